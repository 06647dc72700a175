"""ONNX Runtime: export (export.py), BERT fusions (fusion.py), the session (session.py) and ONNX Runtime's int8
quantizers (quantize.py), behind the one Backend interface. Models are `OrtModel`s, saved as `model.onnx`.

Importing this package stays light: onnx and onnxruntime load when a model is lowered, run or saved.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ...architectures import packs_tokens, within
from ...errors import RecipeError
from ...registry import register_backend
from .. import Backend, installed_versions, optional


def _ort():
    return optional("onnxruntime")


def _linear_leaves(model, layers: tuple) -> tuple:
    """The Linear layers at or under `layers`: each must keep nodes of its own for `exclude` to find it."""
    from torch import nn

    return tuple(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and within(n, layers))


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    title = "ONNX Runtime"
    files = ("model.onnx",)

    def available(self, target) -> bool:
        from .session import provider_for

        ort = _ort()
        return ort is not None and provider_for(target.device) in ort.get_available_providers()

    def precisions(self, target) -> tuple:
        if not self.available(target):
            return ()
        return ("fp32",) if target.is_cuda else ("fp32", "int8-dynamic", "int8-static", "int8-weight", "int4-weight")

    def accepts(self, model: Any) -> bool:
        from .session import OrtModel

        return isinstance(model, OrtModel)

    def place(self, model, target):
        return model.placed(target.device, target.threads)  # a fresh session on the same graph

    def lower(self, model, precision: str, ctx, exclude: tuple = (), **options):
        lowered = self._lower(model, precision, ctx, exclude=exclude, **options)
        if precision != "fp32" and not ctx.target.is_cuda and packs_tokens(model):
            from .fast_path import add_fast_path

            return add_fast_path(model, lowered, lambda twin, excluded: self._lower(
                twin, precision, ctx, exclude=excluded, **options), exclude, ctx)
        return lowered

    def _lower(self, model, precision: str, ctx, per_channel: bool = True, reduce_range: bool | None = None,
               calibration: str = "minmax", format: str = "qdq", exclude: tuple = (), calibration_batches: int = 8,
               group_size: int = 32, **options):
        from .quantize import quantize_dynamic, quantize_static, quantize_weight_only
        from .session import OrtModel

        target = ctx.target
        if precision == "int8-static" and calibration != "minmax" and packs_tokens(model):
            raise RecipeError(f"Quantize: calibration={calibration!r} collects histograms that ONNX Runtime needs "
                              "equally shaped across batches, and after unpad the token count varies per batch; "
                              "use calibration='minmax' (or quantize dynamically)")
        if precision in ("int8-dynamic", "int8-static") and reduce_range is None:
            reduce_range = not target.cpu.vnni
            if reduce_range:
                ctx.note("weights use 7 bits (reduce_range): this CPU has no VNNI, and AVX2's u8 x s8 multiply-add "
                         "saturates with full 8-bit weights (measured on digits-cnn: -1.9 points without it)")
        if precision == "int8-static":
            ctx.progress(f"calibrating static int8 on {calibration_batches} batches", None)
        if isinstance(model, OrtModel):  # a graph the user brought: quantized as it is
            quantized = model.quantized_ops()
            if quantized and precision != "fp32":
                raise RecipeError(f"Quantize: this ONNX graph is already quantized (it has {', '.join(quantized[:3])} "
                                  "nodes); quantize the float graph or the torch model it came from")
            fp32 = model.placed(target.device, target.threads)
        else:
            fp32 = OrtModel.from_torch(model, ctx.data.example_inputs, device=target.device, threads=target.threads,
                                       keep_named=_linear_leaves(model, exclude))
        if precision == "fp32":
            return fp32
        if precision == "int8-dynamic":
            return quantize_dynamic(fp32, per_channel=per_channel, reduce_range=reduce_range, exclude=exclude)
        if precision == "int8-static":
            return quantize_static(fp32, ctx.data.train_batches(limit=calibration_batches), per_channel=per_channel,
                                   reduce_range=reduce_range, calibration=calibration, fmt=format, exclude=exclude)
        if precision in ("int8-weight", "int4-weight"):
            return quantize_weight_only(fp32, bits=int(precision[3]), group_size=group_size, exclude=exclude)
        raise ValueError(f"ONNX Runtime does not lower to {precision}")

    def label_of(self, model) -> str:
        return f"{self.name}-{model.label}"

    def size_bytes(self, model) -> int:
        return model.serialized_size()

    def count_params(self, model) -> tuple[int, int]:
        return model.count_params()

    def save(self, model, example_inputs, directory: Path) -> Path:
        return model.save(directory / "model.onnx")

    def load(self, path: Path, target, trust_pickle: bool = False):
        from .session import OrtModel

        return OrtModel.load(path, device=target.device, threads=target.threads)

    deploy_suffix = ".onnx"

    def export(self, model, example_inputs, path: Path) -> Path:
        from ...paths import write_atomic

        write_atomic(path, model.onnx_bytes)
        return path

    def usage(self, model, path: Path, input_names: list[str]) -> list[str]:
        wanted = {i.name for i in model.session.get_inputs()}  # the graph's own (an unused input is dropped)
        feed = ", ".join(f"{n!r}: {n}" for n in input_names if n in wanted)
        lines = ["import onnxruntime as ort", f"session = ort.InferenceSession({str(path)!r})"]
        if model.layout.get("past"):  # a decoder with its cache: the prompt's call takes an empty one
            first = next(n for n in input_names if n in wanted)
            return [lines[0], "import numpy as np", lines[1],
                    "past = {i.name: np.zeros((len(" + first + "), i.shape[1], 0, i.shape[3]), np.float32) "
                    "for i in session.get_inputs() if i.name.startswith('past_key_values.')}",
                    f"logits, *present = session.run(None, {{{feed}, **past}})  # numpy in, numpy out; next token: "
                    "feed present.<i>.key/value back as past_key_values.<i>.key/value, the mask one longer"]
        return lines + [f"outputs = session.run(None, {{{feed}}})  # numpy arrays in (tensor.numpy()), numpy out"]

    def versions(self) -> dict:
        out = installed_versions("onnxruntime", "onnx")
        if out["onnxruntime"] is None:  # a build under another name (onnxruntime-gpu, -openvino, ...)
            out["onnxruntime"] = getattr(optional("onnxruntime"), "__version__", None)
        return out


def __getattr__(name: str):  # OrtModel without importing onnx at package import
    if name == "OrtModel":
        from .session import OrtModel

        return OrtModel
    raise AttributeError(name)
