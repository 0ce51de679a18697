"""GRPO speed targets (issue 6), measured side by side in one run on the tiny-random preset:
(a) our SDE sampler (noise 0.7, with log-probs) vs the diffusers pipeline, same prompts/steps/size   — target ≤ 0.95×
(b) APEX bookkeeping (normalise + shares + priorities) as a fraction of a whole training step       — target ≤ 1%
(c) the gradient-conflict diagnostic (K=4, default: first training timestep, all LoRA params) as added wall time of a
    whole default step (sampling + scoring + update) — goal ≤ 10% — with the exact full-batch cost (all training
    timesteps) beside it.
Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/grpo_step.py"""
import statistics, tempfile, time
from pathlib import Path
import torch
from apex_nb.grpo import GRPOTrainer, make_config
from apex_nb.sd3 import sample_with_logprob, step_log_prob, tiny_sd3_pipeline
from apex_nb.diagnostics import gradient_conflicts

def median_time(fn, repeats=7):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)

def sampler_ratio(prompts, steps=10):
    pipe = tiny_sd3_pipeline(0)
    ours = lambda: sample_with_logprob(pipe, prompts, steps, 4.5, 0.7, 64, 64, torch.Generator().manual_seed(0))
    theirs = lambda: pipe(prompts, num_inference_steps=steps, guidance_scale=4.5, height=64, width=64, max_sequence_length=32,
                          generator=torch.Generator().manual_seed(0), output_type='pt')
    ours(); theirs()   # warm-up
    # interleave so that machine noise hits both alike
    t_ours, t_theirs = [], []
    for _ in range(7):
        t_ours.append(median_time(ours, 1)); t_theirs.append(median_time(theirs, 1))
    return statistics.median(t_ours), statistics.median(t_theirs)

def step_times(conflict_every, steps=8):
    out = Path(tempfile.mkdtemp()) / 'run'
    tr = GRPOTrainer(make_config('tiny-random', steps=steps, conflict_every=conflict_every, out_dir=str(out), save_every=0, eval_every=0))
    recs = [tr.train_step() for _ in range(steps)][1:]   # the first step pays one-off costs
    return tr, recs

def exact_conflict_cost(tr):
    "Time of the exact full-batch Jacobian: all training timesteps, all samples (one extra forward per timestep + K backward)."
    prompts = tr.step_prompts(0)
    traj, _ = tr.sample(prompts, 0)
    C = torch.randn(traj.latents.shape[0], len(tr.names))
    def run():
        f = sum(step_log_prob(tr.pipe.transformer, traj, j, tr.cfg.noise_level).log_prob for j in tr.train_timesteps())
        gradient_conflicts(f, C, tr.params)
    return median_time(run, 3)

if __name__ == '__main__':
    prompts = ['a sign that says "CAT"'] * 8
    ours, theirs = sampler_ratio(prompts)
    print(f"(a) sampler, 8 images × 10 steps at 64 px: ours (SDE + log-probs) {ours*1e3:.1f} ms vs diffusers pipeline {theirs*1e3:.1f} ms → {ours/theirs:.2f}× (target ≤ 0.95×)")
    tr, with_diag = step_times(conflict_every=1)
    _, without = step_times(conflict_every=0)
    step_with = statistics.median(r['time/step'] for r in with_diag); step_without = statistics.median(r['time/step'] for r in without)
    bookkeeping = statistics.median(r['time/balance'] + r['time/priorities'] for r in without)
    diag = statistics.median(r['time/diag'] for r in with_diag)
    print(f"(b) APEX bookkeeping (normalise + shares + priorities): {bookkeeping*1e3:.2f} ms of a {step_without*1e3:.0f} ms step → {bookkeeping/step_without:.2%} (target ≤ 1%)")
    print(f"(c) conflict diagnostic, default (first training timestep, all samples, LoRA): {diag*1e3:.1f} ms; step {step_with*1e3:.0f} ms with vs "
          f"{step_without*1e3:.0f} ms without → +{(step_with - step_without)/step_without:.1%} wall time (goal ≤ 10%)")
    exact = exact_conflict_cost(tr)
    print(f"    exact full-batch Jacobian (all {len(tr.train_timesteps())} training timesteps, own forward passes): {exact*1e3:.1f} ms "
          f"→ {exact/step_without:.1%} of a step")
