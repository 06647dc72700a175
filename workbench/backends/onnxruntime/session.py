"""OrtModel: an ONNX Runtime inference session, callable with the same inputs as the torch model it came from.

    >>> ort_model = OrtModel.from_torch(model, example_inputs)
    >>> ort_model.save("model.onnx"); OrtModel.load("model.onnx")
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ...architectures import is_causal_lm, packs_tokens
from ...errors import DeviceError, ExportError, WorkbenchError, first_line
from ...contract import bind, other_shapes, rebuild
from .export import export_onnx
from .fusion import fuse_bert

# ONNX Runtime 1.32's CPU SkipLayerNormalization kernel measured slower than the Add + LayerNormalization it
# replaces (see fusion.py), so CPU sessions skip that fusion too
CPU_DISABLED_FUSIONS = ["SkipLayerNormFusion"]
# ONNX Runtime's intra-op workers spin 2^20 pause instructions (~50 ms here) after each run by default; in one process
# with torch, that slowed torch's OpenMP threads 2-4x right after an ONNX Runtime call (digits-cnn, 2 threads).
# A 1 ms spin kept ONNX Runtime's own latency (0.066 ms at batch 1 either way) and ended the interference.
SPIN_US = "1000"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def provider_for(device: str) -> str:
    return PROVIDERS["cuda" if device.startswith("cuda") else "cpu"]


class _Input:
    """An onnx graph input's name and shape (dims as ints or names), as ONNX Runtime's NodeArg gives them."""

    def __init__(self, value_info):
        self.name = value_info.name
        self.shape = [d.dim_value if d.HasField("dim_value") else d.dim_param
                      for d in value_info.type.tensor_type.shape.dim]


class OrtModel:
    """An ONNX Runtime inference session, callable like the torch model it came from."""

    def __init__(self, onnx_bytes: bytes, layout: dict, device: str = "cpu", threads: int | None = None,
                 label: str = "fp32"):
        """layout: `input_kind` ('tensor', 'tuple' or 'dict'), `input_names` (the graph's, in the batch's order),
        `call_names` (the forward's positional parameters) and `outputs` (the output structure, or None for the
        graph's first output as a tensor); see `export.export_onnx`."""
        self.onnx_bytes, self.layout = onnx_bytes, dict(layout)
        self.layout.setdefault("call_names", self.layout["input_names"])
        self.layout.setdefault("outputs", None)
        self.device, self.threads, self.label = device, threads, label
        self._session = None

    @property
    def input_kind(self) -> str:
        return self.layout["input_kind"]

    @property
    def input_names(self) -> list[str]:
        return self.layout["input_names"]

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_torch(cls, model, example_inputs, device: str = "cpu", threads: int | None = None, check: bool = True,
                   fuse: bool = True, keep_named: tuple = ()) -> "OrtModel":
        """Export `model` and check the graph against it. With `fuse`, BERT encoders get ONNX Runtime's
        transformer fusions instead, kept where they match the torch model and where every layer in `keep_named`
        (those quantization `exclude=` leaves in float) still has nodes of its own: fused nodes lose the per-layer
        names it matches. The plain export is made only when no fused graph is kept."""
        fused = fuse_bert(model, example_inputs, on_cpu=provider_for(device) == PROVIDERS["cpu"]) if fuse else None
        if fused is not None and keep_named:
            from .quantize import layers_without_nodes

            missing = layers_without_nodes(fused[0], keep_named)
            if missing:
                logging.getLogger(__name__).info("unfused ONNX graph: %s fused away", missing[0])
                fused = None
        if fused is None and packs_tokens(model):
            from ...techniques.packed_bert import onnxruntime_attention

            try:
                with onnxruntime_attention():  # unpad's attention as one MultiHeadAttention node per layer
                    fused = export_onnx(model, example_inputs)
            except ExportError as e:
                logging.getLogger(__name__).info("unpad's attention kept as plain ops: %s", e)
        if fused is not None:
            candidate = cls(*fused, device=device, threads=threads)
            try:
                candidate.check_parity(model, example_inputs)
                return candidate
            except Exception as e:  # the fusion is an optional extra: fall back to the plain graph, say why in the log
                logging.getLogger(__name__).info("unfused ONNX graph kept: %s", e)
        lost = None
        if is_causal_lm(model) and check:  # a decoder keeps its key/value cache, so that it can generate
            try:
                decoder = cls(*export_onnx(model, example_inputs, cache=True), device=device, threads=threads)
                decoder.check_parity(model, example_inputs)
                for other in other_shapes(example_inputs, decoder.layout, model):
                    decoder.check_parity(model, other)
                return decoder
            except Exception as e:
                lost = first_line(e, 200)
                logging.getLogger(__name__).info("decoder exported without its cache: %s", lost)
        ort_model = cls(*export_onnx(model, example_inputs), device=device, threads=threads)
        if lost:  # said again where it matters: when asked to generate
            ort_model.layout["cache_lost"] = lost
        if check:
            try:
                ort_model.session  # an invalid graph, an operator ONNX Runtime lacks: a graph it cannot load
            except WorkbenchError:  # (no provider for the device)
                raise
            except Exception as e:
                raise ExportError(f"ONNX Runtime cannot load the exported graph ({first_line(e, 200, named=True)}); "
                                  "use backend='torch' for this model") from e
            ort_model.check_parity(model, example_inputs)
            try:
                for other in other_shapes(example_inputs, ort_model.layout, model):
                    ort_model.check_parity(model, other)
            except Exception as e:
                import re

                node = re.search(r"running (\w+) node", str(e))
                where = f"its {node.group(1)} node fails at another shape" if node else first_line(e, 200)
                raise ExportError("the exported ONNX graph runs only at the batch size or sequence length it was "
                                  f"traced with ({where}); use backend='torch' for this model") from e
        return ort_model

    def replace(self, onnx_bytes: bytes, label: str) -> "OrtModel":
        """The same model with another graph (a quantized one)."""
        return OrtModel(onnx_bytes, self.layout, self.device, self.threads, label)

    def placed(self, device: str, threads: int | None) -> "OrtModel":
        """A fresh session on the same graph."""
        return OrtModel(self.onnx_bytes, self.layout, device, threads, self.label)

    @property
    def session(self):
        if self._session is None:
            import onnxruntime as ort

            provider = provider_for(self.device)
            if provider not in ort.get_available_providers():
                raise DeviceError(f"ONNX Runtime here has no {provider}; install onnxruntime-gpu for CUDA, "
                                  "or use device='cpu'")
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 4  # failures reach the caller as exceptions, not as log lines
            opts.add_session_config_entry("session.intra_op.spin_duration_us", SPIN_US)
            if self.threads:
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
            disabled = CPU_DISABLED_FUSIONS if provider == PROVIDERS["cpu"] else []
            self._session = ort.InferenceSession(self.onnx_bytes, opts, providers=[provider],
                                                 disabled_optimizers=disabled)
        return self._session

    # -- running ---------------------------------------------------------------------------------------------
    def feed(self, *args, **kwargs) -> dict:
        """The session's input feed (numpy arrays by graph input name) for a call like the original model's."""
        values = bind(self.layout, args, kwargs)
        wanted = {i.name for i in self.session.get_inputs()}  # the exporter drops inputs the graph never reads
        feed = {n: v.detach().cpu().numpy() for n, v in zip(self.input_names, values) if n in wanted}
        if self.layout.get("past"):  # a decoder with its cache, called like the model: an empty past
            from ...decoding import empty_past, past_specs

            feed.update(empty_past(past_specs(self.layout), values[0].shape[0]))
        return feed

    def __call__(self, *args, **kwargs):
        import torch

        feed = self.feed(*args, **kwargs)
        first = next((v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor)), None)
        out_device = first.device if first is not None else torch.device("cpu")
        outputs = [torch.from_numpy(a) for a in self.session.run(None, feed)]
        if self.layout.get("past"):  # the model's own outputs come first, the cache after them
            outputs = outputs[:len(self.layout["output_ranks"])]
        if str(out_device) != "cpu":
            outputs = [t.to(out_device) for t in outputs]
        return rebuild(self.layout, outputs)

    def eval(self) -> "OrtModel":
        return self

    def check_parity(self, model, example_inputs, rtol: float = 1e-3) -> float:
        """Max abs difference between this graph and the torch model on `example_inputs`; raises if too far."""
        from .. import check_parity

        return check_parity(self, model, example_inputs, "the exported ONNX graph", "backend='torch'", rtol)

    # -- properties ------------------------------------------------------------------------------------------
    def quantized_ops(self) -> list[str]:
        """The graph's integer operators (a graph quantized before), by kind."""
        import onnx

        from .fast_path import nodes

        kinds = {n.op_type for n in nodes(onnx.load_from_string(self.onnx_bytes).graph)}
        return sorted(k for k in kinds if k in ("DynamicQuantizeLinear", "QuantizeLinear", "MatMulInteger",
                                                 "ConvInteger", "QLinearMatMul", "QLinearConv", "QAttention",
                                                 "DynamicQuantizeMatMul", "MatMulNBits"))

    def serialized_size(self) -> int:
        return len(self.onnx_bytes)

    def count_params(self) -> tuple[int, int]:
        """Elements and non-zeros of the graph's weight initializers (scales and zero points left out)."""
        import numpy as np
        import onnx
        from onnx import numpy_helper

        from .fast_path import weights

        total = nonzero = 0
        for init in weights(onnx.load_from_string(self.onnx_bytes).graph):
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
        from ...paths import write_atomic

        path = Path(path)
        write_atomic(path, self.onnx_bytes)
        write_atomic(path.with_suffix(".json"), json.dumps({**self.layout, "label": self.label}))
        return path

    @classmethod
    def load(cls, path, device: str = "cpu", threads: int | None = None) -> "OrtModel":
        path = Path(path)
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        data = path.read_bytes()
        if meta is None:
            import onnx

            from ...decoding import graph_past

            inputs = [_Input(i) for i in onnx.load_from_string(data).graph.input]
            past = graph_past(inputs)
            names = [i.name for i in inputs if i.name not in {p[0] for p in past}]
            # a graph from elsewhere: inputs by name or in the graph's order, its first output returned (a
            # decoder's past inputs, named as the workbench and Optimum name them, start empty)
            meta = {"input_kind": "dict", "input_names": names, "call_names": names, "label": "onnx"}
            if past:
                meta.update(past=[{"name": n, "shape": [h, d]} for n, h, d in past], output_ranks=[3])
        label = meta.pop("label", "onnx")
        return cls(data, meta, device, threads, label)
