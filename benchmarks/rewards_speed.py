"""Reward speed (issue 5): score 16 tiny (64×64) images with ocr + jpeg_compressibility + colorfulness + brisque,
sequentially and in a thread pool, side by side in one run; prints the times, ms per image and the ratios.
Run: .venv/bin/python benchmarks/rewards_speed.py"""
import statistics, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from PIL import Image
from apex_nb.rewards import PROMPT_SETS, get_reward, quoted_text, render_text, score_batch

N, SIZE, REPEATS = 16, 64, 5
NAMES = ('ocr', 'jpeg_compressibility', 'colorfulness', 'brisque')

prompts = PROMPT_SETS['text'][:N]
rng = np.random.default_rng(0)
def image(prompt: str) -> Image.Image:
    "The prompt's word in 10 px text on a 64×64 image, with mild noise (so BRISQUE has texture to judge)."
    x = np.asarray(render_text(quoted_text(prompt), (SIZE, SIZE), font_size=10), dtype=np.float64)
    return Image.fromarray(np.clip(x + rng.normal(0, 8, x.shape), 0, 255).astype(np.uint8))
images = [image(p) for p in prompts]

def timed(rewards, executor=None) -> tuple[float, dict]:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter(); out = score_batch(rewards, images, prompts, executor=executor); times.append(time.perf_counter() - t0)
    return statistics.median(times), out

rewards = {n: get_reward(n).load() for n in NAMES}
score_batch(rewards, images[:2], prompts[:2])   # warm-up (imports, tesseract start-up)
per_reward = {n: timed({n: r})[0] for n, r in rewards.items()}
seq, out = timed(rewards)
with ThreadPoolExecutor(len(NAMES)) as pool: par, out_par = timed(rewards, pool)
fast = {**rewards, 'ocr': get_reward('ocr', workers=2).load()}
with ThreadPoolExecutor(len(NAMES)) as pool: par2, _ = timed(fast, pool)
assert all(np.allclose(out[n].numpy(), out_par[n].numpy()) for n in NAMES)

print(f"{N} images {SIZE}×{SIZE}, objectives {', '.join(NAMES)} (median of {REPEATS})")
for n, t in per_reward.items(): print(f"  {n:22s} alone: {t:6.3f} s  ({1000 * t / N:6.1f} ms/image)")
print(f"sequential                      : {seq:6.3f} s  ({1000 * seq / N:6.1f} ms/image)")
print(f"thread pool (4 threads)         : {par:6.3f} s  ({1000 * par / N:6.1f} ms/image)  sequential/pool = {seq / par:.2f}×")
print(f"thread pool + ocr workers=2     : {par2:6.3f} s  ({1000 * par2 / N:6.1f} ms/image)  sequential/this = {seq / par2:.2f}×")
print("mean scores:", {n: round(float(v.mean()), 3) for n, v in out.items()})
