"""Running one report: papermill executes the template with parameters, nbconvert writes HTML with the code hidden.
A failing report still writes its notebook and HTML, with the error visible, and raises ReportError."""
from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..errors import ReportError, WorkbenchError, require, first_line
from ..paths import check_parents, disk_error, write_atomic
from ..scoped import logger_level
from .templates import check_parameters, template_path

RETRYABLE = ("Kernel died", "Kernel didn't respond", "Address already in use", "port", "Timeout waiting for kernel",
             "kernel_info")
# what a kernel prints on its stderr at every start and shutdown, which says nothing about the report: filtered out;
# anything else the kernel prints is passed on
KERNEL_NOISE = ("Kernel is running over TCP without encryption", "KeyboardInterrupt caught in kernel",
                "To connect another client to this kernel", "--existing kernel-")


# wide result tables scroll inside the page instead of running off it (a 1280 px window shows the page whole)
REPORT_STYLE = (".jp-OutputArea-output table { display: block; max-width: 100%; overflow-x: auto; } "
                ".jp-OutputArea-output td, .jp-OutputArea-output th { white-space: nowrap; }")


def to_html(notebook: Path, html_path: Path) -> Path:
    """nbconvert to HTML with the code cells hidden (outputs, errors included, stay)."""
    import nbformat

    exporter = require("nbconvert", "reports", "HTML reports").HTMLExporter(
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))
    body = body.replace("</head>", f"<style>{REPORT_STYLE}</style></head>", 1)
    try:
        return write_atomic(html_path, body)
    except WorkbenchError as e:
        raise ReportError(str(e)) from None


def report(template: str | Path, parameters: dict | None = None, output: str | Path | None = None,
           html: str | Path | None = None, timeout: int = 1800, kernel: str | None = None,
           progress: bool | Callable = False, cwd: str | Path | None = None) -> Path:
    """Run a template with `parameters` (papermill), then write HTML with the code hidden; returns the notebook.

    The report opens with its one-line verdict and ends with its provenance: when and in how long it was made, the
    workbench, torch and Python versions, the workbench's git commit where it runs from a checkout, and the command
    that re-runs it. `progress`: True for a bar, or a `progress(message, fraction)` callback (the CLI prints
    "cell 3 of 9" lines). The kernel's start-up and shutdown chatter is filtered out; anything else it prints on
    stderr is passed on.

    A failing report still writes its notebook and HTML, with the error visible, and raises ReportError. The
    notebook runs under a temporary name beside `output` and is renamed when the run ends; the HTML is written whole
    or not at all. A disk error is one line naming the path, and leaves nothing half-written.

        >>> wb.report("quickstart", {"model": "digits-mlp"}, output="q.ipynb", html="q.html")
    """
    from ..progress import Bar

    papermill = require("papermill", "reports", "reports")
    path = template_path(template)
    parameters = check_parameters(path, dict(parameters or {}))
    asked = {"output": output, "html": html}  # as given, for the command that re-runs the report
    output = Path(output) if output else Path(f"{path.stem}-report.ipynb")
    running = output.with_name(f".{output.stem}.running{output.suffix}")
    try:
        check_parents(output)
    except WorkbenchError as e:
        raise ReportError(str(e)) from None
    bar = Bar(f"{path.stem} report") if progress is True else None
    on_cell = bar or (progress if callable(progress) else None)
    started = time.time()
    if on_cell is not None:
        on_cell("starting the kernel", 0.0)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        failure = _execute(papermill, path, running, output, parameters, kernel, timeout, on_cell, cwd)
        if running.exists():
            running.replace(output)
        if output.exists():
            _frame(output, template, parameters, asked, time.time() - started)
        if html and output.exists():
            to_html(output, Path(html))
    except OSError as e:
        raise ReportError(disk_error(getattr(e, "filename", None) or output, e)) from None
    finally:
        try:
            running.unlink(missing_ok=True)
        except OSError:
            pass
        if bar is not None:
            bar.finish(None if failure is None and sys.exc_info()[0] is None else "the report failed")
    if failure is not None:
        raise failure
    return output


def _execute(papermill, path: Path, running: Path, output: Path, parameters: dict, kernel, timeout, on_cell, cwd):
    """Run the notebook (retrying kernel-start races); the ReportError of a failed run, or None."""
    failure = None
    with logger_level("papermill", logging.ERROR), tempfile.TemporaryFile() as kernel_stderr:
        # its inspect warns about '=' in our defaults
        try:
            for attempt in range(3):
                try:
                    papermill.execute_notebook(str(path), str(running), parameters=parameters, kernel_name=kernel,
                                               execution_timeout=timeout, progress_bar=False,
                                               cwd=str(cwd) if cwd else None, request_save_on_cell_execute=True,
                                               engine_name=_engine(papermill), on_cell=on_cell,
                                               kernel_manager_class=_kernel_manager(kernel_stderr))
                    return None
                except papermill.PapermillExecutionError as e:
                    return ReportError(f"{path.stem} report failed in cell {e.exec_count}: {e.ename}: {e.evalue} "
                                       f"(see {output})")
                except TimeoutError as e:  # nbclient's cell timeout (a TimeoutError, so an OSError): not the disk
                    return ReportError(f"{path.stem} report stopped: a cell ran longer than the {timeout} s timeout "
                                       f"({first_line(e) if str(e) else 'timeout'}); see {output}")
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
        finally:
            kernel_stderr.seek(0)
            kept = kernel_messages(kernel_stderr.read().decode("utf-8", "replace"))
            if kept:
                print(kept, file=sys.stderr)
    return failure


def kernel_messages(text: str) -> str:
    """A kernel's stderr without its start-up and shutdown chatter (the lines holding one of `KERNEL_NOISE`); real
    messages, tracebacks included, are kept."""
    kept = [line for line in text.splitlines() if not any(noise in line for noise in KERNEL_NOISE)]
    return "\n".join(kept).strip("\n")


def _kernel_manager(stderr):
    """jupyter_client's kernel manager with the kernel's stderr going to `stderr` (a file) instead of ours."""
    from jupyter_client import AsyncKernelManager

    class KernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):  # jupyter_client's hook for how to launch
            kw["stderr"] = stderr
            return await super()._async_launch_kernel(kernel_cmd, **kw)

    return KernelManager


def _engine(papermill) -> str:
    """papermill's nbclient engine, with a callback at the start of each code cell (registered once, by name)."""
    from papermill.engines import NBClientEngine, papermill_engines

    class Engine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, on_cell=None, **kwargs):
            if on_cell is not None:
                cells = nb_man.nb.cells
                code = [i for i, c in enumerate(cells) if c.cell_type == "code"]
                start = nb_man.cell_start

                def cell_start(cell, cell_index=None, **kw):
                    if cell_index in code:
                        n = code.index(cell_index)
                        on_cell(f"cell {n + 1} of {len(code)}: {_section(cells, cell_index)}", n / len(code))
                    return start(cell, cell_index, **kw)

                nb_man.cell_start = cell_start
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    if "workbench" not in papermill_engines._engines:
        papermill_engines.register("workbench", Engine)
    return "workbench"


def _section(cells, index: int) -> str:
    """What a code cell is part of: the last markdown heading above it ('parameters' for the parameter cells)."""
    tags = cells[index].get("metadata", {}).get("tags", [])
    if "parameters" in tags or "injected-parameters" in tags:
        return "parameters"
    for cell in reversed(cells[:index]):
        if cell.cell_type == "markdown":
            heading = next((line.lstrip("#").strip() for line in cell.source.splitlines() if line.startswith("#")),
                           None)
            if heading:
                return heading
    return "setting up"


def rerun_command(template, parameters: dict, output=None, html=None) -> str:
    """The `workbench report` command line that runs this report again (values written as the CLI reads them)."""
    import json
    import shlex

    import yaml

    def value(v) -> str:
        if isinstance(v, str):
            try:
                plain = yaml.safe_load(v) == v
            except yaml.YAMLError:
                plain = False
            return v if plain else json.dumps(v)
        return json.dumps(v)

    parts = ["workbench", "report", str(template)]
    for name, v in parameters.items():
        parts += ["-p", name, value(v)]
    if output is not None:
        parts += ["-o", str(output)]
    if html is not None:
        parts += ["--html", str(html)]
    return " ".join(shlex.quote(p) for p in parts)


def provenance(template, parameters: dict, output=None, html=None, seconds: float | None = None) -> str:
    """Markdown: when and in how long the report was made, with which versions (and git commit), and the command
    that re-runs it."""
    import platform
    from datetime import datetime, timezone

    from .. import __version__
    from ..backends import installed_versions

    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = _commit()
    torch_version = installed_versions("torch")["torch"]  # not imported for it: `workbench report` never needs torch
    lines = ["## Provenance", "",
             f"- made {made}" + (f", in {seconds:.0f} s" if seconds is not None else ""),
             f"- workbench {__version__}" + (f" (git commit {commit})" if commit else "")
             + f", torch {torch_version}, Python {platform.python_version()}",
             f"- re-run: `{rerun_command(template, parameters, output, html)}`"]
    return "\n".join(lines)


def _commit() -> str | None:
    """The workbench's git commit (with '+ local changes' when the tree differs), where it runs from a checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "")


def _frame(notebook: Path, template, parameters: dict, asked: dict, seconds: float) -> None:
    """The executed notebook opened by its one-line verdict (under the title) and closed by its provenance."""
    import nbformat
    from nbformat.v4 import new_markdown_cell

    from .cells import read_headline

    nb = nbformat.read(str(notebook), as_version=4)
    head = read_headline(notebook)
    if head and head.get("text"):
        nb.cells.insert(1, new_markdown_cell(f"**Verdict:** {_escape(head['text'])}"))
    nb.cells.append(new_markdown_cell(provenance(template, parameters, asked["output"], asked["html"], seconds)))
    write_atomic(notebook, nbformat.writes(nb))


def _escape(text: str) -> str:
    """Plain text for a markdown cell (no markup, no HTML from a user's recipe names)."""
    import html

    return html.escape(text).replace("*", "\\*").replace("_", "\\_")


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
