"""Bad input: one clear message that says what to do, and nothing of the user's changed."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import workbench as wb
from workbench.backends.onnxruntime.session import OrtModel
from workbench.errors import DataError, DeviceError, ExportError, ModelError, RecipeError

from .helpers import FAST, state_bytes



def test_not_a_module(digits_mlp):
    _, data = digits_mlp
    with pytest.raises(ModelError, match=r"expected a torch.nn.Module, got function"):
        wb.optimize(lambda x: x, "quant=int8", data=data)


def test_forward_fails_on_the_data(digits_cnn):
    _, data = digits_cnn  # 32x32 images
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # expects 8x8
    before = state_bytes(model)
    with pytest.raises(ModelError, match=r"forward failed on the data's example inputs \(1, 1, 32, 32\)"):
        wb.optimize(model, "quant=int8", data=data, **FAST)
    assert state_bytes(model) == before


def test_empty_loader():
    empty = DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0).long()), batch_size=8)
    data = wb.Data(val=empty, example_inputs=torch.zeros(1, 4))
    with pytest.raises(DataError, match="validation loader is empty"):
        wb.optimize(nn.Linear(4, 2), "quant=int8", data=data, **FAST)


def test_metric_returning_nan():
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8).long()), batch_size=4)
    data = wb.Data(val=loader, metric=lambda outputs, targets: float("nan"))
    model = nn.Linear(4, 2)
    before = state_bytes(model)
    with pytest.raises(DataError, match="returned NaN"):
        wb.optimize(model, "quant=int8", data=data, **FAST)
    assert state_bytes(model) == before


@pytest.mark.parametrize("recipe, message", [
    ("quant=int3", r"Quantize\.dtype: 'int3' is not allowed"),
    ("prune=2", r"Prune\.sparsity: 2 is out of range"),
    ("shrink=0.5", r"unknown step 'shrink'"),
])
def test_bad_recipes_fail_before_any_work(digits_mlp, recipe, message):
    model, data = digits_mlp
    seen = []
    with pytest.raises(RecipeError, match=message):
        wb.optimize(model, recipe, data=data, progress=lambda m, f: seen.append(m), **FAST)
    assert seen == []


def test_a_step_without_a_technique(digits_mlp):
    from dataclasses import dataclass

    from workbench.recipe import Step

    @dataclass
    class Bake(Step):
        minutes: int = 5

    model, data = digits_mlp
    with pytest.raises(RecipeError, match=r"no technique is registered for step 'Bake' yet; available: Compile, Distill, Factorize, FineTune, Prune, Quantize, Unpad"):
        wb.optimize(model, wb.Recipe([Bake()]), data=data, **FAST)


def test_no_data():
    with pytest.raises(DataError, match=r"this needs data"):
        wb.optimize(nn.Linear(4, 2), "quant=int8")


@torch.library.custom_op("workbench_test::wiggle", mutates_args=())
def wiggle(x: torch.Tensor) -> torch.Tensor:
    return x * 1.5


class UsesCustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(wiggle(x.flatten(1)))


def test_onnx_export_of_an_unsupported_op_names_it(digits_mlp):
    _, data = digits_mlp
    model = UsesCustomOp()
    before = state_bytes(model)
    with pytest.raises(ExportError, match=r"operator 'workbench_test::wiggle' has no ONNX translation.*backend='torch'"):
        wb.optimize(model, "quant=int8", data=data, backend="onnxruntime", **FAST)
    assert state_bytes(model) == before
    r = wb.optimize(model, "quant=int8", data=data, backend="torch", **FAST)  # the way out it names works
    assert r.measurement.size_bytes < r.baseline.size_bytes
    auto = wb.optimize(model, "quant=int8", data=data, **FAST)  # backend auto takes that way out itself, and says so
    assert auto.backend.startswith("torch") and any("'workbench_test::wiggle'" in n for n in auto.notes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_without_a_gpu(digits_mlp):
    model, data = digits_mlp
    with pytest.raises(DeviceError, match=r"CUDA was asked for but this machine has no usable GPU"):
        wb.optimize(model, "quant=fp16", data=data, device="cuda", **FAST)


def test_unknown_backend_and_device(digits_mlp):
    model, data = digits_mlp
    with pytest.raises(DeviceError, match="backend 'tensorrt' is not known"):
        wb.optimize(model, "quant=int8", data=data, backend="tensorrt", **FAST)
    with pytest.raises(DeviceError, match="device 'tpu' is not known"):
        wb.optimize(model, "quant=int8", data=data, device="tpu", **FAST)


def test_conflicting_backend_for_a_mode(digits_cnn):
    model, data = digits_cnn
    with pytest.raises(RecipeError, match=r"int8-static does not run on backend 'torch' here; use "
                                          r"backend='onnxruntime' or 'auto'"):
        wb.optimize(model, "quant=int8-static", data=data, backend="torch", **FAST)
    with pytest.raises(RecipeError, match=r"fp16 does not run on backend 'onnxruntime' here; use backend='torch'"):
        wb.optimize(model, "quant=fp16", data=data, backend="onnxruntime", **FAST)


def test_static_int8_without_a_train_split(digits_cnn):
    model, data = digits_cnn
    val_only = wb.Data(val=data.val)
    with pytest.raises(RecipeError, match="no train split"):
        wb.optimize(model, "quant=int8-static", data=val_only, **FAST)
    r = wb.optimize(model, "quant=int8", data=val_only, **FAST)  # auto falls back and says so
    assert any("no train split" in n for n in r.notes)


def test_quantizing_twice_is_refused(digits_mlp):
    model, data = digits_mlp
    with pytest.raises(RecipeError, match=r"quant=int8: the model was already lowered to onnxruntime-int8-dynamic "
                                          r"by an earlier step; put quant before it"):
        wb.optimize(model, "quant=int8,quant=int8", data=data, **FAST)
    with pytest.raises(RecipeError, match=r"prune=0.5 comes after quant=int8, which lowers the model"):
        wb.optimize(model, "quant=int8,prune=0.5", data=data, **FAST)


def test_parity_check_catches_a_graph_that_disagrees(digits_mlp):
    model, data = digits_mlp
    ort_model = OrtModel.from_torch(model, data.example_inputs)
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ExportError, match="disagrees with the torch model"):
        ort_model.check_parity(other, data.example_inputs)


@pytest.mark.parametrize("text, message", [
    ("steps: 5", r"'steps' must be a list of steps, got int 5"),
    ("steps:\n  - 3", r"recipe step 1: expected a mapping with a 'type', got 3 \(YAML line 2\)"),
    ("- type: quantize\n  dtype: int9", r"Quantize.dtype: 'int9' is not allowed"),
    ("steps:\n  - type: prune\n    sparsity: {a: 1}", r"Prune.sparsity: expected a number, got \{'a': 1\}"),
])
def test_odd_yaml_is_one_recipe_error(text, message):
    with pytest.raises(RecipeError, match=message):
        wb.Recipe.from_yaml(text)


@pytest.mark.parametrize("batch_sizes", [[0], [-1], [1.5], ["64"]])
def test_bad_batch_sizes_are_refused_before_any_work(digits_mlp, batch_sizes):
    model, data = digits_mlp
    with pytest.raises(DataError, match=r"batch_sizes: .* is not a batch size; give positive whole numbers"):
        wb.optimize(model, "quant=int8", data=data, batch_sizes=batch_sizes, study=False)


def test_a_metric_returning_inf_and_a_one_shot_loader_are_refused():
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8).long()), batch_size=4)
    with pytest.raises(DataError, match="returned inf"):
        wb.optimize(nn.Linear(4, 2), "quant=int8", data=wb.Data(val=loader, metric=lambda o, t: float("inf")), **FAST)
    with pytest.raises(DataError, match=r"the val loader is a one-shot iterator \(a generator\?\)"):
        wb.Data(val=(b for b in loader))


def test_a_report_the_disk_refuses_is_one_line_and_leaves_nothing(tmp_path):
    from workbench.errors import ReportError

    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(ReportError, match=r"cannot write .*a-file"):
        wb.report("pipeline", {"model": "digits-mlp", "recipes": ["quant=int8"]},
                  output=tmp_path / "a-file" / "r.ipynb")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


class UsesRfft(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.fft.rfft(x.flatten(1), n=126).abs())


def test_a_lowering_that_breaks_the_model_names_the_step_not_the_data(digits_mlp):
    _, data = digits_mlp
    with pytest.raises(ModelError, match=r"quant=fp16 left a model whose forward fails"):
        wb.optimize(UsesRfft(), "quant=fp16", data=data, **FAST)


def test_first_line_is_what_the_workbench_shows_of_a_librarys_error():
    from workbench.errors import first_line

    assert first_line(ValueError("bad shape\n  at layer 3")) == "bad shape"
    assert first_line(ValueError("bad shape\nmore"), named=True) == "ValueError: bad shape"
    assert first_line(KeyError()) == "KeyError" and first_line(KeyError(), named=True) == "KeyError: "
    assert first_line(RuntimeError("x" * 500), limit=10) == "x" * 10
