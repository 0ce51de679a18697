"""The papermill entry point nbs/train.ipynb: defaults run, -p overrides take effect (config.json), a bad value fails
in the first cells with a clear message, the saved notebook holds the figures, and the run replays in the dashboard."""
import json
from pathlib import Path
import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "nbs" / "train.ipynb"


MAX_SAVED_BYTES = 8_000_000    # an executed notebook with the live dashboard stays small enough to mail (≤ 8 MB)


def execute(tmp_path, **params):
    out = tmp_path / "out.ipynb"
    pm.execute_notebook(str(NB), str(out), parameters=params, kernel_name="python3", cwd=str(tmp_path), progress_bar=False)
    return json.loads(out.read_text())


def widget_state(nb):
    return nb["metadata"].get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})


def outputs(nb, kind):
    return [o for c in nb["cells"] for o in c.get("outputs", []) if kind in o.get("data", {})]


def test_defaults_run_and_save_figures(tmp_path):
    nb = execute(tmp_path, out_dir=str(tmp_path / "run"), live_dashboard=False)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["steps"], cfg["method"], cfg["scheduler"], cfg["model"], cfg["prompts"]) == (10, "apex", "p3", "apex-tiny", "apex-tiny-signs")
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "eval" not in r] == list(range(10))
    assert len(outputs(nb, "application/vnd.plotly.v1+json")) >= 7     # the panels + the gain profile, as static plots
    text = "".join("".join(o["text"]) if isinstance(o["text"], list) else o["text"]
                   for c in nb["cells"] for o in c.get("outputs", []) if o.get("name") == "stdout")
    assert f"run directory: {tmp_path / 'run'}" in text


def test_overrides_take_effect_and_dashboard_replays(tmp_path):
    nb = execute(tmp_path, objectives='["ocr","brisque"]', steps=3, method="static", scheduler="dwa", out_dir=str(tmp_path / "run"))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["objectives"], cfg["steps"], cfg["method"], cfg["scheduler"]) == (["ocr", "brisque"], 3, "static", "dwa")
    # the live dashboard (the default) is saved as one plotly FigureWidget: one copy of plotly.js, a notebook you can mail
    copies = [m for m in widget_state(nb).values() if len(m["state"].get("_esm", "")) > 1_000_000]   # a FigureWidget's own plotly.js
    assert len(copies) == 1, [m["model_name"] for m in widget_state(nb).values()]
    size = (tmp_path / "out.ipynb").stat().st_size
    assert size <= MAX_SAVED_BYTES, f"the executed notebook is {size / 1e6:.1f} MB (bound {MAX_SAVED_BYTES / 1e6:.0f} MB)"
    from apex_nb.dashboard import Dashboard
    dash = Dashboard.from_run(tmp_path / "run")
    assert sorted(dash.static_figures()) == ["cos", "cos_pairs", "losses", "normalised_rewards", "raw_rewards", "share_vs_weight", "weights"]
    assert len(dash.traces("weights")) == 2


@pytest.mark.parametrize("params, message", [
    (dict(objectives='["ocr","pickscor"]'), "unknown objective 'pickscor'; valid choices:"),
    (dict(steps="ten"), "steps must be an integer >= 1, got 'ten'"),
    (dict(method="apx"), "unknown normalisation method 'apx'; valid choices: static, mo_grpo, gdpo, apex"),
])
def test_bad_parameters_fail_early_with_a_clear_message(tmp_path, params, message):
    with pytest.raises(pm.PapermillExecutionError) as e:
        execute(tmp_path, out_dir=str(tmp_path / "run"), **params)
    assert message in str(e.value)
    assert e.value.exec_count <= 3                                       # stopped in the validation cell
    assert not (tmp_path / "run").exists()                             # before anything was written
