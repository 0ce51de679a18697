"""The experiment protocol end to end (issue 19, item 2): methods × seeds through nbs/train.ipynb with papermill in two
workers; a re-run executes nothing; a run made unfinished is resumed alone (from its checkpoint, to the same numbers); a
failing run is reported with its executed notebook and error (a stub notebook: the failure path, without loading a model).
tiny-random, 3 steps: the fewest train.ipynb finishes (its gain table needs the 3 warm-up steps of 12_balance)."""
import json
from pathlib import Path
import papermill as pm
import pytest
from apex_nb.experiment import Experiment, ExperimentError, run_experiment, collect_measures, experiment_report, measure_run, run_intervals

METHODS = {"static": dict(method="static", scheduler="static"), "apex+p3": dict(method="apex", scheduler="p3")}
PARAMS = dict(preset="tiny-random", steps=3, eval_every=1)
NOTEBOOK = Path(__file__).resolve().parents[1] / "nbs" / "experiment.ipynb"


def log_lines(root):
    return [json.loads(l) for l in (root / "runs.jsonl").read_text().splitlines()]


def notebook_times(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.glob("*/*/seed-*/train-out.ipynb"))}


def test_run_rerun_resume(tmp_path):
    exp = lambda: Experiment(tmp_path / "exp", METHODS, seeds=2, params=PARAMS, workers=2)
    root = exp().root
    # the first pass as a user runs it: nbs/experiment.ipynb with papermill (nbdev_test skips this entry point: it runs here)
    readme = tmp_path / "README.md"
    readme.write_text("# results\n<!-- results:exp -->\nan old table\n<!-- /results:exp -->\nmore\n")
    nb = pm.execute_notebook(str(NOTEBOOK), str(tmp_path / "experiment-out.ipynb"), kernel_name="python3", progress_bar=False,
                             parameters=dict(root=str(root), methods=json.dumps(METHODS), seeds=2, steps=3, preset="tiny-random", eval_every=1,
                                             workers=2, readme=str(readme), command="papermill nbs/experiment.ipynb out.ipynb"))
    log = log_lines(root)
    assert sorted(r["run"] for r in log) == sorted(r.label for r in exp().runs()) and not any(r["resumed"] for r in log)
    assert [r["status"] for r in log] == ["finished"] * 4, log
    # two workers: two runs at a time, never three (an end time is logged to the second: 2 s of slack)
    iv = run_intervals(root).sort_values("start").reset_index(drop=True)
    overlap = lambda i, j: min(iv.end[i], iv.end[j]) - max(iv.start[i], iv.start[j])
    assert overlap(0, 1) > 2, iv                                             # the first two started together
    assert not any(overlap(i, i + 2) > 2 for i in range(len(iv) - 2)), iv     # no third one beside them
    text = readme.read_text()                                                # the README section, regenerated from the report
    assert text.startswith("# results\n<!-- results:exp -->\nRe-run (resumable): `papermill nbs/experiment.ipynb out.ipynb`") and text.endswith("<!-- /results:exp -->\nmore\n")
    assert "Measured on this machine: 4 runs in" in text and "| default | apex+p3 − static |" in text and "an old table" not in text
    assert (root / "report.md").read_text().strip() in text
    printed = "".join("".join(o.get("text", "")) for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
    assert "4 runs: 1 setting(s) × 2 methods × 2 seeds" in printed and "apex+p3 − static, paired over 2 seeds" in printed
    assert (root / "measures.csv").exists()
    times = notebook_times(root)
    assert len(times) == 4

    status = run_experiment(exp())                                           # again: every run finished, nothing executed
    assert list(status.status) == ["skipped"] * 4
    assert len(log_lines(root)) == 4 and notebook_times(root) == times

    victim = root / "default" / "apex+p3" / "seed-1" / "run"
    numbers = lambda m: {k: v for k, v in m.items() if isinstance(v, float)}
    before = numbers(measure_run(victim))
    lines = (victim / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1]).get("eval") and json.loads(lines[-1])["step"] == 3
    (victim / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")      # its final evaluation lost: unfinished
    status = run_experiment(exp())
    assert status.loc["default/apex+p3/seed-1", "status"] == "finished" and status.loc["default/apex+p3/seed-1", "resumed"]
    assert sorted(status.status) == ["finished", "skipped", "skipped", "skipped"]
    log = log_lines(root)
    assert len(log) == 5 and log[-1]["run"] == "default/apex+p3/seed-1" and log[-1]["resumed"] and log[-1]["error"] is None
    after = notebook_times(root)
    assert {k: v for k, v in after.items() if "apex+p3/seed-1" not in k} == {k: v for k, v in times.items() if "apex+p3/seed-1" not in k}
    assert after["default/apex+p3/seed-1/train-out.ipynb"] != times["default/apex+p3/seed-1/train-out.ipynb"]
    assert numbers(measure_run(victim)) == pytest.approx(before, nan_ok=True)         # resumed from the step-3 checkpoint: the same evaluation

    per_seed = collect_measures(exp())
    assert len(per_seed) == 4 and set(per_seed.gain_unit) == {"all-samples"}   # this trainer logs no per-sample eval rewards yet
    report = experiment_report(per_seed)
    assert list(report.table.index) == [("default", "static"), ("default", "apex+p3")]
    assert list(report.pairs.index) == [("default", "apex+p3 − static")]
    assert "apex+p3 − static, paired over 2 seeds" in report.text and "too few to call any difference significant" in report.text

    with pytest.raises(ValueError, match=r"differs in params.steps: 3 → 4"):  # another question in the same root: refused
        run_experiment(Experiment(root, METHODS, seeds=2, params=dict(PARAMS, steps=4)))


def stub_notebook(path, body):
    "A notebook with train.ipynb's parameter names and `body` as its one other cell (no model: fails in a second, not twenty)."
    params = "preset = None\nmethod = 'apex'\nscheduler = 'p3'\nsteps = 1\neval_every = None\nseed = 0\nout_dir = None\nresume = False\nlive_dashboard = True"
    cells = [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": params, "outputs": [], "execution_count": None},
             {"cell_type": "code", "metadata": {}, "source": body, "outputs": [], "execution_count": None}]
    path.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}},
                                "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_failing_run_is_reported(tmp_path):
    nb = stub_notebook(tmp_path / "train.ipynb", "if method == 'apx': raise ValueError(f'unknown normalisation method {method!r}')")
    exp = Experiment(tmp_path / "bad", {"apx": dict(method="apx")}, seeds=1, params=PARAMS, notebook=nb)
    with pytest.raises(ExperimentError) as e:
        run_experiment(exp)
    notebook = exp.root / "default" / "apx" / "seed-0" / "train-out.ipynb"
    assert "1 of 1 runs failed" in str(e.value) and "ValueError: unknown normalisation method 'apx'" in str(e.value) and str(notebook) in str(e.value)
    (rec,) = log_lines(exp.root)
    assert rec["status"] == "failed" and "unknown normalisation method 'apx'" in rec["error"] and rec["notebook"] == str(notebook)
    assert notebook.exists()                                                 # the executed notebook, with the error in it, is kept
    with pytest.raises(ExperimentError):                                     # not finished: tried again (started afresh: it wrote no run folder)
        run_experiment(exp)
    assert [r["run"] for r in log_lines(exp.root)] == ["default/apx/seed-0"] * 2
