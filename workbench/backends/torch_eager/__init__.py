"""Torch eager: the model stays a torch module. fp16/bf16 as casts (float32 in and out), int8 through torch.ao's
dynamic quantization (CPU kernels), and `torch.export` programs as the saved form.

Importing this package stays light: torch loads when a model is lowered, measured or saved.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import first_line
from ...registry import register_backend
from .. import Backend, installed_versions


def _as_saved(model):
    """What sizes and counts read: the model as it is saved, 2:4 sparse weights dense again (with their zeros)."""
    from .lowering import densified

    return densified(model)


@register_backend
class TorchBackend(Backend):
    name = "torch"
    title = "torch eager"
    files = ("model.pt2", "model.ts", "model.pt")

    def available(self, target) -> bool:
        import torch

        return not target.is_cuda or torch.cuda.is_available()

    def precisions(self, target) -> tuple:
        """On a CPU, int8 through torch.ao; on a GPU, int8 (and fp8 where the GPU has it) through torchao when
        it is installed (the `gpu` extra)."""
        if not target.is_cuda:
            return ("fp32", "fp16", "bf16", "int8-dynamic")
        from .lowering import fp8_capable, torchao_available

        if not torchao_available():
            return ("fp32", "fp16", "bf16")
        return ("fp32", "fp16", "bf16", "int8-dynamic") + (("fp8",) if fp8_capable(target.device) else ())

    def accepts(self, model: Any) -> bool:
        import torch

        return isinstance(model, torch.nn.Module)

    def place(self, model, target):
        from ...tensors import copy_model
        from ...wrappers import to_device

        return to_device(copy_model(model).eval(), target.device)

    def lower(self, model, precision: str, ctx, exclude: tuple = (), per_channel: bool = True, **options):
        from ...wrappers import to_device
        from .lowering import DTYPES, cast_layer_inputs, dynamic_int8, to_dtype

        target = ctx.target
        if precision == "fp32":
            return to_device(model, target.device).eval()
        if precision in ("fp16", "bf16"):
            if not target.native(precision):
                ctx.note(f"{precision} on this CPU ({target.cpu.describe()}): no native {precision} matrix units, "
                         "so expect it to be slower than fp32; it halves the size")
            lowered = to_dtype(model, precision).to(target.device)
            cast = cast_layer_inputs(lowered, target.move(ctx.data.example_inputs), DTYPES[precision])
            if cast:
                ctx.note(f"{precision}: the model's forward makes float32 tensors of its own, which {precision} "
                         f"weights refuse; {len(cast)} layer{'s' if len(cast) > 1 else ''} "
                         f"({', '.join(n.removeprefix('module.') for n in cast[:3])}"
                         f"{' ...' if len(cast) > 3 else ''}) cast their inputs to {precision}")
            if target.is_cuda:  # 2:4-pruned Linear layers onto sparse tensor cores
                from .lowering import sparse_two_four

                lowered = sparse_two_four(lowered, ctx, target.move(ctx.data.example_inputs))
            return lowered
        if precision in ("int8-dynamic", "fp8") and target.is_cuda:
            from .lowering import torchao_coverage, torchao_quantize

            lowered = torchao_quantize(to_device(model, target.device), precision, exclude=exclude)
            coverage = torchao_coverage(lowered, precision)
            if coverage:
                ctx.note(coverage)
            return lowered
        if precision == "int8-dynamic":
            return dynamic_int8(model, exclude=exclude, per_channel=per_channel)
        raise ValueError(f"torch eager does not lower to {precision}")

    def versions(self) -> dict:
        return installed_versions("torchao")

    def label_of(self, model) -> str:
        from ...wrappers import Compiled, saved_form
        from .lowering import CastInputs

        if isinstance(model, Compiled):
            return self.label_of(saved_form(model)) + "+compile"
        model = saved_form(model)
        if getattr(model, "workbench_label", None):
            return model.workbench_label
        if isinstance(model, CastInputs):
            sparse = "+2:4" if getattr(model, "workbench_sparse", False) else ""
            return f"torch-{'fp16' if str(model.dtype) == 'torch.float16' else 'bf16'}{sparse}"
        if any(hasattr(m, "_packed_params") for m in model.modules()):
            return "torch-int8-dynamic"
        return "torch"

    def size_bytes(self, model) -> int:
        from ...measure.counts import serialized_size

        return serialized_size(_as_saved(model))

    def sparse_size_bytes(self, model) -> int | None:
        from ...measure.counts import sparse_size

        return sparse_size(_as_saved(model))

    def count_params(self, model) -> tuple[int, int]:
        from ...measure.counts import count_params

        return count_params(_as_saved(model))

    def save(self, model, example_inputs, directory: Path) -> Path:
        from ...wrappers import saved_form
        from .lowering import densified
        from .storage import save

        return save(densified(saved_form(model)), example_inputs, directory)

    deploy_suffix = ".pt2"
    also_exports = (".ts",)  # a TorchScript trace: recurrent layers, torch.ao int8

    def export(self, model, example_inputs, path: Path) -> Path:
        import os
        import tempfile

        from ...errors import ExportError
        from ...wrappers import saved_form
        from .lowering import densified
        from .storage import export_program, trace_program

        model = densified(saved_form(model))
        write = trace_program if path.suffix == ".ts" else export_program
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            staged = Path(tmp) / path.name
            try:
                write(model, example_inputs, staged)
            except Exception as e:
                why = first_line(e, 160)
                other = "result.export('model.ts') writes a TorchScript trace instead, or " \
                    if path.suffix != ".ts" else ""
                raise ExportError(f"{'torch.export' if write is export_program else 'TorchScript'} cannot capture "
                                  f"this model ({why}); {other}result.save(path) keeps it (as a pickle)") from e
            os.replace(staged, path)
        return path

    def usage(self, model, path: Path, input_names: list[str]) -> list[str]:
        load = f"torch.jit.load({str(path)!r})" if path.suffix == ".ts" else \
            f"torch.export.load({str(path)!r}).module()"
        return ["import torch",
                f"program = {load}",
                f"outputs = program({', '.join(input_names)})  # tensors in this order; a tuple of tensors out"]

    def load(self, path: Path, target, trust_pickle: bool = False):
        from ...wrappers import FollowsInputs
        from .storage import load

        model = load(path, target.device, trust_pickle)
        return FollowsInputs(model, target.device) if target.is_cuda else model
