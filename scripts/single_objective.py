"""Does GRPO raise one objective trained alone on apex-tiny? (issue 19.3) One run per seed: the base model and the trained
LoRA are evaluated on the same 32 fixed deterministic samples (the preset's 8 eval prompts × 4) at 4 denoising steps (the
training discretisation) and at 8 (the preset's eval); the gain is in start within-prompt spreads (`eval_start`).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python scripts/single_objective.py colorfulness --steps 30 --seeds 0,1,2,3
    python scripts/single_objective.py ocr --seeds 0,1 --extra '{"reward_options": {"ocr": {"psm": 7, "ink_below": 140, "min_side": 256}}}'

One JSON line per seed (about 2.5 min a run on one core)."""
import argparse, json, tempfile, time
import torch
from apex_nb.config import make_config
from apex_nb.grpo import GRPOTrainer
from apex_nb.trainer import step_seed, SeedStream, eval_start

def eval_rewards(tr, n_steps: int):
    "The objective's rewards of the fixed eval samples drawn with `n_steps` ODE steps, and their prompt index."
    c = tr.cfg
    prompts = [p for p in tr.eval_prompts for _ in range(c.eval_repeats)]
    groups = torch.tensor([i for i in range(len(tr.eval_prompts)) for _ in range(c.eval_repeats)])
    gens = [torch.Generator().manual_seed(step_seed(c.seed, 0, SeedStream.EVAL, i)) for i in range(len(prompts))]
    with torch.no_grad(): traj = tr.sample_batches(prompts, gens, n_steps, 0.0)
    return tr.score(traj.images, prompts, tr.step).double()[:, 0], groups

def run(objective: str, steps: int, seed: int, preset: str, extra: dict) -> dict:
    cfg = make_config(preset, objectives=objective, method='static', scheduler='static', steps=steps, seed=seed, eval_every=0,
                      out_dir=tempfile.mkdtemp(prefix=f'single-{objective}-{seed}-'), **extra)
    tr, t0 = GRPOTrainer(cfg), time.time()
    start = {n: eval_rewards(tr, n) for n in (4, 8)}
    while tr.step < steps: tr.train_step()
    out = dict(objective=objective, seed=seed, steps=steps, preset=preset, extra=extra, seconds=round(time.time() - t0))
    for n in (4, 8):
        (r0, groups), (r1, _) = start[n], eval_rewards(tr, n)
        mu0, s0 = eval_start(r0[:, None], groups)
        out[f'eval{n}'] = dict(start=round(float(mu0), 4), end=round(float(r1.mean()), 4), gain=round(float((r1.mean() - mu0) / s0), 3))
    return out

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('objective'); ap.add_argument('--steps', type=int, default=30); ap.add_argument('--seeds', default='0,1,2,3')
    ap.add_argument('--preset', default='tiny-cpu-fast'); ap.add_argument('--extra', default='{}', help='JSON: other config fields')
    a = ap.parse_args()
    torch.set_num_threads(1)
    for seed in map(int, a.seeds.split(',')): print(json.dumps(run(a.objective, a.steps, seed, a.preset, json.loads(a.extra))), flush=True)
