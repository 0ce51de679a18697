"""Reliability (issue 9): bad input fails before any model loads, interrupted checkpoint writes and truncated log lines
lose nothing, faults in rewards and losses are handled as documented in the README's Reliability section."""
import json, math, warnings
from pathlib import Path
import pytest
import torch
import apex_nb.sd3
from apex_nb.grpo import GRPOConfig, GRPOTrainer, make_config, read_metrics

FAST = dict(steps=2, save_every=1, eval_every=0, group_size=2, groups_per_step=2, sample_steps=2)


@pytest.fixture
def no_model_loads(monkeypatch):
    "Any model load fails the test: validation must come first."
    def boom(*a, **k): raise AssertionError("a model was loaded before the configuration was validated")
    monkeypatch.setattr(apex_nb.sd3, "load_pipeline", boom)
    monkeypatch.setattr(apex_nb.sd3, "tiny_sd3_pipeline", boom)


@pytest.mark.parametrize("bad, message", [
    (dict(objectives="ocr,pickscor"), "unknown objective 'pickscor'; valid choices:"),
    (dict(method="apx"), "unknown normalisation method 'apx'; valid choices: static, mo_grpo, gdpo, apex"),
    (dict(scheduler="p4"), "unknown scheduler 'p4'; valid choices: static, dwa, rlw, p3, upgrad"),
    (dict(objectives="ocr:-1,brisque:1"), "weight of objective 'ocr' must be finite and >= 0, got -1.0"),
    (dict(objectives="ocr:0,brisque:0"), "objective weights sum to 0"),
    (dict(group_size=1), "group_size must be an integer >= 2, got 1"),
    (dict(steps=0), "steps must be an integer >= 1, got 0"),
    (dict(steps="ten"), "steps must be an integer >= 1, got 'ten'"),
    (dict(resolution=60), "resolution must be a multiple of 8"),
    (dict(prompts=["a red circle", 'a sign that says "HI"']), "prompt 0 has none: 'a red circle'"),
    (dict(noise_level=0.0), "noise_level must be > 0 for training"),
])
def test_bad_configuration_fails_before_any_model_loads(tmp_path, no_model_loads, bad, message):
    with pytest.raises(ValueError, match=None) as e:
        GRPOTrainer(GRPOConfig(**{**FAST, "out_dir": str(tmp_path / "run"), **bad}))
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()


def test_unknown_preset_and_option(no_model_loads):
    with pytest.raises(ValueError, match="unknown preset 'sd36'; valid choices: tiny-cpu, sd35m-1gpu, sd35m-8gpu"): make_config("sd36")
    with pytest.raises(ValueError, match="unknown config option 'stepz'"): make_config(stepz=3)


def test_out_dir_with_another_runs_config_is_refused(tmp_path, no_model_loads):
    (tmp_path / "run").mkdir(); (tmp_path / "run" / "config.json").write_text(json.dumps({"method": "static"}))
    with pytest.raises(ValueError, match="already holds a different run"):
        GRPOTrainer(GRPOConfig(**FAST, out_dir=str(tmp_path / "run")))


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    tr = GRPOTrainer(GRPOConfig(**FAST, out_dir=str(out)))
    tr.train()                                                        # checkpoints step-1, step-2
    real_save = torch.save
    def dies_halfway(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint"); raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(torch, "save", dies_halfway)
    tr.step = 3
    with pytest.raises(KeyboardInterrupt): tr.save_checkpoint()
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in tr.run.checkpoints()] == ["step-000001", "step-000002"]
    resumed = GRPOTrainer(GRPOConfig(**{**FAST, "steps": 2}, out_dir=str(out), resume=True))
    assert resumed.step == 2                                           # the last complete checkpoint loads


def test_truncated_last_log_line_is_skipped_on_resume_and_replay(tmp_path):
    out = tmp_path / "run"
    GRPOTrainer(GRPOConfig(**FAST, out_dir=str(out))).train()
    with open(out / "metrics.jsonl", "a") as f: f.write('{"step": 2, "loss": 0.')      # a write cut by a crash
    from apex_nb.dashboard import Dashboard
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        dash = Dashboard.from_run(out)                                 # replay skips the broken line, with a warning
    assert any("line 4 is not valid JSON" in str(x.message) for x in w), [str(x.message) for x in w]
    assert len(dash.figures["weights"].data[0].x) == 2
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        GRPOTrainer(GRPOConfig(**{**FAST, "steps": 3}, out_dir=str(out), resume=True)).train()
    assert any("not valid JSON" in str(x.message) for x in w)
    assert [r["step"] for r in read_metrics(out) if "eval" not in r] == [0, 1, 2]   # each step once, the broken line gone
