"""Batches: many parameter sets through templates, in parallel on dask.distributed (a LocalCluster, or a scheduler
address); each run in its own directory, failures reported in index.html while the others finish."""
from __future__ import annotations

import html
import json
import os
import sys
import time
from pathlib import Path

from ..errors import ReportError, require
from ..paths import write_atomic
from .cells import read_headline
from .run import report
from .templates import template_path


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
    started = time.time()
    record = {"dir": out.name, "parameters": parameters, "status": "ok", "error": None, "headline": None,
              "attempts": 1}
    try:
        out.mkdir(parents=True, exist_ok=True)
        record["attempts"] = _attempt(out)
        if "__error__" in parameters:
            raise ReportError(f"malformed batch entry: {parameters['__error__']}")
        notebook = report(template, parameters, output=out / "report.ipynb", html=out / "report.html",
                          timeout=timeout, cwd=out)
        record["headline"] = read_headline(notebook)
    except Exception as e:
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
    record["seconds"] = round(time.time() - started, 1)
    try:
        write_atomic(out / "run.json", json.dumps(record, indent=2, default=str))
    except Exception as e:  # the record still reaches the index
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
    return record


def _attempt(out: Path) -> int:
    """Count this attempt at a run (a run whose worker died is run again by dask): 1 for the first."""
    path = out / "attempt.json"
    try:
        previous = json.loads(path.read_text())["attempts"] if path.exists() else 0
    except (OSError, ValueError, KeyError, TypeError):
        previous = 0
    write_atomic(path, json.dumps({"attempts": previous + 1}))
    return previous + 1


def batch(spec: str | Path | dict, workers: int = 2, scheduler: str | None = None, out: str | Path | None = None,
          timeout: int = 1800, progress: bool = True) -> Path:
    """Run many parameter sets through templates in parallel on dask.distributed; returns the index.html path.

    A LocalCluster of `workers` processes by default; `scheduler` ("tcp://host:8786") uses an existing cluster.
    Each run gets its own directory; a failing run is reported in the index and does not stop the others.
    """
    import yaml

    distributed = require("dask.distributed", "reports", "batches on dask")
    Client, LocalCluster, as_completed = distributed.Client, distributed.LocalCluster, distributed.as_completed

    if not isinstance(spec, dict):
        path = Path(spec)
        if not path.exists():
            raise ReportError(f"batch file {str(path)!r} does not exist")
        try:
            spec = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ReportError(f"batch file {path} does not parse: {e}") from None
    runs = expand_batch(spec)
    if not scheduler:  # local workers share this machine's cores: give each its share, so they do not contend
        share = max(1, (os.cpu_count() or 1) // max(workers, 1))
        for run in runs:
            if "threads" in _declared(spec["template"]) and run["parameters"].get("threads") is None:
                run["parameters"]["threads"] = share
    out = Path(out or spec.get("out") or "batch-reports")
    out.mkdir(parents=True, exist_ok=True)
    template_path(spec["template"])  # fail early on an unknown template
    for stale in out.glob("run-*/attempt.json"):  # attempts count within this batch, not an earlier one here
        stale.unlink(missing_ok=True)
    cluster = None
    main = sys.modules.get("__main__")
    if main is not None and not hasattr(main, "__spec__"):
        main.__spec__ = None  # IPython's __main__ lacks it, and worker processes are spawned from it
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    records, futures = [], []
    try:
        futures = [client.submit(run_one, r["template"], r["parameters"], str((out / f"run-{i:03d}").resolve()),
                                 timeout, pure=False) for i, r in enumerate(runs)]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(futures), desc="reports", unit="run")
        for future in as_completed(futures):
            records.append(_record(future, runs, futures, out))
            if bar:
                bar.update(1)
        if bar:
            bar.close()
    except BaseException:  # Ctrl-C or a lost scheduler: cancel what has not run
        client.cancel(futures)
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()  # our own workers are gone: what they left half-written goes too
            for partial in out.glob("run-*/.*.running.ipynb"):
                partial.unlink(missing_ok=True)
    records.sort(key=lambda r: r["dir"])
    return write_index(records, out)


def _record(future, runs: list, futures: list, out: Path) -> dict:
    """A finished run's record; a run whose workers kept dying is reported failed, with why."""
    try:
        return future.result()
    except Exception as e:
        i = futures.index(future)
        run_dir = out / f"run-{i:03d}"
        attempts = _attempts_so_far(run_dir)
        return {"dir": run_dir.name, "parameters": runs[i]["parameters"], "status": "failed", "headline": None,
                "attempts": attempts, "error": f"{type(e).__name__}: the worker running it died"
                f"{f' ({attempts} attempts)' if attempts > 1 else ''}: {e}"}


def _attempts_so_far(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "attempt.json").read_text())["attempts"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def write_index(records: list[dict], out: Path) -> Path:
    """index.html: one row per run with its status, parameters, headline numbers and links (all escaped)."""
    rows = []
    for r in records:
        h = r.get("headline") or {}
        link = f'<a href="{html.escape(r["dir"])}/report.html">report</a>' \
            if (out / r["dir"] / "report.html").exists() else ""
        status = "ok" if r["status"] == "ok" else f"failed: {html.escape(str(r['error']))}"
        if r.get("attempts", 1) > 1:
            status += f" (attempt {r['attempts']}: a worker died running it before)"
        numbers = html.escape(_best_text(h))
        params = html.escape(json.dumps(r["parameters"], default=str))
        rows.append(f"<tr class='{html.escape(r['status'])}'><td>{html.escape(r['dir'])}</td><td>{status}</td>"
                    f"<td><code>{params}</code></td><td>{numbers}</td><td>{link}</td></tr>")
    ok = sum(r["status"] == "ok" for r in records)
    page = ("<!doctype html><meta charset='utf-8'><title>workbench batch</title>"
            "<style>body{font-family:sans-serif} td,th{border:1px solid #ccc;padding:4px} .failed{background:#fee}"
            "</style>"
            f"<h1>workbench batch: {ok} of {len(records)} reports</h1><table><tr><th>run</th><th>status</th>"
            "<th>parameters</th><th>best candidate (reliably faster, within budget)</th><th>report</th></tr>"
            f"{''.join(rows)}</table>")
    index = out / "index.html"
    write_atomic(out / "index.json", json.dumps(records, indent=2, default=str))
    write_atomic(index, page)
    return index


def _best_text(h: dict) -> str:
    """The index's cell for a run's headline: the best candidate with its speedup interval, or why there is none."""
    from ..measure.measurement import significant

    if not h:
        return ""
    if not h.get("best"):
        return h.get("text") or "no candidate is reliably faster here"
    return (f"{h['best']}: {significant(h['best_speedup'], 2)}x ({significant(h['best_low'], 2)}-"
            f"{significant(h['best_high'], 2)}) at batch {h['best_batch']}, {significant(h['best_size_ratio'], 2)}x "
            "size")


def _declared(template: str) -> dict:
    from .templates import inspect_template

    return inspect_template(template_path(template))
