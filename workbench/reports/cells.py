"""What the templates' cells call, so the notebooks stay short and every report records the same things:
parameters, environment, the results table, the chart, a verdict per candidate and a headline for batch indexes.
"""
from __future__ import annotations

import html
from pathlib import Path

from ..errors import ReportError

_plotlyjs_sent = False  # plotly.js went inline with one of this kernel's charts already


def show(fig) -> None:
    """Display a plotly figure so that it renders in JupyterLab (plotly's mime type) and in the exported HTML
    (its text/html, plotly.js inline). Like plotly's `plotly_mimetype+notebook` renderer, except that plotly.js
    (4.8 MB) goes with the kernel's first chart only, not before every chart, and no CDN MathJax: built here
    because plotly's renderers import nbformat, and with it jsonschema's URI grammar (3 s of a report's 25 on a
    2-core AMD EPYC). Reports run top to bottom in a fresh kernel; in a live notebook whose first chart is re-run
    or cleared, export after Restart & Run All. No global renderer is changed."""
    import json

    import plotly.io as pio
    from IPython.display import display

    global _plotlyjs_sent
    html = pio.to_html(fig, include_plotlyjs=not _plotlyjs_sent, full_html=False, default_width="100%",
                       default_height=525, validate=False)
    display({"application/vnd.plotly.v1+json": json.loads(pio.to_json(fig, validate=False)), "text/html": html},
            raw=True)
    _plotlyjs_sent = True


def load_model(spec: str):
    """(model, data) from a built-in name or an import path 'package.module:factory' returning (model, data)."""
    from .. import zoo

    try:
        return zoo.resolve(spec)
    except ReportError:
        raise
    except Exception as e:
        raise ReportError(str(e)) from None


def show_parameters(**parameters) -> None:
    """The report's parameters as a table (escaped)."""
    from IPython.display import HTML, display

    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td><code>{html.escape(repr(v))}</code></td></tr>"
                   for k, v in parameters.items())
    display(HTML(f"<table>{rows}</table>"))


def environment_table(device: str = "auto", threads: int | None = None, seed: int = 0):
    """CPU, threads, GPU, library versions and the seed, as a one-column DataFrame."""
    import pandas as pd

    from ..target import resolve

    env = resolve(device=device, threads=threads).environment()
    env["seed"] = seed
    return pd.DataFrame({"value": {k: str(v) for k, v in env.items()}})


def run_recipes(model, data, recipes, device: str = "auto", batch_sizes=None, threads: int | None = None,
                name: str | None = None, seed: int = 0, **options) -> list:
    """Every recipe against one shared baseline (`wb.run_many`), seeded; the Results."""
    from ..engine import run_many
    from ..tensors import seeded

    with seeded(seed):
        return run_many(model, list(recipes), data, device=device, batch_sizes=batch_sizes or None,
                        threads=threads, name=name, **options)


def labels_only(model, data, student: str, epochs: int, distilled):
    """The distillation report's control: the same student trained on the labels alone, side by side."""
    from ..engine import compare
    from ..tables import display_table
    from ..techniques.distill import build_student
    from ..train import fit

    alone = build_student(student, model)
    alone, _ = fit(alone, data, epochs=epochs, lr=1e-3, label="labels only", start_from_scratch=True)
    return display_table(compare({"teacher": model, "student, distilled": distilled.model,
                                  "student, labels only": alone}, data=data, study=False))


def comparison(results, numeric: bool = False):
    """Baseline plus every candidate in one table (speedups against the shared baseline, with intervals)."""
    from ..tables import table

    if not results:
        raise ReportError("no results to compare; give at least one recipe")
    return table(results, numeric)


def generation(results):
    """A language model's candidates: perplexity and the share of prompts generating the same greedy tokens, then
    each one's generation table beside the original's (time to first token, tokens per second, their ratio)."""
    import pandas as pd
    from IPython.display import display

    from ..tables import generation_table

    rows, tables = [], []
    for r in results:
        m, b, g = r.measurement, r.baseline, r.measurement.generation
        rows.append({"recipe": str(r.recipe), "perplexity (original)": b.perplexity, "perplexity": m.perplexity,
                     "same greedy tokens": None if g is None or g.same_tokens is None else f"{g.same_tokens:.0%}",
                     "agreeing prefix": None if g is None or g.same_prefix is None else round(g.same_prefix, 1),
                     "generation": "not timed" if g is None else g.lines()[0] if not g.settings
                     else f"timed; some settings not: {g.skipped}" if g.skipped else "timed"})
        table = generation_table(b, m)
        if table is not None:
            tables.append(table.assign(recipe=str(r.recipe)).set_index("recipe", append=True))
    display(pd.DataFrame(rows).set_index("recipe"))
    if tables:
        display(pd.concat(tables))


def verdicts(results, max_drop: float = 0.01, numeric: bool = False):
    """Per candidate: within the metric budget? reliably faster at every timed batch? smaller? and the verdict."""
    import pandas as pd

    from ..measure.measurement import significant
    from ..verdict import judge

    rows = {}
    for r in results:
        v = judge(r.baseline, r.measurement, max_drop)
        rows[str(r.recipe)] = {f"{r.measurement.metric_name} drop": v.drop, "within budget": v.within_budget,
                               "speedup (slowest batch)": str(v.worst) if v.worst else None,
                               "worst low": v.worst.low if v.worst else None,
                               "stable": v.stable, "faster": v.faster,
                               "size ×": r.measurement.size_bytes / r.baseline.size_bytes, "smaller": v.smaller,
                               "verdict": v.text}
    df = pd.DataFrame.from_dict(rows, orient="index")
    if not numeric:
        df = df.drop(columns="worst low")
        df[df.columns[0]] = [significant(x, 2) for x in df[df.columns[0]]]
        df["size ×"] = [significant(x, 2) for x in df["size ×"]]
    return df


def headline(results, max_drop: float = 0.01) -> None:
    """Displays the numbers a batch index shows (as JSON, with the one-line verdict as its text): the best candidate
    (reliably faster, within budget), or none. Returns nothing, so no raw dict follows it in the report."""
    from IPython.display import display

    from ..verdict import best, judge

    chosen, text = best(results, max_drop)
    first = results[0]
    data = {"baseline_metric": first.baseline.metric, "metric_name": first.measurement.metric_name,
            "best": str(chosen.recipe) if chosen else None, "candidates": len(results), "text": text,
            "candidates_table": [{"recipe": str(r.recipe), "metric": r.measurement.metric,
                                  "worst_speedup": judge(r.baseline, r.measurement, max_drop).worst.ratio,
                                  "size_ratio": r.measurement.size_bytes / r.baseline.size_bytes,
                                  "verdict": judge(r.baseline, r.measurement, max_drop).text} for r in results]}
    if chosen is not None:
        worst = judge(chosen.baseline, chosen.measurement, max_drop).worst
        data.update({"best_metric": chosen.measurement.metric, "best_speedup": worst.ratio, "best_low": worst.low,
                     "best_high": worst.high, "best_batch": worst.batch,
                     "best_size_ratio": chosen.measurement.size_bytes / chosen.baseline.size_bytes})
    display({"application/json": data, "text/plain": text}, raw=True)  # the batch index reads the JSON


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
