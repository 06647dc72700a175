"""Quantization through optimize(): the 'done means' numbers and every mode."""
import onnx
import pytest
import torch

import workbench as wb
from workbench.backends.onnxruntime.session import OrtModel

from .helpers import FAST, int8_weight_bits, state_bytes



def _ops(result):
    return [n.op_type for n in onnx.load_from_string(result.model.onnx_bytes).graph.node]


def test_cnn_int8_keeps_accuracy_and_shrinks_to_under_0_3x(digits_cnn):
    model, data = digits_cnn
    before = state_bytes(model)
    r = wb.optimize(model, "quant=int8", data=data, **FAST)
    assert isinstance(r.model, OrtModel)
    assert r.backend == "onnxruntime-int8-static-qdq"  # auto picks static for a conv net
    assert r.measurement.metric >= r.baseline.metric - 0.01 or not int8_weight_bits()[1]
    assert r.measurement.size_bytes <= 0.3 * r.baseline.size_bytes
    assert any("convolutions carry" in n for n in r.notes)
    assert "QLinearConv" in _ops(r) or "QuantizeLinear" in _ops(r)
    assert state_bytes(model) == before  # byte for byte
    table = r.table()
    assert list(table.index) == ["baseline", "quant=int8"]
    assert table.loc["baseline", "speedup (b=1)"] == 1.0


@pytest.mark.slow
def test_static_qoperator_runs_integer_convolutions(digits_cnn):
    model, data = digits_cnn
    r = wb.optimize(model, wb.Quantize("int8-static", format="qoperator", calibration="entropy"), data=data, **FAST)
    assert "QLinearConv" in _ops(r)
    assert r.measurement.metric >= r.baseline.metric - 0.02


def test_dynamic_int8_on_a_conv_net_warns_it_will_not_pay(digits_cnn):
    model, data = digits_cnn
    r = wb.optimize(model, "quant=int8-dynamic", data=data, **FAST)
    assert "ConvInteger" in _ops(r)
    assert any("ConvInteger" in n for n in r.notes)


def test_mlp_dynamic_int8_on_onnxruntime(digits_mlp):
    model, data = digits_mlp
    r = wb.optimize(model, "quant=int8", data=data, **FAST)
    assert r.backend == "onnxruntime-int8-dynamic"
    assert "MatMulInteger" in _ops(r) or "DynamicQuantizeMatMul" in _ops(r)
    assert r.measurement.metric >= r.baseline.metric - 0.01
    assert r.measurement.size_bytes < 0.35 * r.baseline.size_bytes


def test_exclude_keeps_a_layer_in_fp32(digits_mlp):
    model, data = digits_mlp
    all_int8 = wb.optimize(model, wb.Quantize("int8-dynamic"), data=data, **FAST)
    last_fp32 = wb.optimize(model, wb.Quantize("int8-dynamic", exclude=("5",)), data=data, **FAST)
    assert _ops(all_int8).count("MatMulInteger") == 3
    assert _ops(last_fp32).count("MatMulInteger") == 2
    assert last_fp32.measurement.size_bytes > all_int8.measurement.size_bytes


def test_torch_backend_dynamic_int8(digits_mlp):
    model, data = digits_mlp
    r = wb.optimize(model, "quant=int8", data=data, backend="torch", **FAST)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    linears = [m for m in r.model.modules() if isinstance(m, (torch.nn.Linear, DynamicQuantizedLinear))]
    assert len(linears) == 3 and all(isinstance(m, DynamicQuantizedLinear) for m in linears)
    assert r.measurement.metric >= r.baseline.metric - 0.01
    assert r.measurement.size_bytes < 0.4 * r.baseline.size_bytes
    assert r.measurement.macs == r.baseline.macs  # counted on the float graph it came from


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_on_torch(digits_cnn, dtype, torch_dtype):
    model, data = digits_cnn
    r = wb.optimize(model, f"quant={dtype}", data=data, **FAST)
    assert r.backend == f"torch-{dtype}"
    assert {p.dtype for p in r.model.parameters()} == {torch_dtype}
    assert r.model(data.inputs(2)).dtype == torch.float32  # callers keep float32 in and out
    assert r.measurement.size_bytes == pytest.approx(0.5 * r.baseline.size_bytes, rel=0.05)
    assert r.measurement.metric >= r.baseline.metric - 0.01
    assert r.measurement.macs == r.baseline.macs


def test_auto_says_what_it_picked_and_why(digits_mlp):
    model, data = digits_mlp
    r = wb.optimize(model, "quant=auto", data=data, **FAST)
    assert r.notes[0] == "auto: int8 on CPU"
    assert any(n.startswith("dynamic int8: Linear/MatMul") for n in r.notes)


def test_minilm_int8_dynamic_per_channel_keeps_fidelity(minilm):
    model, data = minilm
    r = wb.optimize(model, "quant=int8-dynamic", data=data, **FAST)
    assert r.backend == "onnxruntime-int8-dynamic"
    assert r.measurement.metric >= 0.98
    assert r.measurement.size_bytes < 0.3 * r.baseline.size_bytes


def test_index_arithmetic_is_what_computes_an_index_in_float_from_shapes_alone():
    """Static int8 leaves in float the float steps that turn a shape into a table index (T5's and MPNet's
    relative-position buckets), and nothing that reads an input."""
    from onnx import TensorProto, helper, numpy_helper

    from workbench.backends.onnxruntime.quantize import index_arithmetic

    import numpy as np

    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Cast", ["shape"], ["shape_f"], name="to_float", to=TensorProto.FLOAT),
             helper.make_node("Log", ["shape_f"], ["log"], name="log"),
             helper.make_node("Mul", ["log", "scale"], ["scaled"], name="scale_it"),
             helper.make_node("Cast", ["scaled"], ["index"], name="to_index", to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "index"], ["row"], name="lookup"),
             helper.make_node("Mul", ["x", "scale"], ["xs"], name="reads_input"),
             helper.make_node("Cast", ["xs"], ["xi"], name="input_to_int", to=TensorProto.INT64)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("row", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("xi", TensorProto.INT64, None)],
        initializer=[numpy_helper.from_array(np.array(2.0, dtype=np.float32), "scale"),
                     numpy_helper.from_array(np.zeros((8, 4), dtype=np.float32), "table")])
    found = index_arithmetic(helper.make_model(graph).SerializeToString())
    assert sorted(found) == ["log", "scale_it", "to_float"]
