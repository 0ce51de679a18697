"Gold scorers (issue 19.1): computed on the eval samples, never trained on; a hacking flag when a trained reward rises while gold falls."
import math
import numpy as np
import pytest
import torch
from apex_nb.rewards import REWARDS, Reward, register_reward
from apex_nb.config import make_config
from apex_nb.grpo import GRPOTrainer
from apex_nb.normalize import typical_group_std
from apex_nb.runs import read_metrics

HACK = {"level": 0.0}   # how far the hackable reward has been gamed: it rises with it, the gold quality falls with it


def _brightness(images) -> list[float]: return [float(np.asarray(im, dtype=np.float64).mean()) / 255 for im in images]

if "test_hackable" not in REWARDS.names():
    @register_reward
    class _Hackable(Reward):
        name, note = "test_hackable", "a reward built to be hacked: brightness plus whatever the hack adds"
        def score(self, images, prompts, metadata): return [b + HACK["level"] for b in _brightness(images)]

    @register_reward
    class _GoldQuality(Reward):
        name, note = "test_gold", "an independent quality score that the hack destroys (3 units per unit of hack)"
        def score(self, images, prompts, metadata): return [b - 3 * HACK["level"] for b in _brightness(images)]

KW = dict(steps=3, group_size=2, groups_per_step=2, sample_steps=2, eval_sample_steps=2, eval_groups=2, eval_repeats=2, eval_every=1, save_every=0)


def test_hacking_is_flagged_when_a_trained_reward_rises_and_gold_falls(tmp_path):
    HACK["level"] = 0.0
    tr = GRPOTrainer(make_config("tiny-random", **KW, objectives="test_hackable,colorfulness", gold="test_gold", out_dir=str(tmp_path / "run")))
    r0 = tr.evaluate()                                            # step 0: the start of every eval gain
    assert r0["eval_gain"] == {"test_hackable": 0.0, "colorfulness": 0.0} and r0["gold_gain"] == {"test_gold": 0.0} and not r0["hack_flag"]
    tr.step = 1; r1 = tr.evaluate()                               # same weights, same seeds: the same images, gains exactly 0
    assert r1["eval_gain"]["test_hackable"] == 0.0 and r1["hacking"] == []
    HACK["level"] = 0.05
    tr.step = 2
    with pytest.warns(UserWarning, match="possible reward hacking at step 2: test_hackable \\+.* while gold test_gold -"):
        r2 = tr.evaluate()
    # the gains in the one unit: Δ mean / typical within-prompt spread of the step-0 samples
    g = torch.tensor(r0["eval_groups"])
    s0 = typical_group_std(torch.tensor(r0["gold_rewards"]["test_gold"], dtype=torch.float64)[:, None], g).clamp_min(1e-3).item()
    expected = (np.mean(r2["gold_rewards"]["test_gold"]) - np.mean(r0["gold_rewards"]["test_gold"])) / s0
    assert math.isclose(r2["gold_gain"]["test_gold"], expected, rel_tol=1e-9) and expected < -0.5
    assert r2["eval_gain"]["test_hackable"] > 0 and r2["hack_flag"] and len(r2["hacking"]) == 1
    assert r2["eval_gain"]["colorfulness"] == 0.0                # an honest objective did not move: it is not in the flag
    logged = [r for r in read_metrics(tmp_path / "run") if "eval" in r]
    assert [r["step"] for r in logged] == [0, 1, 2] and [r["hack_flag"] for r in logged] == [False, False, True]
    assert logged[2]["gold"]["test_gold"] == pytest.approx(np.mean(logged[2]["gold_rewards"]["test_gold"]))
    assert len(logged[2]["eval_rewards"]["colorfulness"]) == 4  # 2 prompts × 2 deterministic samples
    HACK["level"] = 0.0


def test_gold_on_training_batches_and_validation(tmp_path):
    HACK["level"] = 0.0                                           # unhacked: gold and the trained reward are the same function
    tr = GRPOTrainer(make_config("tiny-random", **{**KW, "steps": 1}, objectives="test_hackable,colorfulness", gold="test_gold",
                                 gold_on_train=True, out_dir=str(tmp_path / "run")))
    rec = tr.train_step()
    assert rec["gold_mean/test_gold"] == pytest.approx(rec["raw_mean/test_hackable"], rel=1e-6)   # scored on the same training images
    assert tr.names == ["test_hackable", "colorfulness"] and "weight/test_gold" not in rec   # never trained on: no weight, no share
    with pytest.raises(ValueError, match="gold scorers must not be trained on, but \\['colorfulness'\\] is also an objective"):
        make_config("tiny-random", objectives="colorfulness", gold="colorfulness")
    with pytest.raises(ValueError, match="unknown objective 'sharpnes'"):
        make_config("tiny-random", gold="sharpnes")
    from apex_nb.dpo import make_dpo_config
    with pytest.raises(ValueError, match="gold_on_train is GRPO's"):
        make_dpo_config("tiny-random", gold="sharpness", gold_on_train=True)
