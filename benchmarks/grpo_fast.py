"""Fast GRPO on apex-tiny (issue 17, item 6), side by side in one run.

(a) Step wall time of today's `tiny-cpu` loop against SDE windows of 1 and 2 steps, scoring overlapped with sampling,
    and CFG-free training, each with the transformer passes (NFE) per image for sampling and for training, and the
    mean OCR reward of the training samples (what GRPO learns from; the full SDE starves it). The trainers step in
    turns (round robin), so machine noise hits all alike; medians over rounds. Goal: fast ≤ 0.5× today's step.
(b) Learning per wall-second: `tiny-cpu` and `tiny-cpu-fast`, 3 seeds each, every run given the same wall-time budget
    (two runs at a time, one torch thread each), evaluated before and after on the same fixed samples (the 8 sign
    prompts × 4 deterministic ODE samples). Gain per objective = change of the eval mean in units of the eval set's
    typical within-prompt spread at the start (the same unit for every run: same model, same samples, same seeds).

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/grpo_fast.py [--rounds 6] [--budget 150] [--seeds 3] [--skip-learning] [--skip-steps]"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import torch

sys.stdout.reconfigure(line_buffering=True)   # lines appear as they are measured, also into a file

SETTINGS = {   # label: overrides of the tiny-cpu preset
    "today (tiny-cpu)": {},
    "today + OCR on 2 cores": dict(reward_options={"ocr": {"psm": 7, "workers": 2}}),
    "window 1": dict(sde_window=1),
    "window 2": dict(sde_window=2),
    "window 1 + overlap": dict(sde_window=1, sample_batch_size=4, score_workers=2),
    "window 1 + overlap + CFG-free": dict(sde_window=1, sample_batch_size=4, score_workers=2, train_cfg=False),
    "window 1 + CFG-free + 2 updates": dict(sde_window=1, train_cfg=False, updates_per_batch=2),
    "tiny-cpu-fast (+ OCR on 2 cores, conflicts every 2nd step)": "tiny-cpu-fast",
}
FAST = "tiny-cpu-fast (+ OCR on 2 cores, conflicts every 2nd step)"
EVAL_REPEATS = 4


def make(setting, out, **kw):
    from apex_nb.grpo import GRPOTrainer
    from apex_nb.config import make_config
    preset, over = (setting, {}) if isinstance(setting, str) else ("tiny-cpu", setting)
    return GRPOTrainer(make_config(preset, **over, **kw, out_dir=str(out), eval_every=0, save_every=0, steps=10_000))


def nfe(c) -> tuple[int, int]:
    "Transformer passes per image in one step: sampling, and training (policy + reference, first pass only counted once per epoch)."
    cfg = 2 if c.guidance_scale > 1 else 1
    trained = c.sde_window or max(1, int(c.sample_steps * c.timestep_fraction))
    per = (2 if c.train_cfg and c.guidance_scale > 1 else 1) * (2 if c.kl_beta > 0 else 1)
    return c.sample_steps * cfg, trained * per * c.inner_epochs


def step_times(rounds: int):
    root = Path(tempfile.mkdtemp())
    trainers = {label: make(s, root / str(i)) for i, (label, s) in enumerate(SETTINGS.items())}
    for t in trainers.values(): t.train_step()                       # warm-up: one-off costs
    times, ocr = {k: [] for k in trainers}, {k: [] for k in trainers}
    for _ in range(rounds):
        for label, t in trainers.items():
            rec = t.train_step(); times[label].append(rec["time/step"]); ocr[label].append(rec["raw_mean/ocr"])
    base = statistics.median(times["today (tiny-cpu)"])
    print(f"(a) step wall time on tiny-cpu (K=4, 8 samples, 4 sampling steps), median of {rounds} rounds, round robin")
    print(f"    {'setting':60s} {'step s':>7s} {'× today':>8s} {'NFE sample':>10s} {'NFE train':>9s} {'train OCR':>9s}")
    for label, t in trainers.items():
        m = statistics.median(times[label]); s, tr = nfe(t.cfg)
        print(f"    {label:60s} {m:7.2f} {m / base:8.2f} {s:10d} {tr:9d} {statistics.mean(ocr[label]):9.3f}")
    return {label: statistics.median(v) / base for label, v in times.items()}


def eval_rewards(t) -> torch.Tensor:
    "Rewards N×K of the fixed eval samples: the 8 sign prompts × EVAL_REPEATS deterministic (ODE) samples, seeds fixed."
    from apex_nb.trainer import SeedStream, step_seed
    from apex_nb.rewards import load_prompts
    prompts = [p for p in load_prompts("apex-tiny-signs") for _ in range(EVAL_REPEATS)]
    gens = [torch.Generator().manual_seed(step_seed(1234, 0, SeedStream.EVAL, i)) for i in range(len(prompts))]
    with torch.no_grad(): traj = t.sample_batches(prompts, gens, t.cfg.eval_sample_steps, 0.0)
    return t.score(traj.images, prompts, -1)


def learn_one(setting: str, seed: int, budget: float, out: str):
    "One run: eval, train until the wall-time budget is spent, eval again; writes a JSON summary."
    torch.set_num_threads(1)
    t = make(SETTINGS[setting], Path(out) / "run", seed=seed)
    R0 = eval_rewards(t)
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < budget: t.train_step(); steps += 1
    R1 = eval_rewards(t)
    Path(out, "summary.json").write_text(json.dumps(dict(setting=setting, seed=seed, steps=steps, names=t.names,
                                                         R0=R0.tolist(), R1=R1.tolist())))


def learning(budget: float, seeds: int):
    from apex_nb.core import group_ids_for
    from apex_nb.normalize import typical_group_std
    labels = ["today (tiny-cpu)", FAST]
    root = Path(tempfile.mkdtemp())
    jobs = [(label, s, root / f"{i}-{s}") for s in range(seeds) for i, label in enumerate(labels)]
    running, env = [], dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for label, s, out in jobs:                                         # two at a time, one per core: today's and fast's run of a seed side by side
        out.mkdir()
        running.append(subprocess.Popen([sys.executable, __file__, "--learn-one", label, str(s), str(budget), str(out)], env=env))
        if len(running) == 2: [p.wait() for p in running]; running = []
    [p.wait() for p in running]
    rows = [json.loads((out / "summary.json").read_text()) for _, _, out in jobs]
    names = rows[0]["names"]
    g = group_ids_for([EVAL_REPEATS] * (len(rows[0]["R0"]) // EVAL_REPEATS))
    unit = typical_group_std(torch.tensor(rows[0]["R0"], dtype=torch.float64), g).clamp_min(1e-3)   # same start for every run
    print(f"\n(b) learning per wall-second: {budget:.0f} s per run, {seeds} seeds, eval on 8 prompts × {EVAL_REPEATS} fixed ODE samples")
    print(f"    gain = Δ eval mean / start within-prompt spread ({', '.join(f'{n} {u:.3g}' for n, u in zip(names, unit.tolist()))})")
    print(f"    | setting | steps | " + " | ".join(names) + " |")
    print("    |---|---|" + "---|" * len(names))
    for label in labels:
        mine = [r for r in rows if r["setting"] == label]
        gains = torch.stack([(torch.tensor(r["R1"]).double().mean(0) - torch.tensor(r["R0"]).double().mean(0)) / unit for r in mine])
        cells = [f"{m:+.2f} ± {s:.2f}" for m, s in zip(gains.mean(0).tolist(), gains.std(0).tolist())]
        print(f"    | {label} | {statistics.mean(r['steps'] for r in mine):.0f} | " + " | ".join(cells) + " |")
    print("    (mean ± sd over seeds)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6); ap.add_argument("--budget", type=float, default=150.0)
    ap.add_argument("--seeds", type=int, default=3); ap.add_argument("--skip-learning", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--learn-one", nargs=4, metavar=("SETTING", "SEED", "BUDGET", "OUT"))
    a = ap.parse_args()
    if a.learn_one: learn_one(a.learn_one[0], int(a.learn_one[1]), float(a.learn_one[2]), a.learn_one[3])
    else:
        if not a.skip_steps:
            ratios = step_times(a.rounds)
            fast = ratios[FAST]
            print(f"    tiny-cpu-fast step = {fast:.2f}× today's → {'PASS' if fast <= 0.5 else 'FAIL'} (goal ≤ 0.5×)")
        if not a.skip_learning: learning(a.budget, a.seeds)
