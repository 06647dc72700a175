"""int8 with ONNX Runtime's own quantizers: dynamic (weights int8, activations per batch) and static (activation
ranges calibrated on train batches), on a pre-processed copy of the graph."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ...scoped import quiet
from .session import OrtModel

UNTYPED_AS_FLOAT = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT, for outputs of fused ops shape inference misses


def nodes_in_layers(onnx_bytes: bytes, layers: tuple) -> list[str]:
    """ONNX node names that belong to the given torch module paths (e.g. 'encoder.layer.0')."""
    if not layers:
        return []
    import onnx

    nodes = [n.name for n in onnx.load_from_string(onnx_bytes).graph.node]
    wanted = [f".{layer}." for layer in layers]
    matched = [n for n in nodes if any(w in n.replace("/", ".") + "." for w in wanted)]
    return matched + [f"{n}_MatMul" for n in matched]  # ORT's quantizers rewrite Gemm as '<name>_MatMul' + Add


def layers_without_nodes(onnx_bytes: bytes, layers: tuple) -> list[str]:
    """The layers among `layers` that no node of the graph is named after (a fusion merged them away)."""
    return [layer for layer in layers if not nodes_in_layers(onnx_bytes, (layer,))]


def _quantized(model: OrtModel, label: str, quantize) -> OrtModel:
    """Run one of ORT's quantizers (`quantize(src_path, dst_path)`) on a pre-processed copy of the graph."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, quiet():
        src, pre, dst = (os.path.join(tmp, f) for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        Path(src).write_bytes(model.onnx_bytes)
        try:  # symbolic shape inference + graph clean-up, as ORT recommends before quantization
            # auto_merge: without it, shape inference fails on BERT graphs and leaves files in the cwd
            quant_pre_process(src, pre, auto_merge=True)
        except Exception:
            pre = src
        quantize(pre, dst)
        return model.replace(Path(dst).read_bytes(), label)


def quantize_dynamic(model: OrtModel, per_channel: bool = True, reduce_range: bool = False,
                     exclude: tuple = ()) -> OrtModel:
    """int8 weights, activations quantized on the fly (ORT `quantize_dynamic`)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    return _quantized(model, "int8-dynamic", lambda src, dst: ort_quantize_dynamic(
        src, dst, per_channel=per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8,
        nodes_to_exclude=nodes_in_layers(model.onnx_bytes, exclude), extra_options=UNTYPED_AS_FLOAT))


class _Calibration:
    """Feeds ORT's calibrator batches of the train split, as numpy."""

    def __init__(self, model: OrtModel, batches):
        self.model, self.batches = model, iter(batches)

    def get_next(self):
        for inputs, _ in self.batches:
            import torch

            return self.model.feed(**inputs) if isinstance(inputs, dict) else \
                self.model.feed(inputs) if isinstance(inputs, torch.Tensor) else self.model.feed(*inputs)
        return None

    def rewind(self):  # ORT's calibrators may call this
        pass


def quantize_static(model: OrtModel, batches, per_channel: bool = True, reduce_range: bool = False,
                    calibration: str = "minmax", fmt: str = "qdq", exclude: tuple = ()) -> OrtModel:
    """int8 weights and activations, activation ranges calibrated on `batches` (ORT `quantize_static`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibration]
    return _quantized(model, f"int8-static-{fmt}", lambda src, dst: ort_quantize_static(
        src, dst, _Calibration(model, batches), quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
        per_channel=per_channel, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, calibrate_method=method,
        nodes_to_exclude=nodes_in_layers(model.onnx_bytes, exclude),
        extra_options={**UNTYPED_AS_FLOAT, **({"CalibMaxIntermediateOutputs": 64} if calibration != "minmax"
                                              else {})}))
