"""What a torch model is, counted: parameters, non-zeros, serialized and compressed size, MACs, per-layer tables.

Counted, not estimated: MACs come from `torch.utils.flop_counter` on a real forward pass.
"""
from __future__ import annotations

import contextlib
import io
import sys
from typing import Any

from ..tensors import call_model


def _plain(t) -> bool:
    """A tensor of torch's own (not a tensor subclass such as torchao's quantized weights, which count as dense)."""
    import torch

    return type(t) in (torch.Tensor, torch.nn.Parameter) or getattr(t, "is_quantized", False)


def count_params(model: Any) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a torch module, packed int8 weights included."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(p.count_nonzero()) if _plain(p) else p.numel()
    for mod in model.modules():  # packed weights of dynamically quantized layers are not parameters
        if hasattr(mod, "weight") and callable(mod.weight) and hasattr(mod, "_packed_params"):
            w = mod.weight()
            total += w.numel()
            nonzero += int(w.int_repr().count_nonzero()) if w.is_quantized else int(w.count_nonzero())
    return total, nonzero


def serialized_size(model: Any) -> int:
    """Bytes of `torch.save(model.state_dict())`."""
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def sparse_size(model: Any) -> int | None:
    """Bytes of the weights stored compressed: a tensor that is mostly zeros as a bitmask (1 bit per entry) plus
    its non-zero values, every other tensor dense. None where it does not apply (packed int8 weights)."""
    import torch

    total = 0
    for t in model.state_dict().values():
        if not isinstance(t, torch.Tensor) or t.is_quantized or not _plain(t):
            return None  # packed int8 layers (torch.ao, torchao): already compressed another way
        dense = t.numel() * t.element_size()
        packed = (t.numel() + 7) // 8 + int(t.count_nonzero()) * t.element_size() if t.is_floating_point() else dense
        total += min(dense, packed)
    return total


def layer_table(model: Any):
    """Per layer with weights: type, shape, parameters, non-zeros and sparsity (real zeros, as stored)."""
    import pandas as pd
    import torch

    rows = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if name and isinstance(w, torch.Tensor) and w.dim() > 1:
            nz = int(w.count_nonzero()) if _plain(w) else w.numel()
            rows.append({"layer": name, "type": type(m).__name__, "shape": tuple(w.shape), "params": w.numel(),
                         "nonzero": nz, "sparsity": 1 - nz / w.numel()})
    return pd.DataFrame(rows, columns=["layer", "type", "shape", "params", "nonzero", "sparsity"]).set_index("layer")


def _flop_counts(model: Any, inputs: Any):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # a compiled model (workbench's compile step, or a user's torch.compile) runs eager here: compiled under the
    # counter's dispatch mode and hooks, dynamo would give up on its frame and run it uncompiled from then on.
    # Without dynamo imported nothing is compiled, and importing it costs 1.5 s a process: only where it is loaded
    stance = getattr(torch.compiler, "set_stance", None)  # torch 2.6+
    eager = stance("force_eager") if stance and "torch._dynamo" in sys.modules else contextlib.nullcontext()
    with counter, torch.inference_mode(), eager:
        call_model(model, inputs)
    return counter


def count_macs(model: Any, inputs: Any) -> int | None:
    """Multiply-accumulates of one forward pass (FLOPs / 2); None where the model cannot be counted."""
    try:
        return int(_flop_counts(model, inputs).get_total_flops() // 2)
    except Exception:
        return None


def macs_by_op(model: Any, inputs: Any) -> dict[str, int]:
    """MACs of one forward pass per aten operator (e.g. {'convolution': ..., 'addmm': ...})."""
    totals = _flop_counts(model, inputs).get_flop_counts().get("Global", {})
    return {getattr(op, "__name__", str(op).split(".")[-1]): int(n // 2) for op, n in totals.items()}


def macs_by_layer(model: Any, inputs: Any) -> dict[str, int]:
    """MACs of one forward pass per named submodule (leaf and parent names, as named_modules gives them)."""
    counts = _flop_counts(model, inputs).get_flop_counts()
    prefix = type(model).__name__ + "."
    return {k[len(prefix):]: int(sum(v.values()) // 2) for k, v in counts.items() if k.startswith(prefix)}


def conv_share(by_op: dict[str, int]) -> float:
    """Share of the MACs spent in convolutions (0..1), from `macs_by_op`."""
    total = sum(by_op.values())
    return sum(v for k, v in by_op.items() if "conv" in k) / total if total else 0.0
