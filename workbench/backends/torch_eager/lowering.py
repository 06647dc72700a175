"""Torch eager precisions: fp16/bf16 copies that take and return float32, and torch.ao dynamic int8."""
from __future__ import annotations

import copy
import functools
import warnings

import torch
from torch import nn

from ...architectures import within
from ...errors import first_line
from ...tensors import drop_cached_tensors, map_tensors, tensors_in

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _floats_to(value, dtype: torch.dtype):
    """`value` (tensors, or tuples, lists and dicts of them) with its floating tensors in `dtype`."""
    return map_tensors(value, lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t)


class CastInputs(nn.Module):
    """Runs a half/bfloat16 model on float32 inputs and returns float32 outputs, so callers need not care."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args, **kwargs):
        return _floats_to(self.module(*_floats_to(args, self.dtype), **_floats_to(kwargs, self.dtype)),
                          torch.float32)


def to_dtype(model: nn.Module, dtype_name: str) -> nn.Module:
    """A half-precision copy (`fp16` or `bf16`) wrapped to accept and return float32 tensors."""
    dtype = DTYPES[dtype_name]
    converted = copy.deepcopy(model).to(dtype)
    drop_cached_tensors(converted)
    return CastInputs(converted, dtype).eval()


def _cast_floats(dtype, module, args, kwargs):
    return _floats_to(args, dtype), _floats_to(kwargs, dtype)


def cast_layer_inputs(model: nn.Module, example_inputs, dtype: torch.dtype) -> list[str]:
    """The layers with weights that a forward on `example_inputs` hands floating inputs of another dtype than
    `dtype` (a forward that makes float32 tensors of its own, a mean pool's `mask.float()` before a classifier,
    which half-precision weights refuse) cast them from now on (forward pre-hooks, which save, pickle and export
    with the layer); returns their names. None where the forward runs as it is (a layer may take float32 on
    purpose) or fails for another reason than a dtype."""
    from ...tensors import call_model

    try:
        with torch.inference_mode():
            call_model(model, example_inputs)
        return []
    except RuntimeError as e:
        if not any(w in str(e) for w in ("dtype", "scalar type", "Half", "BFloat16")):
            return []
    except Exception:  # the step's own check says why it does not run
        return []
    layers = {n: m for n, m in model.named_modules() if any(p.is_floating_point() for p in m.parameters(recurse=False))}
    found = []

    def probe(name):
        def hook(module, args, kwargs):
            if any(t.is_floating_point() and t.dtype != dtype for t in tensors_in((args, kwargs))):
                found.append(name)
            return _cast_floats(dtype, module, args, kwargs)
        return hook

    probes = [m.register_forward_pre_hook(probe(n), with_kwargs=True) for n, m in layers.items()]
    try:
        with torch.inference_mode():
            call_model(model, example_inputs)
    except Exception:  # the step's own check says why it does not run
        return []
    finally:
        for handle in probes:
            handle.remove()
    found = list(dict.fromkeys(found))  # a layer called several times is named once
    for name in found:
        layers[name].register_forward_pre_hook(functools.partial(_cast_floats, dtype), with_kwargs=True)
    return found


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
            drop_cached_tensors(model)
            kept = tuple(f"module.{e}" for e in exclude)
        else:
            kept = tuple(exclude)

        def wanted(module, name: str) -> bool:
            return isinstance(module, nn.Linear) and not within(name, kept) \
                and module.in_features % 16 == 0 and module.out_features % 16 == 0  # the kernels' tile shapes

        quantize_(model, config, filter_fn=wanted)
    model.workbench_label = f"torchao-{precision}"
    return model.eval()


def torchao_coverage(model: nn.Module, precision: str) -> str | None:
    """What the card says of a torchao-quantized model's coverage: Linear layers left in float (sizes off the
    kernels' 16-wide tiles, or excluded), none quantized at all, convolutions. None where every layer is."""
    linear = {n.removeprefix("module."): m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    kept = [n for n, m in linear.items() if type(m.weight) is nn.Parameter]
    off = [n for n in kept if linear[n].in_features % 16 or linear[n].out_features % 16]
    excluded = [n for n in kept if n not in off]
    convs = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    if not kept and not (convs or not linear):
        return None

    def names(some):
        return ", ".join(some[:3]) + (" ..." if len(some) > 3 else "")

    why = "; ".join(part for part in (
        f"{len(off)} with sizes not multiples of 16 (its kernels' tiles): {names(off)}" if off else "",
        f"{len(excluded)} excluded: {names(excluded)}" if excluded else "") if part)
    if not linear:
        head = f"torchao {precision}: the model has no Linear layer, so nothing is quantized"
    elif len(kept) == len(linear):
        head = f"torchao {precision}: none of the {len(linear)} Linear layers is quantized ({why}), so the model " \
               "runs as it was; quant=fp16 halves the size on any of them"
    elif kept:
        head = f"torchao {precision}: {len(kept)} of {len(linear)} Linear layers stay in float ({why})"
    else:
        head = f"torchao {precision}: every Linear layer is quantized"
    return head + ("; convolutions stay in float (torchao quantizes Linear layers only)" if convs else "")


def two_four_layers(model: nn.Module) -> dict:
    """{name: Linear} whose float weights hold the 2:4 pattern (what Prune(semi_structured=True) leaves; the
    pattern itself means half the weights are zero)."""
    from ...techniques.prune import is_two_four

    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and type(m.weight) is nn.Parameter and is_two_four(m.weight)}


def sparse_two_four(model: nn.Module, ctx, example) -> nn.Module:
    """On a GPU of compute 8.0+, fp16/bf16 Linear weights with the 2:4 pattern become torch's semi-structured
    sparse tensors (cuSPARSELt or CUTLASS kernels: `torch.sparse.to_sparse_semi_structured`). Checked where it is
    made: the model must copy, count and run an example; else the weights stay dense and the card says why."""
    from ...tensors import call_model

    layers = two_four_layers(model)
    if not layers:
        return model
    if torch.cuda.get_device_capability(ctx.target.device) < (8, 0):
        ctx.note("2:4 sparsity: this GPU has no sparse tensor cores (compute 8.0+); the weights stay dense")
        return model
    from torch.sparse import to_sparse_semi_structured

    dense, failed = {}, {}
    for name, m in layers.items():
        try:
            sparse = to_sparse_semi_structured(m.weight.detach())
        except Exception as e:  # shapes the kernels do not take (too small, not a multiple of their tile)
            failed[name] = first_line(e, 100)
            continue
        dense[name] = m.weight
        m.weight = nn.Parameter(sparse, requires_grad=False)
    if not dense:
        name, why = next(iter(failed.items()))
        ctx.note(f"2:4 sparsity: the sparse kernels take none of the {len(failed)} 2:4 layers ({name}: {why}); the "
                 "weights stay dense")
        return model
    try:
        copy.deepcopy(model)
        with torch.inference_mode():
            call_model(model, example)
    except Exception as e:
        for name, weight in dense.items():
            layers[name].weight = weight
        ctx.note(f"2:4 sparsity: the sparse kernels did not run this model ({first_line(e, 120)}); the weights stay "
                 "dense")
        return model
    ctx.note(f"2:4 sparsity: {len(dense)} Linear layers run on sparse tensor cores"
             + (f"; {len(failed)} stay dense ({next(iter(failed))}: {next(iter(failed.values()))})" if failed else ""))
    model.workbench_sparse = True
    return model


def densified(model: nn.Module) -> nn.Module:
    """A copy whose semi-structured sparse weights are dense again (what is saved and exported: torch.export and
    ONNX take dense tensors; the zeros, and so the 2:4 pattern, are kept); `model` itself where it has none."""
    from torch.sparse import SparseSemiStructuredTensor

    def sparse(m):
        return [n for n, p in m._parameters.items() if isinstance(p, SparseSemiStructuredTensor)]

    if not any(sparse(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for m in model.modules():
        for name in sparse(m):
            m._parameters[name] = nn.Parameter(m._parameters[name].to_dense(), requires_grad=False)
    return model
