"""The widgets in a real JupyterLab: start JupyterLab on 127.0.0.1, open a notebook that builds the lab explorer and the
dashboard of a short tiny-random run (ipywidgets + one plotly FigureWidget each, every panel a subplot), run it in headless
Chromium driven by Playwright, check that the figures rendered their subplots, SVG traces and heatmaps in the DOM, then
change a control of the explorer from the kernel and check that the figure on the page follows (live, in place).
A screenshot is saved next to the test's files (and to runs/ for a look)."""
import json, os, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.slow

CELLS = ["from apex_nb.lab import LabExplorer\nex = LabExplorer('apex4', 'static', 'static', steps=40)\nex.widget",
         "from apex_nb.grpo import GRPOTrainer, make_config\nfrom apex_nb.dashboard import Dashboard\n"
         "run = GRPOTrainer(make_config('tiny-random', steps=4, out_dir='run', save_every=0)).train()\nDashboard.from_run(run).widget",
         "ex.controls['steps'].value = 80   # re-runs the lab: the explorer's figure must follow on the page"]
NOTEBOOK = {"cells": [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": src} for src in CELLS],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    (tmp_path / "dash.ipynb").write_text(json.dumps(NOTEBOOK))
    port, token = free_port(), "apex-test-token"
    env = dict(os.environ, HF_HUB_OFFLINE="1", JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--ip", "127.0.0.1", f"--port={port}",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--allow-root"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1); break
        except OSError: time.sleep(0.5)
    else:
        proc.kill(); pytest.fail("JupyterLab did not start: " + proc.stdout.read()[-2000:])
    yield url, token, tmp_path
    proc.terminate()
    try: proc.wait(timeout=20)
    except subprocess.TimeoutExpired: proc.kill()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (make test installs it as root)")
def test_lab_explorer_renders_in_jupyterlab(jupyterlab):
    from playwright.sync_api import sync_playwright
    url, token, folder = jupyterlab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                                   "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1600, "height": 1400})
        page.goto(f"{url}/lab/tree/dash.ipynb?token={token}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle'], .jp-Toolbar", timeout=120_000)
        time.sleep(2)                                       # let the kernel connect
        page.click(".jp-Notebook .jp-Cell .jp-InputArea-editor")
        page.keyboard.press("Shift+Enter"); page.keyboard.press("Shift+Enter")   # the lab explorer, then the run's dashboard
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 2 && "
                               "document.querySelectorAll('.js-plotly-plot')[1].querySelectorAll('.scatterlayer .trace').length > 0", timeout=240_000)
        time.sleep(2)
        count = lambda sel: page.locator(sel).count()
        plots, subplots = count(".js-plotly-plot"), count(".js-plotly-plot .cartesianlayer > .subplot")
        traces, heatmaps = count(".js-plotly-plot .scatterlayer .trace"), count(".js-plotly-plot .heatmaplayer .hm")
        points = "document.querySelectorAll('.js-plotly-plot')[0].calcdata[0].length"   # the explorer's first trace, as drawn
        before = page.evaluate(points)
        page.keyboard.press("Shift+Enter")                                    # the third cell: 80 steps instead of 40
        page.wait_for_function(f"{points} === 80", timeout=120_000)
        after, traces_after = page.evaluate(points), count(".js-plotly-plot .scatterlayer .trace")
        shot = folder / "jupyterlab-dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    (ROOT / "runs").mkdir(exist_ok=True); shutil.copy(shot, ROOT / "runs" / "jupyterlab-dashboard.png")
    # two figures (the explorer's dashboard and the run's), each holding every panel as subplots: shares vs weights, weights,
    # 4 raw-reward plots, gains (+ P³ priorities and losses for the run), the cosines at a step and over the run
    assert plots == 2 and subplots >= 2 * 8, (plots, subplots)
    assert traces >= 2 * (8 + 4 + 4 + 4) and heatmaps >= 4, (traces, heatmaps)   # 4 objectives: share + dashed weight, weight, raw, gain
    assert (before, after, traces_after) == (40, 80, traces), (before, after, traces_after)   # redrawn in place: same traces, new data
