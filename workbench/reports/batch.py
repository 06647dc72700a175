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


INDEX_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; cursor: pointer; user-select: none; white-space: nowrap; }
th[aria-sort=ascending]::after { content: " \\25B2"; } th[aria-sort=descending]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fdecec; }
.params span { display: inline-block; margin-right: 10px; } .params b { font-weight: 600; }
"""
# click a header to sort by it (numbers by their value, the rest as text); click again to reverse
INDEX_SORT = """
document.querySelectorAll("th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], down = th.getAttribute("aria-sort") === "ascending";
  th.closest("tr").querySelectorAll("th").forEach(h => h.removeAttribute("aria-sort"));
  th.setAttribute("aria-sort", down ? "descending" : "ascending");
  const key = r => { const c = r.cells[col]; const v = c.dataset.value; return v !== undefined && v !== "" ? +v : c.textContent; };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    return (typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y))) * (down ? -1 : 1);
  }).forEach(r => body.appendChild(r));
}));
"""


def write_index(records: list[dict], out: Path) -> Path:
    """index.html: a sortable table, one row per run (status, its parameters, the best candidate's speedup with its
    interval, metric and size), and a chart of every run's candidates (metric against speedup); all escaped."""
    from ..measure.measurement import significant

    rows = []
    for r in records:
        h = r.get("headline") or {}
        link = f'<a href="{html.escape(r["dir"])}/report.html">report</a>' \
            if (out / r["dir"] / "report.html").exists() else ""
        status = "ok" if r["status"] == "ok" else f"failed: {html.escape(str(r['error']))}"
        if r.get("attempts", 1) > 1:
            status += f" (attempt {r['attempts']}: a worker died running it before)"
        params = "".join(f"<span><b>{html.escape(str(k))}</b> {html.escape(_short(v))}</span>"
                         for k, v in r["parameters"].items())
        best = h.get("best")
        numbers = [(h.get("best_speedup"), f"{significant(h['best_speedup'], 2)}x ({significant(h['best_low'], 2)}-"
                    f"{significant(h['best_high'], 2)}), b={h['best_batch']}" if best else ""),
                   (h.get("best_metric"), significant(h["best_metric"]) if best else ""),
                   (h.get("best_size_ratio"), f"{significant(h['best_size_ratio'], 2)}x" if best else "")]
        cells = "".join(f"<td class='num' data-value='{'' if v is None else v}'>{html.escape(t)}</td>"
                        for v, t in numbers)
        rows.append(f"<tr class='{html.escape(r['status'])}'><td>{html.escape(r['dir'])}</td><td>{status}</td>"
                    f"<td class='params'>{params}</td><td>{html.escape(best or _best_text(h))}</td>{cells}"
                    f"<td>{link}</td></tr>")
    ok = sum(r["status"] == "ok" for r in records)
    page = ("<!doctype html><meta charset='utf-8'><title>workbench batch</title>"
            f"<style>{INDEX_STYLE}</style>"
            f"<h1>workbench batch: {ok} of {len(records)} reports</h1>"
            "<p>Best candidate per run: within the metric budget and reliably faster (the lower end of its speedup's "
            "95% interval above 1). Click a column to sort.</p>"
            "<table><thead><tr><th>run</th><th>status</th><th>parameters</th><th>best candidate</th>"
            "<th>speedup (slowest batch)</th><th>metric</th><th>size ×</th><th>report</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{_runs_chart(records)}<script>{INDEX_SORT}</script>")
    index = out / "index.html"
    write_atomic(out / "index.json", json.dumps(records, indent=2, default=str))
    write_atomic(index, page)
    return index


def _short(value) -> str:
    """A parameter's value for the index: lists as comma-separated items, the rest as text."""
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _runs_chart(records: list[dict]) -> str:
    """Every run's candidates in one chart (metric against the slowest batch's speedup), plotly inline: the
    index is one file that opens offline; empty where plotly is missing or no run has candidates."""
    try:
        import plotly.graph_objects as go
    except ImportError:
        return ""
    from ..charts import themed

    fig = go.Figure()
    for r in records:
        table = (r.get("headline") or {}).get("candidates_table") or []
        if not table:
            continue
        fig.add_trace(go.Scatter(x=[c["worst_speedup"] for c in table], y=[c["metric"] for c in table],
                                 mode="markers", name=r["dir"], text=[c["recipe"] for c in table],
                                 hovertemplate="%{text}<br>speedup %{x:.3g}x<br>metric %{y:.4g}<extra>"
                                               + html.escape(r["dir"]) + "</extra>"))
    if not fig.data:
        return ""
    fig.update_layout(title="every run's candidates: metric against speedup (slowest timed batch)",
                      xaxis_title="speedup against its baseline (x, higher is better)",
                      yaxis_title="metric (higher is better)", height=420, legend_title="run")
    fig.add_vline(x=1, line_dash="dot", line_color="#999")
    return "<h2>Candidates across runs</h2>" + themed(fig).to_html(full_html=False, include_plotlyjs=True)


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
