"""A GRPO run killed (SIGKILL) mid-training and resumed ends with the same LoRA weights as an uninterrupted run,
and its metrics log holds every step exactly once — with the default loop and with the fast options (SDE window drawn
per step, two optimiser steps per batch, CFG-free training)."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
from safetensors.torch import load_file

TRAIN = """
import sys
from apex_nb.grpo import GRPOTrainer
from apex_nb.config import make_config
GRPOTrainer(make_config('tiny-random', steps={steps}, save_every=1, eval_every=0, out_dir=sys.argv[1], resume={resume}, seed=3{options})).train()
"""
STEPS = 6


def train(out, resume=False, wait=True, options=""):
    code = TRAIN.format(steps=STEPS, resume=resume, options=options)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out_text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out_text[-3000:]
    return proc


def steps_logged(out):
    path = Path(out) / "metrics.jsonl"
    if not path.exists(): return []
    recs = []
    for line in path.read_text().splitlines():
        try: recs.append(json.loads(line))
        except json.JSONDecodeError: pass
    return [r["step"] for r in recs if "eval" not in r]


def lora(out):
    last = sorted((Path(out) / "checkpoints").glob("step-*"))[-1]
    return last.name, load_file(last / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("options", ["", ", sde_window=1, updates_per_batch=2, train_cfg=False, same_latent=True"], ids=["default", "fast"])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, options):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    train(ref, options=options)
    proc = train(cut, wait=False, options=options)
    deadline = time.time() + 300
    while len(steps_logged(cut)) < 3 and time.time() < deadline and proc.poll() is None: time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL); proc.wait()
    killed_at = steps_logged(cut)
    assert 3 <= len(killed_at) < STEPS
    train(cut, resume=True, options=options)
    assert steps_logged(cut) == list(range(STEPS))            # every step exactly once
    (name_ref, w_ref), (name_cut, w_cut) = lora(ref), lora(cut)
    assert name_ref == name_cut == f"step-{STEPS:06d}"
    assert w_ref.keys() == w_cut.keys() and len(w_ref) > 0
    for k in w_ref: assert (w_ref[k] == w_cut[k]).all(), k   # bit-identical LoRA weights
