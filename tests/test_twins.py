"""The SD3.5 path on CPU twins of SD3.5-Medium and -Large (`apex_nb.sd3.TWINS`: the real classes and structure at tiny
widths): GRPO and DPO in bf16 weights with bf16 autocast, gradient checkpointing, gradient accumulation, conflicts on,
an aggregator, and LoRA checkpoints that diffusers' `load_lora_weights` reads back bit for bit."""
import math
import pytest
import torch
from safetensors.torch import load_file
from apex_nb.dpo import DPOTrainer, make_dpo_config
from apex_nb.grpo import GRPOTrainer
from apex_nb.config import make_config
from apex_nb.sd3 import TWINS, load_pipeline

TWIN = dict(dtype='bfloat16', mixed_precision='bf16', gradient_checkpointing=True, grad_accum=2, resolution=64,
            max_sequence_length=16, group_size=3, groups_per_step=2, sample_steps=3, eval_sample_steps=2, prompts='text',
            objectives='jpeg_compressibility:1,colorfulness:1', steps=2, eval_every=0, save_every=0)


def lora_reloads(trainer, twin):
    "The saved LoRA file, loaded into a fresh twin with diffusers' `load_lora_weights`, equals the trainer's LoRA."
    folder = trainer.save_checkpoint()
    saved = load_file(folder / 'pytorch_lora_weights.safetensors')
    fresh = load_pipeline(twin, torch.bfloat16)
    fresh.load_lora_weights(folder)
    from peft.utils import get_peft_model_state_dict
    loaded = get_peft_model_state_dict(fresh.transformer, adapter_name=next(iter(fresh.transformer.peft_config)))
    ours = trainer.lora_state_dict()
    assert len(loaded) == len(ours) == len(saved) > 0
    exact_file = all(torch.equal(saved[f'transformer.{k}'], v) for k, v in ours.items())      # float32, as trained
    # loaded into a bf16 model, diffusers casts the LoRA to the model's dtype: equal to ours rounded to that dtype
    return exact_file and all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in ours.items())


@pytest.mark.parametrize('twin', TWINS)
def test_grpo_on_twin(twin, tmp_path):
    t = GRPOTrainer(make_config('tiny-random', model=twin, **TWIN, out_dir=str(tmp_path / 'grpo')))
    tr = t.pipe.transformer
    assert tr.dtype == torch.bfloat16 and t.pipe.vae.dtype == torch.float32
    assert {p.dtype for p in t.params} == {torch.float32}                       # trainable LoRA in float32
    assert not any(p.requires_grad for n in ('text_encoder', 'text_encoder_2', 'text_encoder_3', 'vae')
                   for p in getattr(t.pipe, n).parameters())
    before = {k: v.clone() for k, v in t.lora_state_dict().items()}
    recs = [t.train_step() for _ in range(2)]
    for r in recs:
        assert all(math.isfinite(r[k]) for k in ('loss', 'kl', 'grad_norm')) and not r['skipped_update']
        assert r['cos'] is not None and len(r['cos']) == 2                        # conflicts measured every step
    # on-policy at the first micro-batch: float32 trajectories make the recomputed log-prob the recorded one
    assert abs(recs[0]['ratio_first'] - 1) < 1e-3, recs[0]['ratio_first']
    moved = sum(not torch.equal(before[k], v) for k, v in t.lora_state_dict().items())
    assert moved > len(before) // 2, (moved, len(before))                       # gradients flow through checkpointed blocks
    assert lora_reloads(t, twin)


def test_grpo_aggregator_on_twin(tmp_path):
    t = GRPOTrainer(make_config('tiny-random', model='sd35m-twin', **TWIN, aggregator='upgrad', out_dir=str(tmp_path / 'agg')))
    r = t.train_step()
    assert math.isfinite(r['grad_norm']) and r['grad_norm'] > 0 and not r['skipped_update']
    assert abs(sum(r[f'agg_weight/{n}'] for n in t.names) - 1) < 1e-5


@pytest.mark.parametrize('twin', TWINS)
def test_dpo_on_twin(twin, tmp_path):
    t = DPOTrainer(make_dpo_config('tiny-random', model=twin, **TWIN, out_dir=str(tmp_path / 'dpo'), ref_update_every=1))
    before = {k: v.clone() for k, v in t.lora_state_dict().items()}
    recs = [t.train_step() for _ in range(2)]
    trained = [r for r in recs if r['pairs'] > 0]
    assert trained and all(math.isfinite(r['loss']) for r in trained)
    assert any(not torch.equal(before[k], v) for k, v in t.lora_state_dict().items())
    assert not any(p.grad is not None for n in ('text_encoder', 'text_encoder_2', 'text_encoder_3')
                   for p in getattr(t.pipe, n).parameters())                   # text encoders never get gradients
    assert lora_reloads(t, twin)
