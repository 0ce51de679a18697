"""The SD3.5-M memory plan (benchmarks/sd35m_memory_plan.py): exact parameter counts on the meta device; a tracer that counts
live storage bytes; the depth extension checked against a full-depth trace; a plan that follows the config and the
trainer's batching functions (sampling, training, reference pass, aggregator Jacobian, reward models); the GPU verdicts."""
import importlib.util
from pathlib import Path
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sd35m_memory_plan.py"
GiB = 2 ** 30


@pytest.fixture(scope="module")
def mp():
    spec = importlib.util.spec_from_file_location("sd35m_memory_plan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.components.cache_info().currsize == 0    # importing builds and traces nothing (the GPU check imports it too)
    return module


@pytest.fixture(scope="module")
def cfg():
    from apex_nb.config import make_config
    return make_config


def test_exact_parameter_counts(mp):
    counts = mp.count_components()
    assert counts["transformer"] == 2_469_663_936          # 2,243,171,520 parameters + the 384x384x1536 pos_embed buffer
    assert counts["pos_embed_buffer"] == 384 * 384 * 1536
    assert counts["lora"] == 18_776_064 == (8 * 24 - 1) * 32 * 2 * 1536 == mp.lora_numel_by_hand(mp.SD35M_TRANSFORMER, 32)
    assert (counts["clip_l"], counts["clip_g"], counts["t5_xxl"], counts["vae"]) == \
        (123_650_304, 694_659_840, 4_762_310_656, 83_819_683)
    # everything but T5 equals the published keras-hub count of SD3.5-Medium
    assert mp.check_published_total(counts) == mp.KERAS_HUB_SD35M_TOTAL == 3_371_793_763
    # transformers keeps T5's `wo` (24 × 10240 × 4096) in float32 when the weights are float16, not in bfloat16
    t5 = mp.components("sd35m")["text_encoder_3"]
    assert mp.weight_bytes(t5, torch.float16) - mp.weight_bytes(t5, torch.bfloat16) == 24 * 10240 * 4096 * 2


def test_tracer_counts_live_storages(mp):
    "A Linear + ReLU forward/backward on the CPU: the tracer's bytes are the tensors' bytes; views and inputs are not new memory."
    lin, x = torch.nn.Linear(64, 32), torch.randn(16, 64, requires_grad=True)
    live, act = mp.LiveBytes(), 16 * 32 * 4
    with live:
        y = lin(x).relu()                  # the addmm output lives until relu has run; relu keeps only its own output
        live.mark('forward done')
        v = y.view(-1)
        live.mark('view')
    assert (live.peaks['start'], live.peaks['forward done'], live.peaks['view']) == (2 * act, act, act)
    with live: y.sum().backward()
    assert live.now == act + (64 * 32 + 32 + 16 * 64) * 4                          # y, and the new .grad of weight, bias and x
    del y, v
    assert live.now == (64 * 32 + 32 + 16 * 64) * 4                                # a storage stops counting when it dies


def test_depth_extension_matches_a_full_depth_trace(mp):
    """The transformer is traced with 4 blocks and extended to its depth (checkpointed inputs of the left-out blocks, their
    LoRA rows in the Jacobians): on a narrow 10-block SD3.5-M on the CPU the extension equals the full-depth trace, except in
    the backward, where it is conservative (all left-out inputs counted alive)."""
    r = mp.check_depth_extension(m=1, k=2, conflicts=True)
    assert set(r["full"]) == set(r["extended"]) >= {"policy", "conflicts", "reference", "backward"}
    for seg, full in r["full"].items():
        assert full <= r["extended"][seg] <= 1.1 * full, (seg, r)
    for seg in ("policy", "conflicts", "reference"):
        assert r["extended"][seg] == pytest.approx(r["full"][seg], rel=0.01), (seg, r)


def test_plan_uses_the_trainers_batching(mp, cfg):
    from apex_nb.config import decode_batches, local_samples, micro_batches, sampler_batches
    c = cfg("sd35m-8gpu")
    b = mp.plan_details(c, num_processes=8, phases=("collect",))["batches"]
    assert (b["local_samples"], b["sampler_calls"], b["decode_batch"], b["micro_batch"]) == \
        (local_samples(c, 8), sampler_batches(c, 8), max(decode_batches(c, 8)), max(micro_batches(c, local_samples(c, 8))))


def test_sampling_follows_sample_batch_size(mp, cfg):
    base = mp.plan_details(cfg("sd35m-1gpu"), phases=("sampling",))["phases"]["sampling"]
    big = mp.plan_details(cfg("sd35m-1gpu", sample_batch_size=16), phases=("sampling",))["phases"]["sampling"]
    assert big["segments"]["denoise"] > 1.8 * base["segments"]["denoise"] - 0.2 * GiB     # 2× sequences through the transformer
    assert big["total"] > base["total"]


def test_training_follows_train_batch_size_kl_and_aggregator(mp, cfg):
    only = ("training",)
    base = mp.plan_details(cfg("sd35m-1gpu"), phases=only)                     # (traced with the diagnostic: shared with the verdicts)
    t = base["phases"]["training"]
    assert t["segments"]["reference"] > 0                                      # kl_beta 0.04: the no-grad reference forward
    assert "K×P Jacobian (fp32)" not in t["terms"]
    big = mp.plan_details(cfg("sd35m-1gpu", train_batch_size=4, conflict_every=0), phases=only)["phases"]["training"]
    assert big["total"] > t["total"] and big["segments"]["backward"] > 1.5 * t["segments"]["backward"]
    # no KL: no reference pass; an aggregator (upgrad): the K×P float32 Jacobian on the device, rows through its backward
    d = mp.plan_details(cfg("sd35m-1gpu", kl_beta=0.0, aggregator="upgrad", conflict_every=0), phases=only)
    K, P, agg = d["batches"]["objectives"], d["batches"]["lora_params"], d["phases"]["training"]
    assert agg["segments"]["reference"] == 0 and agg["segments"]["jacobian"] > 0
    assert agg["terms"]["K×P Jacobian (fp32)"] == K * P * 4 == 4 * 18_776_064 * 4
    assert agg["segments"]["backward"] > t["segments"]["backward"] + (K - 1) * P * 4     # K rows of P gradients on the way


def test_reward_models_on_the_gpu_are_counted(mp, cfg):
    from transformers import CLIPConfig
    pick = mp.reward_clip("yuvalkirstain/PickScore_v1")
    assert isinstance(pick.config, CLIPConfig) and pick.config.vision_config.hidden_size == 1280     # ViT-H/14
    n = mp.weight_numel(pick)
    assert 3.5 * GiB < n * 4 < 4.0 * GiB                                                             # ≈ 4 GB in float32
    d = mp.plan_details(cfg("sd35m-1gpu", objectives="ocr:1,pickscore:1,aesthetic:1"), phases=("scoring",))
    assert d["resident"]["reward pickscore"] == n * 4
    vit_l = mp.weight_numel(mp.reward_clip("openai/clip-vit-large-patch14"))
    assert d["resident"]["reward aesthetic"] > vit_l * 4                                             # ViT-L/14 + the MLP head
    assert "reward ocr" not in d["resident"]                                                         # OCR runs on the CPU
    off = mp.plan_details(cfg("sd35m-1gpu", objectives="ocr:1,pickscore:1", reward_options={"pickscore": {"device": "cpu"}}),
                          phases=("scoring",))
    assert "reward pickscore" not in off["resident"]


def test_presets_fit_their_gpus(mp, cfg):
    "sd35m-1gpu fits a 24 GB card, the 80 GB presets 80 GB per GPU (the allowance for context and fragmentation included)."
    for name, card in mp.PRESET_CARDS.items():
        phases = mp.plan(cfg(name), num_processes=mp.PRESET_PROCESSES[name])
        assert set(phases) >= {"sampling", "collect", "scoring", "training", "conflicts", "optimizer", "eval"}
        assert all(isinstance(v, int) and v > 0 for v in phases.values())
        peak = max(phases.values())
        assert mp.fits(peak, mp.CARDS[card]), (name, peak / GiB)
    assert mp.CARDS["24 GB"] / GiB == pytest.approx(22.35, abs=0.01)
    # PickScore (ViT-H, fp32) and the aesthetic CLIP next to SD3.5-M on one 24 GB card leave no room for any batch
    d = mp.plan_details(cfg("sd35m-1gpu", objectives=mp.REWARD_OBJECTIVES), phases=("collect",))
    assert not mp.fits(sum(d["resident"].values()), mp.CARDS["24 GB"])


def test_plan_refuses_what_it_does_not_cover(mp, cfg):
    from apex_nb.dpo import make_dpo_config
    with pytest.raises(TypeError, match="GRPO"): mp.plan(make_dpo_config("sd35m-1gpu"))
    with pytest.raises(ValueError, match="memory plan knows"): mp.plan(cfg("tiny-cpu"))
