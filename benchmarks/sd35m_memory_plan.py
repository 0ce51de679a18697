"""GPU memory plan of the GRPO trainer for SD3.5-Medium (and its twins), from the config and the trainer's own code.

`plan(cfg, num_processes=1) -> {phase: bytes}` predicts, for one process, the peak bytes the CUDA caching allocator hands out
(what `torch.cuda.max_memory_allocated` measures) in every phase of a run:

  sampling     the largest sampler call (`sampler_batches`): prompt encoding, the denoising loop (CFG: 2× sequences, no grad)
               and the VAE decode in calls of `decode_batches`, with the trajectories of the step's earlier calls resident
  collect      `cat_trajectories`: the step's trajectory twice (the calls' parts and their concatenation)
  scoring      the images turned to uint8 for the rewards, and the reward models' forward passes (model rewards on this GPU)
  training     one micro-batch (`micro_batches`) at one timestep: policy forward (gradient checkpointing) + the no-grad reference
               forward with LoRA disabled (when kl_beta > 0) + backward (or the K-row Jacobian with an aggregator)
  conflicts    the same micro-batch with the gradient-conflict diagnostic (every `conflict_every` steps): one backward through
               the retained graph first (`LinearObjectiveGrads`: per-sample products added into its K×P float32 matrix, which
               lives through the step's micro-batches), and after them `conflict_stats`' float64 copy of that matrix. The
               inputs its hooks keep until their gradient arrives are counted in float32 (peft's cast): on a GPU they
               are kept in autocast's dtype, which the meta run does not see (conservative by half their bytes)
  aggregate    an aggregator combining the K×P Jacobian into the LoRA's gradients
  optimizer    clipping and the AdamW step
  eval         an evaluation sampler call (`eval_sample_steps`, no step trajectories resident)

Every phase holds the resident part: the transformer, the three text encoders and the VAE in their dtypes (T5's `wo` stays
float32 when the weights are float16, as transformers loads it), the LoRA in float32 with its gradients and AdamW's m and v,
the reward models that score on this GPU, and the trajectories of the step (float32 latents of every sample for T+1 steps,
log-probs, bf16 prompt embeddings with the unconditional half, images).

How the numbers are obtained (MEASURED / DERIVED / ASSUMED; the script prints a summary):
  * EXACT: parameter counts. Every model is built from its published config on the meta device (no weights, no download);
    SD3.5-M's sum without T5 equals keras-hub's published count; the reward CLIPs are built from their configs in code.
  * TRACED (measured at the real shapes, not estimated): the trainer's own functions (`sample_with_logprob` with prompt
    encoding and `decode_latents`, `GRPOTrainer._accumulate` with `step_log_prob`, the reference pass, `LinearObjectiveGrads`
    and `objective_jacobian`, AdamW) run on the meta device, and a dispatch mode (LiveBytes) adds up the bytes of every
    tensor storage alive after every operation: a storage counts from the op that allocates it until its last reference
    dies. Emulated, so that the meta run allocates what the GPU run allocates (GpuLike):
      - CUDA autocast in the `accelerator.autocast()` regions (and in checkpoint recomputation, as torch.utils.checkpoint
        restores it): matmul/linear/conv/SDPA inputs cast to bf16/fp16, layer_norm/group_norm/pow/rsqrt/softmax/sum... to
        float32, casts of trainable leaves cached for the region;
      - scaled_dot_product_attention as FlashAttention-2 / memory-efficient attention (what PyTorch runs on the GPU): q, k,
        v, out and a float32 logsumexp are kept, no L×L matrix; the backward allocates dq, dk, dv and a float32 dq
        accumulator;
      - values are never read (.item() → 0 on meta tensors).
  * DERIVED (a meta op costs ~1 ms, so some traces are shortened and extended exactly where the extension is known):
      - the transformer is traced with 4 blocks (dual-attention, dual, plain, last) at its real width. A no-grad forward
        keeps nothing between blocks, so its peak does not depend on depth; with gradient checkpointing each left-out
        block keeps only its checkpointed inputs (their bytes are measured in the trace), added everywhere in the
        micro-batch (conservative by up to 9 blocks' inputs, ≈ 4 MB per sequence, in the backward); the left-out blocks'
        LoRA adds its autocast cast cache and its rows of the K×P Jacobians. check_depth_extension compares this with a
        full-depth trace of a narrow 10-block SD3.5-M on the CPU (equal, backward ≤ 10 % above; tests/test_memory_plan.py);
      - the text encoders and the reward CLIPs are traced with 1-2 layers (no-grad: depth-independent peaks);
      - the sampler is traced for 1 denoising step; every further step appends one float32 latent and one log-prob per
        image (kept 3× after the loop: list, stack, clone), added exactly;
      - the trajectory of a step is the traced call's per-image bytes × the step's images; `cat_trajectories` holds it twice.
  * ASSUMED: 64 MiB of cuBLAS/cuDNN workspaces inside the allocator (WORKSPACES); on top of a predicted peak the card
    needs the CUDA context and library handles (0.5 GiB, outside the allocator; NCCL's buffers too) and the caching
    allocator's fragmentation (5 % of the peak): `allowance(peak)`. The VAE decodes in float32 with autocast off for it
    (DECODE_IN_FP32, as the trainer does: `sd3.decode_latents` switches autocast off, so the VAE runs in its own dtype).
  * Not modelled: CPU memory; a DeQA reward server (its own process, ideally on another GPU); NCCL's buffers (allowance).

Run: .venv/bin/python benchmarks/sd35m_memory_plan.py [--search]   (--search: the largest batch knobs that fit, per preset)
"""
from __future__ import annotations
import contextlib, copy, functools, math, sys, time, types, weakref
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

GiB, GB = 2 ** 30, 10 ** 9
CARDS = {'24 GB': 24 * GB, '80 GB': 80 * GB}   # the smallest "24 GB" cards (L4, A10G) report 22.5 GiB: 24·10⁹ B = 22.35 GiB is below
PRESET_CARDS = {'sd35m-1gpu': '24 GB', 'sd35m-1gpu-80gb': '80 GB', 'sd35m-8gpu': '80 GB'}   # what each preset must fit (per GPU)
PRESET_PROCESSES = {'sd35m-1gpu': 1, 'sd35m-1gpu-80gb': 1, 'sd35m-8gpu': 8}
CUDA_CONTEXT = GiB // 2              # ASSUMED: CUDA context, kernels and library handles, outside the caching allocator
FRAGMENTATION = 0.05                 # ASSUMED: reserved − allocated of PyTorch's caching allocator, as a share of the peak
WORKSPACES = 64 * 2 ** 20            # ASSUMED: cuBLAS/cuBLASLt/cuDNN workspaces allocated through the caching allocator
DECODE_IN_FP32 = True                # the VAE decodes in its float32 weights' dtype, autocast off (see the docstring)
REWARD_OBJECTIVES = 'ocr:1,pickscore:1,aesthetic:1'   # the preset variant with model rewards on the GPU (Flow-GRPO-like)


def allowance(peak: int) -> int:
    "Bytes the card needs beyond the predicted allocator peak: CUDA context + fragmentation."
    return CUDA_CONTEXT + int(FRAGMENTATION * peak)


def fits(peak: int, card_bytes: int) -> bool:
    return peak + allowance(peak) <= card_bytes


# ---------------------------------------------------------------- architectures (published configs)
SD35M_IDS = ('stabilityai/stable-diffusion-3.5-medium',)
# SD3.5-Medium transformer/config.json. Sources, each value checked against at least one:
#  [conv] huggingface/diffusers scripts/convert_sd3_to_diffusers.py: sample_size=128, patch_size=2, in_channels=16,
#         joint_attention_dim=4096 fixed; num_attention_heads = num_layers; caption_projection_dim = rows of
#         context_embedder; "(0, 1, ..., 12) for sd3.5" attn2 layers; "sd3.5 2b use pos_embed_max_size=384";
#         qk_norm "rms_norm" for 3.5; attention_head_dim is the class default 64.
#  [sfu]  diffusers loaders/single_file_utils.py: a checkpoint is "sd35_medium" when pos_embed has 147456 = 384² positions
#         and the adaLN width is 9216 = 6 x 1536 (so hidden = caption_projection_dim = 1536).
#  [card] SD3.5-Medium model card: MMDiT-X with self-attention modules in the first 13 layers, QK-norm, 384x384 positions.
#  [copy] verbatim copies of this config in third-party code (Tenstorrent SD3.5 helpers; a 12-layer SD3.5-M distillation).
#  [keras] keras-hub preset "stable_diffusion_3.5_medium": 3,371,793,763 params = CLIP-L + CLIP-G + MMDiT-X + VAE;
#         our meta-built sum must match it exactly (check_published_total).
SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                         pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# Text encoders (configs of SD3's text_encoder, text_encoder_2, text_encoder_3 as hard-coded in AUTOMATIC1111's sd3
# conditioner). CLIP-L + CLIP-G are covered by the keras-hub total; T5-XXL (the t5-v1_1-xxl encoder, 4.76B) is not.
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
                   hidden_act="quick_gelu", max_position_embeddings=77)
CLIP_G_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
                   hidden_act="gelu", max_position_embeddings=77)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu",
              dropout_rate=0.0)
# SD3 VAE = SDXL's AutoencoderKL config with 16 latent channels and no quant convs ([conv], the VAE branch).
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16, use_quant_conv=False,
               use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
KERAS_HUB_SD35M_TOTAL = 3_371_793_763     # published (keras-hub presets), everything except T5
SD35_SCHEDULER_SHIFT = 3.0

# Reward models (CLIPModel configs written out: the hub's config.json of each model id).
#  openai/clip-vit-large-patch14: ViT-L/14 (24 layers, width 1024, 16 heads, MLP 4096) + text (12 layers, width 768), proj 768.
#  yuvalkirstain/PickScore_v1 (fine-tuned laion/CLIP-ViT-H-14-laion2B-s32B-b79K): ViT-H/14 (32 layers, width 1280, 16 heads,
#  MLP 5120) + text (24 layers, width 1024, 16 heads, MLP 4096), proj 1024, gelu.
REWARD_CLIPS = {
    'openai/clip-vit-large-patch14': dict(
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act='quick_gelu'),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                    image_size=224, hidden_act='quick_gelu'), projection_dim=768),
    'yuvalkirstain/PickScore_v1': dict(
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, hidden_act='gelu'),
        vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
                    image_size=224, hidden_act='gelu'), projection_dim=1024),
}
REWARD_CLIPS['laion/CLIP-ViT-H-14-laion2B-s32B-b79K'] = REWARD_CLIPS['yuvalkirstain/PickScore_v1']


def _quiet():
    from diffusers.utils import logging as dl
    from transformers.utils import logging as tl
    dl.set_verbosity_error(); tl.set_verbosity_error()


def model_kind(model: str) -> str:
    "'sd35m' (SD3.5-Medium), 'sd35m-twin' or 'sd35l-twin'; other models are refused (the plan knows only these)."
    if model in ('sd35m-twin', 'sd35l-twin'): return model
    if model in SD35M_IDS or 'stable-diffusion-3.5-medium' in str(model).lower(): return 'sd35m'
    raise ValueError(f"the memory plan knows SD3.5-Medium ({SD35M_IDS[0]} or a folder named after it), 'sd35m-twin' and "
                     f"'sd35l-twin', not {model!r}")


def _meta(module: torch.nn.Module) -> torch.nn.Module:
    return module.to('meta')


# A narrow SD3.5-M: its block structure (dual attention in the first blocks, then plain ones, qk rms-norm) with 10 blocks of
# width 32, on the CPU. Only for checking the depth extension against a full-depth trace: check_depth_extension.
NARROW = dict(SD35M_TRANSFORMER, sample_size=16, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
              caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16, num_layers=10, dual_attention_layers=tuple(range(5)))


@functools.lru_cache(maxsize=None)
def components(kind: str) -> dict:
    """The pipeline's components at full depth (float32 as built; dtypes are applied per use): on the meta device for
    'sd35m' and the twins, on the CPU for '_narrow' (the depth-extension check; text encoders and VAE of the M twin)."""
    _quiet()
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    from apex_nb.sd3 import sd35_twin_components, tiny_tokenizers
    if kind == 'sd35m':
        tok, tok3 = tiny_tokenizers()     # shapes only: CLIP pads to 77, T5 to max_sequence_length, whatever the vocabulary
        with torch.device('meta'):
            comps = dict(transformer=SD3Transformer2DModel(**SD35M_TRANSFORMER),
                         text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_TEXT)),
                         text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT)),
                         text_encoder_3=T5EncoderModel(T5Config(**T5_XXL)), vae=AutoencoderKL(**SD3_VAE))
        comps.update(tokenizer=tok, tokenizer_2=tok, tokenizer_3=tok3, scheduler=FlowMatchEulerDiscreteScheduler(shift=SD35_SCHEDULER_SHIFT))
        return comps
    with torch.random.fork_rng(devices=[]):        # the twins seed the global RNG: leave the caller's untouched
        if kind == '_narrow':
            torch.manual_seed(0)
            return dict(sd35_twin_components('sd35m-twin'), transformer=SD3Transformer2DModel(**NARROW).eval())
        comps = sd35_twin_components(kind)
    for k, v in comps.items():
        if isinstance(v, torch.nn.Module): comps[k] = _meta(v)
    return comps


def weight_numel(model: torch.nn.Module) -> int:
    "Parameters plus persistent buffers (SD3's 384x384 positional table is a buffer stored in the checkpoint)."
    buffers = sum(b.numel() for m in model.modules() for name, b in m._buffers.items()
                  if b is not None and name not in m._non_persistent_buffers_set)
    return sum(p.numel() for p in model.parameters()) + buffers


def weight_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of a model loaded in `dtype`, as transformers loads it: `_keep_in_fp32_modules` (T5's `wo`) stay float32 in fp16."""
    keep = set(getattr(model, '_keep_in_fp32_modules', None) or []) if dtype == torch.float16 else set()
    size = torch.finfo(dtype).bits // 8
    total = 0
    for name, p in list(model.named_parameters()) + [(n, b) for m_name, m in model.named_modules() for n, b in
                                                      ((f"{m_name}.{k}", b) for k, b in m._buffers.items()
                                                       if b is not None and k not in m._non_persistent_buffers_set)]:
        total += p.numel() * (4 if keep & set(name.split('.')) else size)
    return total


def lora_config(rank: int, alpha: float, targets: tuple):
    from peft import LoraConfig
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights='gaussian', target_modules=list(targets))


def attach_lora(transformer: torch.nn.Module, rank: int, alpha: float, targets: tuple) -> list:
    "The trainer's LoRA (`TrainerCore.add_lora`): base frozen, adapter added, trainable weights in float32. Returns the trainable tensors."
    transformer.requires_grad_(False)
    transformer.add_adapter(lora_config(rank, alpha, targets))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params: p.data = p.data.float()
    return params


@functools.lru_cache(maxsize=None)
def lora_numel(kind: str, rank: int, alpha: float, targets: tuple) -> int:
    "Exact number of trainable LoRA parameters on the full-depth transformer."
    tr = copy.deepcopy(components(kind)['transformer'])
    return sum(p.numel() for p in attach_lora(tr, rank, alpha, targets))


def lora_numel_by_hand(cfg: dict, r: int) -> int:
    "r·(in+out) per adapted Linear: 8 square D×D projections per block, minus to_add_out in the last (context_pre_only) block."
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return (8 * cfg["num_layers"] - 1) * r * 2 * D


def count_components(rank: int = 32, alpha: float = 64, targets: tuple | None = None) -> dict:
    "Exact parameter counts of SD3.5-M's components (+ buffers) and of the recipe's LoRA, all on the meta device."
    from apex_nb.config import LORA_TARGETS
    comps = components('sd35m')
    names = dict(transformer='transformer', clip_l='text_encoder', clip_g='text_encoder_2', t5_xxl='text_encoder_3', vae='vae')
    counts = {k: weight_numel(comps[v]) for k, v in names.items()}
    counts['pos_embed_buffer'] = comps['transformer'].pos_embed.pos_embed.numel()
    counts['lora'] = lora_numel('sd35m', rank, alpha, tuple(targets or LORA_TARGETS))
    return counts


def check_published_total(counts: dict) -> int:
    "Everything but T5 must equal keras-hub's published SD3.5-M parameter count."
    return counts["transformer"] + counts["clip_l"] + counts["clip_g"] + counts["vae"]


@functools.lru_cache(maxsize=None)
def reward_clip(model_id: str, depth: int | None = None):
    "A reward's CLIPModel on the meta device from its written-out config (`depth` layers per tower, all when None)."
    from transformers import CLIPConfig, CLIPModel
    if model_id not in REWARD_CLIPS:
        raise ValueError(f"the memory plan knows the reward models {', '.join(REWARD_CLIPS)}, not {model_id!r}")
    spec = REWARD_CLIPS[model_id]
    text, vision = dict(spec['text']), dict(spec['vision'])
    if depth: text['num_hidden_layers'] = vision['num_hidden_layers'] = depth
    with torch.device('meta'):
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec['projection_dim'])).eval()


def gpu_rewards(cfg, parsed: dict) -> list[tuple[str, object]]:
    """The model-backed rewards of `cfg` that score on the trainer's device (`place_rewards`: those with a `device` option,
    unless `reward_options` names another device)."""
    out = []
    for name, r in parsed['rewards'].items():
        if 'device' not in r.defaults: continue
        device = cfg.reward_options.get(name, {}).get('device', cfg.device)
        if torch.device(device).type == torch.device(cfg.device).type: out.append((name, r))
    return out


def reward_weight_bytes(name: str, reward) -> int:
    "A model reward's weights: its CLIP in the reward's dtype (+ the aesthetic MLP head in float32)."
    from apex_nb.rewards import AestheticMLP, resolve_dtype
    clip = reward_clip(reward.model)
    total = weight_bytes(clip, resolve_dtype(reward.dtype))
    if name == 'aesthetic':
        with torch.device('meta'): total += weight_numel(AestheticMLP(clip.config.projection_dim)) * 4
    return total


# ---------------------------------------------------------------- the tracer
def _tensors(x):
    "The tensors in an op's arguments or results (nested tuples, lists and dicts): a lean pytree flatten, called per op."
    if isinstance(x, torch.Tensor): yield x
    elif isinstance(x, (tuple, list)):
        for y in x: yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values(): yield from _tensors(y)


_aten = torch.ops.aten
_BINARY = {_aten.add.Tensor, _aten.sub.Tensor, _aten.mul.Tensor, _aten.div.Tensor, _aten.add.Scalar, _aten.sub.Scalar,
           _aten.mul.Scalar, _aten.div.Scalar, _aten.maximum.default, _aten.minimum.default}
_UNARY = {_aten.neg.default, _aten.exp.default, _aten.rsqrt.default, _aten.sqrt.default, _aten.silu.default, _aten.sigmoid.default,
          _aten.tanh.default, _aten.reciprocal.default, _aten.pow.Tensor_Scalar, _aten.gelu.default, _aten.clone.default,
          _aten.relu.default, _aten.abs.default, _aten.log.default}
_MATMUL = {_aten.mm.default: lambda a, b: (a.shape[0], b.shape[1]), _aten.addmm.default: lambda c, a, b: (a.shape[0], b.shape[1]),
           _aten.bmm.default: lambda a, b: (a.shape[0], a.shape[1], b.shape[2])}
_FAST = _BINARY | _UNARY | set(_MATMUL)


def _fast_meta(func, args, kwargs):
    """The result of a pointwise op on contiguous floating meta tensors or of a matrix product, without PyTorch's Python meta
    kernels (≈ 1 ms each): an empty contiguous tensor of the result's shape and dtype. None when the op or its inputs are not
    that case (then the op runs as usual)."""
    if func in _MATMUL:
        if kwargs or any(not isinstance(x, torch.Tensor) or x.device.type != 'meta' for x in args): return None
        a = args[-2]
        if a.dtype != args[-1].dtype or (len(args) == 3 and args[0].dtype != a.dtype): return None
        return torch.empty(_MATMUL[func](*args), dtype=a.dtype, device='meta')
    if func in _UNARY:
        a = args[0]
        if not (isinstance(a, torch.Tensor) and a.device.type == 'meta' and a.is_floating_point() and a.is_contiguous()): return None
        if kwargs.get('memory_format') not in (None, torch.preserve_format, torch.contiguous_format): return None
        return torch.empty(a.shape, dtype=a.dtype, device='meta')
    if func in _BINARY:
        a, b = args[0], args[1]
        ts = [x for x in (a, b) if isinstance(x, torch.Tensor)]
        if not ts or any(x.device.type != 'meta' or not x.is_floating_point() or not x.is_contiguous() for x in ts): return None
        if not all(isinstance(x, (torch.Tensor, int, float)) for x in (a, b)) or isinstance(b, bool): return None
        shape = torch.broadcast_shapes(*(x.shape for x in ts))
        return torch.empty(shape, dtype=torch.result_type(a, b), device='meta')
    return None


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages allocated inside the trace and still alive, after every op, with the peak per segment
    (`mark`). A storage counts from the op that creates it (an output not aliasing an input) until its last reference dies
    (a finalizer on the storage). Storages that existed before the trace (weights, inputs) are not counted."""
    def __init__(self):
        super().__init__()
        self.live, self.now, self.ops, self.segment, self.peaks = {}, 0, 0, 'start', {}

    def _free(self, key):
        self.now -= self.live.pop(key, 0)

    def _note(self):
        if self.now > self.peaks.get(self.segment, -1): self.peaks[self.segment] = self.now

    def mark(self, segment: str):
        self.segment = segment; self._note()

    @property
    def peak(self) -> int: return max(self.peaks.values(), default=0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _fast_meta(func, args, kwargs) if func in _FAST else None
        if out is None: out = func(*args, **kwargs)
        self.ops += 1
        inputs = None
        for t in _tensors(out):
            s = t.untyped_storage()
            key = s._cdata
            if key in self.live: continue
            if inputs is None:
                inputs = {a.untyped_storage()._cdata for a in _tensors((args, kwargs))}
            if key in inputs: continue                      # a view or an in-place result: no new memory
            n = s.nbytes()
            self.live[key] = n; self.now += n
            weakref.finalize(s, self._free, key)
        self._note()
        return out


class FlashSDPA(torch.autograd.Function):
    """scaled_dot_product_attention as FlashAttention-2 / memory-efficient attention allocate it on the GPU (values are not
    computed: zeros off the meta device, so that a CPU check never computes on garbage): forward keeps q, k, v, out and a
    float32 logsumexp; backward allocates dq, dk, dv and a float32 dq accumulator."""
    @staticmethod
    def forward(ctx, q, k, v):
        new = q.new_empty if q.device.type == 'meta' else q.new_zeros
        out = new(q.shape[:-1] + v.shape[-1:])
        lse = new(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        new = q.new_empty if q.device.type == 'meta' else q.new_zeros
        dq_accum = new(q.shape, dtype=torch.float32)
        softmax_d = new(q.shape[:-1], dtype=torch.float32)
        dq, dk, dv = new(q.shape), new(k.shape), new(v.shape)
        del dq_accum, softmax_d
        return dq, dk, dv


@functools.lru_cache(maxsize=None)
def autocast_policies() -> dict:
    """CUDA autocast's policy of every torch function that reaches an op of its lists, for the installed torch: the lists
    are read from ATen's autocast_mode.h by `apex_nb.devicecheck.cuda_autocast_lists` (one source with the pretend-CUDA
    harness). An op `name` is reached as torch.name, Tensor.name, F.name, torch._C._nn.name or torch.linalg.*; F.interpolate
    reaches the upsample ops (float32 policy)."""
    from apex_nb.devicecheck import cuda_autocast_lists
    table = {}
    for policy, ops in cuda_autocast_lists().items():
        for name, _ in ops:
            for owner, attr in ((torch, name), (torch.Tensor, name), (F, name), (torch._C._nn, name),
                                (torch.linalg, name.removeprefix('linalg_'))):
                f = getattr(owner, attr, None) if owner is not torch.linalg or name.startswith('linalg_') else None
                if callable(f): table.setdefault(f, policy)
    table.update({torch.Tensor.__matmul__: 'lower_precision_fp', torch.Tensor.__rmatmul__: 'lower_precision_fp',
                  torch.Tensor.__pow__: 'fp32', torch.Tensor.__rpow__: 'fp32', F.interpolate: 'fp32'})
    return table


HOST_SYNC = {torch.Tensor.item: 0.0, torch.Tensor.__float__: 0.0, torch.Tensor.__int__: 0, torch.Tensor.__bool__: True,
             torch.Tensor.tolist: []}
_GPU: list = []   # the active GpuLike (the checkpoint function restores its autocast state on recomputation)


class GpuLike(TorchFunctionMode):
    "What the GPU run does differently from a meta run, for memory: CUDA autocast (emulated), flash SDPA, no host syncs."
    def __init__(self):
        super().__init__()
        self.dtype, self.cache = None, {}

    def __enter__(self):
        _GPU.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _GPU.remove(self)
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def autocast(self, dtype, enabled: bool = True):
        "Like torch.autocast('cuda', dtype, enabled): nested regions restore the outer state; the cast cache lives per outermost region."
        prev, outer = self.dtype, self.dtype is None
        self.dtype = dtype if enabled else None
        if outer: self.cache = {}
        try: yield
        finally:
            self.dtype = prev
            if outer: self.cache = {}

    def _cast(self, a, to):
        "autocast's cast of one argument (tensors in lists too): floating, not float64; trainable leaves cached for the region."
        if isinstance(a, (list, tuple)): return type(a)(self._cast(x, to) for x in a)
        if not (isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype not in (to, torch.float64)): return a
        if a.is_leaf and a.requires_grad and to != torch.float32:
            hit = self.cache.get(id(a))
            if hit is None: hit = self.cache[id(a)] = (a, a.to(to))
            return hit[1]
        return a.to(to)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_SYNC and isinstance(args[0], torch.Tensor) and args[0].device.type == 'meta': return HOST_SYNC[func]
        policy = autocast_policies().get(func) if self.dtype is not None else None
        if policy is not None:
            ts = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
            to = None
            if policy == 'lower_precision_fp': to = self.dtype
            elif policy == 'fp32': to = torch.float32
            elif policy == 'promote':
                to = torch.float32 if any(t.is_floating_point() and t.dtype == torch.float32 for t in ts) else self.dtype
            elif policy == 'fp32_set_opt_dtype' and ts and ts[0].dtype in (torch.float16, torch.bfloat16) and kwargs.get('dtype') is None:
                kwargs = {**kwargs, 'dtype': torch.float32}
            if to is not None:
                args, kwargs = tuple(self._cast(a, to) for a in args), {k: self._cast(v, to) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention: return FlashSDPA.apply(args[0], args[1], args[2])
        return func(*args, **kwargs)


def checkpoint_like_diffusers(module, *args):
    """diffusers' default gradient checkpointing (torch.utils.checkpoint, non-reentrant), with the emulated autocast state of
    the forward restored when the block is recomputed (torch.utils.checkpoint does that for the real autocast). The RNG
    state is not saved (meta tensors have none; on the GPU it is a few bytes)."""
    gpu = _GPU[-1] if _GPU else None
    dtype = gpu.dtype if gpu is not None else None
    hook = getattr(module, '_plan_checkpoint_hook', None)
    if hook is not None: hook(args)

    def run(*a):   # recomputation runs inside backward(), where the function mode is not active: enter it again
        from torch.overrides import _get_current_function_mode_stack
        with (gpu if gpu is not None and gpu not in _get_current_function_mode_stack() else contextlib.nullcontext()):
            with (gpu.autocast(dtype) if dtype is not None else contextlib.nullcontext()): return module(*a)
    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False)


def _autocast_dtype(cfg):
    return {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(cfg.mixed_precision)


def _cast_like_loader(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    "`model.to(dtype)`, T5's `_keep_in_fp32_modules` back to float32 in fp16 (as transformers loads them)."
    model.to(dtype)
    keep = set(getattr(model, '_keep_in_fp32_modules', None) or []) if dtype == torch.float16 else set()
    for name, m in model.named_modules():
        if keep & set(name.split('.')): m.float()
    return model


def block_types(num_layers: int, dual: tuple) -> list[str]:
    return ['dual' if k in dual else 'plain' for k in range(num_layers - 1)] + ['last']


def reduced_layout(num_layers: int, dual: tuple) -> list[str]:
    "The traced blocks: the first block, one more of every middle type (so its inputs need grad), and the last block."
    full = block_types(num_layers, dual)
    return full[:1] + [t for t in ('dual', 'plain') if t in full[1:-1]] + ['last']


def reduced_transformer(kind: str, full_depth: bool = False):
    "The transformer with the reduced layout (real width; all blocks when `full_depth`) and the number of blocks it leaves out."
    from diffusers import SD3Transformer2DModel
    tr = components(kind)['transformer']
    conf = dict(tr.config)
    layout = reduced_layout(conf['num_layers'], tuple(conf['dual_attention_layers']))
    if full_depth or len(layout) >= conf['num_layers']: return copy.deepcopy(tr), 0
    conf = {k: v for k, v in conf.items() if not k.startswith('_')}
    conf.update(num_layers=len(layout), dual_attention_layers=tuple(i for i, t in enumerate(layout) if t == 'dual'))
    with torch.device(tr.device): small = SD3Transformer2DModel(**conf)
    return small, tr.config.num_layers - len(layout)


def reduced_text_encoder(enc, layers: int = 1):
    "A text encoder with `layers` layers (no-grad peaks do not depend on depth), on the meta device."
    conf = copy.deepcopy(enc.config)
    if hasattr(conf, 'num_hidden_layers'):
        if conf.num_hidden_layers <= layers: return copy.deepcopy(enc)
        conf.num_hidden_layers = layers
    else:
        if conf.num_layers <= layers: return copy.deepcopy(enc)
        conf.num_layers = layers
    with torch.device(enc.device): return type(enc)(conf).eval()


@functools.lru_cache(maxsize=8)
def tracing_pipeline(kind: str, dtype: torch.dtype, vae_dtype: torch.dtype, rank: int, alpha: float, targets: tuple, ckpt: bool,
                     full_depth: bool = False):
    "The trainer's pipeline for tracing: reduced transformer with the LoRA (and checkpointing), reduced text encoders, the VAE."
    from diffusers import StableDiffusion3Pipeline
    comps = components(kind)
    tr, extra = reduced_transformer(kind, full_depth)
    tr = _cast_like_loader(tr, dtype).eval()
    params = attach_lora(tr, rank, alpha, targets)
    if ckpt: tr.enable_gradient_checkpointing(checkpoint_like_diffusers)
    encs = {k: _cast_like_loader(reduced_text_encoder(comps[k]), dtype) for k in ('text_encoder', 'text_encoder_2', 'text_encoder_3')}
    vae = copy.deepcopy(comps['vae']).to(vae_dtype).eval()
    pipe = StableDiffusion3Pipeline(transformer=tr, vae=vae, scheduler=copy.deepcopy(comps['scheduler']),
                                    tokenizer=comps['tokenizer'], tokenizer_2=comps['tokenizer_2'], tokenizer_3=comps['tokenizer_3'], **encs)
    pipe.set_progress_bar_config(disable=True)
    return types.SimpleNamespace(pipe=pipe, params=params, extra_blocks=extra)


def _pipe_key(cfg):
    from apex_nb.config import LORA_TARGETS
    return (model_kind(cfg.model), getattr(torch, cfg.dtype), getattr(torch, cfg.vae_dtype), cfg.lora_rank, cfg.lora_alpha,
            tuple(cfg.lora_targets if hasattr(cfg, 'lora_targets') else LORA_TARGETS), bool(cfg.gradient_checkpointing), False)


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try: yield
    finally: setattr(obj, name, old)


TRACE_STEPS = 1   # denoising steps traced; the others only append a latent and a log-prob per image (added exactly)


def _bytes(dtype) -> int: return torch.finfo(dtype).bits // 8


@functools.lru_cache(maxsize=64)
def trace_sampler_call(key: tuple, n: int, group_size: int, steps: int, decode_batch: int, guidance: float, noise: float,
                       resolution: int, max_seq: int, autocast, lora_full: int, fp32_decode: bool = True) -> dict:
    """One `sample_with_logprob` call of `n` images (prompts repeated `group_size` times, as the trainer expands them), under
    the accelerator's autocast, traced for min(steps, TRACE_STEPS) steps. Returns the peak per segment (encode / denoise /
    decode / assemble) extended to `steps` and to the full LoRA (autocast caches its cast for the whole call), and the
    trajectory bytes per image."""
    import apex_nb.sd3 as sd3
    tp = tracing_pipeline(*key)
    pipe, T = tp.pipe, min(steps, TRACE_STEPS)
    prompts = [f'a prompt {i // group_size}' for i in range(n)]
    live, gpu = LiveBytes(), GpuLike()
    decode = sd3.decode_latents

    def decode_marked(p, latents, batch_size=None):
        live.mark('decode')
        with (gpu.autocast(None, enabled=False) if fp32_decode else contextlib.nullcontext()):
            out = decode(p, latents, batch_size)
        live.mark('assemble')
        return out

    def denoising(*_):
        if live.segment == 'encode': live.mark('denoise')
    hook = pipe.transformer.register_forward_pre_hook(denoising)
    try:
        with _patched(sd3, 'decode_latents', decode_marked), gpu, live:
            live.mark('encode')
            with (gpu.autocast(autocast) if autocast is not None else contextlib.nullcontext()):
                traj = sd3.sample_with_logprob(pipe, prompts, T, guidance, noise, resolution, resolution, None, max_seq, decode_batch or None)
    finally: hook.remove()
    lat = traj.latents[:, 0].nbytes // n                      # one float32 latent of one image
    per_step = n * (lat + 4)                                  # what a step appends: a latent and a log-prob per image
    grow = steps - T
    cache = (lora_full - sum(p.numel() for p in tp.params)) * _bytes(autocast) if autocast is not None else 0
    ext = dict(encode=0, denoise=grow * per_step + cache, decode=grow * per_step + cache, assemble=3 * grow * per_step + cache)
    peaks = {s: p + ext.get(s, 0) for s, p in live.peaks.items() if s != 'start'}
    per_image = sum(getattr(traj, k).nbytes for k in ('images', 'latents', 'log_probs', 'prompt_embeds', 'pooled_prompt_embeds')) // n
    return dict(peaks=peaks, per_image=per_image + grow * (lat + 4), ops=live.ops)


@functools.lru_cache(maxsize=64)
def trace_micro_batch(key: tuple, m: int, steps: int, k: int, kl_beta: float, noise: float, guidance: float, resolution: int,
                      max_seq: int, conflicts: bool, aggregator: bool, autocast, lora_full: int, clip_range: float = 1e-4) -> dict:
    """`GRPOTrainer._accumulate` on a micro-batch of `m` samples at one timestep (the trainer's own code on a stub trainer:
    its cfg, transformer, LoRA params, accelerator autocast/backward), traced. Returns the peak per segment (policy forward,
    conflicts, reference, backward, jacobian), extended to the full depth and the full LoRA:
      + (left-out blocks) × (what the checkpoint keeps per block: its input image and text states, measured) everywhere;
      + the autocast cache of the left-out LoRA (bf16 copies) in the policy forward;
      + the left-out LoRA's gradients that the diagnostic's one backward returns (and drops: its hooks add into the K×P
        matrix, allocated before the micro-batch and counted by the plan);
      + K rows of left-out LoRA gradients during the K backward passes of an aggregator (K−1 finished rows and the one
        being captured), and 3·K·(left-out LoRA)·4 B while the rows are flattened and stacked (rows + flats + stack; then
        stack + its float64 copy); the checkpointed inputs are gone by then."""
    import apex_nb.diagnostics as diag
    import apex_nb.grpo as grpo
    from apex_nb.sd3 import Trajectory
    tp = tracing_pipeline(*key)
    tr, params = tp.pipe.transformer, tp.params
    comps = components(key[0])
    C_lat, lat_side = tr.config.in_channels, resolution // (2 ** (len(comps['vae'].config.block_out_channels) - 1))
    dev, dt = tr.device, key[1]
    M = lambda *s, dt=torch.float32: torch.zeros(*s, device=dev, dtype=dt)
    # the trajectory is resident (counted apart): here only the m samples the micro-batch indexes
    traj = Trajectory(M(m, 3, 8, 8), M(m, steps + 1, C_lat, lat_side, lat_side), M(m, steps), M(steps), M(steps + 1) + 0.5, M(steps) + 0.5,
                      M(2 * m, 77 + max_seq, tr.config.joint_attention_dim, dt=dt), M(2 * m, tr.config.pooled_projection_dim, dt=dt), guidance)
    for p in params: p.grad = None if aggregator else torch.zeros_like(p)    # steady state: .grad exists from micro-batch 2 on
    P_R = sum(p.numel() for p in params)
    J = M(k, P_R) if aggregator else None
    live, gpu = LiveBytes(), GpuLike()
    block_inputs = []
    for blk in tr.transformer_blocks:
        blk._plan_checkpoint_hook = lambda args: block_inputs.append(sum(a.untyped_storage().nbytes() for a in args[:2] if isinstance(a, torch.Tensor)))

    class Acc:
        def autocast(self): return gpu.autocast(autocast) if autocast is not None else contextlib.nullcontext()
        def backward(self, loss): live.mark('backward'); loss.backward()
    cfg = types.SimpleNamespace(noise_level=noise, clip_range=clip_range, kl_beta=kl_beta, train_cfg=True)
    stub = types.SimpleNamespace(cfg=cfg, pipe=types.SimpleNamespace(transformer=tr), acc=Acc(), aggregator='agg' if aggregator else None,
                                 params=params, names=[f'objective{i}' for i in range(k)])
    grads = diag.LinearObjectiveGrads(tr, params, k) if conflicts else None    # its K×P matrix exists before the micro-batch
    accumulate = grads.accumulate if grads is not None else None
    jacobian_fn, flat_fn = diag.objective_jacobian, diag._flat

    def accumulate_marked(*a, **kw):                                 # the diagnostic's one backward through the retained graph
        live.mark('conflicts'); out = accumulate(*a, **kw); live.mark('policy'); return out

    def jacobian_marked(*a, **kw):                                   # the aggregator's backward
        live.mark('backward')
        return jacobian_fn(*a, **kw)

    def flat_marked(*a, **kw):                                       # the K rows are there: flatten and stack them
        if live.segment == 'backward': live.mark('jacobian')
        return flat_fn(*a, **kw)
    disable, enable = tr.disable_adapters, tr.enable_adapters
    stats = dict(loss=0.0, pg_loss=0.0, kl=0.0, clip_frac=0.0, ratio_first=math.nan, ratio_min=math.inf, ratio_max=-math.inf, cos=None,
                 conflict_rate=None, diag_seconds=0.0, diag_path=None)
    A, C = M(m), M(m, k)
    chunk = torch.arange(m, device=dev)
    try:
        with _patched(grads, 'accumulate', accumulate_marked) if grads is not None else contextlib.nullcontext(), \
             _patched(diag, 'objective_jacobian', jacobian_marked), _patched(grpo, 'objective_jacobian', jacobian_marked), \
             _patched(diag, '_flat', flat_marked), _patched(tr, 'disable_adapters', lambda: (live.mark('reference'), disable())), \
             _patched(tr, 'enable_adapters', lambda: (enable(), live.mark('policy'))), gpu, live:
            live.mark('policy')
            grpo.GRPOTrainer._accumulate(stub, traj, A, C, 0, chunk, m, 1, stats, J, diag=grads)
    finally:
        for blk in tr.transformer_blocks: del blk._plan_checkpoint_hook
        for p in params: p.grad = None
    per_block = max(block_inputs, default=0)
    extra = tp.extra_blocks * per_block                               # the left-out blocks keep only their checkpointed inputs
    gap = lora_full - P_R
    ext = {'policy': extra + (gap * _bytes(autocast) if autocast is not None else 0), 'reference': extra,
           'conflicts': extra + gap * 4,                                                       # the graph is retained
           'backward': extra + (k * gap * 4 if aggregator else 0), 'jacobian': 3 * k * gap * 4}   # the last pass freed the graph
    peaks = {s: p + ext.get(s, extra) for s, p in live.peaks.items() if s != 'start'}
    return dict(peaks=peaks, per_block=per_block, extra_blocks=tp.extra_blocks, traced_lora=P_R, ops=live.ops)


def check_depth_extension(m: int = 2, k: int = 3, conflicts: bool = True, aggregator: bool = False) -> dict:
    """The depth (and LoRA-size) extension against a full-depth trace, on a narrow 10-block SD3.5-M on the CPU (float32 without
    autocast: bf16 matmuls are slow on CPUs; LoRA r4, 128 px, 8 T5 tokens, `k` objectives). Returns both peak-per-segment dicts."""
    from apex_nb.config import LORA_TARGETS
    key = ('_narrow', torch.float32, torch.float32, 4, 8, tuple(LORA_TARGETS), True)
    full = lora_numel('_narrow', 4, 8, tuple(LORA_TARGETS))
    args = (m, 4, k, 0.04, 0.7, 4.5, 128, 8, conflicts, aggregator, None, full)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                  # tiny ops: threads only wait for each other (and for other processes)
    try: return dict(extended=trace_micro_batch(key + (False,), *args)['peaks'], full=trace_micro_batch(key + (True,), *args)['peaks'])
    finally: torch.set_num_threads(threads)


@functools.lru_cache(maxsize=16)
def trace_reward(model_id: str, dtype: torch.dtype, batch: int, n_images: int) -> int:
    "ClipScore.embed_images + embed_texts of one batch on the GPU (pixel values and token ids created there), traced, 2 layers/tower."
    clip = _cast_like_loader(copy.deepcopy(reward_clip(model_id, depth=2)), dtype)
    size = clip.config.vision_config.image_size
    b = min(batch, n_images)
    live, gpu = LiveBytes(), GpuLike()
    with torch.no_grad(), gpu, live:
        px = torch.empty(b, 3, size, size, dtype=dtype, device='meta')
        img = F.normalize(clip.visual_projection(clip.vision_model(pixel_values=px).pooler_output).float(), dim=-1)
        del px
        ids = torch.zeros(b, 77, dtype=torch.long, device='meta')
        h = clip.text_model(input_ids=ids, attention_mask=torch.ones_like(ids))
        txt = F.normalize(clip.text_projection(h.pooler_output).float(), dim=-1)
        (img * txt).sum(-1)
    return live.peak + n_images * clip.config.projection_dim * 4 * 2      # + the embeddings of all images and prompts


@functools.lru_cache(maxsize=16)
def trace_uint8(n: int, resolution: int, dtype: torch.dtype) -> int:
    "`TrainerCore.score`'s `(images.clamp(0, 1) * 255).round().to(torch.uint8)` on the GPU (before `.cpu()`), traced."
    images = torch.empty(n, 3, resolution, resolution, dtype=dtype, device='meta')
    live = LiveBytes()
    with live: (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return live.peak


@functools.lru_cache(maxsize=8)
def trace_optimizer(shapes: tuple, lr: float, weight_decay: float, grad_clip: float) -> int:
    "Clipping + AdamW (foreach, as on the GPU) on the LoRA tensors in steady state (moments exist), traced."
    params = [torch.empty(s, device='meta', requires_grad=True) for s in shapes]
    for p in params: p.grad = torch.empty_like(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    opt.step()                                                # creates the moments (resident, counted separately)
    live = LiveBytes()
    with GpuLike(), live:
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=False)   # foreach norms are not available on meta: per tensor
        opt.step()
    return live.peak


# ---------------------------------------------------------------- the plan
def _largest(sizes: list[int]) -> int: return max(sizes) if sizes else 0


def plan_details(cfg, num_processes: int = 1, phases: tuple | None = None) -> dict:
    """The plan with its terms: {'phases': {phase: {'total': bytes, 'terms': {term: bytes}}}, 'resident': {...}, 'batches':
    {...}, 'traces': {...}}. `phases` limits the work to some phases (tracing is the slow part)."""
    from apex_nb.config import GRPOConfig, decode_batches, local_samples, micro_batches, sampler_batches, split_sizes, validate_config
    if not isinstance(cfg, GRPOConfig): raise TypeError(f"the memory plan covers GRPO configs (GRPOConfig), not {type(cfg).__name__}")
    parsed = validate_config(cfg)
    kind, key = model_kind(cfg.model), _pipe_key(cfg)
    comps = components(kind)
    want = lambda p: phases is None or p in phases
    dtype, vae_dtype, ac = getattr(torch, cfg.dtype), getattr(torch, cfg.vae_dtype), _autocast_dtype(cfg)
    k = len(parsed['objectives'])
    P = lora_numel(kind, cfg.lora_rank, cfg.lora_alpha, key[5])
    aggregator = cfg.aggregator != 'none'

    # resident: weights, LoRA state, reward models, workspaces
    resident = {'transformer': weight_bytes(comps['transformer'], dtype),
                'text encoders': sum(weight_bytes(comps[n], dtype) for n in ('text_encoder', 'text_encoder_2', 'text_encoder_3')),
                'VAE': weight_bytes(comps['vae'], vae_dtype),
                'LoRA (fp32)': P * 4, 'AdamW m, v (fp32)': P * 8}
    for name, r in gpu_rewards(cfg, parsed): resident[f'reward {name}'] = reward_weight_bytes(name, r)
    resident['workspaces (assumed)'] = WORKSPACES
    base = sum(resident.values())

    n_local = local_samples(cfg, num_processes)
    calls = sampler_batches(cfg, num_processes)
    n_call = _largest(calls)
    dec = _largest(decode_batches(cfg, num_processes))
    micro = micro_batches(cfg, n_local)
    m = _largest(micro)
    n_eval = _largest(split_sizes(len(parsed['eval_prompts']), cfg.sample_batch_size))
    batches = dict(local_samples=n_local, sampler_calls=calls, sampler_batch=n_call, decode_batch=dec, micro_batches=len(micro),
                   micro_batch=m, eval_batch=n_eval, objectives=k, lora_params=P)
    sample_args = (cfg.guidance_scale, cfg.noise_level, cfg.resolution, cfg.max_sequence_length, ac, P)
    call = trace_sampler_call(key, n_call, cfg.group_size, cfg.sample_steps, _largest(split_sizes(n_call, cfg.decode_batch_size)),
                              *sample_args, DECODE_IN_FP32)
    traj = call['per_image'] * n_local                               # the step's trajectory (cat_trajectories' result)
    out, traces = {}, {'sampler': call}

    def phase(name, **terms):
        terms = {'resident': base, **{t: v for t, v in terms.items() if v}}
        out[name] = dict(total=sum(terms.values()), terms=terms)

    if want('sampling'):
        enc, den, decp, asm = (call['peaks'].get(s, 0) for s in ('encode', 'denoise', 'decode', 'assemble'))
        earlier = call['per_image'] * (n_local - n_call)
        phase('sampling', **{'earlier calls\' trajectories': earlier,
                             f'sampler call ({n_call} images, decode {dec}): peak': max(enc, den, decp, asm)})
        out['sampling']['segments'] = dict(encode=enc, denoise=den, decode=decp, assemble=asm)
    if want('collect'):
        phase('collect', **{'trajectory (calls + concatenation)': traj * (2 if len(calls) > 1 else 1)})
    if want('scoring'):
        images = torch.float32 if DECODE_IN_FP32 else (ac or vae_dtype)
        conv = trace_uint8(n_local, cfg.resolution, images)
        rewards = max((trace_reward(r.model, getattr(torch, r.dtype), r.batch_size, n_local) for _, r in gpu_rewards(cfg, parsed)), default=0)
        phase('scoring', trajectory=traj, **{'images → uint8 / reward forward': max(conv, rewards)})
    grads = 0 if aggregator else P * 4
    jac = k * P * 4 if aggregator else 0
    small = n_local * (1 + k) * 4 * 2                                 # A and C on the device
    if want('training') or want('conflicts'):
        conflict = cfg.conflict_every > 0          # one trace: the diagnostic's micro-batch runs the plain one after it
        mb = trace_micro_batch(key, m, cfg.sample_steps, k, cfg.kl_beta, cfg.noise_level, cfg.guidance_scale, cfg.resolution,
                               cfg.max_sequence_length, conflict, aggregator, ac, P, cfg.clip_range)
        traces['micro_batch'] = mb
        pk = mb['peaks']
        segs = {s: pk.get(s, 0) for s in ('policy', 'reference', 'backward', 'jacobian')}
        terms = {'trajectory': traj, 'LoRA grads (fp32)': grads, 'advantages, contributions': small, 'K×P Jacobian (fp32)': jac}
        if want('training'):
            phase('training', **terms, **{f'micro-batch ({m} samples × CFG) peak': max(segs.values())})
            out['training']['segments'] = segs
        if conflict and want('conflicts'):
            # the diagnostic's K×P float32 matrix lives through the micro-batches; after them conflict_stats copies it to float64
            diag_segs = dict(conflicts=pk.get('conflicts', 0), stats=k * P * 8 + k * k * 8)
            phase('conflicts', **terms, **{'K×P conflict matrix (fp32)': k * P * 4,
                                           f'micro-batch + conflict diagnostic (K={k}), or its float64 copy: peak': max(max(segs.values()), *diag_segs.values())})
            out['conflicts']['segments'] = diag_segs
    if aggregator and want('aggregate'):
        phase('aggregate', trajectory=traj, **{'K×P Jacobian (fp32)': jac, 'combined vector + new grads (derived)': 2 * P * 4,
                                               'Gramian K×K': k * k * 8})
    if want('optimizer'):
        shapes = tuple(tuple(p.shape) for p in tracing_pipeline(*key).params)
        scale = P / max(1, sum(math.prod(s) for s in shapes))       # the traced (reduced-depth) LoRA → the full one
        opt = int(trace_optimizer(shapes, cfg.lr, cfg.weight_decay, cfg.grad_clip) * scale)
        phase('optimizer', trajectory=traj, **{'LoRA grads (fp32)': P * 4, 'clip + AdamW step (foreach)': opt})
    if want('eval'):
        ev = trace_sampler_call(key, n_eval, 1, cfg.eval_sample_steps, _largest(split_sizes(n_eval, cfg.decode_batch_size)), cfg.guidance_scale, 0.0,
                                cfg.resolution, cfg.max_sequence_length, ac, P, DECODE_IN_FP32)
        n_ev = len(parsed['eval_prompts'])
        phase('eval', **{'earlier eval calls': ev['per_image'] * (n_ev - n_eval), f'eval sampler call ({n_eval} images)': max(ev['peaks'].values())})
    return dict(phases=out, resident=resident, batches=batches, traces=traces, kind=kind)


def plan(cfg, num_processes: int = 1) -> dict[str, int]:
    """Predicted peak bytes per phase for one process (what torch.cuda.max_memory_allocated measures); the card also needs
    `allowance(max(plan(cfg).values()))`. Raises for configs the plan does not cover (non-GRPO configs, other models)."""
    return {name: p['total'] for name, p in plan_details(cfg, num_processes)['phases'].items()}


def peak_phase(phases: dict) -> tuple[str, int]:
    name = max(phases, key=phases.get)
    return name, phases[name]


# ---------------------------------------------------------------- choosing batch knobs
def divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def largest_fitting(preset: str, card_bytes: int, num_processes: int = 1, **overrides) -> dict:
    """The largest sample_batch_size (then decode_batch_size) and train_batch_size whose phases fit `card_bytes`, among the
    divisors of the local samples (even calls and micro-batches). None for a knob when even 1 does not fit."""
    from apex_nb.config import local_samples, make_config
    base = make_config(preset, **overrides)
    n = local_samples(base, num_processes)
    ok = lambda c, ph: all(fits(v['total'], card_bytes) for v in plan_details(c, num_processes, ph)['phases'].values())
    best = dict(sample_batch_size=None, decode_batch_size=None, train_batch_size=None)
    for s in divisors(n):
        for d in divisors(s):
            c = make_config(preset, **{**overrides, 'sample_batch_size': s, 'decode_batch_size': d})
            if ok(c, ('sampling',)): best.update(sample_batch_size=s, decode_batch_size=d); break
        if best['sample_batch_size']: break
    for t in divisors(n):
        c = make_config(preset, **{**overrides, 'train_batch_size': t, 'grad_accum': 1})
        if ok(c, ('training', 'conflicts')): best['train_batch_size'] = t; break
    return best


# ---------------------------------------------------------------- report
def gib(n: int) -> str: return f"{n / GiB:7.2f}"


REWARDS_BF16 = {'pickscore': {'dtype': 'bfloat16'}, 'aesthetic': {'dtype': 'bfloat16'}}
VARIANTS = {'as shipped': {}, '+ rewards fp32': dict(objectives=REWARD_OBJECTIVES),
            '+ rewards bf16': dict(objectives=REWARD_OBJECTIVES, reward_options=REWARDS_BF16)}


def preset_report(name: str, **overrides) -> dict:
    "plan_details of a preset (on its number of processes), with `overrides`."
    from apex_nb.config import make_config
    return plan_details(make_config(name, **overrides), PRESET_PROCESSES[name])


def print_preset(name: str, reports: dict) -> None:
    "The phase table of a preset: GiB per phase for every variant, the largest terms, the segments, and the verdicts."
    d, card = reports['as shipped'], PRESET_CARDS[name]
    b = d['batches']
    print(f"\n== {name} ({PRESET_PROCESSES[name]} process{'es' if PRESET_PROCESSES[name] > 1 else ''}, must fit {card} per GPU): "
          f"{b['local_samples']} images per GPU per step in sampler calls of {b['sampler_batch']} (decode {b['decode_batch']}), "
          f"{b['micro_batches']} micro-batches of {b['micro_batch']}, K={b['objectives']}")
    print(f"  {'phase':<11}" + ''.join(f"{v:>16}" for v in reports) + "   (GiB)  largest terms of 'as shipped' (GiB)")
    for ph, p in d['phases'].items():
        terms = sorted(((t, v) for t, v in p['terms'].items() if t != 'resident'), key=lambda tv: -tv[1])[:2]
        cells = ''.join(f"{r['phases'][ph]['total'] / GiB:16.2f}" for r in reports.values())
        print(f"  {ph:<11}{cells}          resident {p['terms']['resident'] / GiB:.2f}; " + '; '.join(f"{t} {v / GiB:.2f}" for t, v in terms))
        if p.get('segments'):
            print(f"  {'':<11}{'':>{16 * len(reports)}}            segments: " +
                  ', '.join(f"{k} {v / GiB:.2f}" for k, v in p['segments'].items() if v))
    for label, r in reports.items():
        ph, peak = peak_phase(plan_from(r))
        need = peak + allowance(peak)
        print(f"  {label:<15} peak phase {ph:<9} {peak / GiB:6.2f} GiB + allowance {allowance(peak) / GiB:.2f} = {need / GiB:6.2f} GiB "
              f"vs {card} = {CARDS[card] / GiB:.2f} GiB: {'FITS' if fits(peak, CARDS[card]) else 'DOES NOT FIT'} "
              f"(headroom {(CARDS[card] - need) / GiB:+.2f} GiB)")


def main(argv=None) -> int:
    import argparse
    from apex_nb.config import make_config
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--search', action='store_true', help='the largest batch knobs that fit, per preset (slow: traces each candidate)')
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    counts = count_components()
    total = check_published_total(counts)
    print("SD3.5-M parameters (meta device, exact): transformer {transformer:,} (incl. pos_embed buffer {pos_embed_buffer:,}), "
          "CLIP-L {clip_l:,}, CLIP-G {clip_g:,}, T5-XXL {t5_xxl:,}, VAE {vae:,}, LoRA r32 {lora:,}".format(**counts))
    print(f"check: transformer+CLIP-L+CLIP-G+VAE = {total:,} vs keras-hub {KERAS_HUB_SD35M_TOTAL:,}: "
          f"{'EXACT' if total == KERAS_HUB_SD35M_TOTAL else 'MISMATCH'}; LoRA by hand (8·24−1)·r·2D = "
          f"{lora_numel_by_hand(SD35M_TRANSFORMER, 32):,}")
    for mid in ('yuvalkirstain/PickScore_v1', 'openai/clip-vit-large-patch14'):
        n = weight_numel(reward_clip(mid))
        print(f"reward CLIP {mid}: {n:,} parameters = {n * 4 / GiB:.2f} GiB in float32")
    print("how: weights exact (meta device); activations TRACED (the trainer's functions on the meta device at the real shapes, "
          "live storage bytes, CUDA autocast + flash SDPA emulated); depth, steps and LoRA size extended (DERIVED, checked in "
          "tests/test_memory_plan.py); ASSUMED: workspaces "
          f"{WORKSPACES / 2 ** 20:.0f} MiB, VAE decode in float32, allowance = CUDA context {CUDA_CONTEXT / GiB:.2f} GiB + "
          f"fragmentation {FRAGMENTATION:.0%} of the peak; cards: " + ', '.join(f"{k} = {v / GiB:.2f} GiB" for k, v in CARDS.items()))
    print(f"variants: + rewards = objectives {REWARD_OBJECTIVES} (PickScore ViT-H/14 and the aesthetic ViT-L/14 + MLP on the "
          f"trainer's GPU), in float32 (the rewards' default) or with reward_options {REWARDS_BF16}")
    d0 = preset_report('sd35m-1gpu')
    print("resident (as shipped): " + ', '.join(f"{k} {v / GiB:.2f}" for k, v in d0['resident'].items()) + " GiB")
    verdicts = {}
    for name in PRESET_CARDS:
        reports = {label: preset_report(name, **ov) for label, ov in VARIANTS.items()}
        print_preset(name, reports)
        verdicts[name] = fits(peak_phase(plan_from(reports['as shipped']))[1], CARDS[PRESET_CARDS[name]])
        if args.search:
            for label, ov in VARIANTS.items():
                best = largest_fitting(name, CARDS[PRESET_CARDS[name]], PRESET_PROCESSES[name], **ov)
                print(f"  largest knobs that fit, {label}: {best}")
    print(f"\nverdicts (as shipped): " + ', '.join(f"{k} {'fits' if v else 'DOES NOT FIT'} {PRESET_CARDS[k]}" for k, v in verdicts.items()))
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0 if all(verdicts.values()) else 1


def plan_from(details: dict) -> dict[str, int]:
    return {k: v['total'] for k, v in details['phases'].items()}


if __name__ == '__main__':
    sys.exit(main())
