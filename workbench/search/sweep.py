"""Sweeps: run a grid of recipes against one baseline, fill the Study, and show the Pareto chart.

    >>> swept = wb.sweep(model, data, grid={"prune": [0.25, 0.5, 0.75], "structured": True, "quant": [None, "int8"]})
    >>> swept.figure; swept.results

A grid's keys are the flags of the registered techniques (`workbench.recipe.flag_keys`), so a new technique can
be swept as soon as it is registered.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import RecipeError
from ..recipe import Recipe, flag_keys, from_flags


def grid_recipes(grid: dict) -> list[Recipe]:
    """Every combination of the grid's values as a Recipe (combinations with nothing to do are skipped)."""
    from ..registry import step_types

    if not isinstance(grid, dict) or not grid:
        raise RecipeError("sweep: give the grid as a dict of flags to values, e.g. {'quant': ['int8', 'fp16']}")
    known = flag_keys()
    unknown = set(grid) - set(known)
    if unknown:
        raise RecipeError(f"sweep: unknown grid key(s) {', '.join(sorted(unknown))}; use {', '.join(known)}")
    techniques = {cls.short for cls in step_types().values()}
    keys = list(grid)
    values = [v if isinstance(v, (list, tuple)) else [v] for v in grid.values()]
    recipes = []
    for combo in itertools.product(*values):
        flags = {k: v for k, v in zip(keys, combo) if v is not None}
        if not any(flags.get(k) not in (None, False) for k in techniques):
            continue
        flags = {k: v for k, v in flags.items() if k in techniques or _owner_on(k, flags)}
        recipes.append(Recipe.from_dict(from_flags(order=keys, **flags)))
    if not recipes:
        raise RecipeError("sweep: the grid produced no recipe; give e.g. grid={'quant': ['int8']}")
    return recipes


def _owner_on(key: str, flags: dict) -> bool:
    """An extra flag (e.g. structured) only applies in combinations where its technique is on."""
    from ..recipe import flag_fields

    return flags.get(flag_fields()[key][0].short) not in (None, False)


@dataclass
class Swept:
    """What `sweep` returns: every Result (one shared baseline) and the Study they were recorded in; shows its
    Pareto chart in a notebook."""

    results: list
    study: Any = field(repr=False, default=None)

    @property
    def figure(self):
        from .. import charts

        return charts.pareto(self.results)

    def table(self, numeric: bool = False):
        from ..tables import table

        return table(self.results, numeric)

    def _repr_mimebundle_(self, **kwargs):
        return self.figure._repr_mimebundle_(**kwargs)


def sweep(model, data, grid: dict, *, on_result: Callable | None = None, progress: Callable | None = None,
          study=None, **options: Any) -> Swept:
    """Optimize `model` with every recipe of `grid` against one shared baseline; a `Swept` (results, chart).

    on_result(result) is called as each point finishes (the panel adds it to its live chart); every run lands
    in the Study. Extra keyword arguments go to `wb.run_many` (backend, device, batch_sizes, threads ...).
    """
    from ..engine import run_many
    from ..study import Study

    recipes = grid_recipes(grid)
    store = Study() if study is False else study  # without a study, the runs still need a place for the chart
    results = run_many(model, recipes, data, on_result=on_result, progress=progress, study=store, **options)
    if progress:
        progress(f"swept {len(recipes)} recipes", 1.0)
    return Swept(results, store)
