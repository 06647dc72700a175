"""The control panel and the per-layer map, through ipywidgets without a browser (the browser test is apart)."""
import pytest

import workbench as wb


def test_panel_run_button_adds_a_study_row_and_a_chart_point(digits_mlp):
    model, data = digits_mlp
    study = wb.Study()
    p = wb.panel(model, data, study=study, name="net")
    assert p.magic_line() == "%optimize net --quant int8 --backend auto --device auto"
    p.run_button.click()  # the button's handler, as a click in the browser would call it
    p.wait()
    assert p.progress.description == "done" and p.points == 1 and len(study) == 2
    p.enabled["prune"].value, p.options["structured"].value = True, True
    p.layer_map.toggle("3")
    recipe = p.recipe()
    assert recipe.steps[0].ignore == ("3",) and recipe.steps[-1].exclude == ("3",)
    assert "exclusions are in the YAML only" in p.code.value and "ignore:" in p.code.value
    p.run(wait=True)
    assert p.points == 2 and len(study) == 3  # the baseline is measured once
    assert "<table" in p.table.value and p.layer_map.colour_by == "share kept"  # structured: channels kept


@pytest.mark.slow
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
    p.enabled["quant"].value = False  # nothing to do
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


def test_a_panel_built_again_restores_its_runs_chart_table_and_choices(digits_mlp):
    """What a reopened notebook sees when it runs the panel's cell again: the Study's runs of this model."""
    model, data = digits_mlp
    study = wb.Study()
    first = wb.panel(model, data, study=study, name="net")
    assert first.restored == 0 and first.points == 0
    first.enabled["prune"].value, first.main["prune"].value = True, 0.25
    first.options["structured"].value = True
    first.run(wait=True)
    first.main["quant"].value = "fp16"
    first.run(wait=True)
    again = wb.panel(model, data, study=study, name="net")
    assert again.restored == 2 and again.points == 2 and again.progress.description == "restored 2 runs"
    assert "runs will appear" not in str(again.chart.layout.title.text)  # the placeholder goes with data
    assert "quant=fp16" in again.table.value and "baseline" in again.table.value
    assert again.main["quant"].value == "fp16" and again.enabled["prune"].value and again.options["structured"].value
    other = wb.panel(wb.zoo.load("digits-cnn")[0], data, study=study, name="net")  # same name, another model
    assert other.restored == 0


def test_the_layer_map_shows_what_structured_pruning_kept(digits_mlp):
    model, data = digits_mlp
    m = wb.LayerMap.from_model(model)
    r = wb.optimize(model, "prune=0.5:structured=true:scope=layer", data=data, batch_sizes=(1,), study=False)
    m.show_result(r)
    kept = {layer["name"]: layer for layer in m.layers}
    assert m.colour_by == "share kept"
    assert kept["1"]["label"] == "128/256 out" and 0.2 < kept["1"]["value"] < 0.6
    assert "shape (256, 64) -> (128, 64)" == kept["1"]["detail"]
    m.show_result(wb.optimize(model, "prune=0.5", data=data, batch_sizes=(1,), study=False))  # unstructured
    assert m.colour_by == "sparsity" and all("label" not in layer for layer in m.layers)


def test_charts_read_on_light_and_dark_themes(digits_mlp):
    from workbench import charts

    model, data = digits_mlp
    fig = charts.pareto(wb.optimize(model, "quant=int8", data=data, batch_sizes=(1,), study=False))
    for f in (fig, charts.pareto_placeholder()):
        assert f.layout.paper_bgcolor == "rgba(0,0,0,0)" and f.layout.plot_bgcolor == "rgba(0,0,0,0)"
        assert f.layout.font.color == "#8a8a8a"
