"""One real-browser check: JupyterLab + headless Chromium (Playwright) render the panel, its chart and the layer
map, and a click on Run adds a point. The screenshot is kept in test-artifacts/ for a person to look at."""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("WORKBENCH_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (make test installs it)")

CELLS = [
    "import workbench as wb\npanel = wb.panel('digits-mlp')\npanel",
    "layers = wb.LayerMap.from_model(panel.model, title='digits-mlp layer map')\nlayers",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# a second notebook: the panel of a model whose runs the Study holds, the layer map by keyboard, a %compare bar
REOPEN_CELLS = [
    "import workbench as wb\npanel = wb.panel('digits-mlp')\npanel",
    "%load_ext workbench\nm = panel.model\n%compare digits-mlp m --batch 1",
]


def _notebook(path: Path, cells=CELLS) -> None:
    cells = [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": src}
             for src in cells]
    path.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}))


@pytest.fixture
def lab(tmp_path):
    pytest.importorskip("jupyterlab")
    port = _free_port()
    env = dict(os.environ, WORKBENCH_STUDY=str(tmp_path / "study.sqlite"), JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    _notebook(tmp_path / "panel.ipynb")
    _notebook(tmp_path / "reopen.ipynb", REOPEN_CELLS)
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                             f"--ServerApp.port={port}", "--IdentityProvider.token=", "--allow-root",
                             "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={tmp_path}",
                             "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/status", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited: {(tmp_path / 'lab.log').read_text()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"JupyterLab did not start: {(tmp_path / 'lab.log').read_text()[-2000:]}")
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _browser(pw):
    return pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"])


def _open_and_run_all(page, url: str) -> None:
    page.goto(url, timeout=60_000)
    page.wait_for_selector(".jp-Notebook", timeout=60_000)
    page.wait_for_selector("#jp-main-statusbar >> text=/Python 3.*\\| Idle/", timeout=90_000)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()


@contextlib.contextmanager
def _page(height: int, failure: str):
    """A Chromium page on JupyterLab; on an error its screenshot goes to test-artifacts/`failure`."""
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = _browser(pw)
        page = browser.new_page(viewport={"width": 1400, "height": height})
        try:
            yield page
        except Exception:
            page.screenshot(path=str(ARTIFACTS / failure), full_page=True)
            raise
        finally:
            browser.close()


CHART_POINTS = ("() => [...document.querySelectorAll('.js-plotly-plot')].some(p => (p.data || [])"
                ".some(t => t.name === 'quant' && t.x && t.x.length > 0))")


@pytest.mark.slow
def test_panel_chart_and_layer_map_render_and_run_adds_a_point(lab):
    with _page(1800, "browser-panel-failure.png") as page:
        _open_and_run_all(page, f"{lab}/lab/tree/panel.ipynb")

        page.wait_for_selector(".widget-slider", timeout=120_000)  # the sparsity slider
        page.wait_for_selector(".js-plotly-plot", timeout=60_000)  # the live Pareto FigureWidget
        page.wait_for_selector(".wb-layer-map .wb-layer", timeout=60_000)  # the custom widget
        assert page.locator(".wb-layer-map").count() == 2  # in the panel and on its own

        cell = page.locator(".wb-layer-map").nth(1).locator(".wb-layer", has_text="Linear").first
        cell.click()
        page.wait_for_selector(".wb-layer-map >> nth=1 >> .wb-excluded", timeout=10_000)

        page.locator("button.jupyter-button", has_text="Run").first.click()
        page.wait_for_function(CHART_POINTS, timeout=180_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "browser-panel.png"), full_page=True)


@pytest.mark.slow
def test_a_reopened_panel_restores_its_chart_in_the_dark_theme_and_the_map_works_by_keyboard(lab):
    """Issue 19's browser checks: run once, reopen the notebook and run it again: the chart comes back from the
    Study; in JupyterLab's dark theme the chart has no white box; Space toggles a focused layer and Ctrl+Z takes it
    back; a %compare progress bar ends at 100%. Screenshots go to test-artifacts/."""
    with _page(2200, "browser-reopen-failure.png") as page:
        _open_and_run_all(page, f"{lab}/lab/tree/reopen.ipynb")
        page.wait_for_selector(".wb-layer-map .wb-layer", timeout=120_000)
        page.locator("button.jupyter-button", has_text="Run").first.click()
        page.wait_for_function(CHART_POINTS, timeout=180_000)

        # reopen: a fresh page and kernel, the same cells; no click on Run this time
        page.get_by_role("menuitem", name="Kernel", exact=True).click()
        page.get_by_role("menuitem", name="Shut Down Kernel", exact=True).click()
        page.wait_for_timeout(1000)
        # the dark theme, as Settings > Theme sets it (JupyterLab's settings API), then the page reloaded
        answer = page.request.put(f"{lab}/lab/api/settings/@jupyterlab/apputils-extension:themes",
                                  data=json.dumps({"raw": json.dumps({"theme": "JupyterLab Dark"})}),
                                  headers={"Content-Type": "application/json"})
        assert answer.ok, answer.text()
        page.reload()
        page.wait_for_selector("body[data-jp-theme-light='false']", state="attached", timeout=60_000)
        page.wait_for_selector("#jp-main-statusbar >> text=/Python 3.*\\| Idle/", timeout=90_000)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
        page.wait_for_function(CHART_POINTS, timeout=180_000)  # restored from the Study
        page.wait_for_selector("text=restored 1 run", timeout=30_000)

        # the dark theme: the chart's background is the notebook's, not a white box
        fill = page.evaluate("() => getComputedStyle(document.querySelector('.js-plotly-plot .main-svg'))"
                             ".backgroundColor")
        assert fill in ("rgba(0, 0, 0, 0)", "transparent"), fill

        # the layer map by keyboard: focus a tile, Space leaves it out, Ctrl+Z takes that back
        tile = page.locator(".wb-layer-map .wb-layer").first
        tile.focus()
        page.keyboard.press("Space")
        page.wait_for_selector(".wb-layer-map .wb-excluded", timeout=10_000)
        page.keyboard.press("Control+z")
        page.wait_for_function("() => !document.querySelector('.wb-layer-map .wb-excluded')", timeout=10_000)

        # %compare's bar ends at 100%, not red partway
        page.wait_for_function(
            "() => [...document.querySelectorAll('.widget-hprogress .progress-bar')].some("
            "b => b.style.width === '100%' && !b.className.includes('danger'))", timeout=180_000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "browser-panel-dark-restored.png"), full_page=True)
