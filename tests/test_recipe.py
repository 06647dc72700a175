import pytest

from workbench.errors import RecipeError
from workbench import Distill, Factorize, FineTune, Prune, Quantize, Recipe

FULL = Recipe([Prune(0.4, structured=True, ignore=("fc",)), Distill(epochs=3), Factorize(energy=0.9),
               FineTune(2), Quantize("int8-static", calibration="entropy")], name="all-four")


def test_dict_yaml_and_string_round_trip():
    assert Recipe.from_dict(FULL.to_dict()) == FULL
    assert Recipe.from_yaml(FULL.to_yaml()) == FULL
    assert Recipe.parse(FULL.to_string()).steps == FULL.steps
    assert FULL.to_string() == ("prune=0.4:structured=true:ignore=fc,distill=3,factorize:energy=0.9,"
                                "finetune=2,quant=int8-static:calibration=entropy")


def test_short_form_builds_the_same_dict_as_the_api():
    assert Recipe.parse("prune=0.5,quant=int8").to_dict() == Recipe([Prune(0.5), Quantize("int8")]).to_dict()
    assert Recipe.parse("q=int8-dynamic:per_channel=false").steps == [Quantize("int8", method="dynamic",
                                                                               per_channel=False)]


def test_int8_static_shorthand_normalises():
    q = Quantize("int8-static")
    assert (q.dtype, q.method) == ("int8", "static")
    with pytest.raises(RecipeError, match="conflicts"):
        Quantize("int8-static", method="dynamic")


def test_parse_accepts_yaml_text_and_files(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(FULL.to_yaml())
    assert Recipe.parse(str(path)) == FULL
    assert Recipe.parse("steps:\n- type: quantize\n  dtype: fp16\n").steps == [Quantize("fp16")]


@pytest.mark.parametrize("make, message", [
    (lambda: Quantize("int3"), r"Quantize\.dtype: 'int3' is not allowed; choose one of 'int8'"),
    (lambda: Quantize(calibration="max"), r"Quantize\.calibration: 'max' is not allowed"),
    (lambda: Prune(1.5), r"Prune\.sparsity: 1\.5 is out of range; allowed \[0, 1\)"),
    (lambda: Prune(-0.1), r"Prune\.sparsity: -0\.1 is out of range"),
    (lambda: Prune(1), r"Prune\.sparsity: 1 is out of range"),
    (lambda: Prune(0.5, per_layer="random"), r"Prune\.per_layer"),
    (lambda: Prune(0.5, scope="net"), r"Prune\.scope"),
    (lambda: Prune(0.5, schedule="weekly"), r"Prune\.schedule"),
    (lambda: Distill(temperature=0), r"Distill\.temperature: 0 is out of range"),
    (lambda: Distill(epochs=1.5), r"Distill\.epochs: expected an integer"),
    (lambda: Factorize(rank_ratio=1.2), r"Factorize\.rank_ratio: 1\.2 is out of range; allowed \(0, 1\]"),
    (lambda: Factorize(), r"exactly one of rank_ratio"),
    (lambda: Factorize(rank_ratio=0.5, energy=0.9), r"exactly one of rank_ratio"),
    (lambda: Recipe.parse("sparsify=0.5"), r"unknown step 'sparsify'"),
    (lambda: Recipe.parse("prune=0.5:colour=red"), r"Prune: unknown field\(s\) colour"),
    (lambda: Recipe.from_dict({"steps": [{"type": "bake"}]}), r"unknown step type 'bake'"),
    (lambda: Recipe.from_yaml("steps: [unclosed"), r"does not parse"),
    (lambda: Recipe.parse(""), r"empty recipe"),
    (lambda: Recipe.parse(42), r"cannot make a recipe from int"),
    (lambda: Recipe(["quant"]), r"is not a step"),
])
def test_bad_values_name_step_field_and_what_is_allowed(make, message):
    with pytest.raises(RecipeError, match=message):
        make()


def test_schedules_survive_the_short_form():
    r = Recipe([Prune(0.5, schedule="iterative:3")])
    assert str(r) == "prune=0.5:schedule=iterative-3"
    assert Recipe.parse(str(r)) == r and Recipe.parse(str(r)).steps[0].steps == 3
