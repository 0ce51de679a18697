"""A GPU check for users (issue 14 item 4): `make gpu-check` (extra flags through GPU_CHECK_ARGS="...").

On a CUDA machine: 2 steps of GRPO on each SD3.5 architecture twin (bf16 weights, bf16 autocast, gradient checkpointing,
grad_accum 2, gradient-conflict diagnostics on), 2 GRPO steps with the `upgrad` aggregator and 2 DPO steps on the M twin
(≈ 1 minute together), then 2 steps of the `sd35m-1gpu` preset on the real SD3.5-Medium when its weights are on this machine
(HF cache, or a folder given by --model) or downloadable (only when HF_HUB_OFFLINE is not set). The real case refuses to start
when the GPU has less free memory than the memory plan predicts (benchmarks/sd35m_memory_plan.py `plan(cfg)`), instead of
running out of memory after loading for 20 minutes.

Per case the table shows: the time of the first and of the last step, the peak GPU memory of the case
(torch.cuda.max_memory_allocated, reset before it) against the plan's prediction, the PPO ratio at the first training
timestep of step 0 (`ratio_first`, 1 on-policy up to bf16 rounding), whether the saved LoRA checkpoint reloads with diffusers'
`load_lora_weights` bit-exactly (trained LoRA = file = reloaded adapter, tensor by tensor, dtype included), and PASS/FAIL.
A case passes when it runs, every step has a finite loss and gradient norm and no skipped update, |ratio_first − 1| ≤ the
tolerance (--ratio-tol), the LoRA reloads bit-exactly, and (on CUDA, with a plan) the peak stays within the prediction + 10%.
A case that raises is a FAIL with the error's first line; the script goes on. Exit code 1 if any case failed, else 0.

Without a CUDA device (and no --device cpu) it says so and exits 0. `--device cpu` runs the twin cases on the CPU (smaller
groups, so that the script itself is tested in `make test`: tests/test_gpu_check.py) and skips the real model.

Run: .venv/bin/python benchmarks/gpu_check.py [--device cuda|cpu] [--model PATH_OR_HUB_ID] [--skip-real] [--steps 2]
"""
from __future__ import annotations
import argparse, gc, importlib.util, math, os, shutil, sys, tempfile, time, warnings
from dataclasses import dataclass, field
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]
PLAN_SCRIPT = ROOT / 'benchmarks' / 'sd35m_memory_plan.py'
DEFAULT_MODEL = 'stabilityai/stable-diffusion-3.5-medium'
NO_CUDA = "no CUDA device: nothing to check on a GPU here; the CPU twins run in `make test`"
GiB = 2 ** 30
MEMORY_SLACK = 1.10          # a case fails when its peak exceeds the plan's prediction by more than 10%
# SD3.5-M's weights as the trainer holds them (transformer + CLIP-L + CLIP-G + T5-XXL in bf16, the VAE in float32), from the
# exact parameter counts of benchmarks/sd35m_memory_plan.py: the least a GPU must hold when the plan itself is unavailable.
SD35M_WEIGHT_BYTES = (2_469_663_936 + 123_650_304 + 694_659_840 + 4_762_310_656) * 2 + 83_819_683 * 4

# What every twin case shares (the brief of issue 14): bf16 as on the GPU, checkpointing, two micro-batches, fresh out_dir.
TWIN = dict(resolution=64, max_sequence_length=16, dtype='bfloat16', mixed_precision='bf16', gradient_checkpointing=True,
            grad_accum=2, prompts='text', objectives='jpeg_compressibility:1,colorfulness:1', eval_every=0, save_every=0)
SIZES = dict(cuda=dict(group_size=4, groups_per_step=2, sample_steps=4),
             cpu=dict(group_size=2, groups_per_step=2, sample_steps=2))   # --device cpu: the script's own test, kept short


@dataclass
class Case:
    name: str
    method: str                       # grpo | dpo
    preset: str
    overrides: dict
    real: bool = False


@dataclass
class Row:
    case: str
    status: str = 'FAIL'
    t_first: float | None = None      # seconds of step 0 (pays the one-off costs)
    t_last: float | None = None       # seconds of the last step
    peak: int | None = None           # bytes, torch.cuda.max_memory_allocated over the case
    plan: int | None = None           # bytes, the memory plan's prediction
    ratio: float | None = None        # ratio_first of step 0 (GRPO)
    reload: str = '-'
    note: str = ''
    problems: list = field(default_factory=list)   # what makes the case FAIL
    infos: list = field(default_factory=list)      # worth knowing, not a failure


def twin_cases(device: str, steps: int) -> list[Case]:
    base = dict(TWIN, **SIZES['cpu' if device == 'cpu' else 'cuda'], device=device, steps=steps)
    grpo = dict(base, conflict_every=1)
    return [Case('GRPO sd35m-twin', 'grpo', 'tiny-random', dict(grpo, model='sd35m-twin')),
            Case('GRPO sd35l-twin', 'grpo', 'tiny-random', dict(grpo, model='sd35l-twin')),
            Case('GRPO upgrad sd35m-twin', 'grpo', 'tiny-random', dict(grpo, model='sd35m-twin', aggregator='upgrad')),
            # score_sum labels every pair that is not an exact tie: the small groups always train (majority of two scorers may not)
            Case('DPO sd35m-twin', 'dpo', 'tiny-random', dict(base, model='sd35m-twin', labeler='score_sum'))]


def real_case(model: str, steps: int) -> Case:
    return Case('GRPO sd35m-1gpu (real)', 'grpo', 'sd35m-1gpu', dict(model=model, steps=steps, eval_every=0, save_every=0), real=True)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------- the memory plan (optional)
def load_plan():
    "`plan(cfg, num_processes=1) -> {phase: peak bytes}` of benchmarks/sd35m_memory_plan.py, or None if it has none (or fails to import)."
    if not PLAN_SCRIPT.exists(): return None
    try:
        spec = importlib.util.spec_from_file_location('sd35m_memory_plan', PLAN_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:
        print(f"memory plan: cannot import {PLAN_SCRIPT.name} ({first_line(e)}); the prediction column shows n/a")
        return None
    return getattr(module, 'plan', None)


def predicted_peak(plan_fn, cfg) -> tuple[int | None, str]:
    "The largest per-phase peak (bytes) the plan predicts for `cfg` on one process, or None and why (no plan, or it cannot plan `cfg`)."
    if plan_fn is None: return None, ''
    try: phases = plan_fn(cfg, num_processes=1)
    except Exception as e: return None, f"memory plan failed: {first_line(e)}"
    if isinstance(phases, (int, float)) and not isinstance(phases, bool): return int(phases), ''
    values = [v for v in (phases or {}).values() if isinstance(v, (int, float)) and not isinstance(v, bool)] if isinstance(phases, dict) else []
    return (int(max(values)), '') if values else (None, f"memory plan returned no byte counts ({type(phases).__name__})")


# ---------------------------------------------------------------- one case
def lora_reload(trainer, folder: Path) -> tuple[str, str]:
    """('yes', note) when the checkpoint's LoRA reloads with diffusers' `load_lora_weights` bit-exactly: the trained adapter equals
    the file (float32), and the adapter diffusers loads (as a new adapter of the trainer's own pipeline: no second copy of the
    model) equals the file tensor by tensor. diffusers (peft) casts a loaded LoRA to its base weights' dtype: then the loaded
    tensors must equal the file's rounded to that dtype, and the note says so. ('no', why) otherwise."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    live = {k: v.detach().cpu() for k, v in trainer.lora_state_dict().items()}
    saved = {k.removeprefix('transformer.'): v for k, v in load_file(folder / 'pytorch_lora_weights.safetensors').items()}
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Already found a `peft_config`')   # the trainer's own adapter(s) are there
        trainer.pipe.load_lora_weights(str(folder), adapter_name='gpu_check_reload')
    loaded = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(trainer.pipe.transformer, adapter_name='gpu_check_reload').items()}
    if not live: return 'no', 'the trainer has no LoRA tensors'
    for what, other in (('file', saved), ('reloaded', loaded)):
        if other.keys() != live.keys():
            return 'no', f"{what} has {len(other)} tensors, the trainer {len(live)} ({len(other.keys() ^ live.keys())} names differ)"
    bad = [k for k in live if saved[k].dtype != live[k].dtype or not torch.equal(saved[k], live[k])]
    if bad: return 'no', f"{len(bad)}/{len(live)} saved tensors differ from the trained ones (first: {bad[0]})"
    bad = [k for k in live if not torch.equal(saved[k].to(loaded[k].dtype), loaded[k])]
    if bad: return 'no', f"{len(bad)}/{len(live)} reloaded tensors differ from the file (first: {bad[0]}, {saved[bad[0]].dtype} -> {loaded[bad[0]].dtype})"
    cast = sorted({str(v.dtype).removeprefix('torch.') for k, v in loaded.items() if v.dtype != saved[k].dtype})
    return 'yes', (f"reloaded as {'/'.join(cast)} (file float32)" if cast else '')


def run_case(case: Case, device: str, plan_fn, ratio_tol: float, log=print) -> Row:
    from apex_nb.dpo import DPOTrainer, make_dpo_config
    from apex_nb.grpo import GRPOTrainer
    from apex_nb.config import make_config
    row, out, trainer = Row(case.name), Path(tempfile.mkdtemp(prefix='gpu-check-')), None
    cuda = device.startswith('cuda')
    try:
        make, Trainer = (make_config, GRPOTrainer) if case.method == 'grpo' else (make_dpo_config, DPOTrainer)
        cfg = make(case.preset, **case.overrides, out_dir=str(out / 'run'))
        row.plan, why = predicted_peak(plan_fn, cfg)
        if why and case.real: row.infos.append(why)
        if case.real and not check_free_memory(row, cfg, log): return row
        if cuda: free_gpu(); torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(cfg)
        recs = []
        for _ in range(cfg.steps):
            recs.append(trainer.train_step())
            log(f"  {case.name}: step {recs[-1]['step']} in {recs[-1]['time/step']:.2f} s")
        if cuda: torch.cuda.synchronize(); row.peak = torch.cuda.max_memory_allocated()
        row.t_first, row.t_last = recs[0]['time/step'], recs[-1]['time/step']
        if 'ratio_first' in recs[0]: row.ratio = recs[0]['ratio_first']
        for r in recs:
            for k in ('loss', 'grad_norm'):
                if not math.isfinite(r[k]): row.problems.append(f"step {r['step']}: {k} {r[k]}")
            if r.get('skipped_update'): row.problems.append(f"step {r['step']}: update skipped")
            if r.get('pairs') == 0: row.problems.append(f"step {r['step']}: no decisive pair (nothing trained)")
        if row.ratio is not None and math.isnan(row.ratio):
            row.problems.append("step 0 trained no sample (every group had zero reward spread): no ratio to check")
        elif row.ratio is not None and not abs(row.ratio - 1) <= ratio_tol:
            row.problems.append(f"ratio_first {row.ratio:.7f} is not 1 ± {ratio_tol:g}")
        if recs[0].get('clip_frac'):   # on-policy ratios beyond the clip range at step 0: bf16 recomputation drift
            row.infos.append(f"step-0 clip_frac {recs[0]['clip_frac']:.3f} (clip_range {cfg.clip_range:g})")
        row.reload, why = lora_reload(trainer, trainer.save_checkpoint())
        if row.reload != 'yes': row.problems.append(f"LoRA reload: {why}")
        elif why: row.infos.append(why)
        if cuda and row.plan and row.peak > row.plan * MEMORY_SLACK:
            row.problems.append(f"peak {row.peak / GiB:.2f} GiB > plan {row.plan / GiB:.2f} GiB + {MEMORY_SLACK - 1:.0%}")
        row.status = 'FAIL' if row.problems else 'PASS'
        row.note = '; '.join(row.problems + row.infos)
    except Exception as e:
        row.status, row.note = 'FAIL', first_line(e)
    finally:
        del trainer
        if cuda: free_gpu()
        shutil.rmtree(out, ignore_errors=True)
    return row


def free_gpu():
    gc.collect(); torch.cuda.empty_cache()


# ---------------------------------------------------------------- the real model
def real_model_available(model: str) -> str | None:
    "None when `model` can be loaded here (a folder, the HF cache, or the hub when online), else why not."
    if Path(model).exists(): return None if (Path(model) / 'model_index.json').exists() else f"{model} has no model_index.json (not a diffusers folder)"
    from huggingface_hub import constants, snapshot_download
    try:
        snapshot_download(model, local_files_only=True, allow_patterns=['model_index.json'])
        return None                                                  # in the HF cache (from_pretrained fetches what may be missing)
    except Exception as e:
        if constants.HF_HUB_OFFLINE:
            return (f"{model!r} is not in the HF cache and HF_HUB_OFFLINE is set ({type(e).__name__}). Download it on a connected machine "
                    f"(`hf download {model}`) and pass the folder with GPU_CHECK_ARGS='--model FOLDER', or run "
                    f"`make gpu-check HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0` to let it download (≈ 20 GB)")
        return None                                                  # online: from_pretrained downloads it


def check_free_memory(row: Row, cfg, log) -> bool:
    "Refuse (FAIL, with the numbers) when the GPU has less free memory than the case needs: before 20 minutes of loading, not after."
    free_gpu()
    free, total = torch.cuda.mem_get_info()
    need, what = (row.plan, 'the memory plan predicts') if row.plan else (SD35M_WEIGHT_BYTES, 'the weights alone take (no memory plan)')
    log(f"  {row.case}: GPU free {free / GiB:.1f} of {total / GiB:.1f} GiB; {what} {need / GiB:.1f} GiB")
    if free < need:
        row.status, row.note = 'FAIL', (f"not started: the GPU has {free / GiB:.1f} GiB free of {total / GiB:.1f} GiB, {what} "
                                        f"{need / GiB:.1f} GiB (free the GPU or use a larger one)")
        return False
    return True


# ---------------------------------------------------------------- the table
COLUMNS = [('case', 24), ('status', 6), ('step0 s', 8), ('step s', 8), ('peak GiB', 9), ('plan GiB', 9), ('ratio0', 10), ('reload', 6)]


def fmt_row(row: Row) -> str:
    num = lambda v, f: '-' if v is None else format(v, f)
    cells = [row.case, row.status, num(row.t_first, '.2f'), num(row.t_last, '.2f'),
             num(None if row.peak is None else row.peak / GiB, '.2f'), 'n/a' if row.plan is None else f"{row.plan / GiB:.2f}",
             num(row.ratio, '.7f'), row.reload]
    line = '  '.join(c[:w].ljust(w) if i < 2 else c.rjust(w) for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS)))
    return line + (f"  {row.note}" if row.note else '')


def print_table(rows: list[Row], device: str):
    header = '  '.join(n.ljust(w) if i < 2 else n.rjust(w) for i, (n, w) in enumerate(COLUMNS)) + '  note'
    print(f"\ngpu-check on {device}: {sum(r.status == 'PASS' for r in rows)} passed, {sum(r.status == 'FAIL' for r in rows)} failed, "
          f"{sum(r.status == 'SKIP' for r in rows)} skipped")
    print(header); print('-' * len(header))
    for r in rows: print(fmt_row(r))


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda', choices=('cuda', 'cpu'),
                   help="cuda (default); cpu runs the twin cases on the CPU (a test of this script) and skips the real model")
    p.add_argument('--model', default=DEFAULT_MODEL, help=f"SD3.5-Medium: a local diffusers folder or a hub id (default {DEFAULT_MODEL})")
    p.add_argument('--skip-real', action='store_true', help="only the twin cases")
    p.add_argument('--steps', type=int, default=2, help="training steps per case (default 2)")
    p.add_argument('--ratio-tol', type=float, default=1e-3, help="largest |ratio_first - 1| that passes (default 1e-3)")
    args = p.parse_args(argv)
    if args.steps < 1: p.error("--steps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    diffusers_logging.set_verbosity_error(); transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar(); transformers_logging.disable_progress_bar()
    warnings.filterwarnings('ignore', category=FutureWarning)
    warnings.filterwarnings('ignore', message='Already found a `peft_config`')   # DPO's reference adapter, the reload check's adapter
    where = torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'
    print(f"gpu-check: {where}, torch {torch.__version__}, {args.steps} steps per case")
    plan_fn = load_plan()
    if plan_fn is None: print("memory plan: benchmarks/sd35m_memory_plan.py has no plan(cfg); the prediction column shows n/a")
    rows, t0 = [], time.perf_counter()
    for case in twin_cases(args.device, args.steps):
        print(f"{case.name} ...", flush=True)
        rows.append(run_case(case, args.device, plan_fn, args.ratio_tol))
        print(fmt_row(rows[-1]), flush=True)
    real = real_case(args.model, args.steps)
    why = ("--skip-real" if args.skip_real else
           "--device cpu: the real model runs only on CUDA" if args.device != 'cuda' else real_model_available(args.model))
    if why: rows.append(Row(real.name, status='SKIP', note=f"skipped: {why}")); print(f"{real.name}: skipped: {why}")
    else:
        print(f"{real.name} ({args.model}) ...", flush=True)
        rows.append(run_case(real, args.device, plan_fn, args.ratio_tol))
        print(fmt_row(rows[-1]), flush=True)
    print_table(rows, where)
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 1 if any(r.status == 'FAIL' for r in rows) else 0


if __name__ == '__main__':
    sys.exit(main())
