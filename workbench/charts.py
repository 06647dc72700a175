"""Charts: pure functions from a Study / DataFrame / Results (or one Result) to a plotly Figure.

    >>> fig = wb.charts.pareto(wb.Study.default())      # metric vs latency, the front and the baseline
    >>> fig = wb.charts.sensitivity_heatmap(wb.sensitivity(model, data))
    >>> live = wb.charts.as_widget(fig)                  # a FigureWidget that can gain points

Static figures go into reports; `as_widget` gives a `go.FigureWidget` for live updates in notebooks. Colours per
technique come from the technique registry, so a new technique gets its own.
"""
from __future__ import annotations

from typing import Any

from .measure.measurement import batches_in, column
from .tables import pareto_front  # noqa: F401  (charts.pareto_front, as before)

FIXED_COLOURS = {"baseline": "#7f7f7f", "compare": "#9a9a9a", "mixed": "#ff7f0e"}
# Charts sit on JupyterLab's light or dark theme, and on a report's white page: transparent backgrounds, and text,
# axes and grid in a mid grey that reads on either (plotly_white's black-on-white is a white box in the dark theme)
NEUTRAL = dict(paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)",
               font=dict(color="#8a8a8a"))
GRID = dict(gridcolor="rgba(138,138,138,0.25)", zerolinecolor="rgba(138,138,138,0.4)",
            linecolor="rgba(138,138,138,0.6)")


def themed(fig):
    """`fig` with the theme-neutral look every workbench chart has (see NEUTRAL)."""
    fig.update_layout(**NEUTRAL)
    fig.update_xaxes(**GRID)
    fig.update_yaxes(**GRID)
    return fig


def technique_colours() -> dict[str, str]:
    """Colour per technique short name (from the registry), plus the baseline, compare and mixed recipes."""
    from .registry import colours

    return {**colours(), **FIXED_COLOURS}


def _frame(source: Any):
    """A DataFrame of runs from a Study, a DataFrame, a list of Results or one Result."""
    import pandas as pd

    from .result import Result
    from .study import Study

    if isinstance(source, Study):
        return source.df.reset_index()
    if isinstance(source, pd.DataFrame):
        return source.reset_index() if "id" not in source.columns and source.index.name == "id" else source
    results = [source] if isinstance(source, Result) else list(source)
    rows = []
    for i, r in enumerate(results):
        if i == 0:
            rows.append({**r.baseline.to_row(), "name": "baseline", "kind": "baseline", "recipe": None})
        rows.append({**r.measurement.to_row(), "name": r.name, "kind": "optimize", "recipe": str(r.recipe)})
    return pd.DataFrame(rows)


def technique_of(recipe: str | None, kind: str | None = None) -> str:
    """'baseline', a single technique ('quant', 'prune', ...) or 'mixed', from a recipe's short form."""
    if kind == "baseline" or not recipe:
        return "baseline" if kind in (None, "baseline") else str(kind)
    kinds = {part.split("=")[0].split(":")[0] for part in str(recipe).split(",")}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _latency_column(df, batch: int | None) -> tuple[str, int]:
    batches = batches_in(df.columns)
    if not batches:
        raise ValueError("no latency column in these runs; measure them with wb.optimize or wb.compare first")
    if batch is not None and batch not in batches:
        raise ValueError(f"no runs timed at batch {batch}; timed batches: {', '.join(map(str, batches))}")
    batch = batch if batch is not None else batches[0]
    return column("p50", batch), batch


def pareto(source: Any, batch: int | None = None, title: str | None = None, model: str | None = None):
    """Metric vs latency p50, marker size = model size, colour = technique; the front drawn, the baseline marked.

    Hover shows each run's recipe. Works on a Study, its DataFrame, or Results; `model` keeps one model's runs
    (default: the model of the latest run).
    """
    import plotly.graph_objects as go

    df = _frame(source)
    if "model" in df.columns and df["model"].notna().any():
        model = model or df["model"].dropna().iloc[-1]
        df = df[df["model"] == model]
    latency, batch = _latency_column(df, batch)
    df = df.dropna(subset=["metric", latency]).copy()
    metric_name = str(df["metric_name"].dropna().iloc[0]) if "metric_name" in df and df["metric_name"].notna().any() \
        else "metric"
    df["technique"] = [technique_of(r, k) for r, k in zip(df.get("recipe", [None] * len(df)),
                                                            df.get("kind", [None] * len(df)))]
    size_mb = df["size_bytes"] / 1e6 if "size_bytes" in df else None
    colours = technique_colours()
    fig = go.Figure()
    for tech, part in df.groupby("technique", sort=False):
        if tech == "baseline":
            continue
        sizes = size_mb.loc[part.index] if size_mb is not None else None
        fig.add_trace(go.Scatter(
            x=part[latency], y=part["metric"], mode="markers", name=tech,
            marker=dict(color=colours.get(tech, "#17becf"), opacity=0.85,
                        size=None if sizes is None else 8 + 24 * (sizes / size_mb.max()).clip(0, 1) ** 0.5,
                        line=dict(width=1, color="white")),
            text=[str(r) for r in part.get("recipe", part.get("name"))],
            customdata=None if sizes is None else sizes.to_numpy(),
            hovertemplate="%{text}<br>" + metric_name + " %{y:.4f}<br>p50 %{x:.3f} ms"
                          + ("<br>size %{customdata:.3f} MB" if sizes is not None else "") + "<extra></extra>"))
    base = df[df["technique"] == "baseline"]
    if not base.empty:
        fig.add_trace(go.Scatter(x=base[latency], y=base["metric"], mode="markers", name="baseline",
                                 marker=dict(symbol="star", size=18, color=colours["baseline"]),
                                 hovertemplate="baseline<br>" + metric_name + " %{y:.4f}<br>p50 %{x:.3f} ms"
                                               "<extra></extra>"))
    front = df.loc[pareto_front(df, "metric", latency)].sort_values(latency)
    fig.add_trace(go.Scatter(x=front[latency], y=front["metric"], mode="lines", name="Pareto front",
                             line=dict(dash="dash", color="#888888", shape="hv"), hoverinfo="skip"))
    fig.update_layout(title=title or f"{metric_name} vs latency (batch {batch}); marker size = model size",
                      xaxis_title=f"latency p50 (ms, batch {batch}, lower is better)",
                      yaxis_title=f"{metric_name} (higher is better)",
                      legend_title="technique")
    return themed(fig)


def bars(table):
    """Size, latency and metric side by side for a comparison table (`Result.table()` or `wb.compare`)."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    latency = next(c for c in table.columns if c.startswith("p50 ms"))
    metric = table.columns[0]
    fig = make_subplots(rows=1, cols=3, subplot_titles=(f"{metric}", f"{latency}", "size (MB)"))
    names = [str(i) for i in table.index]
    for col, (field, fmt) in enumerate(((metric, ".4f"), (latency, ".3f"), ("size MB", ".3f")), start=1):
        fig.add_trace(go.Bar(x=names, y=table[field], name=field, texttemplate="%{y:" + fmt + "}",
                             marker_color=["#444444"] + ["#1f77b4"] * (len(names) - 1), showlegend=False),
                      row=1, col=col)
    fig.update_yaxes(title_text=metric, row=1, col=1)
    fig.update_yaxes(title_text="ms", row=1, col=2)
    fig.update_yaxes(title_text="MB", row=1, col=3)
    fig.update_layout(title="comparison (one run, same threads)")
    return themed(fig)


def sensitivity_heatmap(df, title: str | None = None):
    """Layers x levels, coloured by the metric change when only that layer is pruned/quantized."""
    import plotly.graph_objects as go

    grid = df.pivot_table(index="layer", columns="level", values="delta", sort=False)
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=[str(c) for c in grid.columns], y=list(grid.index),
                               colorscale="RdBu", zmid=0, colorbar=dict(title="Δ metric"),
                               hovertemplate="layer %{y}<br>level %{x}<br>Δ %{z:.4f}<extra></extra>"))
    fig.update_layout(title=title or "per-layer sensitivity (Δ metric when only that layer changes)",
                      xaxis_title="level", yaxis_title="layer",
                      yaxis=dict(autorange="reversed"))
    return themed(fig)


def layer_map(result_or_model):
    """Per-layer sparsity and precision of one model (bars: sparsity; colour: precision)."""
    import plotly.graph_objects as go

    from .measure.counts import layer_table

    layers = getattr(result_or_model, "layers", None)
    if layers is None or callable(layers):
        layers = layer_table(result_or_model)
    backend = getattr(result_or_model, "backend", "torch")
    precision = "int8" if "int8" in backend else "fp16" if "fp16" in backend else "bf16" if "bf16" in backend \
        else "fp32"
    fig = go.Figure(go.Bar(x=list(layers.index), y=layers["sparsity"], name=precision,
                           marker_color={"int8": "#1f77b4", "fp16": "#2ca02c", "bf16": "#9467bd"}.get(precision,
                                                                                                          "#444444"),
                           customdata=layers[["params", "nonzero"]].to_numpy(),
                           hovertemplate="%{x}<br>sparsity %{y:.1%}<br>%{customdata[1]:,} of %{customdata[0]:,} "
                                         "weights non-zero<extra></extra>"))
    fig.update_layout(title=f"per-layer sparsity; precision: {precision}", xaxis_title="layer",
                      yaxis_title="sparsity (share of zero weights)", yaxis_tickformat=".0%",
                      showlegend=True, legend_title="precision")
    return themed(fig)


def weight_histograms(before, after, layer: str | None = None, bins: int = 80):
    """Weight distributions of one layer (default: the largest) before and after optimization."""
    import plotly.graph_objects as go

    def weights(model):
        return {n: m.weight.detach().float().flatten().cpu().numpy() for n, m in model.named_modules()
                if isinstance(getattr(m, "weight", None), __import__("torch").Tensor) and m.weight.dim() > 1}

    w_before, w_after = weights(before), weights(after)
    if layer is None:
        common = [n for n in w_before if n in w_after]
        if not common:
            raise ValueError("the two models share no layer name; pass layer=")
        layer = max(common, key=lambda n: w_before[n].size)
    fig = go.Figure()
    for label, values in (("before", w_before[layer]), ("after", w_after[layer])):
        fig.add_trace(go.Histogram(x=values, nbinsx=bins, name=label, opacity=0.6))
    fig.update_layout(barmode="overlay", title=f"weights of {layer}", xaxis_title="weight value",
                      yaxis_title="count")
    return themed(fig)


def pareto_placeholder(title: str = "candidates will appear here"):
    """An empty chart with the Pareto chart's axes, for live views that fill in as runs finish."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(title=title, xaxis_title="latency p50 (ms)", yaxis_title="metric (higher is better)",
                      height=380)
    return themed(fig)


def as_widget(fig):
    """A live `go.FigureWidget` of `fig` (needs anywidget), for charts that gain points as runs finish."""
    import plotly.graph_objects as go

    return go.FigureWidget(fig)
