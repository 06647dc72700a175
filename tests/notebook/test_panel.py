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
