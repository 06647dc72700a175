"""Distillation and low-rank factorization, alone and composed with the other techniques."""
import warnings

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.errors import RecipeError
from workbench.techniques.distill import build_student
from workbench.techniques.factorize import choose_rank, factorize_conv, factorize_linear

from .helpers import FAST

def convs(model):
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.slow
def test_half_width_student_distilled_from_the_cnn(digits_cnn):
    model, data = digits_cnn
    r = wb.optimize(model, wb.Distill(epochs=6, student="width=0.5"), data=data, **FAST)
    assert convs(r.model) == [16, 32, 32]
    assert r.measurement.metric >= r.baseline.metric - 0.02
    assert r.measurement.macs < 0.3 * r.baseline.macs
    assert any("new student width=0.5" in n for n in r.notes)


@pytest.mark.slow
def test_prune_then_distill_recovers_with_the_original_as_teacher(digits_cnn):
    model, data = digits_cnn
    pruned = wb.optimize(model, wb.Prune(0.5, structured=True, scope="layer"), data=data, **FAST)
    r = wb.optimize(model, [wb.Prune(0.5, structured=True, scope="layer"), wb.Distill(epochs=2)], data=data, **FAST)
    assert convs(r.model) == [16, 32, 32]
    assert r.measurement.metric > pruned.measurement.metric + 0.1
    assert r.measurement.metric >= r.baseline.metric - 0.02
    assert any("from the original teacher" in n for n in r.notes)


@pytest.mark.slow
def test_feature_matching_learns_a_projection_when_widths_differ(digits_cnn):
    model, data = digits_cnn
    r = wb.optimize(model, wb.Distill(epochs=1, student="width=0.5", features=("4:4",), patience=None),
                    data=data, **FAST)
    assert convs(r.model) == [16, 32, 32]  # the projection trained alongside is not part of the student
    assert r.measurement.metric > 0.5


def test_depth_student_keeps_every_other_transformer_layer(minilm):
    model, data = minilm
    student = build_student("depth=0.5", model)
    assert len(student.encoder.encoder.layer) == 3 and len(model.encoder.encoder.layer) == 6
    assert student(**data.inputs(2)).shape == (2, 384)
    assert torch.equal(student.encoder.encoder.layer[1].output.dense.weight,
                       model.encoder.encoder.layer[2].output.dense.weight)


def test_teacher_with_other_outputs_is_refused_with_a_way_out(digits_cnn):
    model, data = digits_cnn
    other = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 12))
    with pytest.raises(RecipeError, match=r"teacher's outputs have shape \(1, 12\).*\(1, 10\).*projection"):
        wb.optimize(model, wb.Distill(teacher=other), data=data, **FAST)


def test_teacher_module_is_named_in_the_recipe_dict(digits_cnn):
    step = wb.Distill(teacher=digits_cnn[0])
    assert step.to_dict()["teacher"] == "<Sequential module>"
    with pytest.raises(RecipeError, match="student: 'width=big' is not a spec"):
        wb.Distill(student="width=big")


def test_svd_and_tucker_at_full_rank_reproduce_the_layer():
    torch.manual_seed(0)
    lin = nn.Linear(20, 12)
    x = torch.randn(4, 20)
    assert torch.allclose(factorize_linear(lin, 12)(x), lin(x), atol=1e-5)
    conv = nn.Conv2d(6, 8, 3, padding=1, stride=2)
    img = torch.randn(2, 6, 9, 9)
    assert torch.allclose(factorize_conv(conv, 8, 6)(img), conv(img), atol=1e-5)


def test_rank_choice():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert choose_rank(s, None, 0.7) == 1 and choose_rank(s, None, 0.9) == 2 and choose_rank(s, None, 1.0) == 4
    assert choose_rank(s, 0.5, None) == 2 and choose_rank(s, 0.01, None) == 1


def test_factorize_mlp_lists_ranks_and_macs(digits_mlp):
    model, data = digits_mlp
    r = wb.optimize(model, "factorize=0.25,finetune=1", data=data, **FAST)
    table = r.details["factorize"]
    assert list(table["layer"]) == ["1", "3"] and table["replaced"].all()  # the output head is left alone
    assert (table["macs_after"] < table["macs_before"]).all()
    assert r.measurement.macs < 0.5 * r.baseline.macs and r.measurement.params < r.baseline.params
    assert r.measurement.metric >= r.baseline.metric - 0.03


def test_factorize_conv_net_replaces_only_where_macs_fall(digits_cnn):
    model, data = digits_cnn
    r = wb.optimize(model, wb.Factorize(energy=0.9), data=data, **FAST)
    table = r.details["factorize"].set_index("layer")
    assert not table.loc["0", "replaced"]  # 1 input channel: nothing to gain
    assert table.loc["4", "replaced"] and table.loc["4", "macs_after"] < table.loc["4", "macs_before"]
    assert r.measurement.macs == table["macs_after"].sum() + (r.baseline.macs - table["macs_before"].sum())


def test_no_factorizable_layer_warns_and_returns_the_model_unchanged(digits_mlp):
    _, data = digits_mlp
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # only the output head
    with pytest.warns(UserWarning, match="no layer of this model gets fewer MACs"):
        r = wb.optimize(model, wb.Factorize(rank_ratio=0.5), data=data, **FAST)
    assert torch.equal(r.model[1].weight, model[1].weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning):
            wb.optimize(model, wb.Factorize(rank_ratio=1.0, layers="all"), data=data, **FAST)


@pytest.mark.slow
def test_all_four_techniques_in_one_recipe(digits_cnn):
    model, data = digits_cnn
    recipe = wb.Recipe([wb.Prune(0.4, structured=True, scope="layer"), wb.Distill(epochs=2),
                        wb.Factorize(energy=0.9), wb.Quantize("int8")])
    r = wb.optimize(model, recipe, data=data, **FAST)
    assert isinstance(r.model, wb.OrtModel) and r.backend.startswith("onnxruntime-int8")
    assert r.measurement.macs < 0.5 * r.baseline.macs and r.measurement.size_bytes < 0.15 * r.baseline.size_bytes
    assert r.measurement.metric >= r.baseline.metric - 0.05
    assert list(r.table().index) == ["baseline", str(recipe)]
