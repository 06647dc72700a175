"""One registry per axis: a technique registered from this file alone is known to the recipe parser and short form,
the magic's flags, the CLI, the panel, sweep grids and the charts' colours; backends behind one interface."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import workbench as wb
from workbench import registry
from workbench.recipe import Step, option

from .helpers import FAST


@dataclass
class Scale(Step):
    """Multiply the output head's weights by a factor (a toy technique: a different model, measurably)."""

    kind = "scale"
    short = "scale"
    main_field = "factor"

    factor: float = option(1.0, low=0, high=10, low_open=True, ui=(0.1, 2.0, 0.1), help="how much")
    bias: bool = option(False, choices=(True, False), flag="--scale-bias", help="scale the bias too")


def scale(model, step, ctx):
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.mul_(step.factor)
        if step.bias:
            head.bias.mul_(step.factor)
    ctx.note(f"scaled the head by {step.factor}")
    return model


@pytest.fixture
def toy():
    registry.technique(Scale)(scale)
    yield Scale
    registry.TECHNIQUES.pop("scale")


def test_a_toy_technique_from_a_recipe_string(toy, digits_mlp):
    model, data = digits_mlp
    r = wb.optimize(model, "scale=0.5:bias=true", data=data, **FAST)
    assert r.recipe.steps == [Scale(0.5, bias=True)] and r.notes == ["scaled the head by 0.5"]
    head = [m for m in r.model.modules() if isinstance(m, nn.Linear)][-1]
    assert torch.allclose(head.weight, model[5].weight * 0.5)
    assert wb.Recipe.from_yaml(r.recipe.to_yaml()) == r.recipe
    with pytest.raises(wb.WorkbenchError, match=r"Scale\.factor: 20 is out of range; allowed \(0, 10\]"):
        wb.Recipe.parse("scale=20")


def test_a_toy_technique_from_a_magic_flag_and_the_cli_parser(toy, digits_mlp):
    import argparse

    from IPython.core.interactiveshell import InteractiveShell

    from workbench.notebook.magics import optimize_parser
    from workbench.recipe import add_flags

    assert "--scale [FACTOR]" in optimize_parser().format_help() and "--scale-bias" in optimize_parser().format_help()
    cli = argparse.ArgumentParser()
    add_flags(cli)
    assert cli.parse_args(["--scale", "0.5", "--scale-bias"]).scale_bias is True
    shell = InteractiveShell.instance()
    try:
        shell.run_line_magic("load_ext", "workbench")
        shell.user_ns.update(net=digits_mlp[0], val=digits_mlp[1])
        shell.run_line_magic("optimize", "net --scale 0.5 --scale-bias --quant int8 --data val --no-card")
        result = shell.user_ns["net_opt"]
        assert str(result.recipe) == "scale=0.5:bias=true,quant=int8"
        assert "--scale" in type(shell.magics_manager.registry["WorkbenchMagics"]).optimize.__doc__
    finally:
        InteractiveShell.clear_instance()


def test_a_toy_technique_in_a_sweep_grid_the_panel_and_the_charts(toy, digits_mlp):
    from workbench import charts
    from workbench.search.sweep import grid_recipes

    model, data = digits_mlp
    recipes = grid_recipes({"scale": [0.5, 2.0], "scale_bias": True})
    assert [str(r) for r in recipes] == ["scale=0.5:bias=true", "scale=2.0:bias=true"]
    swept = wb.sweep(model, data, grid={"scale": [0.5, 2.0]}, batch_sizes=(1,), study=False)
    assert len(swept.results) == 2
    names = [t.name for t in swept.figure.data]
    assert "scale" in names and charts.technique_colours()["scale"].startswith("#")
    panel = wb.panel(model, data, study=wb.Study())
    panel.enabled["scale"].value, panel.main["scale"].value = True, 0.5
    panel.enabled["quant"].value = False
    assert str(panel.recipe()) == "scale=0.5" and "--scale 0.5" in panel.magic_line()


def test_backends_share_one_interface_and_register_in_order():
    from workbench.backends import Backend
    from workbench.target import Target

    names = registry.backend_names()
    assert names[:2] == ["onnxruntime", "torch"]  # auto prefers ONNX Runtime for int8, torch for half precision
    cpu = Target("cpu")
    for b in registry.backends():
        assert isinstance(b, Backend) and b.files
        for method in ("available", "precisions", "accepts", "lower", "run", "save", "load"):
            assert getattr(type(b), method) is not getattr(Backend, method) or method in ("run",)
    assert [b.name for b in registry.backends_for("int8-dynamic", cpu)] == ["onnxruntime", "torch"]
    assert [b.name for b in registry.backends_for("fp16", cpu)] == ["torch"]
    assert registry.backends_for("int8-static", Target("cpu", backend="torch")) == []
    assert registry.backend_of(nn.Linear(2, 2)).name == "torch"


def test_a_plugin_technique_registered_twice_under_a_taken_short_name_is_refused(toy):
    @dataclass
    class Other(Step):
        kind, short, main_field = "other", "scale", "x"
        x: int = option(1, low=0, high=2, integer=True)

    with pytest.raises(TypeError, match="short name 'scale' of Other is taken by 'scale'"):
        registry.technique(Other)(lambda m, s, c: m)
