"""The GRPO and DPO trainers under 2 CPU processes (torchrun + accelerate, gloo). GRPO: groups are gathered across
processes before normalisation (step 0: exactly the normalisation of all groups, on the same samples a 1-process run
draws), and both processes end with identical LoRA weights (gradients averaged through accelerate). DPO: every process
labels the same gathered scores, trains its own groups' pairs with each pair weighted 1/N of the step's pairs (the loss
is the mean over all processes' pairs) and the noise of the pair's global index, so 2 processes train what 1 does;
policy and reference adapters stay bit-identical across processes."""
import math, os, subprocess, sys
from pathlib import Path
import torch
from apex_nb.core import group_ids_for
from apex_nb.dpo import all_pairs
from apex_nb.normalize import get_normalizer

SCRIPT = r"""
import sys, torch
from apex_nb.grpo import GRPOTrainer
from apex_nb.config import make_config
out = sys.argv[1]
t = GRPOTrainer(make_config('tiny-random', steps=2, groups_per_step=2, group_size=3, save_every=0, eval_every=0, out_dir=out + '/run', seed=5))
batches = []
for _ in range(2):
    t.train_step(); batches.append({k: v for k, v in t.last_batch.items()})
lora = {k: v.detach().clone() for k, v in t.lora_state_dict().items()}
torch.save(dict(batches=batches, lora=lora, world=t.acc.num_processes), f"{out}/result-{t.acc.process_index}.pt")
"""


UNEVEN_SCRIPT = r"""
import sys, torch
from apex_nb.grpo import GRPOTrainer
from apex_nb.config import make_config
out = sys.argv[1]
t = GRPOTrainer(make_config('tiny-random', steps=1, groups_per_step=2, group_size=3, save_every=0, eval_every=0, out_dir=out + '/run', seed=5))
traj, _ = t.sample(t.step_prompts(0), 0)
n, K = traj.log_probs.shape[0], len(t.names)
g = torch.Generator().manual_seed(3)
A, C = torch.randn(6, generator=g), torch.randn(6, K, generator=g)
mine = slice(t.acc.process_index * n, (t.acc.process_index + 1) * n)
keeps = dict(uneven=torch.tensor([1, 1, 1, 1, 0, 0]), one_side=torch.tensor([1, 1, 1, 0, 0, 0]), none=torch.zeros(6))
res = {name: {k: v for k, v in t.update(traj, A[mine], C[mine], conflicts=True, train_mask=keep.bool()[mine]).items()
              if k in ('loss', 'pg_loss', 'kl', 'grad_norm', 'cos', 'skipped_update')} for name, keep in keeps.items()}
torch.save(dict(res=res, world=t.acc.num_processes, lora={k: v.detach().clone() for k, v in t.lora_state_dict().items()}),
           f"{out}/result-{t.acc.process_index}.pt")
"""


DPO_SCRIPT = r"""
import sys, torch
from apex_nb.dpo import DPOTrainer, make_dpo_config, adapter_params
out = sys.argv[1]
t = DPOTrainer(make_dpo_config('tiny-random', steps=2, pairs='all', reference='ref', ref_update_every=1, save_every=0, eval_every=0,
                               out_dir=out + '/run', seed=1))
update, mine = t.dpo_update, []
def spy(batch, step):                     # the pairs this process trains: their global indices (noise seeds) and count
    mine.append(dict(pair_ids=batch['pair_ids'].clone(), n=len(batch['x_w']))); return update(batch, step)
t.dpo_update = spy
steps = []
for step in range(2):
    prompts = t.step_prompts(step)        # this process's slice of the step's prompts
    rec = t.train_step()
    steps.append(dict(t.last_batch, prompts=prompts, loss=rec['loss'], grad_norm=rec['grad_norm'], **mine[-1]))
tr = t.pipe.transformer
adapters = {a: {n: p.detach().clone() for n, p in adapter_params(tr, a).items()} for a in ('default', 'ref')}
torch.save(dict(steps=steps, adapters=adapters, world=t.acc.num_processes), f"{out}/result-{t.acc.process_index}.pt")
"""


def run(cmd, out):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd + [str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def one_and_two_processes(tmp_path, source: str, port: int):
    "Run `source` as 1 process and with torchrun as 2; the result of the one, and of each of the two."
    script = tmp_path / "train.py"; script.write_text(source)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(); two.mkdir()
    run([sys.executable, str(script)], one)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(script)], two)
    return torch.load(one / "result-0.pt", weights_only=False), [torch.load(two / f"result-{i}.pt", weights_only=False) for i in (0, 1)]


def test_two_processes_match_one(tmp_path):
    r1, r2 = one_and_two_processes(tmp_path, SCRIPT, 29517)
    assert (r1["world"], r2[0]["world"]) == (1, 2)
    for step in range(2):
        b1, b2 = r1["batches"][step], r2[0]["batches"][step]
        assert b1["prompts"] == b2["prompts"]                               # same prompts, gathered in order
        if step == 0:   # the same samples from the same weights: images agree to float rounding (batch layout changes BLAS blocking)
            assert torch.allclose(b1["rewards"], b2["rewards"], rtol=1e-3, atol=1e-4), (b1["rewards"] - b2["rewards"]).abs().max()
        assert torch.equal(b2["advantages"], r2[1]["batches"][step]["advantages"])   # every process holds the same advantages
    # step 0 (fresh normaliser state): the 2-process advantages are exactly the normalisation of *all* gathered groups …
    R, A = r2[0]["batches"][0]["rewards"], r2[0]["batches"][0]["advantages"]
    g = group_ids_for([3, 3])
    w = torch.full((4,), 0.25)
    assert torch.allclose(A, get_normalizer("apex")(R, g, w).advantages.clamp(-5, 5), atol=1e-6)
    # … not of each process's own group, which would differ by O(1)
    per_process = torch.cat([get_normalizer("apex")(R[i:i + 3], torch.zeros(3, dtype=torch.long), w).advantages for i in (0, 3)])
    assert (per_process - A).abs().max() > 0.1
    assert len(r2[0]["lora"]) > 0
    for k in r2[0]["lora"]:                                                # the processes stay in sync: gradients averaged
        assert torch.equal(r2[0]["lora"][k], r2[1]["lora"][k]), k


def test_grpo_uneven_samples(tmp_path):
    """Processes may keep different numbers of samples (groups without signal leave the loss): each kept sample weighs
    1/(all processes' kept samples), so 2 processes give the 1-process loss and gradient; a process with nothing to train
    still joins every reduce (it used to return early and leave the other waiting); with nothing kept anywhere, no step."""
    r1, r2 = one_and_two_processes(tmp_path, UNEVEN_SCRIPT, 29519)
    assert (r1["world"], r2[0]["world"]) == (1, 2)
    for case in ("uneven", "one_side"):                       # 4 = 3 + 1 kept samples; 3 = 3 + 0
        one, two = r1["res"][case], r2[0]["res"][case]
        for k in ("loss", "pg_loss", "kl", "grad_norm"):       # the means over all kept samples, as one process computes them
            assert math.isclose(one[k], two[k], rel_tol=1e-3, abs_tol=1e-9), (case, k, one[k], two[k])
            assert two[k] == r2[1]["res"][case][k], (case, k)   # every process logs the same numbers
        assert torch.allclose(one["cos"], two["cos"], atol=1e-3), (case, one["cos"], two["cos"])
    none = r2[0]["res"]["none"]
    assert (none["grad_norm"], none["loss"], none["cos"]) == (0.0, 0.0, None)   # no signal anywhere: no step
    for k in r2[0]["lora"]:                                    # the processes stay in sync
        assert torch.equal(r2[0]["lora"][k], r2[1]["lora"][k]), k


def test_dpo_two_processes(tmp_path):
    r1, r2 = one_and_two_processes(tmp_path, DPO_SCRIPT, 29518)
    assert (r1["world"], r2[0]["world"], r2[1]["world"]) == (1, 2, 2)
    pairs = all_pairs(group_ids_for([4, 4]))                                       # tiny-random: 2 groups of 4, one per process
    counts = []
    for step in range(2):
        s1, (a, b) = r1["steps"][step], (r2[i]["steps"][step] for i in (0, 1))
        assert a["prompts"] + b["prompts"] == s1["prompts"]                          # each process its slice of the same draw
        for key in ("rewards", "labels"):                                            # every process holds the same gathered scores and labels
            assert torch.equal(a[key], b[key]), (step, key)
        assert a["n_pairs"] == b["n_pairs"] == s1["n_pairs"] > 0
        # The pairs are split, not duplicated or lost: the processes' pair indices partition 0..N-1, each trains its own
        # groups' pairs, and together as many as one process trains.
        assert torch.equal(torch.cat([a["pair_ids"], b["pair_ids"]]), torch.arange(s1["n_pairs"])), step
        assert a["n"] + b["n"] == a["n_pairs"] == s1["n"], step
        counts.append((a["n"], b["n"]))
        # The same samples as one process: the 2-process weights equal the 1-process ones to float rounding (checked below),
        # so the images agree to rounding; 8-bit quantisation can still move a pixel level, which moves BRISQUE and JPEG
        # size by up to ~1e-3 relative (measured: 8e-4) → rtol 5e-3. A scorer's vote on a pair can only differ between the
        # runs if its 1-process gap is within twice that scorer's largest run-to-run score difference d (exact when d = 0,
        # e.g. OCR reading the same on both), so labels must match on every pair whose votes are all clear of that, and
        # such pairs must be most of them for the check to mean anything.
        R1, R2 = s1["rewards"], a["rewards"]
        assert torch.allclose(R1, R2, rtol=5e-3, atol=1e-6), (step, (R1 - R2).abs().max(0).values)
        d, gap = (R1 - R2).abs().max(0).values, R1[pairs[:, 0]] - R1[pairs[:, 1]]
        clear = ((d == 0) | (gap.abs() > 2 * d)).all(1)
        assert clear.float().mean() >= 0.5, (step, d, gap)
        assert torch.equal(s1["labels"][clear], a["labels"][clear]), (step, s1["labels"], a["labels"], clear)
        # The loss is finite and, with the reference re-copied after every step, exactly log 2 (policy = reference); every
        # process logs the same global loss and gradient norm, and that norm is the 1-process one: each pair weighs 1/N
        # wherever it lives (weighting each process's mean equally gave a 3e-3 relative difference with 6 vs 3 pairs).
        assert math.isfinite(a["loss"]) and a["loss"] == b["loss"] and abs(a["loss"] - math.log(2)) < 1e-5
        assert a["grad_norm"] == b["grad_norm"] and math.isclose(a["grad_norm"], s1["grad_norm"], rel_tol=1e-4), (step, a["grad_norm"], s1["grad_norm"])
    assert any(x != y for x, y in counts), counts                                      # unequal shares exercised (seed 1, step 0: 6 vs 3)
    for adapter in ("default", "ref"):                                                 # policy and reference: bit-identical on both processes
        p0, p1 = r2[0]["adapters"][adapter], r2[1]["adapters"][adapter]
        assert p0.keys() == p1.keys() and len(p0) > 0
        for k in p0: assert torch.equal(p0[k], p1[k]), (adapter, k)
        # the same training as one process, to float rounding (a step on other noise or weights moves entries by ~lr = 3e-4)
        for k in p0: assert torch.allclose(p0[k], r1["adapters"][adapter][k], rtol=0, atol=1e-5), (adapter, k)
    for k in r2[0]["adapters"]["default"]:                                             # ref_update_every=1: the reference is the final policy
        assert torch.equal(r2[0]["adapters"]["ref"][k], r2[0]["adapters"]["default"][k].to(r2[0]["adapters"]["ref"][k].dtype)), k
