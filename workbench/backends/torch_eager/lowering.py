"""Torch eager precisions: fp16/bf16 copies that take and return float32, and torch.ao dynamic int8."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from ...architectures import within
from ...tensors import map_tensors

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class CastInputs(nn.Module):
    """Runs a half/bfloat16 model on float32 inputs and returns float32 outputs, so callers need not care."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args, **kwargs):
        def cast(t):
            return t.to(self.dtype) if t.is_floating_point() else t

        out = self.module(*map_tensors(args, cast), **map_tensors(kwargs, cast))
        return map_tensors(out, lambda t: t.float() if t.is_floating_point() else t)


def to_dtype(model: nn.Module, dtype_name: str) -> nn.Module:
    """A half-precision copy (`fp16` or `bf16`) wrapped to accept and return float32 tensors."""
    dtype = DTYPES[dtype_name]
    return CastInputs(copy.deepcopy(model).to(dtype), dtype).eval()


def dynamic_int8(model: nn.Module, exclude: tuple = (), per_channel: bool = True) -> nn.Module:
    """torch.ao dynamic quantization of Linear/LSTM/GRU layers (weights int8, activations per batch).

    `exclude` names layers (or their parents) to keep in fp32.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

        spec = {}
        # torch's own transformer layers read their Linears' weights in their fast-path checks, which a quantized
        # Linear does not have as a tensor: those stay fp32 (MultiheadAttention's out_proj likewise)
        inside_torch_layers = {f"{n}.{c}" for n, m in model.named_modules()
                               if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
                               for c, _ in m.named_modules() if c}
        for name, mod in model.named_modules():
            if within(name, exclude) or name in inside_torch_layers:
                continue
            if isinstance(mod, nn.Linear) and not isinstance(mod, nn.modules.linear.NonDynamicallyQuantizableLinear):
                spec[name] = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
            elif isinstance(mod, (nn.LSTM, nn.GRU)):
                spec[name] = default_dynamic_qconfig
        return quantize_dynamic(copy.deepcopy(model), spec)


def torchao_available() -> bool:
    """Whether torchao (the `gpu` extra) imports: int8 and fp8 on a GPU go through it."""
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def fp8_capable(device) -> bool:
    """fp8 matrix units: compute capability 8.9 (Ada) or later."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def torchao_quantize(model: nn.Module, precision: str, exclude: tuple = ()) -> nn.Module:
    """A copy with its Linear layers quantized by torchao: `int8-dynamic` (int8 weights per channel, activations
    per token, int8 tensor-core matmuls via torch._int_mm) or `fp8` (float8 e4m3 weights and activations, per
    row; Ada/Hopper). Layers named in `exclude` (or under them) stay as they are."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao's deprecation notices on import
        from torchao.quantization import quantize_

        if precision == "fp8":
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

            config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        else:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig

            config = Int8DynamicActivationInt8WeightConfig()
        model = copy.deepcopy(model)
        if precision == "fp8":  # torchao's per-row fp8 takes bf16 weights; float32 inputs are cast on the way in
            model = CastInputs(model.to(torch.bfloat16), torch.bfloat16)
            kept = tuple(f"module.{e}" for e in exclude)
        else:
            kept = tuple(exclude)

        def wanted(module, name: str) -> bool:
            return isinstance(module, nn.Linear) and not within(name, kept) \
                and module.in_features % 16 == 0 and module.out_features % 16 == 0  # the kernels' tile shapes

        quantize_(model, config, filter_fn=wanted)
    model.workbench_label = f"torchao-{precision}"
    return model.eval()
