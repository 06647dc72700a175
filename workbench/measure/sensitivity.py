"""Per-layer sensitivity: how much the metric drops when only one layer is pruned (to each level) or quantized.

    >>> df = wb.sensitivity(model, data, technique="prune", levels=[0.25, 0.5, 0.75])
    >>> df.pivot(index="layer", columns="level", values="delta")     # what a heatmap shows

A measurement (of the metric, layer by layer), so it lives here: `Prune(per_layer="sensitivity")` uses it to prune
less where the model is fragile, and techniques may not depend on the search layer above them.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

from ..data import Data


def fake_int8(weight):
    """Per-output-channel symmetric int8 round trip of a weight tensor (what int8 weights cost in accuracy)."""
    import torch

    flat = weight.reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return (torch.round(flat / scale).clamp(-127, 127) * scale).reshape(weight.shape)


def _prune_one(layer, level: float, structured: bool) -> None:
    """Zero the `level` share of one layer's weights (unstructured) or of its output channels (structured)."""
    from torch.nn.utils import prune

    if structured:
        prune.ln_structured(layer, "weight", amount=level, n=1, dim=0)
    else:
        prune.l1_unstructured(layer, "weight", amount=level)
    prune.remove(layer, "weight")


def sensitivity(model, data: Data, technique: str = "prune", levels=(0.25, 0.5, 0.75), structured: bool = False,
                layers=None, device: str = "auto", progress: Callable | None = None, reference: Any = None,
                target=None):
    """DataFrame (layer, type, level, metric, delta, params, macs_share): one row per layer and level.

    technique="prune": only that layer is pruned to each level (zeroed weights, or zeroed output channels with
    structured=True, which predicts what removing them costs). technique="quant": only that layer's weights are
    rounded to int8 per channel (level "int8"). The user's model is not changed.
    """
    import pandas as pd
    import torch

    from ..architectures import head_layer, prunable_layers
    from ..errors import RecipeError
    from ..target import resolve
    from .counts import count_macs, macs_by_layer

    target = target or resolve(device=device)
    if technique not in ("prune", "quant"):
        raise RecipeError(f"sensitivity: technique {technique!r} is not known; use 'prune' or 'quant'")
    data = Data.coerce(data)
    work = copy.deepcopy(model).eval().to(target.device)
    reference = reference if reference is not None else work
    candidates = prunable_layers(work)
    if layers is not None:
        missing = [n for n in layers if n not in candidates]
        if missing:
            raise RecipeError(f"sensitivity: no Linear/Conv layer named {', '.join(map(repr, missing))}")
        candidates = {n: candidates[n] for n in layers}
    if technique == "prune":
        bad = [lv for lv in levels if not 0 < lv < 1]
        if bad:
            raise RecipeError(f"sensitivity: prune levels must be in (0, 1), got {bad}")
    levels = list(levels) if technique == "prune" else ["int8"]
    base = data.evaluate(work, target, reference=reference)
    one = target.move(data.inputs(1))
    total_macs = count_macs(work, one) or 1
    macs = macs_by_layer(work, one)
    head = head_layer(work)
    rows = []
    total = len(candidates) * len(levels)
    for i, (name, layer) in enumerate(candidates.items()):
        saved = layer.weight.detach().clone()
        for j, level in enumerate(levels):
            if progress:
                progress(f"sensitivity: {name} at {level}", (i * len(levels) + j) / total)
            with torch.no_grad():
                if technique == "quant":
                    layer.weight.copy_(fake_int8(layer.weight))
                else:
                    _prune_one(layer, level, structured)
            metric = data.evaluate(work, target, reference=reference)
            with torch.no_grad():
                layer.weight.copy_(saved)
            rows.append({"layer": name, "type": type(layer).__name__, "level": level, "metric": metric,
                         "delta": metric - base, "params": layer.weight.numel(),
                         "macs_share": macs.get(name, 0) / total_macs, "head": name == head})
    return pd.DataFrame(rows)


def allocate_ratios(model, data: Data, step, target, reference: Any = None, ignored=()) -> dict:
    """Per-layer pruning ratios averaging `step.sparsity`, lower where pruning that layer alone hurts more
    (`ignored`: layers left out)."""
    df = sensitivity(model, data, "prune", levels=[step.sparsity], structured=step.structured, target=target,
                     reference=reference)
    df = df[~df["layer"].isin(list(ignored))]
    if df.empty:
        return {}
    harm = (-df["delta"]).clip(lower=0).to_numpy()
    ratios = _spread(step.sparsity, harm)
    return dict(zip(df["layer"], ratios.round(3)))


def _spread(target: float, harm, swing: float = 0.5, cap: float = 0.95):
    """Per-layer ratios whose mean is `target`: up to ±`swing`·target, less where `harm` is higher."""
    import numpy as np

    span = harm.max() - harm.min()
    if span <= 0:
        return np.full(len(harm), target)
    ratios = target * (1 + swing * (harm.mean() - harm) / span)
    for _ in range(10):  # clip to [0, cap] and hand what was clipped to the layers that still have room
        ratios = ratios.clip(0, cap)
        missing = target * len(ratios) - ratios.sum()
        room = (ratios < cap) & (ratios > 0)
        if abs(missing) < 1e-9 or not room.any():
            break
        ratios[room] += missing / room.sum()
    return ratios
