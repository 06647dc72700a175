"""The search layer: many recipes against one baseline. `sweep` runs a grid; `autotune` searches with optuna
within a metric and a time budget (the [search] extra). Both call the engine's `run_many` / `Baseline`."""
from .sweep import grid_recipes, sweep  # noqa: F401


def __getattr__(name: str):  # autotune needs optuna: imported when asked for
    if name in ("autotune", "parse_budget", "Tuned"):
        from . import autotune as module

        return getattr(module, name)
    raise AttributeError(name)
