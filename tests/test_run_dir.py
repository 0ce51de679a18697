"""Issue 16, a run directory you can trust, at the trainer level (the folder's own rules are tested in nbs/13_runs):
checkpoints load no code, a bad checkpoint falls back to the previous one, one writer per folder, the log matches the
resumed state, a finished run resumes as a no-op, prompts and objectives are compared by meaning, a mistyped resume
is an error, and a run where nothing can train stops."""
import json, math, os, subprocess, sys, warnings
from pathlib import Path
import pytest
import torch
from apex_nb.config import GRPOConfig
from apex_nb.grpo import GRPOTrainer
from apex_nb.runs import read_metrics
from apex_nb.dpo import DPOTrainer, make_dpo_config
from apex_nb.rewards import REWARDS, Reward

FAST = dict(model='tiny', prompts='text', reward_options={}, steps=2, save_every=1, eval_every=0, group_size=2, groups_per_step=2,
            sample_steps=2)   # the tiny-random preset's model and prompts: machinery only


def trainer(out, **kw):
    return GRPOTrainer(GRPOConfig(**{**FAST, **kw}, out_dir=str(out)))


def steps_logged(out):
    return [r["step"] for r in read_metrics(out) if "eval" not in r]


class Evil:
    "A pickle that runs a command when loaded."
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_and_the_previous_one_resumes(tmp_path):
    out = tmp_path / "run"
    trainer(out, steps=2).train()                                          # checkpoints step-1, step-2
    marker = tmp_path / "pwned"
    torch.save(dict(step=2, optimizer={}, rng={}, x=Evil(marker)), out / "checkpoints" / "step-000002" / "trainer_state.pt")
    with pytest.warns(UserWarning, match=r"step-000002/trainer_state.pt cannot be loaded safely"):
        resumed = trainer(out, steps=2, resume=True)
    assert not marker.exists()                                              # the command never ran
    assert resumed.step == 1 and steps_logged(out) == [0]                   # the previous checkpoint, the log cut back to it
    bad = out / "checkpoints" / "bad-step-000002"
    assert bad.is_dir() and "cannot be loaded safely" in (bad / "WHY.txt").read_text()   # set aside, named, kept for inspection
    resumed.train()
    assert steps_logged(out) == [0, 1]


def test_a_truncated_lora_file_falls_back_naming_the_file(tmp_path):
    out = tmp_path / "run"
    trainer(out, steps=2).train()
    f = out / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"step-000002/pytorch_lora_weights.safetensors cannot be read"):
        assert trainer(out, steps=2, resume=True).step == 1


def test_no_loadable_checkpoint_is_an_error_naming_each(tmp_path):
    out = tmp_path / "run"
    trainer(out, steps=2).train()
    for s in (1, 2): (out / "checkpoints" / f"step-00000{s}" / "trainer_state.pt").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"no checkpoint of .* can be loaded: .*step-000002/trainer_state.pt.*step-000001/trainer_state.pt"):
            trainer(out, steps=2, resume=True)


def test_one_writer_per_folder(tmp_path):
    out = tmp_path / "run"
    first = trainer(out, steps=3)
    first.train_step()
    with pytest.raises(ValueError, match=f'is being written by another run .*"pid": {os.getpid()}'):
        trainer(out, steps=3, resume=True)                                  # the same job launched twice
    code = (f"from apex_nb.grpo import GRPOConfig, GRPOTrainer\n"
            f"GRPOTrainer(GRPOConfig(**{FAST!r}, out_dir={str(out)!r}, resume=True))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert other.returncode != 0 and "is being written by another run" in other.stderr, other.stderr[-800:]
    assert steps_logged(out) == [0]                                          # nothing interleaved
    first.run.close()
    trainer(out, steps=3, resume=True).train()
    assert steps_logged(out) == [0, 1, 2]


def test_killed_before_the_first_checkpoint_resumes_with_a_clean_log(tmp_path):
    out = tmp_path / "run"
    t = trainer(out, steps=3, save_every=0, eval_every=1)
    t.evaluate(); t.train_step(); t.train_step()                             # logged, never checkpointed: then killed
    t.run.close(); del t
    trainer(out, steps=3, save_every=0, eval_every=1, resume=True).train()
    recs = read_metrics(out)
    assert steps_logged(out) == [0, 1, 2]                                     # was 0, 1, 0, 1, 2
    assert [r["step"] for r in recs if "eval" in r] == [0, 1, 2, 3]           # step 0's evaluation kept once


def test_a_finished_run_resumed_does_nothing_and_a_longer_one_extends(tmp_path):
    out = tmp_path / "run"
    trainer(out, steps=2, eval_every=0).train()
    before = (out / "metrics.jsonl").read_text()
    ckpt = out / "checkpoints" / "step-000002" / "trainer_state.pt"
    mtime = ckpt.stat().st_mtime_ns
    trainer(out, steps=2, resume=True).train()
    assert (out / "metrics.jsonl").read_text() == before                      # no second final evaluation
    assert ckpt.stat().st_mtime_ns == mtime                                    # nor a rewritten checkpoint
    trainer(out, steps=3, resume=True).train()
    assert steps_logged(out) == [0, 1, 2] and [r["step"] for r in read_metrics(out) if "eval" in r] == [2, 3]


def test_resume_compares_meaning_and_names_what_differs(tmp_path):
    out, prompts = tmp_path / "run", tmp_path / "prompts.txt"
    prompts.write_text('a sign that says "HI"\na sign that says "NO"\n')
    trainer(out, steps=1, prompts=str(prompts), objectives="ocr,colorfulness").train()
    trainer(out, steps=2, prompts=str(prompts), objectives="ocr:1,colorfulness:1.0", resume=True).train()   # another spelling
    prompts.write_text('a sign that says "HI"\na sign that says "GO"\n')                                   # edited between legs
    with pytest.raises(ValueError, match=r"differs from the run's config.json in .*resolved.prompts"):
        trainer(out, steps=3, prompts=str(prompts), objectives="ocr,colorfulness", resume=True)
    with pytest.raises(ValueError, match=r"clip_range: 0.0001 → 0.2.*resolved.objectives"):
        trainer(out, steps=3, prompts=str(prompts), objectives="ocr:2,colorfulness", clip_range=0.2, resume=True)


def test_a_run_from_before_a_config_field_resumes_while_the_field_keeps_its_default(tmp_path):
    out = tmp_path / "run"
    trainer(out, steps=1).train()
    cfg = json.loads((out / "config.json").read_text())
    for field in ("hack_threshold", "sde_window"): del cfg[field]                     # as apex_nb wrote it before these fields existed
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r'differs from the run\'s config.json in sde_window: "<absent>" → 1$'):
        trainer(out, steps=2, sde_window=1, resume=True)                             # a new behaviour the first leg did not have: refused
    trainer(out, steps=2, resume=True).train()                                         # the defaults: the old code's behaviour, resumed
    assert steps_logged(out) == [0, 1]


def test_resume_of_a_missing_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="nothing to resume in .*typo.*no config.json"):
        trainer(tmp_path / "typo", resume=True)
    assert not (tmp_path / "typo").exists()


def test_a_folder_with_an_unknown_runs_files_is_refused(tmp_path):
    out = tmp_path / "run"
    trainer(out, steps=1).train()
    (out / "config.json").unlink()
    with pytest.raises(ValueError, match="holds logs or checkpoints of an unknown run"):
        trainer(out, steps=1)


if "never_finite" not in REWARDS:
    REWARDS.register("never_finite")(type("never_finite", (Reward,), dict(name="never_finite", note="test reward",
                                                                       score=lambda self, ims, ps, md: [float("nan")] * len(ims))))


def test_grpo_with_nothing_to_train_on_stops(tmp_path):
    out = tmp_path / "run"
    t = trainer(out, steps=10, save_every=0, objectives="never_finite")
    before = {k: v.clone() for k, v in t.lora_state_dict().items()}
    with pytest.raises(RuntimeError, match=r"nothing to train on at 3 steps in a row \(steps 0–2\): no objective had a finite reward"):
        t.train()
    assert all(torch.equal(before[k], v) for k, v in t.lora_state_dict().items())


def test_dpo_with_nothing_to_train_on_stops(tmp_path):
    t = DPOTrainer(make_dpo_config("tiny-random", steps=10, objectives="never_finite", save_every=0, eval_every=0, out_dir=str(tmp_path / "run")))
    with pytest.raises(RuntimeError, match=r"nothing to train on at 3 steps in a row \(steps 0–2\): no scorer gave a finite score"):
        t.train()
