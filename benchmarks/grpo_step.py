"""GRPO speed targets (issue 6, issue 15 item 5), measured side by side in one run:
(a) our SDE sampler (noise 0.7, with log-probs) vs the diffusers pipeline, same prompts/steps/size   — target ≤ 0.95×
(b) APEX bookkeeping (normalise + shares + priorities) as a fraction of a whole tiny-random training step — target ≤ 1%
(c) on `tiny-cpu` (K=4 objectives, 8 samples, 3 training timesteps): the gradient-conflict diagnostic, exact on every
    sample of the diagnosed timesteps, as wall time added to `GRPOTrainer.update`, in % of a whole default step
    (sampling + scoring + update, without the diagnostic) — goal ≤ 10% — for the default `conflict_timesteps=1` and for
    all training timesteps (0). Two exact ways in the same update: the trainer's (`LinearObjectiveGrads`, one extra
    backward per chunk and diagnosed timestep) and, beside it, `gradient_conflicts`' 'loop' (K backward passes per chunk
    through the same forward: `objective_jacobian` of `surrogate_losses`). Each round runs a default step and the three
    updates (on one trajectory) in turns, so that machine noise hits all alike; medians over rounds of (with − without)
    and of (with − without) / that round's step.
Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/grpo_step.py"""
import contextlib, statistics, tempfile, time
from pathlib import Path
import torch
import apex_nb.grpo as grpo
from apex_nb.grpo import GRPOTrainer
from apex_nb.config import make_config
from apex_nb.sd3 import sample_with_logprob, tiny_sd3_pipeline
from apex_nb.diagnostics import objective_jacobian, surrogate_losses

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

def step_records(preset, steps=7, **overrides):
    "A trainer of `preset` and the records of `steps` steps after a first one (which pays one-off costs)."
    tr = GRPOTrainer(make_config(preset, steps=steps + 1, out_dir=str(Path(tempfile.mkdtemp()) / 'run'), save_every=0, eval_every=0, **overrides))
    return tr, [tr.train_step() for _ in range(steps + 1)][1:]

class LoopJacobian:
    "Stands in for `LinearObjectiveGrads` in `update`: the same K×P matrix by `gradient_conflicts`' 'loop' (K backward passes)."
    def __init__(self, model, params, n_objectives):
        self.params = list(params)
        self.J = torch.zeros(n_objectives, sum(p.numel() for p in self.params), device=self.params[0].device)
    def capture(self): return contextlib.nullcontext()
    def accumulate(self, f, weights):
        self.J += objective_jacobian(surrogate_losses(f, weights * len(f)), self.params, 'loop', retain_graph=True)   # = weightsᵀ f
    def __enter__(self): return self
    def __exit__(self, *exc): pass

def diagnostic_overhead(tr, conflict_timesteps: int, rounds: int = 7) -> dict:
    """Per round: a whole default step (no diagnostic), then `update` on one trajectory without a diagnostic, with the
    trainer's and with 'loop'. Medians over rounds of the added seconds, of the added share of that round's step, and of
    time/diag."""
    tr.cfg.conflict_timesteps = conflict_timesteps
    traj, _ = tr.sample(tr.step_prompts(0), 0)
    n, k = traj.latents.shape[0], len(tr.names)
    g = torch.Generator().manual_seed(0)
    A, C = torch.randn(n, generator=g), torch.randn(n, k, generator=g)
    def timed(conflicts, loop=False):
        with _patched(grpo, 'LinearObjectiveGrads', LoopJacobian) if loop else contextlib.nullcontext():
            t0 = time.perf_counter(); upd = tr.update(traj, A, C, conflicts=conflicts); return time.perf_counter() - t0, upd
    timed(False); timed(True); timed(True, loop=True)   # warm-up
    rec = {key: [] for key in ('step', 'per-sample', 'loop', 'diag')}
    for _ in range(rounds):
        rec['step'].append(tr.train_step()['time/step'])           # conflict_every=0: a default step without the diagnostic
        base = timed(False)[0]
        t, upd = timed(True); rec['per-sample'].append(t - base); rec['diag'].append(upd['diag_seconds'])
        rec['loop'].append(timed(True, loop=True)[0] - base)
    med = lambda xs: statistics.median(xs)
    share = {key: med([a / s for a, s in zip(rec[key], rec['step'])]) for key in ('per-sample', 'loop')}
    return {key: med(v) for key, v in rec.items()} | {f'{key} share': v for key, v in share.items()} | \
           dict(path=upd['diag_path'], timesteps=tr.diagnosed_timesteps())

@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name); setattr(obj, name, value)
    try: yield
    finally: setattr(obj, name, old)

if __name__ == '__main__':
    prompts = ['a sign that says "CAT"'] * 8
    ours, theirs = sampler_ratio(prompts)
    print(f"(a) sampler, 8 images × 10 steps at 64 px: ours (SDE + log-probs) {ours*1e3:.1f} ms vs diffusers pipeline {theirs*1e3:.1f} ms → {ours/theirs:.2f}× (target ≤ 0.95×)")
    _, random_steps = step_records('tiny-random', conflict_every=0)
    bookkeeping = statistics.median(r['time/balance'] + r['time/priorities'] for r in random_steps)
    step_random = statistics.median(r['time/step'] for r in random_steps)
    print(f"(b) APEX bookkeeping (normalise + shares + priorities): {bookkeeping*1e3:.2f} ms of a {step_random*1e3:.0f} ms tiny-random step → {bookkeeping/step_random:.2%} (target ≤ 1%)")

    tr = GRPOTrainer(make_config('tiny-cpu', steps=100, conflict_every=0, out_dir=str(Path(tempfile.mkdtemp()) / 'run'), save_every=0, eval_every=0))
    tr.train_step()                                                 # the first step pays one-off costs
    print(f"(c) tiny-cpu (K={len(tr.names)}, {tr.cfg.group_size * tr.cfg.groups_per_step} samples × CFG, {len(tr.train_timesteps())} training timesteps, 1 chunk):")
    for ct in (1, 0):
        r = diagnostic_overhead(tr, ct)
        label = f"conflict_timesteps={ct} ({'default; ' if ct == 1 else ''}diagnosed timesteps {r['timesteps']})"
        print(f"    {label}, default step without the diagnostic {r['step']*1e3:.0f} ms:")
        print(f"      exact on all samples, {r['path']} (1 extra backward per timestep): +{r['per-sample']*1e3:.0f} ms → "
              f"+{r['per-sample share']:.1%} of a step (goal ≤ 10%; time/diag {r['diag']*1e3:.0f} ms)")
        print(f"      beside it, exact full-batch by gradient_conflicts' 'loop' ({len(tr.names)} backward passes per timestep): "
              f"+{r['loop']*1e3:.0f} ms → +{r['loop share']:.1%} of a step")
