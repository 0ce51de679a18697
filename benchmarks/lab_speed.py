"""Speed target of the lab (issue 4): 300 steps of `apex4` with the full APEX loop (apex normalisation, P³, gradient
conflicts every step, K=4) in under 1 s on one core. Measured side by side with the bare loop (static sum, no conflict
diagnostics) in the same run; prints the times and the ratios.  Run: .venv/bin/python benchmarks/lab_speed.py"""
import statistics, time
import torch
from apex_nb.lab import run_lab

torch.set_num_threads(1)   # one core, as the target says
BUDGET_S, STEPS, REPEATS = 1.0, 300, 5

def timed(**kw) -> float:
    times = []
    for seed in range(REPEATS):
        t0 = time.perf_counter(); run_lab('apex4', steps=STEPS, seed=seed, **kw); times.append(time.perf_counter() - t0)
    return statistics.median(times)

run_lab('apex4', steps=10)  # warm-up (imports, allocator)
full = timed(method='apex', scheduler='p3', conflict_every=1)
bare = timed(method='static', scheduler='static', conflict_every=0)
print(f"full APEX loop, {STEPS} steps: {full:.3f} s  (median of {REPEATS}; budget {BUDGET_S:.1f} s → {full / BUDGET_S:.2f} of budget)")
print(f"bare static loop, no diagnostics: {bare:.3f} s  (APEX machinery costs {full / bare:.2f}× the bare loop)")
print("PASS" if full < BUDGET_S else "FAIL: over budget")
