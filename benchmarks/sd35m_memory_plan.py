"""Memory plan for the `sd35m-1gpu` Flow-GRPO preset (issue 6), proven at shape level on CPU.

Builds the SD3.5-Medium transformer, the three text encoders and the VAE from their published configs on the meta
device (no weights, no memory, no download), attaches the recipe's LoRA, counts parameters exactly, and estimates the
peak GPU memory of a training step and of a sampling phase. The per-block activation formula is checked against the
bytes autograd really saves in a small real SD3Transformer2DModel (bf16, CPU), measured with saved_tensors_hooks.
Assumptions (stated where used): flash / memory-efficient SDPA on the GPU (no N² attention matrix is kept), a fixed
1 GiB CUDA context, 95% of the card usable; the no-grad sampling, backward-transient and VAE-decode terms are rough.

Run: cd /work/main && HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sd35m_memory_plan.py
"""
from __future__ import annotations
import itertools, math, time
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from peft import LoraConfig
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

diffusers_logging.set_verbosity_error()   # the small bf16 check model would warn about casting with .to()

# Memory-relevant settings of the 1-GPU Flow-GRPO preset (REFERENCE §3). The values the trainer also uses are taken from
# apex_nb.grpo.PRESETS['sd35m-1gpu'] below (one source of truth); the rest are this plan's own assumptions.
PRESET = dict(
    resolution=512, vae_downsample=8, latent_channels=16,
    group_size=8, sample_batch=8,              # one group of 8 images per sampling batch
    sample_steps=10, eval_steps=40, cfg_scale=4.5, train_cfg=True,  # Flow-GRPO's compute_log_prob also runs CFG
    timestep_fraction=0.99,                    # trains int(10 * 0.99) = 9 timesteps per trajectory
    train_micro_batch=1,                       # samples per backward; CFG doubles it to 2 sequences
    gradient_checkpointing=True,
    clip_tokens=77, t5_tokens=256,             # Flow-GRPO's train_sd3.py uses T5 max_sequence_length=128: 256 is conservative
    lora_r=32, lora_alpha=64, lora_init="gaussian",
    lora_targets=["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                  "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"],
    lr=3e-4, weight_decay=1e-4,
    weight_bytes=2,                            # transformer and text encoders in bf16/fp16
    vae_bytes=4,                               # Flow-GRPO keeps the VAE in fp32
    vae_decode_batch=1,                        # decode one image at a time (vae.enable_slicing()); Flow-GRPO decodes
                                               # the whole sampling batch at once: ≈ +4.4 GiB at 8 images
    act_bytes=2,                               # activations in bf16/fp16
    lora_state_bytes=4 + 4 + 8 + 4,            # fp32 LoRA weight (= master) + fp32 grad + AdamW m, v + EMA copy
)


def _from_trainer_preset(plan: dict, name: str = "sd35m-1gpu") -> dict:
    "The plan's settings with every value the trainer also has taken from apex_nb.grpo's preset."
    from apex_nb.grpo import GRPOConfig, PRESETS
    c = GRPOConfig(**PRESETS[name])
    return dict(plan, resolution=c.resolution, group_size=c.group_size, sample_batch=c.group_size, sample_steps=c.sample_steps,
                eval_steps=c.eval_sample_steps, cfg_scale=c.guidance_scale, timestep_fraction=c.timestep_fraction,
                gradient_checkpointing=c.gradient_checkpointing, t5_tokens=c.max_sequence_length, lora_r=c.lora_rank,
                lora_alpha=c.lora_alpha, lora_targets=list(c.lora_targets), lr=c.lr, weight_decay=c.weight_decay)

PRESET = _from_trainer_preset(PRESET)

# SD3.5-Medium transformer/config.json. Sources, each value checked against at least one:
#  [conv] huggingface/diffusers scripts/convert_sd3_to_diffusers.py: sample_size=128, patch_size=2, in_channels=16,
#         joint_attention_dim=4096 fixed; num_attention_heads = num_layers; caption_projection_dim = rows of
#         context_embedder; "(0, 1, ..., 12) for sd3.5" attn2 layers; "sd3.5 2b use pos_embed_max_size=384";
#         qk_norm "rms_norm" for 3.5; attention_head_dim is the class default 64.
#  [sfu]  diffusers 0.42 loaders/single_file_utils.py (installed): a checkpoint is "sd35_medium" when pos_embed has
#         147456 = 384² positions and the adaLN width is 9216 = 6 x 1536 (so hidden = caption_projection_dim = 1536).
#  [card] SD3.5-Medium model card: MMDiT-X with self-attention modules in the first 13 layers, QK-norm,
#         positional embedding extended to 384x384 latent positions; 2.5B parameters.
#  [copy] verbatim copies of this config in third-party code (Tenstorrent SD3.5 helpers; a 12-layer SD3.5-M
#         distillation config noting "the original 3.5 Medium model used a depth of 24 layers, dual attention 0-12").
#  [keras] keras-hub preset "stable_diffusion_3.5_medium": 3,371,793,763 params = CLIP-L + CLIP-G + MMDiT-X + VAE;
#         our meta-built sum must match it exactly (checked in check_published_total).
SD35M_TRANSFORMER = dict(
    sample_size=128,                       # [conv][copy]
    patch_size=2,                          # [conv][copy]
    in_channels=16, out_channels=16,       # [conv][copy] 16 latent channels
    num_layers=24,                         # [copy][keras]; heads = layers per [conv]
    attention_head_dim=64,                 # [conv][copy]
    num_attention_heads=24,                # [conv] = num_layers; 24 x 64 = 1536 per [sfu]
    joint_attention_dim=4096,              # [conv][copy] T5-XXL width
    caption_projection_dim=1536,           # [sfu][copy]
    pooled_projection_dim=2048,            # [copy] 768 (CLIP-L) + 1280 (CLIP-G) pooled
    pos_embed_max_size=384,                # [conv][sfu][card]
    dual_attention_layers=tuple(range(13)),  # [conv][card][copy] layers 0..12
    qk_norm="rms_norm",                    # [conv][card][copy]
)
# Text encoders (CLIPTextConfig / T5Config kwargs; configs of SD3's text_encoder, text_encoder_2, text_encoder_3 as
# hard-coded in AUTOMATIC1111's sd3 conditioner: CLIPL_CONFIG, CLIPG_CONFIG, T5_CONFIG; projection dims = widths).
# CLIP-L + CLIP-G are covered by the keras-hub total; the T5-XXL count (4.76B, the t5-v1_1-xxl encoder) is built
# from its config and not cross-checked against a published exact number.
TEXT_ENCODERS = dict(
    clip_l=(CLIPTextModelWithProjection, CLIPTextConfig, dict(hidden_size=768, intermediate_size=3072,
            num_hidden_layers=12, num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")),
    clip_g=(CLIPTextModelWithProjection, CLIPTextConfig, dict(hidden_size=1280, intermediate_size=5120,
            num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, hidden_act="gelu")),
    t5_xxl=(T5EncoderModel, T5Config, dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
            vocab_size=32128, feed_forward_proj="gated-gelu")),
)
# SD3 VAE = SDXL's AutoencoderKL config with 16 latent channels and no quant convs ([conv], the VAE branch).
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
KERAS_HUB_SD35M_TOTAL = 3_371_793_763     # published (keras-hub presets), everything except T5

GiB = 2 ** 30
GPUS_GIB = (24, 40, 80)
CUDA_OVERHEAD_GIB = 1.0   # assumption: CUDA context + cuBLAS/cuDNN workspaces
USABLE_FRACTION = 0.95    # assumption: allocator fragmentation headroom


# ---------------------------------------------------------------- parameter counts (meta device, exact)
def weight_numel(model: torch.nn.Module) -> int:
    "Parameters plus persistent buffers (SD3's 384x384 positional table is a buffer stored in the checkpoint)."
    buffers = sum(b.numel() for m in model.modules() for name, b in m._buffers.items()
                  if b is not None and name not in m._non_persistent_buffers_set)
    return sum(p.numel() for p in model.parameters()) + buffers


def build_on_meta() -> dict[str, torch.nn.Module]:
    "All five SD3.5-M components from configs, on the meta device: shapes only, no memory, instant."
    with torch.device("meta"):
        models = dict(transformer=SD3Transformer2DModel(**SD35M_TRANSFORMER))
        for name, (cls, cfg_cls, kw) in TEXT_ENCODERS.items(): models[name] = cls(cfg_cls(**kw))
        models["vae"] = AutoencoderKL(**SD3_VAE)
    return models


def lora_config(preset: dict) -> LoraConfig:
    return LoraConfig(r=preset["lora_r"], lora_alpha=preset["lora_alpha"], init_lora_weights=preset["lora_init"],
                      target_modules=preset["lora_targets"])


def attach_lora(transformer: torch.nn.Module, preset: dict) -> int:
    "Add the recipe's LoRA (base weights frozen) and return the exact number of trainable parameters."
    transformer.requires_grad_(False)
    transformer.add_adapter(lora_config(preset))
    return sum(p.numel() for p in transformer.parameters() if p.requires_grad)


def lora_numel_by_hand(cfg: dict, r: int) -> int:
    "r·(in+out) per adapted Linear: 8 square D×D projections per block, minus to_add_out in the last (context_pre_only) block."
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return (8 * cfg["num_layers"] - 1) * r * 2 * D


# ---------------------------------------------------------------- activation formula
def tokens(preset: dict, cfg: dict = SD35M_TRANSFORMER) -> tuple[int, int]:
    "(image tokens, text tokens) per sample: (512/8/2)² latent patches; 77 CLIP + 256 T5 tokens."
    side = preset["resolution"] // preset["vae_downsample"] // cfg["patch_size"]
    return side * side, preset["clip_tokens"] + preset["t5_tokens"]


def stream_bytes_per_token(D: int, H: int, r: int, dual: bool = False, act: int = 2, stat: int = 4) -> int:
    """Bytes autograd keeps per token of one stream (image or text) in one JointTransformerBlock, frozen base + LoRA.
    Frozen Linears keep only their weight (no activation); what stays, in activation dtype `act` unless fp32:
      GELU input (4D) ........................................ 4D·act
      RMSNorm on q and k: their input + the fp32 upcast ....... 2D·act + 2D·4,  rsqrt per head 2H·4
      SDPA (flash/mem-efficient): q, k, v, out + logsumexp .... 4D·act + H·4
      LayerNorm inputs (norm1, norm2) + mean/rstd ............. 2D·act + 4·stat
      LoRA A inputs (normed x shared by q,k,v; attn out) ...... 2D·act,  LoRA B inputs 4r·act
    Dual-attention blocks (SD3.5 layers 0..12) add a frozen attn2 on the image stream, which keeps no LoRA or Linear
    inputs but the same RMSNorm + SDPA tensors: (2D + 4D)·act + 2D·4 + 3H·4."""
    b = 4 * D * act + (2 * D * act + 2 * D * 4 + 2 * H * 4) + (4 * D * act + H * 4) + (2 * D * act + 4 * stat) \
        + 2 * D * act + 4 * r * act
    return b + (dual * (6 * D * act + 2 * D * 4 + 3 * H * 4))


def saved_activation_bytes(cfg: dict, img: int, txt: int, r: int, seqs: int, act: int = 2, stat: int = 4) -> int:
    """Bytes kept for backward by the whole transformer without checkpointing: every block as a general block (the first
    block's inputs need no grad and the last block's text stream ends early, so this is slightly conservative), plus
    the final AdaLayerNorm input."""
    D, H = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_attention_heads"]
    blocks = sum(img * stream_bytes_per_token(D, H, r, i in cfg["dual_attention_layers"], act, stat)
                 + txt * stream_bytes_per_token(D, H, r, False, act, stat) for i in range(cfg["num_layers"]))
    return seqs * (blocks + img * (D * act + 2 * stat))


def checkpointed_activation_bytes(cfg: dict, img: int, txt: int, r: int, seqs: int, act: int = 2, stat: int = 4) -> int:
    """Gradient checkpointing per block (diffusers, non-reentrant): every block keeps only its inputs (image + text
    states); backward re-runs one block at a time, whose saved tensors (worst case: a dual-attention block) live then.
    Analytic: saved_tensors_hooks cannot see inside a non-reentrant checkpoint, so this part is not measured."""
    D, H = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_attention_heads"]
    inputs = cfg["num_layers"] * (img + txt) * D * act
    one_block = img * stream_bytes_per_token(D, H, r, True, act, stat) + txt * stream_bytes_per_token(D, H, r, False, act, stat)
    return seqs * (inputs + one_block + img * (D * act + 2 * stat))


def backward_transient_bytes(cfg: dict, img: int, txt: int, seqs: int, act: int = 2) -> int:
    "Rough: while a block runs backward, gradients of its widest tensor (the 4D MLP hidden) live twice."
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return seqs * 2 * (img + txt) * 4 * D * act


def inference_activation_bytes(cfg: dict, img: int, txt: int, seqs: int, act: int = 2) -> int:
    "Rough, no grad: residual + normed states + the 4D MLP hidden twice (Linear out, GELU out) live at once: ≈ 12D per token."
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return seqs * (img + txt) * 12 * D * act


def vae_decode_bytes(preset: dict, images: int) -> int:
    """Rough: the decoder's last upsampling (256 channels, interpolated input + conv output at full resolution) plus a
    128-channel map live at once: ≈ 5 full-resolution 128-channel maps per image, in the VAE's dtype."""
    return images * 5 * 128 * preset["resolution"] ** 2 * preset["vae_bytes"]


# ---------------------------------------------------------------- empirical check on a small real model
def measure_saved_bytes(cfg: dict, side: int, txt: int, r: int, batch: int) -> dict[str, int]:
    """Build a small SD3Transformer2DModel in bf16 on CPU with the recipe's LoRA, run forward + backward and sum the
    unique storages autograd saves (parameters excluded), per block and outside the blocks."""
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**cfg).to(torch.bfloat16)
    attach_lora(model, dict(PRESET, lora_r=r, lora_alpha=2 * r))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where, seen = ["outside"], {}
    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, f"block{i}"))
        block.register_forward_hook(lambda m, a, o: where.__setitem__(0, "outside"))

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params: seen.setdefault(s.data_ptr(), (where[0], s.nbytes()))
        return t
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg["in_channels"], side, side, generator=g).bfloat16()
    enc = torch.randn(batch, txt, cfg["joint_attention_dim"], generator=g).bfloat16()
    pooled = torch.randn(batch, cfg["pooled_projection_dim"], generator=g).bfloat16()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                    timestep=torch.full((batch,), 500.0)).sample
    out.float().square().mean().backward()   # the graph must really be usable
    per: dict[str, int] = {}
    for place, nbytes in seen.values(): per[place] = per.get(place, 0) + nbytes
    return per


SMALL_CONFIGS = [  # (config, latent side, text tokens, LoRA r, batch): two different shapes, not tuned to the formula
    (dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=8,
          num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12,
          pos_embed_max_size=16, dual_attention_layers=(0, 1, 2), qk_norm="rms_norm"), 16, 10, 4, 2),
    (dict(sample_size=24, patch_size=2, in_channels=4, out_channels=4, num_layers=5, attention_head_dim=16,
          num_attention_heads=3, joint_attention_dim=40, caption_projection_dim=48, pooled_projection_dim=20,
          pos_embed_max_size=24, dual_attention_layers=(0, 1), qk_norm="rms_norm"), 24, 7, 8, 1),
]


def validate_formula() -> list[dict]:
    """Measured / predicted saved bytes at small dims. 'middle' compares blocks 1..N-2 with the general-block formula
    (CPU LayerNorm keeps mean/rstd in bf16, so stat=2 there); 'model' compares the whole transformer with the plan's
    formula (fp32 stats as on GPU, edge blocks treated as general: expected a little below 1)."""
    rows = []
    for cfg, side, txt, r, batch in SMALL_CONFIGS:
        per = measure_saved_bytes(cfg, side, txt, r, batch)
        D, H, img = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_attention_heads"], (side // 2) ** 2
        mid = range(1, cfg["num_layers"] - 1)
        pred_mid = batch * sum(img * stream_bytes_per_token(D, H, r, i in cfg["dual_attention_layers"], stat=2)
                               + txt * stream_bytes_per_token(D, H, r, stat=2) for i in mid)
        meas_mid = sum(per[f"block{i}"] for i in mid)
        rows.append(dict(D=D, img=img, txt=txt, r=r, layers=cfg["num_layers"], middle=meas_mid / pred_mid,
                         model=sum(per.values()) / saved_activation_bytes(cfg, img, txt, r, batch)))
    return rows


# ---------------------------------------------------------------- the plan
def count_components(preset: dict) -> dict:
    "Exact parameter counts of every component and of the LoRA, all on the meta device."
    models = build_on_meta()
    counts = {name: weight_numel(m) for name, m in models.items()}
    counts["pos_embed_buffer"] = models["transformer"].pos_embed.pos_embed.numel()
    counts["lora"] = attach_lora(models["transformer"], preset)
    return counts


def check_published_total(counts: dict) -> int:
    "Everything but T5 must equal keras-hub's published SD3.5-M parameter count."
    return counts["transformer"] + counts["clip_l"] + counts["clip_g"] + counts["vae"]


def training_peak(counts: dict, preset: dict, te_resident: bool, ckpt: bool, micro_batch: int) -> dict[str, int]:
    "Bytes of one training step (forward+backward of one micro-batch), by component."
    img, txt = tokens(preset)
    seqs = micro_batch * (2 if preset["train_cfg"] else 1)
    act = (checkpointed_activation_bytes(SD35M_TRANSFORMER, img, txt, preset["lora_r"], seqs) if ckpt else
           saved_activation_bytes(SD35M_TRANSFORMER, img, txt, preset["lora_r"], seqs))
    te = sum(counts[k] for k in TEXT_ENCODERS) * preset["weight_bytes"] if te_resident else 0
    return dict(transformer=counts["transformer"] * preset["weight_bytes"], text_encoders=te,
                vae=counts["vae"] * preset["vae_bytes"], lora_state=counts["lora"] * preset["lora_state_bytes"],
                activations=act, transient=backward_transient_bytes(SD35M_TRANSFORMER, img, txt, seqs),
                cuda=int(CUDA_OVERHEAD_GIB * GiB))


def sampling_peak(counts: dict, preset: dict, te_resident: bool) -> dict[str, int]:
    "Bytes of the sampling phase: CFG doubles the batch; no grad; then the VAE decodes (transformer activations are gone)."
    img, txt = tokens(preset)
    seqs = preset["sample_batch"] * 2
    te = sum(counts[k] for k in TEXT_ENCODERS) * preset["weight_bytes"] if te_resident else 0
    return dict(transformer=counts["transformer"] * preset["weight_bytes"], text_encoders=te,
                vae=counts["vae"] * preset["vae_bytes"], lora_state=counts["lora"] * preset["lora_state_bytes"],
                activations=max(inference_activation_bytes(SD35M_TRANSFORMER, img, txt, seqs),
                                vae_decode_bytes(preset, preset["vae_decode_batch"])),
                cuda=int(CUDA_OVERHEAD_GIB * GiB))


def settings_grid(counts: dict, preset: dict) -> list[dict]:
    "Peak = max(training step, sampling) for each (text encoders resident?, checkpointing?, micro-batch)."
    rows = []
    for te, ckpt, mb in itertools.product((True, False), (False, True), (1, 2, 4)):
        train = sum(training_peak(counts, preset, te, ckpt, mb).values())
        sample = sum(sampling_peak(counts, preset, te).values())
        rows.append(dict(te_resident=te, ckpt=ckpt, micro_batch=mb, train=train, sample=sample, peak=max(train, sample)))
    return rows


def fitting_settings(grid: list[dict], gpu_gib: float) -> list[dict]:
    "Settings whose peak fits the usable part of the GPU, fastest first (TE resident, no checkpointing, big micro-batch)."
    fits = [g for g in grid if g["peak"] <= USABLE_FRACTION * gpu_gib * GiB]
    return sorted(fits, key=lambda g: (not g["te_resident"], g["ckpt"], -g["micro_batch"]))


# ---------------------------------------------------------------- printing
def gib(n: int) -> str: return f"{n / GiB:8.2f}"


def describe(g: dict) -> str:
    return (f"TE {'resident' if g['te_resident'] else 'offloaded'}, ckpt {'on' if g['ckpt'] else 'off'}, "
            f"micro-batch {g['micro_batch']}")


def print_report(counts: dict, validation: list[dict], preset: dict) -> None:
    img, txt = tokens(preset)
    wb, mb, seqs = preset["weight_bytes"], preset["train_micro_batch"], preset["train_micro_batch"] * (1 + preset["train_cfg"])
    print(f"SD3.5-M memory plan, preset sd35m-1gpu: {preset['resolution']} px -> {img} image + {txt} text tokens per "
          f"sample; train micro-batch {mb} x CFG = {seqs} sequences; sampling batch {preset['sample_batch']} x CFG")
    print(f"\n{'component':<44}{'parameters':>15}{'GiB':>9}")
    rows = [("transformer (bf16), of which:", counts["transformer"], counts["transformer"] * wb),
            ("  pos_embed buffer 384x384x1536", counts["pos_embed_buffer"], counts["pos_embed_buffer"] * wb),
            ("CLIP-L text encoder (bf16)", counts["clip_l"], counts["clip_l"] * wb),
            ("CLIP-G text encoder (bf16)", counts["clip_g"], counts["clip_g"] * wb),
            ("T5-XXL encoder (bf16)", counts["t5_xxl"], counts["t5_xxl"] * wb),
            ("VAE (fp32)", counts["vae"], counts["vae"] * preset["vae_bytes"]),
            ("LoRA r32 (trainable, fp32)", counts["lora"], counts["lora"] * 4),
            ("  + fp32 grads", counts["lora"], counts["lora"] * 4),
            ("  + AdamW m, v (fp32)", 2 * counts["lora"], counts["lora"] * 8),
            ("  + EMA copy (fp32)", counts["lora"], counts["lora"] * 4)]
    for name, n, b in rows: print(f"{name:<44}{n:>15,}{gib(b)}")
    cfg = SD35M_TRANSFORMER
    for label, ckpt in (("activations, no checkpointing", False), ("activations, gradient checkpointing", True)):
        a = (checkpointed_activation_bytes if ckpt else saved_activation_bytes)(cfg, img, txt, preset["lora_r"], seqs)
        print(f"{label + f' ({seqs} seq)':<44}{'':>15}{gib(a)}")
    print(f"{'backward transient (rough)':<44}{'':>15}{gib(backward_transient_bytes(cfg, img, txt, seqs))}")
    print(f"{'sampling activations, no grad (rough)':<44}{'':>15}"
          f"{gib(inference_activation_bytes(cfg, img, txt, 2 * preset['sample_batch']))}")
    n = preset["vae_decode_batch"]
    print(f"{f'VAE decode, {n} image(s) at once, fp32 (rough)':<44}{'':>15}{gib(vae_decode_bytes(preset, n))}")
    print(f"{'CUDA context + workspaces (assumed)':<44}{'':>15}{gib(int(CUDA_OVERHEAD_GIB * GiB))}")
    for te in (True, False):
        train = sum(training_peak(counts, preset, te, preset["gradient_checkpointing"], mb).values())
        sample = sum(sampling_peak(counts, preset, te).values())
        tag = "TE resident" if te else "TE offloaded"
        print(f"{'TOTAL training step, ' + tag + ', ckpt on':<44}{'':>15}{gib(train)}")
        print(f"{'TOTAL sampling, ' + tag:<44}{'':>15}{gib(sample)}")
    total = check_published_total(counts)
    print(f"\ncheck: transformer+CLIP-L+CLIP-G+VAE = {total:,} vs keras-hub published {KERAS_HUB_SD35M_TOTAL:,}: "
          f"{'EXACT' if total == KERAS_HUB_SD35M_TOTAL else 'MISMATCH'}")
    print(f"check: LoRA trainable {counts['lora']:,} vs (8·24-1)·r·2D by hand {lora_numel_by_hand(cfg, preset['lora_r']):,}")
    print("\nactivation formula vs saved-tensor bytes measured on small real SD3 transformers (bf16, CPU):")
    for v in validation:
        print(f"  D={v['D']:>3} img={v['img']:>4} txt={v['txt']:>3} r={v['r']} layers={v['layers']}: "
              f"measured/predicted middle blocks {v['middle']:.3f}, whole model {v['model']:.3f}")
    grid = settings_grid(counts, preset)
    chosen = next(g for g in grid if (g["te_resident"], g["ckpt"], g["micro_batch"]) ==
                  (True, preset["gradient_checkpointing"], preset["train_micro_batch"]))
    print(f"\nGiB per setting (TE offloaded = text encoders on CPU / prompt embeddings precomputed):")
    print(f"  {'setting':<52}{'train':>8}{'sample':>9}{'peak':>9}")
    for g in grid: print(f"  {describe(g):<52}{gib(g['train'])} {gib(g['sample'])} {gib(g['peak'])}")
    print(f"\nfits in usable {USABLE_FRACTION:.0%} of the GPU:")
    for gpu in GPUS_GIB:
        fits = fitting_settings(grid, gpu)
        verdict = (f"fits; fastest: {describe(fits[0])} ({fits[0]['peak'] / GiB:.1f} GiB); {len(fits)}/{len(grid)} "
                   f"settings fit" if fits else "does NOT fit with any setting here")
        preset_fits = "fits" if chosen in fits else "does NOT fit"
        print(f"  {gpu} GB: {verdict}; the preset's own setting ({describe(chosen)}, {chosen['peak'] / GiB:.1f} GiB) "
              f"{preset_fits}")


def main(preset: dict = PRESET, verbose: bool = True) -> dict:
    "Count, validate, plan; print the report and return the numbers (for tests and the lead)."
    t0 = time.perf_counter()
    counts = count_components(preset)
    validation = validate_formula()
    img, txt = tokens(preset)
    seqs = preset["train_micro_batch"] * (1 + preset["train_cfg"])
    grid = settings_grid(counts, preset)
    result = dict(counts=counts, validation=validation, published_total=check_published_total(counts),
                  act_no_ckpt=saved_activation_bytes(SD35M_TRANSFORMER, img, txt, preset["lora_r"], seqs),
                  act_ckpt=checkpointed_activation_bytes(SD35M_TRANSFORMER, img, txt, preset["lora_r"], seqs),
                  grid=grid, fits={gpu: fitting_settings(grid, gpu) for gpu in GPUS_GIB})
    if verbose:
        print_report(counts, validation, preset)
        print(f"\n({time.perf_counter() - t0:.1f} s)")
    return result


if __name__ == "__main__":
    main()
