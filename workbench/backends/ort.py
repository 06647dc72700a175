"""ONNX Runtime backend: export a torch module (verified for parity), quantize with ORT's own tools, run it.

    >>> ort_model = OrtModel.from_torch(model, example_inputs)   # callable like the torch model
    >>> ort_model.save("model.onnx"); OrtModel.load("model.onnx")
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ..data import batch_size_of, map_tensors
from ..errors import DeviceError, ExportError
from ..registry import backend

OPSET = 17
# ONNX Runtime 1.32's CPU SkipLayerNormalization kernel measured slower than the Add + LayerNormalization it
# replaces (minilm int8, 2 threads, batch 32: fused-attention graph 171 ms without it vs 190 ms with it; unpad
# graph 108 vs 123 ms), so CPU sessions skip that fusion
CPU_DISABLED_FUSIONS = ["SkipLayerNormFusion"]
UNTYPED_AS_FLOAT = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT, for outputs of fused ops shape inference misses
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _input_layout(example_inputs: Any) -> tuple[str, list[str]]:
    import torch

    if isinstance(example_inputs, torch.Tensor):
        return "tensor", ["input"]
    if isinstance(example_inputs, dict):
        return "dict", list(example_inputs)
    return "tuple", [f"input_{i}" for i in range(len(example_inputs))]


def _unsupported_operator(message: str) -> str | None:
    for pattern in (r"operator ([\w:.]+) to ONNX", r"operator with unrecognized namespace ([\w:.]+)",
                    r"Unsupported: ONNX export of operator ([\w:.]+)", r"'([\w]+::[\w.]+)'", r"(aten::\w+)"):
        found = re.search(pattern, message)
        if found:
            return found.group(1).rstrip(".")
    return None


def export_onnx(model, example_inputs: Any) -> tuple[bytes, str, list[str]]:
    """Export a copy of `model` to ONNX (batch dimension dynamic, and the sequence length of token inputs).
    Returns (bytes, input kind, input names).

    A copy, because tracing a Hugging Face model was seen to change the eager model's later outputs.
    Uses the TorchScript exporter: ~0.1 s per model here where the dynamo exporter takes seconds, and its
    graphs are the ones ONNX Runtime's quantization tools are tested on.
    """
    import torch

    kind, names = _input_layout(example_inputs)
    model = copy.deepcopy(model).eval().cpu()
    example_inputs = map_tensors(example_inputs, lambda t: t.cpu())
    args, kwargs = ((example_inputs,), None) if kind == "tensor" else \
        ((), dict(example_inputs)) if kind == "dict" else (tuple(example_inputs), None)
    values = [example_inputs] if kind == "tensor" else list(example_inputs.values()) if kind == "dict" \
        else list(example_inputs)
    # batch is dynamic; so is the sequence axis of token inputs (2-D integer tensors: ids, masks)
    dynamic = {n: {0: "batch", 1: "sequence"} if isinstance(v, torch.Tensor) and v.dim() == 2
               and not v.is_floating_point() else {0: "batch"} for n, v in zip(names, values)}
    dynamic["output"] = {0: "batch"}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, buf, kwargs=kwargs, dynamo=False, input_names=names,
                              output_names=["output"], dynamic_axes=dynamic, opset_version=OPSET,
                              do_constant_folding=True)
    except Exception as e:
        op = _unsupported_operator(str(e))
        what = f"operator {op!r} has no ONNX translation" if op else str(e).splitlines()[0]
        raise ExportError(f"ONNX export failed: {what}. Use backend='torch' for this model, or replace that "
                          "operation with standard torch ops.") from e
    return buf.getvalue(), kind, names


def _fuse_bert(model, example_inputs, device: str = "cpu") -> bytes | None:
    """The model's graph with ONNX Runtime's BERT fusions, or None where they do not apply.

    Exported with eager attention: the pattern ORT's Attention fusion recognises (with SDPA it fuses none).
    """
    from ..techniques.unpad import supported

    names = supported(model)
    if len(names) != 1:  # none, or several encoders (the fusion assumes one)
        return None
    try:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError:
        return None
    eager = copy.deepcopy(model).eval()
    bert = eager.get_submodule(names[0]) if names[0] else eager
    shapes = {(layer.attention.self.num_attention_heads, layer.attention.self.all_head_size)
              for layer in bert.encoder.layer}
    if not hasattr(bert, "set_attn_implementation") or len(shapes) != 1:  # one shape for every layer
        return None
    (heads, width), = shapes
    try:
        bert.set_attn_implementation("eager")
        onnx_bytes = export_onnx(eager, example_inputs)[0]
        with tempfile.TemporaryDirectory() as tmp, _quiet():
            src, dst = os.path.join(tmp, "a.onnx"), os.path.join(tmp, "fused.onnx")
            Path(src).write_bytes(onnx_bytes)
            options = FusionOptions("bert")
            options.use_raw_attention_mask(True)  # its default (a length per row) assumes right padding
            options.enable_skip_layer_norm = not device.startswith("cpu")  # see CPU_DISABLED_FUSIONS
            optimized = optimize_model(src, model_type="bert", num_heads=heads, hidden_size=width,
                                       optimization_options=options)
            if not optimized.get_fused_operator_statistics().get("Attention"):
                return None
            optimized.save_model_to_file(dst)
            return Path(dst).read_bytes()
    except Exception as e:
        logging.getLogger(__name__).info("ONNX Runtime's BERT fusion did not apply: %s", e)
        return None


class OrtModel:
    """An ONNX Runtime inference session, callable with the same inputs as the torch model it came from."""

    def __init__(self, onnx_bytes: bytes, input_kind: str, input_names: list[str], device: str = "cpu",
                 threads: int | None = None, label: str = "fp32"):
        self.onnx_bytes, self.input_kind, self.input_names = onnx_bytes, input_kind, list(input_names)
        self.device, self.threads, self.label = device, threads, label
        self._session = None

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_torch(cls, model, example_inputs, device="cpu", threads=None, check=True, fuse=True) -> "OrtModel":
        """Export `model` and check the graph against it. With `fuse`, BERT encoders get ONNX Runtime's
        transformer fusions instead (Attention, EmbedLayerNormalization, BiasGelu; SkipLayerNormalization off
        CPU), kept where they match the torch model; fused nodes lose the per-layer names that quantization
        `exclude=` matches. The plain export is made only when no fused graph is kept."""
        fused = _fuse_bert(model, example_inputs, device) if fuse else None
        if fused is not None:
            candidate = cls(fused, *_input_layout(example_inputs), device=device, threads=threads)
            try:
                candidate.check_parity(model, example_inputs)
                return candidate
            except Exception as e:  # the fusion is an optional extra: fall back to the plain graph, say why in the log
                logging.getLogger(__name__).info("unfused ONNX graph kept: %s", e)
        onnx_bytes, kind, names = export_onnx(model, example_inputs)
        ort_model = cls(onnx_bytes, kind, names, device=device, threads=threads)
        if check:
            ort_model.check_parity(model, example_inputs)
        return ort_model

    def replace(self, onnx_bytes: bytes, label: str) -> "OrtModel":
        return OrtModel(onnx_bytes, self.input_kind, self.input_names, self.device, self.threads, label)

    @property
    def session(self):
        if self._session is None:
            import onnxruntime as ort

            provider = PROVIDERS["cuda" if self.device.startswith("cuda") else "cpu"]
            if provider not in ort.get_available_providers():
                raise DeviceError(f"ONNX Runtime here has no {provider}; install onnxruntime-gpu for CUDA, "
                                  "or use device='cpu'")
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            if self.threads:
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
            disabled = CPU_DISABLED_FUSIONS if provider == PROVIDERS["cpu"] else []
            self._session = ort.InferenceSession(self.onnx_bytes, opts, providers=[provider],
                                                 disabled_optimizers=disabled)
        return self._session

    # -- running ---------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        import torch

        if self.input_kind == "dict":
            values = [kwargs[n] for n in self.input_names]
        else:
            values = list(args)
        out_device = values[0].device if isinstance(values[0], torch.Tensor) else "cpu"
        feed = {n: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
                for n, v in zip(self.input_names, values)}
        outputs = self.session.run(None, feed)
        result = torch.from_numpy(outputs[0])
        return result.to(out_device) if str(out_device) != "cpu" else result

    def eval(self) -> "OrtModel":
        return self

    def check_parity(self, model, example_inputs, rtol: float = 1e-3) -> float:
        """Max abs difference between this graph and the torch model on `example_inputs`; raises if too far."""
        import torch

        from ..data import call_model, first_tensor

        with torch.inference_mode():
            expected = first_tensor(call_model(model, example_inputs)).float().cpu()
        got = call_model(self, map_tensors(example_inputs, lambda t: t.cpu())).float()
        if got.shape != expected.shape:
            raise ExportError(f"the exported graph returns shape {tuple(got.shape)}, torch returns "
                              f"{tuple(expected.shape)}")
        diff = (got - expected).abs().max().item()
        if diff > rtol * max(1.0, expected.abs().max().item()):
            raise ExportError(f"the exported ONNX graph disagrees with the torch model (max abs diff {diff:.3g} "
                              f"on the example inputs); use backend='torch' for this model")
        return diff

    # -- properties ------------------------------------------------------------------------------------------
    def serialized_size(self) -> int:
        return len(self.onnx_bytes)

    def count_params(self) -> tuple[int, int]:
        """Elements and non-zeros of the graph's weight initializers (scales and zero points left out)."""
        import numpy as np
        import onnx
        from onnx import numpy_helper

        total = nonzero = 0
        for init in onnx.load_from_string(self.onnx_bytes).graph.initializer:
            if init.name.endswith(("_scale", "_zero_point")) or len(init.dims) < 1:
                continue
            arr = numpy_helper.to_array(init)
            total += arr.size
            nonzero += int(np.count_nonzero(arr))
        return total, nonzero

    def __repr__(self) -> str:
        return f"OrtModel({self.label}, {len(self.onnx_bytes) / 1e6:.2f} MB, device={self.device!r})"

    # -- persistence -----------------------------------------------------------------------------------------
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_session"] = None
        return state

    def save(self, path) -> Path:
        """Write the .onnx file plus a small sidecar with the input layout, so `OrtModel.load` restores it."""
        import json

        path = Path(path)
        path.write_bytes(self.onnx_bytes)
        path.with_suffix(".json").write_text(json.dumps(
            {"input_kind": self.input_kind, "input_names": self.input_names, "label": self.label}))
        return path

    @classmethod
    def load(cls, path, device="cpu", threads=None) -> "OrtModel":
        import json

        path = Path(path)
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        data = path.read_bytes()
        if meta is None:
            import onnx

            names = [i.name for i in onnx.load_from_string(data).graph.input]
            meta = {"input_kind": "tensor" if len(names) == 1 else "tuple", "input_names": names, "label": "onnx"}
        return cls(data, meta["input_kind"], meta["input_names"], device, threads, meta.get("label", "onnx"))


# -- quantization with ONNX Runtime's tools -------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """ORT's quantizer prints calibration chatter and root-logger warnings; keep the notebook clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _nodes_in_layers(onnx_bytes: bytes, layers: tuple) -> list[str]:
    """ONNX node names that belong to the given torch module paths (e.g. 'encoder.layer.0')."""
    if not layers:
        return []
    import onnx

    nodes = [n.name for n in onnx.load_from_string(onnx_bytes).graph.node]
    wanted = [f".{layer}." for layer in layers]
    matched = [n for n in nodes if any(w in n.replace("/", ".") + "." for w in wanted)]
    return matched + [f"{n}_MatMul" for n in matched]  # ORT's quantizers rewrite Gemm as '<name>_MatMul' + Add


def _quantized(model: OrtModel, label: str, quantize) -> OrtModel:
    """Run one of ORT's quantizers (`quantize(src_path, dst_path)`) on a pre-processed copy of the graph."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        src, pre, dst = (os.path.join(tmp, f) for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        Path(src).write_bytes(model.onnx_bytes)
        try:  # symbolic shape inference + graph clean-up, as ORT recommends before quantization
            quant_pre_process(src, pre, auto_merge=True)  # without it, failing inference leaves files in the cwd
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
        nodes_to_exclude=_nodes_in_layers(model.onnx_bytes, exclude), extra_options=UNTYPED_AS_FLOAT))


class _Calibration:
    """Feeds ORT's calibrator batches of the train split, as numpy."""

    def __init__(self, model: OrtModel, batches):
        self.model, self.batches = model, iter(batches)

    def get_next(self):
        for inputs, _ in self.batches:
            values = list(inputs.values()) if isinstance(inputs, dict) else \
                [inputs] if self.model.input_kind == "tensor" else list(inputs)
            return {n: v.detach().cpu().numpy() for n, v in zip(self.model.input_names, values)}
        return None

    def rewind(self):  # ORT's calibrators may call this
        pass


def quantize_static(model: OrtModel, batches, per_channel=True, reduce_range=False, calibration="minmax",
                    fmt="qdq", exclude: tuple = ()) -> OrtModel:
    """int8 weights and activations, activation ranges calibrated on `batches` (ORT `quantize_static`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibration]
    return _quantized(model, f"int8-static-{fmt}", lambda src, dst: ort_quantize_static(
        src, dst, _Calibration(model, batches), quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
        per_channel=per_channel, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, calibrate_method=method,
        nodes_to_exclude=_nodes_in_layers(model.onnx_bytes, exclude),
        extra_options={**UNTYPED_AS_FLOAT, **({"CalibMaxIntermediateOutputs": 64} if calibration != "minmax"
                                              else {})}))


@backend("onnxruntime")
class OnnxRuntimeBackend:
    name = "onnxruntime"

    @staticmethod
    def available(device: str) -> bool:
        try:
            import onnxruntime as ort
        except ImportError:
            return False
        return PROVIDERS["cuda" if device.startswith("cuda") else "cpu"] in ort.get_available_providers()

    @staticmethod
    def compile(model, ctx) -> OrtModel:
        if isinstance(model, OrtModel):
            return model
        return OrtModel.from_torch(model, ctx.data.example_inputs, device=ctx.device, threads=ctx.threads)


__all__ = ["OrtModel", "export_onnx", "quantize_dynamic", "quantize_static", "batch_size_of"]
