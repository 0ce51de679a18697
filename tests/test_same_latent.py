"""same_latent (Flow-GRPO's option): a prompt's samples start from the same noise, so with an SDE window they differ only by
the window's noise, the noise GRPO credits their rewards to. Off (the default), each sample starts from its own noise."""
import pytest
import torch
from apex_nb.config import GRPOConfig, make_config
from apex_nb.grpo import GRPOTrainer

FAST = dict(model='tiny', prompts='text', reward_options={}, steps=1, save_every=0, eval_every=0, group_size=3, groups_per_step=2,
            sample_steps=4, sde_window=1, sde_window_range=[1, 1])


def start_and_window(tmp_path, **kw):
    t = GRPOTrainer(GRPOConfig(**FAST, **kw, out_dir=str(tmp_path / 'run')))
    try:
        traj, prompts = t.sample(t.step_prompts(0), 0, sde_steps=[1])
        return traj.latents, prompts
    finally: t.run.close()


def test_a_group_starts_alike_and_branches_at_the_window(tmp_path):
    lat, prompts = start_and_window(tmp_path / 'a', same_latent=True)
    groups = [lat[0:3], lat[3:6]]
    for g in groups:                                        # alike through the ODE prefix (steps 0, 1), apart after the window
        assert all(torch.equal(g[0, i], g[j, i]) for j in (1, 2) for i in (0, 1))
        assert not any(torch.equal(g[0, 2], g[j, 2]) for j in (1, 2))
    assert not torch.equal(groups[0][0, 0], groups[1][0, 0])  # each group its own start
    off, _ = start_and_window(tmp_path / 'b')                # the default: every sample its own start
    assert not torch.equal(off[0, 0], off[1, 0])
    assert torch.equal(off[:, 0], start_and_window(tmp_path / 'c', same_latent=False)[0][:, 0])


def test_same_latent_must_be_a_bool():
    with pytest.raises(ValueError, match="same_latent must be True or False, got 'yes'"):
        make_config('tiny-random', same_latent='yes')
