"""Pre-flight checks: "will this be faster here?", from facts about the machine and the model, before any work.

    >>> wb.preflight(model, "prune=0.5,quant=int8-dynamic", data)
    ['unstructured sparsity: dense runtimes skip no work for zeros ...', ...]

Each technique contributes the lines about its own steps (its `preflight` hook); each line names the fact it comes
from (CPU flags, the model's MACs by operator, the data's padding, the recipe) and what to expect.
"""
from __future__ import annotations

from typing import Any

TINY_MACS = 200_000  # per sample: below this, call overhead dominates and few optimizations show in latency


def preflight_lines(recipe, facts) -> list[str]:
    """The warnings for `recipe` given `facts` (a `workbench.facts.ModelFacts`); empty when nothing stands out."""
    from .registry import techniques

    lines = []
    for tech in techniques():
        if tech.preflight is not None:
            lines += tech.preflight([s for s in recipe.steps if s.kind == tech.kind], facts)
    if facts.macs is not None and facts.macs < TINY_MACS and recipe.steps:
        lines.append(f"tiny model ({facts.macs:,} MACs per sample): per-call overhead dominates at batch 1, so "
                     "latency gains show mostly at larger batches")
    return lines


def preflight(model: Any, recipe: Any, data: Any = None, device: str | None = None) -> list[str]:
    """Warnings about what will not pay on this machine for this model and recipe (empty when nothing stands out).

    device: where it would run (default: where the model's parameters are).
    """
    from .data import Data
    from .facts import ModelFacts
    from .recipe import Recipe
    from .target import of_model, resolve

    target = resolve(device=device) if device else of_model(model)
    return preflight_lines(Recipe.parse(recipe), ModelFacts(model, Data.coerce(data) if data is not None else None,
                                                            target))
