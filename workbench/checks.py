"""Pre-flight: "will this be faster here?", from facts about the machine and the model, before any search time.

    >>> wb.preflight(model, "prune=0.5,quant=int8-dynamic", data)
    ['unstructured sparsity: dense runtimes skip no work for zeros ...', ...]

Each line names the fact it comes from (CPU flags, the model's MACs by operator, the recipe) and what to expect.
"""
from __future__ import annotations

from typing import Any

TINY_MACS = 200_000  # per sample: below this, call overhead dominates and few optimizations show in latency


def preflight(model: Any, recipe: Any, data: Any = None, device: str = "cpu") -> list[str]:
    """Warnings about what will not pay on this machine for this model and recipe (empty when nothing stands out)."""
    from .data import Data, map_tensors
    from .measure import count_macs, cpu_info, macs_by_op
    from .recipe import Prune, Quantize, Recipe, Unpad
    from .techniques.unpad import padding_share, supported

    recipe = Recipe.parse(recipe)
    flags = set(cpu_info()["cpu_flags"].split())
    on_cuda = str(device).startswith("cuda")
    warnings = []
    macs, conv_share = None, 0.0
    if data is not None:
        try:
            data = Data.coerce(data)
            one = map_tensors(data.inputs(1), lambda t: t.to("cpu"))
            by_op = macs_by_op(model, one)
            macs = sum(by_op.values()) or count_macs(model, one)
            conv_share = sum(v for k, v in by_op.items() if "conv" in k) / macs if macs else 0.0
        except Exception:
            macs = None
    for step in recipe.steps:
        if isinstance(step, Prune) and not step.structured:
            warnings.append("unstructured sparsity: dense runtimes (torch eager, ONNX Runtime) skip no work for "
                            "zeros, so expect a smaller compressed size and no speedup; structured=True removes "
                            "whole channels")
        if isinstance(step, Quantize):
            int8 = step.dtype in ("int8", "auto") and not on_cuda
            if int8 and not ({"avx512_vnni", "avx_vnni", "amx_int8"} & flags):
                cpu = f"{cpu_info()['cpu']}: {' '.join(sorted(flags)) or 'no flags'}"
                warnings.append(f"int8 on a CPU without VNNI ({cpu}): "
                                "int8 matrix products take AVX2's u8 x s8 path with 7-bit weights, short of the 4x "
                                "int8 ceiling; how much is left depends on the model, so measure it")
            if int8 and step.method == "dynamic" and conv_share > 0.5:
                warnings.append(f"dynamic int8 of convolutions ({conv_share:.0%} of the MACs): ONNX Runtime runs "
                                "them as ConvInteger, often slower than fp32; static int8 is the one that pays")
            if step.dtype in ("fp16", "bf16") and not on_cuda:
                native = "avx512_bf16" in flags or "amx_tile" in flags
                if step.dtype == "fp16" or not native:
                    warnings.append(f"{step.dtype} on this CPU has no native matrix units: expect it slower than "
                                    "fp32 (it halves the size)")
    padding = padding_share(data) if data is not None and supported(model) else None
    unpad = any(isinstance(step, Unpad) for step in recipe.steps)
    if padding is not None and padding > 0.2 and not unpad:
        warnings.append(f"padding: {padding:.0%} of the validation inputs' token slots are padding, which the "
                        "encoder's dense layers compute like real tokens; add unpad (--unpad) to skip them")
    if padding is not None and padding < 0.05 and unpad:
        warnings.append(f"padding: only {padding:.0%} of the token slots are padding, so unpad has little to skip")
    if macs is not None and macs < TINY_MACS and recipe.steps:
        warnings.append(f"tiny model ({macs:,} MACs per sample): per-call overhead dominates at batch 1, so "
                        "latency gains show mostly at larger batches")
    return warnings
