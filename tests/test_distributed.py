"""The GRPO trainer under 2 CPU processes (torchrun + accelerate, gloo): groups are gathered across processes before
normalisation (step 0: exactly the normalisation of all groups, on the same samples a 1-process run draws), and both
processes end with identical LoRA weights (gradients averaged through accelerate)."""
import os, subprocess, sys
from pathlib import Path
import torch
from apex_nb.core import group_ids_for
from apex_nb.normalize import get_normalizer

SCRIPT = r"""
import sys, torch
from apex_nb.grpo import GRPOTrainer, make_config
out = sys.argv[1]
t = GRPOTrainer(make_config('tiny-random', steps=2, groups_per_step=2, group_size=3, save_every=0, eval_every=0, out_dir=out + '/run', seed=5))
batches = []
for _ in range(2):
    t.train_step(); batches.append({k: v for k, v in t.last_batch.items()})
lora = {k: v.detach().clone() for k, v in t.lora_state_dict().items()}
torch.save(dict(batches=batches, lora=lora, world=t.acc.num_processes), f"{out}/result-{t.acc.process_index}.pt")
"""


def run(cmd, out):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd + [str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_two_processes_match_one(tmp_path):
    script = tmp_path / "train.py"; script.write_text(SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(); two.mkdir()
    run([sys.executable, str(script)], one)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", str(script)], two)
    r1 = torch.load(one / "result-0.pt", weights_only=False)
    r2 = [torch.load(two / f"result-{i}.pt", weights_only=False) for i in (0, 1)]
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
