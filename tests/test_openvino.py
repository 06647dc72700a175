"""OpenVINO as a backend: fp32 and NNCF int8 run, save as IR, reload with the same inputs and outputs, and skip
padding after unpad; without openvino installed, a saved model says what to install."""
import pytest
import torch

import workbench as wb
from workbench.errors import RecipeError
from workbench.registry import backend_named
from workbench.target import resolve

pytest.importorskip("openvino")


@pytest.mark.slow  # NNCF calibration; the fast subset keeps the BERT and missing-extra checks
def test_openvino_fp32_and_int8_run_save_and_reload(digits_cnn, tmp_path):
    pytest.importorskip("nncf")
    model, data = digits_cnn
    fp32 = wb.optimize(model, [], data=data, backend="openvino", study=False, batch_sizes=(1,))
    assert fp32.backend == "openvino-fp32" and fp32.measurement.metric == pytest.approx(data.evaluate(model))
    int8 = wb.optimize(model, "quant=int8-static", data=data, backend="openvino", study=False, batch_sizes=(1,))
    assert int8.backend == "openvino-int8-static" and any("NNCF" in n for n in int8.notes)
    assert int8.measurement.metric > data.evaluate(model) - 0.02
    assert int8.measurement.size_bytes < fp32.measurement.size_bytes / 2  # int8 weights
    path = int8.save(tmp_path / "int8")
    assert {"model.xml", "model.bin"} <= {p.name for p in path.iterdir()}
    back = wb.load(path)
    x = data.example_inputs
    torch.testing.assert_close(back(x), int8.model(x))
    assert data.evaluate(back) == pytest.approx(int8.measurement.metric)
    assert any("openvino" in line for line in int8.deploy)


@pytest.mark.slow  # NNCF calibration
def test_int8_on_openvino_means_its_static_int8_for_a_linear_model_too(digits_mlp):
    """quant=int8 picks dynamic int8 for a model of Linear layers, which OpenVINO does not run: with
    backend='openvino' it said "int8-dynamic does not run on backend 'openvino'". It is OpenVINO's static int8
    now, or, without train batches to calibrate on, one line that says so."""
    pytest.importorskip("nncf")
    model, data = digits_mlp
    r = wb.optimize(model, "quant=int8", data=data, backend="openvino", study=False, batch_sizes=(1,))
    assert r.backend == "openvino-int8-static" and r.measurement.metric > data.evaluate(model) - 0.02
    assert any("OpenVINO runs int8 with static ranges only" in n for n in r.notes)
    with pytest.raises(RecipeError, match="no train split; give wb.Data"):
        wb.optimize(model, "quant=int8", data=wb.Data(val=data.val), backend="openvino",
                    study=False, batch_sizes=(1,))


@pytest.mark.slow
def test_openvino_runs_a_bert_with_its_dict_inputs_and_after_unpad():
    pytest.importorskip("transformers")
    from tests.test_unpad import encoder_and_data, padded

    model, data = encoder_and_data()
    for recipe in ([], "unpad"):
        result = wb.optimize(model, recipe, data=data, backend="openvino", study=False, batch_sizes=(1,))
        assert result.backend == "openvino-fp32" and result.measurement.metric > 0.9999, recipe
        other = padded([9, 2, 5], seed=7)  # another batch size and length than the export's
        torch.testing.assert_close(result.model(**other), model(**other), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("route", [pytest.param("pytorch frontend", marks=pytest.mark.slow), "onnx"])
def test_both_conversion_routes_give_a_model_that_runs_at_other_shapes(route, monkeypatch):
    """OpenVINO's PyTorch frontend first; the workbench's ONNX graph where the frontend fails (forced here)."""
    pytest.importorskip("transformers")
    from tests.test_unpad import encoder_and_data, padded
    from workbench.backends.openvino import OvModel

    used = []
    for name in ("from_torch", "from_onnx"):
        real = getattr(OvModel, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            used.append(_name)
            if route == "onnx" and _name == "from_torch":
                raise RuntimeError("frontend cannot take this model")
            return _real(*args, **kwargs)

        monkeypatch.setattr(OvModel, name, staticmethod(spy))
    model, data = encoder_and_data()
    result = wb.optimize(model, [], data=data, backend="openvino", study=False, batch_sizes=(1,))
    assert used == (["from_torch"] if route != "onnx" else ["from_torch", "from_onnx"])
    other = padded([9, 2, 5], seed=7)
    torch.testing.assert_close(result.model(**other), model(**other), atol=1e-4, rtol=1e-3)


def test_auto_prefers_the_other_backends_and_openvino_is_searched_for_float_models():
    target = resolve(device="cpu")
    from workbench.registry import backends_for

    assert backends_for("int8-static", target)[-1].name == "openvino"  # last: by name or by autotune
    assert "fp32" in backend_named("openvino").precisions(target)


def test_a_saved_openvino_model_without_openvino_says_what_to_install(digits_mlp, tmp_path, monkeypatch):
    model, data = digits_mlp
    path = wb.optimize(model, [], data=data, backend="openvino", study=False, batch_sizes=(1,)).save(tmp_path / "m")
    import workbench.backends.openvino as ov_backend

    monkeypatch.setattr(ov_backend, "_ov", lambda: None)
    with pytest.raises(wb.WorkbenchError, match=r"pip install 'workbench\[openvino\]'"):
        wb.load(path)


@pytest.mark.slow
def test_default_int8_of_a_bert_goes_to_openvino_and_falls_back_with_the_reason(monkeypatch):
    """quant=int8 on a BERT encoder with a train split: OpenVINO + NNCF where installed (measured to lead on
    minilm); where it cannot take the model, ONNX Runtime's dynamic int8 with the reason; unpad and named
    backends keep their paths."""
    pytest.importorskip("nncf")
    pytest.importorskip("transformers")
    from tests.test_unpad import encoder_and_data
    from workbench.backends.openvino import OpenVinoBackend

    model, data = encoder_and_data()
    result = wb.optimize(model, "quant=int8", data=data, study=False, batch_sizes=(1,))
    assert result.backend == "openvino-int8-static" and result.measurement.metric > 0.99
    assert any("OpenVINO + NNCF" in n and "ONNX Runtime" in n for n in result.notes)
    for recipe, backend in (("unpad,quant=int8", "auto"), ("quant=int8", "onnxruntime"),
                            ("quant=int8-dynamic", "auto")):
        r = wb.optimize(model, recipe, data=data, study=False, batch_sizes=(1,), backend=backend)
        assert r.backend == "onnxruntime-int8-dynamic", (recipe, backend)

    def broken(*args, **kwargs):
        raise RuntimeError("conversion failed: unsupported operation")

    monkeypatch.setattr(OpenVinoBackend, "lower", broken)
    r = wb.optimize(model, "quant=int8", data=data, study=False, batch_sizes=(1,))
    assert r.backend == "onnxruntime-int8-dynamic"
    assert any("could not take this model (conversion failed" in n for n in r.notes), r.notes


def test_preflight_names_openvino_for_a_bert_where_it_is_missing(monkeypatch):
    pytest.importorskip("transformers")
    from tests.test_unpad import encoder_and_data
    from workbench.backends.openvino import OpenVinoBackend

    model, data = encoder_and_data()
    assert not any("workbench[openvino]" in line for line in wb.preflight(model, "quant=int8", data, device="cpu"))
    monkeypatch.setattr(OpenVinoBackend, "available", lambda self, target: False)
    assert any("workbench[openvino]" in line for line in wb.preflight(model, "quant=int8", data, device="cpu"))
    assert not any("workbench[openvino]" in line for line in wb.preflight(model, "quant=int8-dynamic", data,
                                                                          device="cpu"))


@pytest.mark.parametrize("route", ["pytorch frontend", "onnx"])
def test_a_graph_that_computes_otherwise_at_a_shorter_length_is_refused_on_both_routes(route, monkeypatch):
    """A model that branches on its length, traced at 12 steps: the graph keeps the long branch, which the check
    three steps longer cannot tell apart; the ONNX route was checked only for running at other shapes."""
    from tests.test_contract import _Branches
    from workbench.backends.openvino import OvModel
    from workbench.errors import WorkbenchError

    if route == "onnx":
        def refuse(*args, **kwargs):
            raise RuntimeError("frontend cannot take this model")

        monkeypatch.setattr(OvModel, "from_torch", staticmethod(refuse))
    torch.manual_seed(0)
    data = wb.Data(val=[(torch.randint(0, 20, (4, 12)), None)], metric="fidelity")
    with pytest.raises(WorkbenchError, match="disagrees with the torch model"):
        wb.optimize(_Branches().eval(), [], data=data, backend="openvino", study=False, batch_sizes=(1,))
