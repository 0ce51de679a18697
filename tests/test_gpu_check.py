"""`make gpu-check` (benchmarks/gpu_check.py), tested on the CPU: with `--device cpu --skip-real` every SD3.5 twin case
(GRPO on both twins, GRPO with upgrad, DPO; bf16, checkpointing, grad_accum 2) passes, the PPO ratio at step 0 is 1
(measured exactly 1.0000000 on the CPU), the saved LoRA reloads with diffusers' `load_lora_weights`; without a GPU the
default run says so and exits 0; the real model refuses to start without enough free GPU memory and is skipped, with the
reason, when its weights are not here and the hub is offline."""
import importlib.util, os, re, subprocess, sys
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
TWIN_CASES = ("GRPO sd35m-twin", "GRPO sd35l-twin", "GRPO upgrad sd35m-twin", "DPO sd35m-twin")


def run(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def table(stdout: str) -> dict[str, list[str]]:
    "The final table's rows by case: the cells after the case name (status, step0 s, step s, peak, plan, ratio0, reload, note…)."
    lines = stdout.splitlines()
    start = max(i for i, l in enumerate(lines) if l.startswith("case ") and "status" in l) + 2
    rows = {}
    for line in lines[start:]:
        if not line.strip() or line.startswith("total "): break
        name = line[:24].strip()
        rows[name] = line[24:].split()
    return rows


@pytest.fixture(scope="module")
def module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod                 # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("gpu_check", None)


def test_twins_on_cpu():
    p = run("--device", "cpu", "--skip-real")
    assert p.returncode == 0, p.stdout + p.stderr
    rows = table(p.stdout)
    assert set(TWIN_CASES) <= rows.keys(), p.stdout
    for case in TWIN_CASES:
        status, t0, t1, peak, plan, ratio, reload = rows[case][:7]
        assert status == "PASS", (case, p.stdout)
        assert float(t0) > 0 and float(t1) > 0 and peak == "-"                   # no GPU memory on the CPU
        assert reload == "yes", (case, p.stdout)
        if case.startswith("GRPO"): assert abs(float(ratio) - 1) <= 1e-6, (case, ratio)   # on-policy at step 0
        else: assert ratio == "-"                                                # DPO has no PPO ratio
    real = rows["GRPO sd35m-1gpu (real)"]
    assert real[0] == "SKIP" and "--skip-real" in " ".join(real)
    assert re.search(r"4 passed, 0 failed, 1 skipped", p.stdout), p.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_no_gpu_says_so():
    p = run(timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no CUDA device: nothing to check on a GPU here; the CPU twins run in `make test`" in p.stdout


def test_real_model_refuses_without_free_memory(module, monkeypatch):
    "Checked before loading: the plan's prediction (or the weights alone, without a plan) against the GPU's free memory."
    GiB = module.GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (10 * GiB, 24 * GiB))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    row = module.Row("real", plan=20 * GiB)
    assert not module.check_free_memory(row, None, log=lambda *a: None)
    assert row.status == "FAIL" and "not started" in row.note and "10.0 GiB free" in row.note and "20.0 GiB" in row.note
    row = module.Row("real")                                                     # no plan: SD3.5-M's weights are the floor
    assert not module.check_free_memory(row, None, log=lambda *a: None) and "weights alone" in row.note
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (22 * GiB, 24 * GiB))
    assert module.check_free_memory(module.Row("real", plan=20 * GiB), None, log=lambda *a: None)


def test_real_model_availability(module, monkeypatch, tmp_path):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    why = module.real_model_available("apex-nb-tests/no-such-model")
    assert why and "HF_HUB_OFFLINE" in why and "--model" in why
    assert "model_index.json" in module.real_model_available(str(tmp_path))    # a folder that is not a diffusers model
    (tmp_path / "model_index.json").write_text("{}")
    assert module.real_model_available(str(tmp_path)) is None


def test_plan_prediction(module):
    "The largest per-phase peak of `plan(cfg)`; n/a (None) without a plan or when it cannot plan the config."
    assert module.predicted_peak(None, None) == (None, "")
    assert module.predicted_peak(lambda cfg, num_processes=1: dict(sampling=3, training=7, note="x"), None) == (7, "")
    value, why = module.predicted_peak(lambda cfg, num_processes=1: 1 / 0, None)
    assert value is None and "ZeroDivisionError" in why
