"""Chart builders: pure functions from runs to plotly figures."""
import pandas as pd

import workbench as wb
from workbench import charts


def runs():
    return pd.DataFrame([
        {"name": "baseline", "kind": "baseline", "recipe": None, "metric": 0.99, "latency_p50_ms_b1": 1.0,
         "size_bytes": 4e6, "metric_name": "accuracy"},
        {"name": "a", "kind": "optimize", "recipe": "quant=int8", "metric": 0.985, "latency_p50_ms_b1": 0.3,
         "size_bytes": 1e6, "metric_name": "accuracy"},
        {"name": "b", "kind": "optimize", "recipe": "prune=0.5:structured=true", "metric": 0.97,
         "latency_p50_ms_b1": 0.5, "size_bytes": 2e6, "metric_name": "accuracy"},
        {"name": "c", "kind": "optimize", "recipe": "prune=0.5,quant=int8", "metric": 0.95, "latency_p50_ms_b1": 0.2,
         "size_bytes": 0.5e6, "metric_name": "accuracy"},
    ])


def test_pareto_front_membership():
    df = runs()
    assert charts.pareto_front(df) == [0, 1, 3]  # b is beaten by a on both axes


def test_pareto_figure_traces_axes_and_hover():
    fig = charts.pareto(runs())
    names = [t.name for t in fig.data]
    assert names == ["quant", "prune", "mixed", "baseline", "Pareto front"]
    base = fig.data[names.index("baseline")]
    assert base.marker.symbol == "star" and list(base.y) == [0.99]
    front = fig.data[-1]
    assert list(front.x) == [0.2, 0.3, 1.0]  # sorted by latency
    assert fig.layout.xaxis.title.text.startswith("latency p50 (ms, batch 1")
    assert fig.layout.yaxis.title.text == "accuracy (higher is better)"
    assert "quant=int8" in fig.data[0].text[0] and "size %{customdata" in fig.data[0].hovertemplate


def test_technique_of():
    assert charts.technique_of("quant=int8") == "quant"
    assert charts.technique_of("prune=0.5:structured=true,finetune=1") == "mixed"
    assert charts.technique_of(None, "baseline") == "baseline"


def test_bars_heatmap_layer_map_and_histograms(digits_mlp):
    model, data = digits_mlp
    r = wb.optimize(model, "prune=0.8", data=data, batch_sizes=(1,), study=False)
    fig = charts.bars(r.table())
    assert len(fig.data) == 3 and [t.x[0] for t in fig.data] == ["baseline"] * 3
    sens = wb.sensitivity(model, data, levels=[0.5, 0.9])
    heat = charts.sensitivity_heatmap(sens)
    assert heat.data[0].z.shape == (3, 2) and heat.layout.xaxis.title.text == "level"
    lm = charts.layer_map(r)
    assert list(lm.data[0].x) == ["1", "3", "5"] and lm.data[0].y[0] > 0.5 and lm.data[0].y[2] == 0
    hist = charts.weight_histograms(model, r.model)
    assert [t.name for t in hist.data] == ["before", "after"] and hist.layout.title.text == "weights of 3"
    widget = charts.as_widget(heat)
    assert type(widget).__name__ == "FigureWidget"
