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


SOURCES = ("Shape", "Size", "Constant")  # ops whose outputs are known without the inputs' values


def index_arithmetic(onnx_bytes: bytes) -> list[str]:
    """The nodes that compute integer indices in float from shapes and constants alone: upstream of a Cast to an
    integer type, and fed by nothing but shapes, constants and weights. T5's and MPNet's relative-position buckets
    take the log of a distance in float, then cast it to a table index; quantized, the log of distance 0 (-inf) made
    every scale NaN and the index the lowest int64 (ONNX Runtime then refused the Gather). Indices are not
    activations: static int8 leaves these nodes in float (and no node that reads the model's inputs)."""
    import onnx

    graph = onnx.load_from_string(onnx_bytes).graph
    integer = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
               onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}
    fixed = {i.name for i in graph.initializer}  # values known without the inputs: weights, constants, shapes
    for node in graph.node:  # in topological order
        if node.op_type in SOURCES or all(x in fixed for x in node.input if x):
            fixed.update(node.output)
    producer = {out: node for node in graph.node for out in node.output}
    found: dict = {}  # node names, in the order found
    seen: set = set()
    stack = [n.input[0] for n in graph.node if n.op_type == "Cast"
             and any(a.name == "to" and a.i in integer for a in n.attribute)]
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or name not in fixed or node.op_type in SOURCES or name in seen:
            continue
        seen.update(node.output)
        if node.name:  # (an unnamed node cannot be excluded by name)
            found[node.name] = None
        stack.extend(node.input)
    return list(found)


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
        nodes_to_exclude=nodes_in_layers(model.onnx_bytes, exclude) + index_arithmetic(model.onnx_bytes),
        extra_options={**UNTYPED_AS_FLOAT, **({"CalibMaxIntermediateOutputs": 64} if calibration != "minmax"
                                              else {})}))


def quantize_weight_only(model: OrtModel, bits: int = 4, group_size: int = 32, exclude: tuple = ()) -> OrtModel:
    """Weights in `bits` (4 or 8) with a scale per group of `group_size` input elements, activations in float:
    ONNX Runtime's `MatMulNBitsQuantizer` (MatMul -> MatMulNBits; embedding Gathers -> GatherBlockQuantized),
    symmetric, its CPU kernels computing in int8 (accuracy level 4). What decoders spend their time and memory on
    at small batches is reading weights, which this divides by 8 (int4) or 4 (int8)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    def run(src, dst):
        proto = _at_opset(gemms_as_matmuls(onnx.load(src)), QUANTIZER_OPSET)
        quantizer = MatMulNBitsQuantizer(
            proto, bits=bits, block_size=group_size, is_symmetric=True, accuracy_level=4,
            op_types_to_quantize=("MatMul", "Gather") if bits == 4 else ("MatMul",),  # embeddings: 4 bits only
            quant_axes=(("MatMul", 0), ("Gather", 1)), nodes_to_exclude=nodes_in_layers(model.onnx_bytes, exclude))
        quantizer.process()
        quantizer.model.save_model_to_file(dst, use_external_data_format=False)

    return _quantized(model, f"int{bits}-weight", run)


QUANTIZER_OPSET = 21  # MatMulNBitsQuantizer declares this opset on what it writes, without converting the nodes


def _at_opset(proto, version: int):
    """`proto` converted to `version` of the default ONNX domain (ReduceMean's axes, an attribute up to opset 17,
    become an input at 18: left as they were, LLaMA's RMSNorm and ConvNeXt's pooling made invalid graphs)."""
    from onnx import version_converter

    current = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), version)
    return proto if current >= version else version_converter.convert_version(proto, version)


def gemms_as_matmuls(proto):
    """`proto` with each Gemm whose weight is an initializer (GPT-2's Conv1D layers and torch's Linear layers on 2-D
    inputs export as Gemm) rewritten as MatMul + Add, which weight-only quantizers take: ONNX Runtime's
    MatMulNBitsQuantizer quantizes MatMul only, so on GPT-2 it left every layer but the head in fp32. The MatMul is
    named '<gemm>_MatMul', as ORT's int8 quantizers name theirs (`nodes_in_layers` finds both)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    weights = {i.name: i for i in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in weights:
            nodes.append(node)
            continue
        b = node.input[1]
        if attrs.get("transB", 0):
            transposed = numpy_helper.to_array(weights[b]).T.copy()
            b = f"{b}_transposed"
            graph.initializer.append(numpy_helper.from_array(transposed, b))
        product = f"{node.output[0]}_product" if len(node.input) > 2 and node.input[2] else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], b], [product], name=f"{node.name}_MatMul"))
        if product != node.output[0]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_Add"))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    return proto
