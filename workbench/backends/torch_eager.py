"""Torch eager backend: the model stays a torch module; int8 via torch.ao dynamic quantization, fp16/bf16 casts."""
from __future__ import annotations

import warnings

from ..registry import backend


def to_dtype(model, dtype_name: str):
    """A half-precision copy (`fp16` or `bf16`) wrapped to accept and return float32 tensors."""
    import copy

    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    from ..modules import CastInputs

    return CastInputs(copy.deepcopy(model).to(dtype), dtype).eval()


def dynamic_int8(model, exclude: tuple = (), per_channel: bool = True):
    """torch.ao dynamic quantization of Linear/LSTM/GRU layers (weights int8, activations per batch).

    `exclude` names layers (or their parents) to keep in fp32.
    """
    from torch import nn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

        spec = {}
        for name, mod in model.named_modules():
            if any(name == e or name.startswith(e + ".") for e in exclude):
                continue
            if isinstance(mod, nn.Linear):
                spec[name] = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
            elif isinstance(mod, (nn.LSTM, nn.GRU)):
                spec[name] = default_dynamic_qconfig
        return quantize_dynamic(model, spec)


@backend("torch")
class TorchBackend:
    name = "torch"

    @staticmethod
    def available(device: str) -> bool:
        import torch

        return not device.startswith("cuda") or torch.cuda.is_available()

    @staticmethod
    def compile(model, ctx):
        return model.to(ctx.device).eval()
