"The project's own machinery: nbdev settings, test flags, clean keeping papermill's tag, failing notebooks fail."
import configparser, json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CFG = configparser.ConfigParser(delimiters=["="]); CFG.read(ROOT / "settings.ini")
S = CFG["DEFAULT"]


def notebook(path: Path, cells: list[tuple[str, str, list]]) -> Path:
    "Write a minimal notebook of (cell_type, source, tags) cells."
    nb = {"cells": [{"cell_type": t, "metadata": {"tags": tags} if tags else {}, "source": src,
                     **({"outputs": [], "execution_count": None} if t == "code" else {})} for t, src, tags in cells],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
    return path


def run(*args):
    return subprocess.run([str(BIN / args[0]), *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_package_imports_with_settings_version():
    import apex_nb
    assert apex_nb.__version__ == S["version"]


def test_settings_are_the_nbdev2_layout():
    assert (S["lib_name"], S["nbs_path"], S["tst_flags"], S["allowed_cell_metadata_keys"], S["jupyter_hooks"]) == \
        ("apex_nb", "nbs", "slow gpu", "tags", "False")
    reqs = S["requirements"].split()
    for pin in ["nbdev==2.4.14", "execnb<0.2", "fastcore<2", "ghapi<2"]: assert pin in reqs


def test_nbdev_test_fails_on_a_failing_notebook(tmp_path):
    good = notebook(tmp_path / "good.ipynb", [("code", "assert 1 + 1 == 2", [])])
    bad = notebook(tmp_path / "bad.ipynb", [("code", "x = 41", []), ("code", "assert x == 42, 'x is not 42'", [])])
    assert run("nbdev_test", "--path", str(good)).returncode == 0
    r = run("nbdev_test", "--path", str(bad))
    assert r.returncode != 0 and "x is not 42" in r.stdout + r.stderr


def test_gpu_and_slow_cells_skipped_unless_flagged(tmp_path):
    nb = notebook(tmp_path / "flags.ipynb", [("code", "#| gpu\nraise RuntimeError('gpu cell ran')", []),
                                              ("code", "#| slow\nraise RuntimeError('slow cell ran')", [])])
    assert run("nbdev_test", "--path", str(nb)).returncode == 0
    r = run("nbdev_test", "--path", str(nb), "--flags", "gpu")
    assert r.returncode != 0 and "gpu cell ran" in r.stdout + r.stderr
    r = run("nbdev_test", "--path", str(nb), "--flags", "slow")
    assert r.returncode != 0 and "slow cell ran" in r.stdout + r.stderr


def test_nbdev_clean_keeps_the_papermill_parameters_tag(tmp_path):
    nb = notebook(tmp_path / "p.ipynb", [("code", "steps = 3", ["parameters"])])
    raw = json.loads(nb.read_text()); raw["cells"][0]["metadata"]["collapsed"] = True; raw["cells"][0]["execution_count"] = 7
    nb.write_text(json.dumps(raw))
    assert run("nbdev_clean", "--fname", str(nb)).returncode == 0
    cell = json.loads(nb.read_text())["cells"][0]
    assert cell["metadata"] == {"tags": ["parameters"]} and cell["execution_count"] is None


def test_repo_notebooks_are_clean():
    "Committed notebooks carry no outputs or execution counts (nbdev_clean state)."
    for p in sorted((ROOT / "nbs").glob("*.ipynb")):
        for c in json.loads(p.read_text())["cells"]:
            if c["cell_type"] == "code":
                assert c.get("outputs") == [] and c.get("execution_count") is None, p.name


def test_no_import_circle():
    "The package's modules import each other as a DAG (no circle, lazy imports inside functions included)."
    import ast, apex_nb
    root = Path(apex_nb.__file__).parent
    mods = {p.stem for p in root.glob("*.py") if not p.stem.startswith("_")}
    deps = {}
    for m in mods:
        tree = ast.parse((root / f"{m}.py").read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module.removeprefix("apex_nb.") if node.module.startswith("apex_nb.") else (node.module if node.level else None)
                if mod in mods: names.add(mod)
            elif isinstance(node, ast.Import):
                names |= {a.name.removeprefix("apex_nb.") for a in node.names if a.name.startswith("apex_nb.")} & mods
        deps[m] = names - {m}
    done, stack = set(), []
    def visit(m):
        assert m not in stack, f"import circle: {' -> '.join(stack[stack.index(m):] + [m])}"
        if m in done: return
        stack.append(m); [visit(d) for d in sorted(deps[m])]; stack.pop(); done.add(m)
    for m in sorted(mods): visit(m)
    assert {"config", "trainer", "grpo"} <= mods and "trainer" in deps["grpo"] and "config" in deps["trainer"]
