"""Figure builders (pure functions), sweeps, the panel and the layer map, without a browser."""
import pandas as pd
import pytest

import workbench as wb
from workbench import dashboards


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
    assert dashboards.pareto_front(df) == [0, 1, 3]  # b is beaten by a on both axes


def test_pareto_figure_traces_axes_and_hover():
    fig = dashboards.pareto(runs())
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
    assert dashboards.technique_of("quant=int8") == "quant"
    assert dashboards.technique_of("prune=0.5:structured=true,finetune=1") == "mixed"
    assert dashboards.technique_of(None, "baseline") == "baseline"


def test_sweep_of_six_recipes_shows_the_front_with_the_baseline(digits_cnn):
    model, data = digits_cnn
    study = wb.Study()
    seen = []
    fig = wb.sweep(model, data, grid={"prune": [None, 0.25, 0.5, 0.75], "structured": True, "quant": [None, "int8"]},
                   study=study, batch_sizes=(1,), on_result=seen.append)
    assert len(seen) == 7 and len(study) == 8  # one shared baseline row + 7 runs
    assert all(r.baseline_id == seen[0].baseline_id for r in seen)
    names = [t.name for t in fig.data]
    assert "baseline" in names and "Pareto front" in names
    points = sum(len(t.x) for t in fig.data if t.name not in ("baseline", "Pareto front"))
    assert points == 7
    front = fig.data[names.index("Pareto front")]
    assert len(front.x) >= 2


def test_bars_heatmap_layer_map_and_histograms(digits_mlp):
    model, data = digits_mlp
    r = wb.optimize(model, "prune=0.8", data=data, batch_sizes=(1,), study=False)
    fig = dashboards.bars(r.table())
    assert len(fig.data) == 3 and [t.x[0] for t in fig.data] == ["baseline"] * 3
    sens = wb.sensitivity(model, data, levels=[0.5, 0.9])
    heat = dashboards.sensitivity_heatmap(sens)
    assert heat.data[0].z.shape == (3, 2) and heat.layout.xaxis.title.text == "level"
    lm = dashboards.layer_map(r)
    assert list(lm.data[0].x) == ["1", "3", "5"] and lm.data[0].y[0] > 0.5 and lm.data[0].y[2] == 0
    hist = dashboards.weight_histograms(model, r.model)
    assert [t.name for t in hist.data] == ["before", "after"] and hist.layout.title.text == "weights of 3"
    widget = dashboards.as_widget(heat)
    assert type(widget).__name__ == "FigureWidget"


def test_panel_run_button_adds_a_study_row_and_a_chart_point(digits_mlp):
    model, data = digits_mlp
    study = wb.Study()
    p = wb.panel(model, data, study=study, name="net")
    assert p.magic_line() == "%optimize net --quant int8 --backend auto --device auto"
    p.run_button.click()  # the button's handler, as a click in the browser would call it
    p.wait()
    assert p.progress.description == "done" and p.points == 1 and len(study) == 2
    p.prune_on.value, p.structured.value = True, True
    p.layer_map.toggle("3")
    recipe = p.recipe()
    assert recipe.steps[0].ignore == ("3",) and recipe.steps[-1].exclude == ("3",)
    assert "exclusions are in the YAML only" in p.code.value and "ignore:" in p.code.value
    p.run(wait=True)
    assert p.points == 2 and len(study) == 3  # the baseline is measured once
    assert "<table" in p.table.value and p.layer_map.colour_by == "sparsity"


def test_panel_sweep_adds_a_point_per_recipe(digits_mlp):
    model, data = digits_mlp
    study = wb.Study()
    p = wb.panel(model, data, study=study)
    counts = []
    original = p._update
    p._update = lambda result: (original(result), counts.append(p.points))
    p.sweep({"quant": ["int8", "fp16"], "prune": [None, 0.5]}, wait=True)
    assert counts == [1, 2, 3, 4] and p.progress.description == "done"  # the chart grew as each point finished
    assert len(study) == 5


def test_panel_errors_show_in_its_output(digits_mlp):
    model, data = digits_mlp
    p = wb.panel(model, data, study=wb.Study())
    p.quant_on.value = False  # nothing to do
    p.run(wait=True)
    assert p.progress.description == "failed" and p.points == 0
    assert "nothing to do" in p.errors.outputs[0]["text"]
    assert not p.run_button.disabled


def test_layer_map_widget(digits_cnn):
    model, data = digits_cnn
    m = wb.LayerMap.from_model(model)
    assert [layer["name"] for layer in m.layers] == ["0", "4", "8", "13", "15"]
    m.toggle("13")
    m.toggle("0")
    m.toggle("13")
    assert m.ignored == ("0",)
    with pytest.raises(KeyError):
        m.toggle("nope")
    sens = m.from_sensitivity(wb.sensitivity(model, data, levels=[0.5], layers=["4", "8"]))
    assert sens.colour_by == "sensitivity" and [layer["name"] for layer in sens.layers] == ["4", "8"]
    esm = m._esm if isinstance(m._esm, str) else m._esm.read_text()
    assert "export default" in esm and "save_changes" in esm
