"""Running one report: papermill executes the template with parameters, nbconvert writes HTML with the code hidden.
A failing report still writes its notebook and HTML, with the error visible, and raises ReportError."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..errors import ReportError, WorkbenchError, require
from ..paths import check_parents, disk_error, write_atomic
from ..scoped import logger_level
from .templates import check_parameters, template_path

RETRYABLE = ("Kernel died", "Kernel didn't respond", "Address already in use", "port", "Timeout waiting for kernel",
             "kernel_info")


def to_html(notebook: Path, html_path: Path) -> Path:
    """nbconvert to HTML with the code cells hidden (outputs, errors included, stay)."""
    import nbformat

    exporter = require("nbconvert", "reports", "HTML reports").HTMLExporter(
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))
    try:
        return write_atomic(html_path, body)
    except WorkbenchError as e:
        raise ReportError(str(e)) from None


def report(template: str | Path, parameters: dict | None = None, output: str | Path | None = None,
           html: str | Path | None = None, timeout: int = 1800, kernel: str | None = None,
           progress: bool = False, cwd: str | Path | None = None) -> Path:
    """Run a template with `parameters` (papermill), then write HTML with the code hidden; returns the notebook.

    A failing report still writes its notebook and HTML, with the error visible, and raises ReportError. The
    notebook runs under a temporary name beside `output` and is renamed when the run ends; the HTML is written whole
    or not at all. A disk error is one line naming the path, and leaves nothing half-written.

        >>> wb.report("quickstart", {"model": "digits-mlp"}, output="q.ipynb", html="q.html")
    """
    papermill = require("papermill", "reports", "reports")
    path = template_path(template)
    parameters = check_parameters(path, dict(parameters or {}))
    output = Path(output) if output else Path(f"{path.stem}-report.ipynb")
    running = output.with_name(f".{output.stem}.running{output.suffix}")
    try:
        check_parents(output)
    except WorkbenchError as e:
        raise ReportError(str(e)) from None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        failure = _execute(papermill, path, running, output, parameters, kernel, timeout, progress, cwd)
        if running.exists():
            running.replace(output)
        if html and output.exists():
            to_html(output, Path(html))
    except OSError as e:
        raise ReportError(disk_error(getattr(e, "filename", None) or output, e)) from None
    finally:
        try:
            running.unlink(missing_ok=True)
        except OSError:
            pass
    if failure is not None:
        raise failure
    return output


def _execute(papermill, path: Path, running: Path, output: Path, parameters: dict, kernel, timeout, progress, cwd):
    """Run the notebook (retrying kernel-start races); the ReportError of a failed run, or None."""
    failure = None
    with logger_level("papermill", logging.ERROR):  # its inspect warns about '=' in our defaults
        for attempt in range(3):
            try:
                papermill.execute_notebook(str(path), str(running), parameters=parameters, kernel_name=kernel,
                                           execution_timeout=timeout, progress_bar=progress,
                                           cwd=str(cwd) if cwd else None, request_save_on_cell_execute=True)
                return None
            except papermill.PapermillExecutionError as e:
                return ReportError(f"{path.stem} report failed in cell {e.exec_count}: {e.ename}: {e.evalue} "
                                   f"(see {output})")
            except TimeoutError as e:  # nbclient's cell timeout (a TimeoutError, so an OSError): not the disk
                return ReportError(f"{path.stem} report stopped: a cell ran longer than the {timeout} s timeout "
                                   f"({str(e).splitlines()[0] if str(e) else 'timeout'}); see {output}")
            except OSError as e:
                if _ours(e, running):
                    raise  # the disk refused the notebook: report() says so in one line
                failure = ReportError(f"{path.stem} report could not run: {type(e).__name__}: {e}")
                break
            except Exception as e:  # kernel start races: a port in use, a kernel that does not answer
                failure = ReportError(f"{path.stem} report could not run: {type(e).__name__}: {e}")
                if not any(word in str(e) for word in RETRYABLE) or attempt == 2:
                    break
                time.sleep(1 + attempt)
    return failure


def _ours(error: OSError, running: Path) -> bool:
    """Whether an OSError is about the report's own files (a disk error), not e.g. a missing kernel program."""
    name = getattr(error, "filename", None)
    return name is not None and Path(name).resolve().parent == running.resolve().parent


def from_study(study, path, model: str | None = None, timeout: int = 1800) -> Path:
    """The pipeline report for the recipes a Study explored on `model` (default: the latest run's model), with the
    same batch sizes and device, so someone else can re-run it. `path` is the HTML; the notebook goes beside it.
    The model must be a built-in name or an import path 'package.module:factory'."""
    df = study.df
    runs = df[df["kind"] == "optimize"] if "kind" in df else df.iloc[0:0]
    if runs.empty:
        raise ReportError("the study has no optimize runs to report on")
    model = model or runs["model"].iloc[-1]
    runs = runs[runs["model"] == model]
    recipes = list(dict.fromkeys(runs["recipe"]))
    path = Path(path)
    batches = runs["batch_sizes"].iloc[-1]
    batch_sizes = [int(b) for b in (batches.split(",") if isinstance(batches, str) else batches)]
    params = {"model": model, "recipes": recipes, "batch_sizes": batch_sizes, "device": str(runs["device"].iloc[-1])}
    report("pipeline", params, output=path.with_suffix(".ipynb"), html=path, timeout=timeout)
    return path
