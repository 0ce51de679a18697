"""Reliability (issue 9): bad input fails before any model loads, interrupted checkpoint writes and truncated log lines
lose nothing, faults in rewards and losses are handled as documented in the README's Reliability section."""
import json, math, os, warnings
from pathlib import Path
import pytest
import torch
import apex_nb.sd3
from apex_nb.config import GRPOConfig, make_config
from apex_nb.grpo import GRPOTrainer
from apex_nb.runs import read_metrics

FAST = dict(model='tiny', prompts='text', reward_options={}, steps=2, save_every=1, eval_every=0, group_size=2, groups_per_step=2,
            sample_steps=2)   # the tiny-random preset's model and prompts: machinery only


@pytest.fixture
def no_model_loads(monkeypatch):
    "Any model load fails the test: validation must come first."
    def boom(*a, **k): raise AssertionError("a model was loaded before the configuration was validated")
    monkeypatch.setattr(apex_nb.sd3, "load_pipeline", boom)
    monkeypatch.setattr(apex_nb.sd3, "tiny_sd3_pipeline", boom)


@pytest.mark.parametrize("bad, message", [
    (dict(objectives="ocr,pickscor"), "unknown objective 'pickscor'; valid choices:"),
    (dict(method="apx"), "unknown normalisation method 'apx'; valid choices: static, mo_grpo, gdpo, apex"),
    (dict(scheduler="p4"), "unknown scheduler 'p4'; valid choices: static, dwa, rlw, p3"),
    (dict(objectives="ocr:-1,brisque:1"), "weight of objective 'ocr' must be finite and >= 0, got -1.0"),
    (dict(objectives="ocr:0,brisque:0"), "objective weights sum to 0"),
    (dict(group_size=1), "group_size must be an integer >= 2, got 1"),
    (dict(steps=0), "steps must be an integer >= 1, got 0"),
    (dict(steps="ten"), "steps must be an integer >= 1, got 'ten'"),
    (dict(resolution=60), "resolution must be a multiple of 8"),
    (dict(prompts=["a red circle", 'a sign that says "HI"']), "prompt 0 has none: 'a red circle'"),
    (dict(noise_level=0.0), "noise_level must be > 0 for GRPO training"),
    (dict(resolution=0), "resolution must be an integer >= 8, got 0"),          # trained at 64 px while config.json said 0
    (dict(resolution="64"), "resolution must be an integer >= 8, got '64'"),    # was a %-format TypeError
    (dict(resolution=-64), "resolution must be an integer >= 8, got -64"),
    (dict(lora_alpha=-3), "lora_alpha must be a number > 0"),
    (dict(lora_targets=("attn.to_qq",)), "lora_targets ['attn.to_qq'] match no linear layer of the SD3 transformer; valid names include attn.add_k_proj"),
    (dict(seed=2 ** 64), "seed must be an integer in 0..2**63-1"),
    (dict(reward_options={"ocr": {"psm": 99}}), "option psm of reward 'ocr' must be a tesseract page segmentation mode 1 or 3..13, got 99"),
])
def test_bad_configuration_fails_before_any_model_loads(tmp_path, no_model_loads, bad, message):
    with pytest.raises(ValueError, match=None) as e:
        GRPOTrainer(GRPOConfig(**{**FAST, "out_dir": str(tmp_path / "run"), **bad}))
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()


def test_reward_options_of_rewards_not_trained(no_model_loads):
    "The README's `-p objectives '[\"colorfulness\"]'` on the default preset (which sets ocr's psm): accepted; options of a reward"
    "that is not an objective are still checked (a misspelled reward or option, a bad value), then left aside."
    assert make_config(objectives=["colorfulness"]).objectives == ["colorfulness"]
    assert make_config().reward_options == {"ocr": {"psm": 7}}
    make_config(objectives="colorfulness", reward_options={"ocr": {"psm": 7}})          # harmless: OCR is simply not scored
    with pytest.raises(ValueError, match="unknown reward in reward_options 'orc'; valid choices: "):
        make_config(objectives="colorfulness", reward_options={"orc": {"psm": 7}})
    with pytest.raises(ValueError, match="psm"):
        make_config(objectives="colorfulness", reward_options={"ocr": {"psm": 99}})


def test_unknown_preset_and_option(no_model_loads):
    with pytest.raises(ValueError, match="unknown preset 'sd36'; valid choices: tiny-cpu, tiny-random, sd35m-1gpu, sd35m-1gpu-80gb, sd35m-8gpu"): make_config("sd36")
    with pytest.raises(ValueError, match="unknown config option 'stepz'"): make_config(stepz=3)


def test_out_dir_with_another_runs_config_is_refused(tmp_path, no_model_loads):
    (tmp_path / "run").mkdir(); (tmp_path / "run" / "config.json").write_text(json.dumps({"method": "static"}))
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0}\n')          # that run started (one that never did may be replaced)
    with pytest.raises(ValueError, match="already holds a different run"):
        GRPOTrainer(GRPOConfig(**FAST, out_dir=str(tmp_path / "run")))


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    tr = GRPOTrainer(GRPOConfig(**FAST, out_dir=str(out)))
    tr.train()                                                        # checkpoints step-1, step-2
    real_save = torch.save
    def dies_halfway(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)): Path(f).write_bytes(b"half a checkpoint")
        else: f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(torch, "save", dies_halfway)
    tr.step = 3
    with pytest.raises(KeyboardInterrupt): tr.save_checkpoint()
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in tr.run.checkpoints()] == ["step-000001", "step-000002"]
    tr.run.close()                                                     # the killed writer's folder is free again
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
    assert len(dash.traces("weights")[0].x) == 2
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        GRPOTrainer(GRPOConfig(**{**FAST, "steps": 3}, out_dir=str(out), resume=True)).train()
    assert any("not valid JSON" in str(x.message) for x in w)
    assert [r["step"] for r in read_metrics(out) if "eval" not in r] == [0, 1, 2]   # each step once, the broken line gone


# --- faults during training --------------------------------------------------------------------------------------
from apex_nb.rewards import REWARDS, Reward


def _register(name, score):
    "A test reward (registered once per process)."
    if name not in REWARDS:
        REWARDS.register(name)(type(name, (Reward,), dict(name=name, note="test reward", score=lambda self, ims, ps, md: score(ims))))


_register("nan_for_first", lambda ims: [float("nan")] + [float(i) for i in range(1, len(ims))])
_register("always_nan", lambda ims: [float("nan")] * len(ims))
_register("inf_sometimes", lambda ims: [float("inf") if i % 3 == 0 else float(i % 2) for i in range(len(ims))])


def _boom(ims): raise OSError("scorer crashed")
_register("crashes", _boom)


def test_nonfinite_rewards_are_masked_and_counted(tmp_path):
    out = tmp_path / "run"
    GRPOTrainer(GRPOConfig(**{**FAST, "steps": 3}, objectives="colorfulness,nan_for_first,inf_sometimes", out_dir=str(out))).train()
    recs = [r for r in read_metrics(out) if "eval" not in r]
    assert [r["step"] for r in recs] == [0, 1, 2]                                # training went on
    for r in recs:
        assert r["nonfinite/nan_for_first"] == 1 and r["nonfinite/inf_sometimes"] == 2   # 4 samples: index 0; indices 0 and 3
        assert r["masked_samples"] == 2 and r["nonfinite/colorfulness"] == 0
        assert not r["skipped/nan_for_first"] and math.isfinite(r["loss"]) and math.isfinite(r["share/colorfulness"])


def test_an_all_nan_objective_is_skipped_for_the_step(tmp_path):
    out = tmp_path / "run"
    tr = GRPOTrainer(GRPOConfig(**{**FAST, "steps": 4}, objectives="colorfulness,always_nan", scheduler="p3", out_dir=str(out)))
    tr.train()
    recs = [r for r in read_metrics(out) if "eval" not in r]
    assert all(r["skipped/always_nan"] and r["nonfinite/always_nan"] == 4 and r["masked_samples"] == 0 for r in recs)
    assert all(r["weight/always_nan"] == 0.5 for r in recs)                       # the scheduler held its weights
    assert all(math.isfinite(r["loss"]) for r in recs)


def test_a_failing_scorer_stops_with_its_name_and_step_after_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    tr = GRPOTrainer(GRPOConfig(**{**FAST, "steps": 3, "save_every": 0}, objectives="colorfulness,crashes", out_dir=str(out)))
    with pytest.raises(RuntimeError) as e: tr.train()
    assert "scoring failed at step 0" in str(e.value) and "reward 'crashes' failed: OSError: scorer crashed" in str(e.value)
    assert [p.name for p in tr.run.checkpoints()] == ["step-000000"]               # written before the error propagated
    assert (out / "metrics.jsonl").exists() is False or read_metrics(out) == []


def test_nonfinite_losses_skip_the_step_and_three_in_a_row_stop_the_run(tmp_path, monkeypatch):
    import apex_nb.grpo as grpo
    real = grpo.ppo_clip_loss
    calls = {"n": 0}
    def poisoned(lp, old, a, clip):
        loss, frac, ratio = real(lp, old, a, clip)
        return loss * float("nan"), frac, ratio
    out = tmp_path / "run"
    tr = GRPOTrainer(GRPOConfig(**{**FAST, "steps": 6, "save_every": 0}, out_dir=str(out)))
    before = {k: v.clone() for k, v in tr.lora_state_dict().items()}
    monkeypatch.setattr(grpo, "ppo_clip_loss", poisoned)
    with pytest.raises(RuntimeError, match=r"non-finite loss or gradient at 3 steps in a row \(steps 0–2\)"): tr.train()
    recs = [r for r in read_metrics(out) if "eval" not in r]
    assert [(r["step"], r["skipped_update"]) for r in recs] == [(0, True), (1, True), (2, True)]
    assert all(torch.equal(before[k], v) for k, v in tr.lora_state_dict().items())   # no poisoned step was applied
    assert [p.name for p in tr.run.checkpoints()] == ["step-000002"]
