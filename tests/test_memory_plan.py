"The SD3.5-M memory plan (benchmarks/sd35m_memory_plan.py): exact counts on the meta device, a checked activation formula."
import importlib.util
from pathlib import Path
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sd35m_memory_plan.py"


@pytest.fixture(scope="module")
def plan():
    spec = importlib.util.spec_from_file_location("sd35m_memory_plan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.main(verbose=False)


def test_exact_parameter_counts(plan):
    module, result = plan
    counts = result["counts"]
    assert counts["transformer"] == 2_469_663_936          # 2,243,171,520 parameters + the 384x384x1536 pos_embed buffer
    assert counts["pos_embed_buffer"] == 384 * 384 * 1536
    assert counts["lora"] == 18_776_064 == (8 * 24 - 1) * 32 * 2 * 1536
    assert (counts["clip_l"], counts["clip_g"], counts["t5_xxl"], counts["vae"]) == \
        (123_650_304, 694_659_840, 4_762_310_656, 83_819_683)
    # everything but T5 equals the published keras-hub count of SD3.5-Medium
    assert result["published_total"] == module.KERAS_HUB_SD35M_TOTAL == 3_371_793_763


def test_checkpointing_keeps_less_than_full_activations(plan):
    _, result = plan
    assert 0 < result["act_ckpt"] < result["act_no_ckpt"] / 5


def test_activation_formula_matches_measured_saved_tensors(plan):
    "Middle blocks are the general block the formula describes; the whole model saves less (edge blocks), never more."
    _, result = plan
    for v in result["validation"]:
        assert 0.95 < v["middle"] < 1.05, v
        assert 0.8 < v["model"] <= 1.0, v


def test_dual_attention_blocks_cost_more(plan):
    module, _ = plan
    general, dual = (module.stream_bytes_per_token(1536, 24, 32, d) for d in (False, True))
    assert general == 36 * 1536 + 12 * 24 + 8 * 32 + 16      # bf16 activations, fp32 LayerNorm stats
    assert dual - general == 20 * 1536 + 12 * 24


def test_settings_grid_is_monotone_in_micro_batch(plan):
    _, result = plan
    for te in (True, False):
        for ckpt in (False, True):
            peaks = [g["train"] for g in result["grid"] if (g["te_resident"], g["ckpt"]) == (te, ckpt)]
            assert peaks == sorted(peaks) and len(set(peaks)) == 3
    assert result["fits"][80] and len(result["fits"][80]) >= len(result["fits"][24])
