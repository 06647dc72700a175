"""Reports: every template through papermill with tiny parameters, bad input, batches on dask, the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import workbench as wb
from workbench import reports
from workbench.reports import ReportError

TINY = {"model": "digits-mlp", "batch_sizes": [1]}
TEMPLATE_RUNS = {
    "quickstart": {"recipes": ["quant=int8", "prune=0.5:structured=true,finetune=1"]},
    "quantization": {"modes": ["int8", "fp16"]},
    "pruning": {"sparsities": [0.5], "finetune": 0},
    "distillation": {"epochs": 1},
    "pipeline": {"recipes": ["quant=int8"]},
    "language-model": {"model": "docs-lm-tiny", "recipes": ["quant=int4"]},
}


@pytest.mark.parametrize("template", list(TEMPLATE_RUNS))
@pytest.mark.slow
def test_each_template_runs_with_tiny_parameters(template, tmp_path):
    notebook = wb.report(template, {**TINY, **TEMPLATE_RUNS[template]}, output=tmp_path / "r.ipynb",
                         html=tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "Environment" in page and "onnxruntime" in page and "plotly" in page.lower()
    assert "Verdicts" in page and "import workbench" not in page  # code hidden
    head = reports.read_headline(notebook)
    assert head["metric_name"] == "accuracy" and head["candidates"] >= 1
    if template == "pruning":
        assert "per-layer sensitivity" in page
    if template == "language-model":
        assert "Generation" in page and "tokens/s ratio" in page and "perplexity" in page


def test_templates_are_built_from_the_shared_cells():
    out = subprocess.run([sys.executable, "tools/build_templates.py", "--check"], capture_output=True, text=True,
                         cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stdout


def test_template_listing_reads_every_parameter():
    listing = reports.templates()
    assert set(listing) == set(TEMPLATE_RUNS)
    quick = listing["quickstart"]
    assert quick["recipes"]["type"] == "list" and "quant=int8" in quick["recipes"]["default"]
    assert quick["threads"]["type"] == "int" and quick["device"]["help"] == "auto, cpu or cuda"


@pytest.mark.parametrize("template, params, message", [
    ("nope", {}, r"no template 'nope'; templates: distillation, language-model, pipeline, pruning, quantization, quickstart"),
    ("pruning", {"sparsity": 0.5}, r"no parameter 'sparsity'; its parameters are: model, sparsities, structured"),
    ("pruning", {"finetune": "two"}, r"parameter 'finetune' of 'pruning' takes an int \(default 3\), got str"),
    ("pipeline", {"recipes": "quant=int8"}, r"takes a list"),
])
def test_bad_parameters(template, params, message, tmp_path):
    with pytest.raises(ReportError, match=message):
        wb.report(template, params, output=tmp_path / "r.ipynb")
    assert not (tmp_path / "r.ipynb").exists()  # refused before running anything


@pytest.mark.slow
def test_a_failing_report_still_writes_notebook_and_html_with_the_error_escaped(tmp_path):
    bad_model = "no_such_pkg.<b>models</b>:build"
    with pytest.raises(ReportError, match=r"report failed in cell .*ReportError"):
        wb.report("pipeline", {**TINY, "model": bad_model}, output=tmp_path / "r.ipynb", html=tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "model import path" in page and "ModuleNotFoundError" in page
    assert "<b>models</b>" not in page and "&lt;b&gt;models&lt;/b&gt;" in page


@pytest.mark.slow
def test_cli_report_and_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "workbench.cli", "report", "pipeline", "-p", "model", "digits-mlp",
                         "-p", "batch_sizes", "[1]", "-p", "recipes", "[quant=fp16]", "-o", str(tmp_path / "a.ipynb"),
                         "--html", str(tmp_path / "a.html")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "a.html").exists() and "wrote" in ok.stdout
    # progress lines as it runs, and none of the kernel's start-up and shutdown chatter
    assert "starting the kernel" in ok.stderr and "cell 1 of" in ok.stderr and "IPKernelApp" not in ok.stderr
    page = (tmp_path / "a.html").read_text()
    assert "IPKernelApp" not in page and "Provenance" in page and "Verdict:" in page
    assert page.index("Verdict:") < page.index('<h2 id="Environment"')  # the one-line verdict comes first
    assert "re-run: <code>workbench report pipeline -p model digits-mlp -p batch_sizes &#x27;[1]&#x27;" in page \
        or "re-run: <code>workbench report pipeline -p model digits-mlp -p batch_sizes '[1]'" in page
    assert "{&#x27;baseline_metric&#x27;" not in page and "{'baseline_metric'" not in page  # no raw dict at the end
    bad = subprocess.run([sys.executable, "-m", "workbench.cli", "report", "pipeline", "-p", "model", "nope:x",
                          "-o", str(tmp_path / "b.ipynb"), "--html", str(tmp_path / "b.html")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "error: pipeline report failed" in bad.stderr
    assert (tmp_path / "b.ipynb").exists() and (tmp_path / "b.html").exists()


@pytest.mark.slow
def test_batch_on_dask_two_workers_three_reports_and_two_broken_entries(tmp_path):
    """One batch on a two-worker dask cluster: a grid of three runs, then a run the report refuses and an entry
    that is not a run at all; the good ones finish, the broken ones are failed records with their reason."""
    spec = {"template": "pipeline", "parameters": {"batch_sizes": [1]},
            "grid": {"model": ["digits-mlp"], "recipes": [["quant=int8"], ["quant=fp16"],
                                                          ["prune=0.5:structured=true"]]},
            "runs": [{"model": "digits-mlp", "recipes": ["quant=int3"]}, "not a mapping"]}
    index = reports.batch(spec, workers=2, out=tmp_path / "one", progress=False)
    records = json.loads((index.parent / "index.json").read_text())
    assert [r["status"] for r in records] == ["ok"] * 3 + ["failed"] * 2
    assert all((tmp_path / "one" / r["dir"] / "report.html").exists() for r in records[:3])
    assert "Quantize.dtype: 'int3' is not allowed" in records[3]["error"]
    assert "malformed batch entry" in records[4]["error"]
    page = index.read_text()
    assert "3 of 5 reports" in page and page.count('href="run-') >= 3 and "Candidates across runs" in page


def test_the_index_is_a_sortable_table_with_a_chart_across_runs(tmp_path):
    head = {"best": "quant=int8", "best_speedup": 3.14159, "best_low": 2.71828, "best_high": 3.5, "best_batch": 64,
            "best_metric": 0.987654, "best_size_ratio": 0.2678, "text": "best ...",
            "candidates_table": [{"recipe": "quant=int8", "metric": 0.987654, "worst_speedup": 3.14159},
                                 {"recipe": "quant=fp16", "metric": 0.99, "worst_speedup": 0.4}]}
    records = [{"dir": "run-000", "parameters": {"model": "digits-cnn", "recipes": ["quant=int8", "quant=fp16"]},
                "status": "ok", "headline": head},
               {"dir": "run-001", "parameters": {"model": "digits-mlp"}, "status": "failed", "error": "E",
                "headline": None}]
    page = reports.write_index(records, tmp_path).read_text()
    assert "3.1x (2.7-3.5), b=64" in page and "data-value='3.14159'" in page and "0.27x" in page
    assert "<b>recipes</b> quant=int8, quant=fp16" in page and "&quot;model&quot;" not in page  # no raw JSON
    assert "aria-sort" in page and "Candidates across runs" in page and "plotly" in page.lower()


def test_index_escapes_user_strings(tmp_path):
    records = [{"dir": "run-000", "parameters": {"model": "<script>alert(1)</script>"}, "status": "failed",
                "error": "ReportError: <img src=x>", "headline": None}]
    page = reports.write_index(records, tmp_path).read_text()
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "<img" not in page


@pytest.mark.slow
def test_study_to_report_re_runs_the_explored_recipes(digits_mlp, tmp_path):
    model, data = digits_mlp
    study = wb.Study(tmp_path / "s.sqlite")
    wb.optimize(model, "quant=int8", data=data, batch_sizes=(1,), study=study, name="digits-mlp")
    wb.optimize(model, "quant=fp16", data=data, batch_sizes=(1,), study=study, name="digits-mlp")
    path = wb.reports.from_study(study, tmp_path / "explored.html")
    head = reports.read_headline(path.with_suffix(".ipynb"))
    assert head["candidates"] == 2 and "quant=fp16" in path.read_text()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_batch_on_a_real_scheduler_survives_a_worker_killed_mid_run(tmp_path):
    """A `dask scheduler` and two `dask worker` processes started here; one worker is killed while it runs a report:
    that run is run again on the other worker, the others finish, and the index says which was retried."""
    import os
    import signal
    import socket
    import threading
    import time

    dask = Path(sys.executable).parent / "dask"
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.time() < deadline, "the dask scheduler did not start"
            time.sleep(0.2)
        procs += [subprocess.Popen([str(dask), "worker", address, "--nthreads", "1", "--no-dashboard",
                                    "--name", f"w{i}"], start_new_session=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL) for i in range(2)]
        spec = {"template": "pipeline", "parameters": {"batch_sizes": [1], "model": "digits-mlp"},
                "runs": [{"recipes": ["quant=int8"]}, {"recipes": ["quant=fp16"]}, {"recipes": ["quant=bf16"]}]}
        done = {}
        worker = threading.Thread(target=lambda: done.update(index=reports.batch(
            spec, scheduler=address, out=tmp_path / "out", progress=False)))
        worker.start()
        while len(list((tmp_path / "out").glob("run-*/attempt.json"))) < 2:  # both workers busy
            assert worker.is_alive() and time.time() < deadline + 120, "no run started"
            time.sleep(0.2)
        time.sleep(2)
        os.killpg(procs[1].pid, signal.SIGKILL)  # a worker dies in the middle of a report
        worker.join(timeout=600)
        records = json.loads((tmp_path / "out" / "index.json").read_text())
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert [r["status"] for r in records] == ["ok"] * 3  # the lost run was run again on the other worker
    retried = [r for r in records if r["attempts"] > 1]
    assert len(retried) >= 1
    page = done["index"].read_text()
    assert "a worker died running it before" in page and "3 of 3 reports" in page


def test_the_kernels_chatter_is_filtered_and_its_real_messages_kept():
    from workbench.reports.run import kernel_messages

    text = ("[IPKernelApp] WARNING | Kernel is running over TCP without encryption. All communication (including "
            "code and outputs) is sent in plain text and is susceptible to eavesdropping.\n"
            "Traceback (most recent call last):\n  File \"x.py\", line 1\nMemoryError: the kernel ran out\n"
            "[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel.\n")
    kept = kernel_messages(text)
    assert "MemoryError: the kernel ran out" in kept and "Traceback" in kept
    assert "IPKernelApp" not in kept and "eavesdropping" not in kept
    assert kernel_messages("[IPKernelApp] WARNING | Kernel is running over TCP without encryption.\n") == ""


def test_the_rerun_command_reads_back_as_the_same_parameters():
    import shlex

    from workbench import cli
    from workbench.reports.run import rerun_command

    params = {"model": "digits-mlp", "recipes": ["quant=int8", "prune=0.5:structured=true"], "batch_sizes": [1, 64],
              "threads": None, "max_drop": 0.02, "device": "auto", "seed": 3, "note": "0.5", "flag": "true"}
    line = rerun_command("pipeline", params, output="a b.ipynb", html="r.html")
    argv = shlex.split(line)
    assert argv[:3] == ["workbench", "report", "pipeline"] and argv[-4:] == ["-o", "a b.ipynb", "--html", "r.html"]
    pairs = [argv[i + 1:i + 3] for i, a in enumerate(argv) if a == "-p"]
    args = type("Args", (), {"parameters_file": None, "parameter": pairs})()
    assert cli._parameters(args) == params


@pytest.mark.slow
def test_the_pruning_templates_defaults_give_a_candidate_within_budget():
    """The first pruning report a user runs shows the technique working (issue 19): with its default sparsities and
    fine-tuning, at least one candidate keeps digits-cnn within the 0.01 budget."""
    import nbformat

    # the template's own parameter and recipe cells, run as they are (no kernel, no sensitivity sweep: just the
    # candidates a default report measures), then measured as the report's cell does
    nb = nbformat.read(str(reports.template_path("pruning")), as_version=4)
    scope: dict = {}
    for cell in nb.cells[1:3]:
        exec(cell.source, scope)
    model, data = reports.load_model(scope["model"])
    results = reports.run_recipes(model, data, scope["recipes"], batch_sizes=[1], seed=scope["seed"], study=False)
    drops = [r.baseline.metric - r.measurement.metric for r in results]
    assert len(drops) == 3 and min(drops) <= scope["max_drop"]


def test_a_reports_chart_carries_plotly_js_once_and_its_json_without_loading_nbformat():
    code = """
import sys, plotly.graph_objects as go, IPython.display as d
from workbench.reports import cells
shown = []
d.display = lambda bundle, raw: shown.append(bundle)
fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))
cells.show(fig); cells.show(fig)
assert all(set(b) == {"application/vnd.plotly.v1+json", "text/html"} for b in shown)
assert shown[0]["application/vnd.plotly.v1+json"]["data"][0]["y"] == [3, 4]
assert "window.Plotly" in shown[0]["text/html"] and "window.Plotly" not in shown[1]["text/html"]
assert all("Plotly.newPlot" in b["text/html"] for b in shown)
assert "nbformat" not in sys.modules
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
