"""Sweeps: run a grid of recipes against one baseline, fill the Study, return the Pareto chart.

    >>> fig = wb.sweep(model, data, grid={"prune": [0.25, 0.5, 0.75], "quant": [None, "int8"]})
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

from .recipe import Recipe, from_flags

GRID_KEYS = ("prune", "structured", "quant", "factorize", "distill", "epochs", "finetune")


def grid_recipes(grid: dict) -> list[Recipe]:
    """Every combination of the grid's values as a Recipe (combinations with nothing to do are skipped)."""
    from .errors import RecipeError

    unknown = set(grid) - set(GRID_KEYS)
    if unknown:
        raise RecipeError(f"sweep: unknown grid key(s) {', '.join(sorted(unknown))}; use {', '.join(GRID_KEYS)}")
    keys = list(grid)
    values = [v if isinstance(v, (list, tuple)) else [v] for v in grid.values()]
    recipes = []
    for combo in itertools.product(*values):
        flags = {k: v for k, v in zip(keys, combo) if v is not None}
        if not any(k in flags for k in ("prune", "quant", "factorize", "distill", "finetune")):
            continue
        structured = bool(flags.pop("structured", False)) and "prune" in flags
        recipes.append(Recipe.from_dict(from_flags(structured=structured, order=keys, **flags)))
    if not recipes:
        raise RecipeError("sweep: the grid produced no recipe; give e.g. grid={'quant': ['int8']}")
    return recipes


def sweep(model, data, grid: dict, *, on_result: Callable | None = None, progress: Callable | None = None,
          study=None, **optimize_kwargs: Any):
    """Optimize `model` with every recipe of `grid` (one shared baseline), and return the Pareto figure.

    on_result(result) is called as each point finishes (the panel adds it to its live chart); every run lands
    in the Study. Extra keyword arguments go to `wb.optimize` (backend, device, batch_sizes, threads ...).
    """
    from . import dashboards
    from .engine import _study, optimize

    recipes = grid_recipes(grid)
    store = _study(study)
    if store is None:
        from .study import Study

        store = Study()  # the chart needs the runs somewhere
    first_id = None
    earlier = None
    for i, recipe in enumerate(recipes):
        def step_progress(message, fraction=None, i=i):
            if progress:
                progress(f"[{i + 1}/{len(recipes)}] {recipe}: {message}",
                         (i + (fraction or 0)) / len(recipes))

        result = optimize(model, recipe, data=data, study=store, progress=step_progress, baseline=earlier,
                          **optimize_kwargs)
        earlier = earlier or result
        first_id = first_id or result.baseline_id
        if on_result:
            on_result(result)
    df = store.df
    runs = df.loc[df.index >= first_id]
    if progress:
        progress(f"swept {len(recipes)} recipes", 1.0)
    return dashboards.pareto(runs)
