"""Reproducible reports: papermill templates run with parameters, then nbconvert to HTML with the code hidden.

    >>> wb.report("quickstart", {"model": "digits-mlp"}, html="out.html")
    >>> wb.reports.batch("grid.yaml", workers=2)

Templates live in `templates/` (a bare name like "quickstart" resolves there). The helpers below are what the
templates' cells call, so the notebooks stay short and every report records the same things: parameters, recipe,
environment, the study table, the charts and a verdict per candidate.
"""
from __future__ import annotations

import html
import json
import logging
import sys
import time
from pathlib import Path
from .errors import WorkbenchError

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
RETRYABLE = ("Kernel died", "Kernel didn't respond", "Address already in use", "port", "Timeout waiting for kernel",
             "kernel_info")


class ReportError(WorkbenchError):
    """A report could not be made; the message says why (the notebook and HTML are still written)."""


# -- templates and parameters -----------------------------------------------------------------------------------
def template_path(template: str | Path) -> Path:
    path = Path(template)
    if path.suffix != ".ipynb":
        path = TEMPLATES / f"{template}.ipynb"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in TEMPLATES.glob("*.ipynb"))) if TEMPLATES.exists() else "none"
        raise ReportError(f"no template {str(template)!r}; templates: {known}")
    return path


def inspect_template(path: Path) -> dict:
    """{parameter: {"type", "default", "help"}} from the cell tagged `parameters`.

    Parsed with Python's ast rather than papermill's inspect, which skips every line holding more than one '='
    (so a default like ["quant=int8"] would vanish). The type is the annotation (`name: int = 3`).
    """
    import ast

    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        raise ReportError(f"template {path.name} has no cell tagged 'parameters'")
    lines = cell.source.splitlines()
    out = {}
    for node in ast.parse(cell.source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name, kind = node.target.id, ast.unparse(node.annotation)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name, kind = node.targets[0].id, "None"
        else:
            continue
        line = lines[node.end_lineno - 1]
        comment = line[node.end_col_offset:].strip()
        out[name] = {"type": kind, "default": ast.unparse(node.value) if node.value else None,
                     "help": comment.lstrip("#").strip()}
    return out


def templates() -> dict:
    """{template name: {parameter: {"type", "default", "help"}}} for every template."""
    return {path.stem: inspect_template(path) for path in sorted(TEMPLATES.glob("*.ipynb"))}


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list, tuple),
          "dict": (dict,)}


def check_parameters(template: Path, parameters: dict) -> dict:
    """Refuse parameters the template does not declare, and values of the wrong type."""
    declared = inspect_template(template)
    unknown = [n for n in parameters if n not in declared]
    if unknown:
        raise ReportError(f"template {template.stem!r} has no parameter {', '.join(map(repr, unknown))}; its "
                          f"parameters are: {', '.join(declared)}")
    for name, value in parameters.items():
        kind = declared[name]["type"]
        allowed = _TYPES.get(kind)
        if allowed and value is not None and (not isinstance(value, allowed) or
                                              (kind in ("int", "float") and isinstance(value, bool))):
            article = "an" if kind[0] in "aeiou" else "a"
            raise ReportError(f"parameter {name!r} of {template.stem!r} takes {article} {kind} (default "
                              f"{declared[name]['default']}), got {type(value).__name__} {value!r}")
    return parameters


# -- running one report -----------------------------------------------------------------------------------------
def to_html(notebook: Path, html_path: Path) -> Path:
    """nbconvert to HTML with the code cells hidden (outputs, errors included, stay)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(str(notebook), as_version=4))
    html_path.write_text(body, encoding="utf-8")
    return html_path


def report(template: str | Path, parameters: dict | None = None, output: str | Path | None = None,
           html: str | Path | None = None, timeout: int = 1800, kernel: str | None = None,
           progress: bool = False, cwd: str | Path | None = None) -> Path:
    """Run a template with `parameters` (papermill), then write HTML with the code hidden; returns the notebook.

    A failing report still writes its notebook and HTML, with the error visible, and raises ReportError.
    """
    import papermill

    path = template_path(template)
    parameters = check_parameters(path, dict(parameters or {}))
    output = Path(output) if output else Path(f"{path.stem}-report.ipynb")
    output.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("papermill").setLevel(logging.ERROR)  # its inspect warns about '=' in our defaults
    failure = None
    for attempt in range(3):
        try:
            papermill.execute_notebook(str(path), str(output), parameters=parameters, kernel_name=kernel,
                                       execution_timeout=timeout, progress_bar=progress, cwd=str(cwd) if cwd else None,
                                       request_save_on_cell_execute=True)
            failure = None
            break
        except papermill.PapermillExecutionError as e:
            failure = ReportError(f"{path.stem} report failed in cell {e.exec_count}: {e.ename}: {e.evalue} "
                                  f"(see {output})")
            break
        except Exception as e:  # kernel start races: a port in use, a kernel that does not answer
            failure = ReportError(f"{path.stem} report could not run: {type(e).__name__}: {e}")
            if not any(word in str(e) for word in RETRYABLE) or attempt == 2:
                break
            time.sleep(1 + attempt)
    if html and output.exists():
        to_html(output, Path(html))
    if failure is not None:
        raise failure
    return output


# -- helpers the templates call ---------------------------------------------------------------------------------
def setup() -> None:
    """Static Plotly figures that render in JupyterLab and in the exported HTML, offline (plotly.js inline)."""
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype+notebook"


def load_model(spec: str):
    """(model, data) from a built-in name or an import path 'package.module:factory' returning (model, data)."""
    import importlib

    from . import zoo

    if spec in zoo.list():
        return zoo.load(spec)
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ReportError(f"model {spec!r} is neither a built-in ({', '.join(zoo.list())}) nor an import path "
                          "like 'my_package.models:build' (a function returning (model, data))")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ReportError(f"model import path {spec!r} failed: {type(e).__name__}: {e}") from None
    built = factory()
    if not (isinstance(built, tuple) and len(built) == 2):
        raise ReportError(f"{spec} must return (model, data), got {type(built).__name__}")
    return built


def show_parameters(**parameters) -> None:
    """The report's parameters as a table (escaped)."""
    from IPython.display import HTML, display

    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td><code>{html.escape(repr(v))}</code></td></tr>"
                   for k, v in parameters.items())
    display(HTML(f"<table>{rows}</table>"))


def environment_table(device: str = "auto", threads: int | None = None, seed: int = 0):
    """CPU, threads, GPU, library versions and the seed, as a one-column DataFrame."""
    import pandas as pd

    from .engine import resolve_device
    from .measure import environment

    env = environment(threads, resolve_device(device))
    env["seed"] = seed
    return pd.DataFrame({"value": {k: str(v) for k, v in env.items()}})


def run_recipes(model, data, recipes, device: str = "auto", batch_sizes=None, threads: int | None = None,
                name: str | None = None, **kwargs) -> list:
    """One optimize per recipe against one shared baseline measurement; returns the Results."""
    import torch

    from .engine import optimize

    results = []
    for recipe in recipes:
        torch.manual_seed(0)
        results.append(optimize(model, recipe, data=data, device=device, batch_sizes=batch_sizes, threads=threads,
                                name=name, baseline=results[0] if results else None, **kwargs))
    return results


def labels_only(model, data, student: str, epochs: int, distilled):
    """The distillation report's control: the same student trained on the labels alone, side by side."""
    from .engine import compare
    from .techniques.distill import build_student
    from .train import fit

    alone = build_student(student, model)
    alone, _ = fit(alone, data, epochs=epochs, lr=1e-3, label="labels only", start_from_scratch=True)
    return compare({"teacher": model, "student, distilled": distilled.model, "student, labels only": alone},
                   data=data, study=False)


def comparison(results):
    """Baseline plus every candidate in one table (speedups against the shared baseline)."""
    import pandas as pd

    if not results:
        raise ReportError("no results to compare; give at least one recipe")
    return pd.concat([results[0].table().iloc[[0]]] + [r.table().iloc[[1]] for r in results])


def verdicts(results, max_drop: float = 0.01):
    """Per candidate: within the metric budget? faster (at every timed batch)? smaller? and a one-line verdict."""
    import pandas as pd

    rows = {}
    for r in results:
        drop = r.baseline["metric"] - r.metrics["metric"]
        batches = [b for b in r.baseline["batch_sizes"].split(",") if b]
        speedups = [r.baseline[f"latency_p50_ms_b{b}"] / r.metrics[f"latency_p50_ms_b{b}"] for b in batches]
        smaller = r.metrics["size_bytes"] / r.baseline["size_bytes"]
        ok, faster, small = drop <= max_drop, min(speedups) > 1.05, smaller < 0.95
        verdict = ("over the metric budget" if not ok else "recommended: faster and smaller" if faster and small
                   else "recommended: faster" if faster else "smaller only, not faster here" if small
                   else "no gain measured")
        rows[str(r.recipe)] = {f"{r.metrics['metric_name']} drop": drop, "within budget": ok,
                               "speedup (worst batch)": min(speedups), "faster": faster, "size ×": smaller,
                               "smaller": small, "verdict": verdict}
    return pd.DataFrame.from_dict(rows, orient="index")


def headline(results, max_drop: float = 0.01) -> dict:
    """The numbers a batch index shows: the best candidate within budget (by worst-batch speedup)."""
    from IPython.display import display

    table = verdicts(results, max_drop)
    good = table[table["within budget"]]
    best = good.sort_values("speedup (worst batch)", ascending=False).index[0] if len(good) else None
    data = {"baseline_metric": results[0].baseline["metric"], "metric_name": results[0].metrics["metric_name"],
            "best": best, "candidates": len(results)}
    if best is not None:
        data.update({"best_metric": float(results[0].baseline["metric"] - table.loc[best].iloc[0]),
                     "best_speedup": float(table.loc[best, "speedup (worst batch)"]),
                     "best_size_ratio": float(table.loc[best, "size ×"])})
    text = (f"best within a {max_drop:g} {data['metric_name']} budget: {best} "
            f"({data.get('best_speedup', 0):.2f}x at the worst batch, {data.get('best_size_ratio', 1):.2f}x size)"
            if best else f"no candidate stays within a {max_drop:g} {data['metric_name']} budget")
    display({"application/json": data, "text/plain": text}, raw=True)
    return data


def read_headline(notebook: Path) -> dict | None:
    """The JSON a template's `headline` cell displayed, from an executed notebook."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    for cell in nb.cells:
        if "headline" in cell.get("metadata", {}).get("tags", []):
            for out in cell.get("outputs", []):
                if "application/json" in out.get("data", {}):
                    return dict(out["data"]["application/json"])
    return None


# -- batches ------------------------------------------------------------------------------------------------------
def expand_batch(spec: dict) -> list[dict]:
    """Runs from a batch spec: {"template", "parameters" (shared), "grid" (every combination) or "runs" (a list)}.
    Each run is {"template", "parameters"} or {"error"} for a malformed entry (reported, the others still run)."""
    import itertools

    if not isinstance(spec, dict) or "template" not in spec:
        raise ReportError("a batch file needs a 'template' and a 'grid' or 'runs'")
    shared = dict(spec.get("parameters") or {})
    runs = []
    if "grid" in spec:
        grid = spec["grid"] or {}
        keys = list(grid)
        for combo in itertools.product(*[v if isinstance(v, list) else [v] for v in grid.values()]):
            runs.append({**shared, **dict(zip(keys, combo))})
    for entry in spec.get("runs") or []:
        runs.append({**shared, **entry} if isinstance(entry, dict) else {"__error__": f"not a mapping: {entry!r}"})
    if not runs:
        raise ReportError("the batch has no runs: give a 'grid' or a 'runs' list")
    return [{"template": spec["template"], "parameters": r} for r in runs]


def run_one(template: str, parameters: dict, out_dir: str, timeout: int = 1800) -> dict:
    """One batch run in its own directory; never raises (the batch reports failures)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    record = {"dir": out.name, "parameters": parameters, "status": "ok", "error": None, "headline": None}
    try:
        if "__error__" in parameters:
            raise ReportError(f"malformed batch entry: {parameters['__error__']}")
        notebook = report(template, parameters, output=out / "report.ipynb", html=out / "report.html",
                          timeout=timeout, cwd=out)
        record["headline"] = read_headline(notebook)
    except Exception as e:
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
    record["seconds"] = round(time.time() - started, 1)
    (out / "run.json").write_text(json.dumps(record, indent=2, default=str))
    return record


def batch(spec: str | Path | dict, workers: int = 2, scheduler: str | None = None, out: str | Path | None = None,
          timeout: int = 1800, progress: bool = True) -> Path:
    """Run many parameter sets through templates in parallel on dask.distributed; returns the index.html path.

    A LocalCluster of `workers` processes by default; `scheduler` ("tcp://host:8786") uses an existing cluster.
    Each run gets its own directory; a failing run is reported in the index and does not stop the others.
    """
    import yaml
    from dask.distributed import Client, LocalCluster, as_completed

    if not isinstance(spec, dict):
        path = Path(spec)
        if not path.exists():
            raise ReportError(f"batch file {str(path)!r} does not exist")
        try:
            spec = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ReportError(f"batch file {path} does not parse: {e}") from None
    runs = expand_batch(spec)
    out = Path(out or spec.get("out") or "batch-reports")
    out.mkdir(parents=True, exist_ok=True)
    template_path(spec["template"])  # fail early on an unknown template
    cluster = None
    main = sys.modules.get("__main__")
    if main is not None and not hasattr(main, "__spec__"):
        main.__spec__ = None  # IPython's __main__ lacks it, and worker processes are spawned from it
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    records = []
    try:
        futures = [client.submit(run_one, r["template"], r["parameters"], str((out / f"run-{i:03d}").resolve()),
                                 timeout, pure=False) for i, r in enumerate(runs)]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(futures), desc="reports", unit="run")
        for future in as_completed(futures):
            records.append(future.result())
            if bar:
                bar.update(1)
        if bar:
            bar.close()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    records.sort(key=lambda r: r["dir"])
    return write_index(records, out)


def write_index(records: list[dict], out: Path) -> Path:
    """index.html: one row per run with its status, parameters, headline numbers and links (all escaped)."""
    rows = []
    for r in records:
        h = r.get("headline") or {}
        link = f'<a href="{html.escape(r["dir"])}/report.html">report</a>' \
            if (out / r["dir"] / "report.html").exists() else ""
        status = "ok" if r["status"] == "ok" else f"failed: {html.escape(str(r['error']))}"
        numbers = (f"{html.escape(str(h.get('best')))}: {h['best_speedup']:.2f}x faster, "
                   f"{h['best_size_ratio']:.2f}x size" if h.get("best") else html.escape(str(h.get("best", ""))))
        params = html.escape(json.dumps(r["parameters"], default=str))
        rows.append(f"<tr class='{html.escape(r['status'])}'><td>{html.escape(r['dir'])}</td><td>{status}</td>"
                    f"<td><code>{params}</code></td><td>{numbers}</td><td>{link}</td></tr>")
    ok = sum(r["status"] == "ok" for r in records)
    page = ("<!doctype html><meta charset='utf-8'><title>workbench batch</title>"
            "<style>body{font-family:sans-serif} td,th{border:1px solid #ccc;padding:4px} .failed{background:#fee}"
            "</style>"
            f"<h1>workbench batch: {ok} of {len(records)} reports</h1><table><tr><th>run</th><th>status</th>"
            f"<th>parameters</th><th>best candidate within budget</th><th>report</th></tr>{''.join(rows)}</table>")
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    (out / "index.json").write_text(json.dumps(records, indent=2, default=str))
    return index
