"""Result of `optimize`: the optimized model, its measurements next to the baseline's, and how it was made."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .recipe import Recipe


def summary_table(rows: dict[str, dict], baseline: str | None = None):
    """A comparison DataFrame, one row per model: metric, latency p50/p95 per batch size, speedup, size, params, MACs.

    Ratios (speedup, size x) are against `baseline` (default: the first row).
    """
    import pandas as pd

    if not rows:
        return pd.DataFrame()
    names = list(rows)
    base = rows[baseline or names[0]]
    batches = [int(b) for b in str(base.get("batch_sizes", "1")).split(",") if b]
    metric_name = base.get("metric_name", "metric")
    table = {}
    for name in names:
        r = rows[name]
        out: dict[str, Any] = {metric_name: r["metric"], f"Δ {metric_name}": r["metric"] - base["metric"]}
        for b in batches:
            p50 = r.get(f"latency_p50_ms_b{b}")
            out[f"p50 ms (b={b})"] = p50
            out[f"p95 ms (b={b})"] = r.get(f"latency_p95_ms_b{b}")
            out[f"speedup (b={b})"] = base[f"latency_p50_ms_b{b}"] / p50 if p50 else None
        out["size MB"] = r["size_bytes"] / 1e6
        out["size ×"] = r["size_bytes"] / base["size_bytes"]
        sparse = r.get("sparse_size_bytes")
        if sparse and sparse < 0.9 * r["size_bytes"]:  # only where zeros make compression pay
            out["sparse MB"] = sparse / 1e6
            out["sparse size ×"] = sparse / base["size_bytes"]
        out["params"] = r.get("params")
        out["nonzero"] = r.get("nonzero_params")
        out["MACs"] = r.get("macs")
        out["backend"] = r.get("backend")
        table[name] = out
    df = pd.DataFrame.from_dict(table, orient="index")
    df.index.name = "model"
    return df


@dataclass
class Result:
    """What `wb.optimize` returns.

    model: the optimized model (a torch module, or an `OrtModel` callable like one).
    metrics / baseline: measurement rows (see `workbench.measure.measure`).
    notes: what the engine decided and why, and honest warnings (e.g. "no speedup expected here").
    """

    model: Any
    recipe: Recipe
    metrics: dict
    baseline: dict
    notes: list = field(default_factory=list)
    backend: str = "torch"
    device: str = "cpu"
    run_id: int | None = None
    baseline_id: int | None = None
    env: dict = field(default_factory=dict)
    example_inputs: Any = field(default=None, repr=False)
    layers: Any = field(default=None, repr=False)  # per-layer shapes and sparsity of the (last float) torch model
    details: dict = field(default_factory=dict, repr=False)  # per-technique tables, e.g. details["factorize"]
    preflight: list = field(default_factory=list)  # "will this be faster here?", checked before any work

    @property
    def name(self) -> str:
        return str(self.recipe)

    def table(self):
        """Baseline and optimized model side by side, as a pandas DataFrame."""
        return summary_table({"baseline": self.baseline, self.name: self.metrics}, "baseline")

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        m, b = self.metrics, self.baseline
        return (f"Result({self.name!r}: {m['metric_name']} {b['metric']:.4f} -> {m['metric']:.4f}, "
                f"size {b['size_bytes'] / 1e6:.2f} -> {m['size_bytes'] / 1e6:.2f} MB, backend={self.backend!r})")

    def _repr_html_(self) -> str:
        return Card(self)._repr_html_()

    # -- persistence -----------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write the model, recipe.yaml and result.json into directory `path` (see `workbench.storage` for the
        formats and what is safe to load)."""
        from .storage import save_model

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model_file = save_model(self.model, self.example_inputs, path)
        (path / "recipe.yaml").write_text(self.recipe.to_yaml())
        (path / "result.json").write_text(json.dumps(
            {"model_file": model_file.name, "metrics": self.metrics, "baseline": self.baseline, "notes": self.notes,
             "backend": self.backend, "device": self.device, "env": self.env}, indent=2, default=str))
        return path


class Card:
    """The result card a notebook shows: the comparison table and the engine's notes (text or HTML)."""

    def __init__(self, result: Result, name: str | None = None):
        self.result, self.name = result, name

    def _title(self) -> str:
        r = self.result
        where = f" -> {self.name}" if self.name else ""
        return f"{r.name} on {r.device} ({r.backend}){where}"

    def __repr__(self) -> str:
        table = self.result.table().to_string(float_format=lambda v: f"{v:.4g}")
        checks = "".join(f"\n! pre-flight: {n}" for n in self.result.preflight)
        notes = "".join(f"\n- {n}" for n in self.result.notes)
        return f"{self._title()}\n{table}{checks}{notes}"

    def _repr_html_(self) -> str:
        import html

        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.result.notes)
        checks = "".join(f"<li>{html.escape(n)}</li>" for n in self.result.preflight)
        checks = f"<p><b>pre-flight</b> (will this be faster here?)</p><ul>{checks}</ul>" if checks else ""
        table = self.result.table().to_html(float_format=lambda v: f"{v:.4g}")
        return (f"<div><b>{html.escape(self._title())}</b>{table}{checks}"
                f"{f'<ul>{notes}</ul>' if notes else ''}</div>")
