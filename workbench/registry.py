"""The two registries: techniques (keyed by their step's type) and backends (keyed by name), open to plugins.

A technique is one module: its config dataclass (a `Step`) beside its handler, bound here by a decorator.

    @dataclass
    class Scale(Step):
        kind, short, main_field = "scale", "scale", "factor"
        factor: float = option(1.0, low=0, high=10)

    @technique(Scale)
    def scale(model, step, ctx):          # returns the new model; never touches the user's model
        ...

Registering it is all it takes: the recipe parser and short form, `%optimize --scale`, the CLI, the panel's
controls, sweep grids, autotune (when `search=` is given) and chart colours all read this registry.
Plugins register the same way from a package's entry points (groups `workbench.techniques`, `workbench.backends`),
as papermill's engines do.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable

from .errors import DeviceError, RecipeError

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


@dataclass
class Technique:
    """A registered technique: its config (Step subclass), the handler, and optional hooks.

    preflight(steps, facts) -> [str]: what will not pay here (steps: this technique's steps in the recipe, maybe
        none; facts: `workbench.facts.ModelFacts`).
    search(trial, facts) -> [str]: short-form steps autotune tries (an optuna trial suggests the values).
    seeds(facts) -> [dict]: trial parameters autotune starts from (what usually wins).
    applies(facts) -> bool: whether it can apply to this model at all (the panel hides it otherwise).
    suggested(facts) -> bool: whether the panel starts with it ticked.
    graphs: whether it also applies to a model that is already a runtime graph (an `.onnx` file the user has):
        quantization does; pruning, distillation and factorization need the torch model.
    """

    config: type
    apply: Callable
    preflight: Callable | None = None
    search: Callable | None = None
    seeds: Callable | None = None
    applies: Callable | None = None
    suggested: Callable | None = None
    graphs: bool = False

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def colour(self) -> str:
        return getattr(self.config, "colour", None) or PALETTE[zlib.crc32(self.kind.encode()) % len(PALETTE)]


TECHNIQUES: dict[str, Technique] = {}
BACKENDS: dict[str, Any] = {}
_loaded = False


def technique(config: type, *, preflight: Callable | None = None, search: Callable | None = None,
              seeds: Callable | None = None, applies: Callable | None = None, suggested: Callable | None = None,
              graphs: bool = False):
    """Bind `fn(model, step, ctx) -> model` to a step type (a Step dataclass with `kind`, `short`, `main_field`)."""
    for attr in ("kind", "short", "main_field"):
        if not getattr(config, attr, None) and attr != "main_field":
            raise TypeError(f"{config.__name__}.{attr} must be set to register it as a technique")

    def register(fn: Callable) -> Callable:
        known = {t.config.short: k for k, t in TECHNIQUES.items() if k != config.kind}
        if config.short in known:
            raise TypeError(f"short name {config.short!r} of {config.__name__} is taken by {known[config.short]!r}")
        TECHNIQUES[config.kind] = Technique(config, fn, preflight, search, seeds, applies, suggested, graphs)
        return fn

    return register


def register_backend(cls):
    """Class decorator: register an instance of a Backend subclass under its `name`."""
    BACKENDS[cls.name] = cls()
    return cls


def _load() -> None:
    """Built-ins first (their order is the order `auto` prefers), then plugins from entry points."""
    global _loaded
    if _loaded:
        return
    from . import backends, techniques  # noqa: F401  (modules register themselves on import)

    _loaded = True
    import logging
    from importlib.metadata import entry_points

    for group in ("workbench.techniques", "workbench.backends"):
        for ep in entry_points(group=group):
            try:
                ep.load()
            except Exception as e:  # a broken plugin must not break the workbench or the other plugins
                logging.getLogger(__name__).warning("workbench plugin %r (%s) failed to load: %s", ep.name, group, e)


# -- techniques ------------------------------------------------------------------------------------------------
def techniques() -> list[Technique]:
    """Registered techniques, in registration order."""
    _load()
    return list(TECHNIQUES.values())


def step_types() -> dict[str, type]:
    """{kind: Step class} of every registered technique."""
    return {t.kind: t.config for t in techniques()}


def step_class(kind: str) -> type:
    types = step_types()
    cls = types.get(str(kind).lower())
    if cls is None:
        raise RecipeError(f"unknown step type {kind!r}; known steps: {', '.join(types)}")
    return cls


def technique_for(step) -> Technique:
    _load()
    found = TECHNIQUES.get(getattr(step, "kind", None))
    if found is None or found.config is not type(step):
        raise RecipeError(
            f"no technique is registered for step {type(step).__name__!r} yet; available: "
            f"{', '.join(sorted(t.config.__name__ for t in TECHNIQUES.values()))}")
    return found


def colours() -> dict[str, str]:
    """Chart colour per technique short name (what `charts` shows in legends)."""
    return {t.config.short: t.colour for t in techniques()}


# -- backends --------------------------------------------------------------------------------------------------
def backends() -> list:
    _load()
    return list(BACKENDS.values())


def backend_names() -> list[str]:
    return [b.name for b in backends()]


def backend_named(name: str):
    _load()
    if name not in BACKENDS:
        raise DeviceError(f"backend {name!r} is not known; use one of {', '.join(['auto', *BACKENDS])}")
    return BACKENDS[name]


def backends_for(precision: str, target) -> list:
    """Backends that run `precision` on the target, the target's named backend only when it names one."""
    candidates = backends() if target.backend == "auto" else [backend_named(target.backend)]
    return [b for b in candidates if b.available(target) and precision in b.precisions(target)]


def backend_of(model):
    """The backend whose runtime form `model` is (a torch module, an ONNX Runtime session, ...)."""
    for b in backends():
        if b.accepts(model):
            return b
    raise DeviceError(f"no backend runs a {type(model).__name__}; expected a torch module or a model a backend "
                      f"made ({', '.join(backend_names())})")


def backend_for_file(path):
    """The backend that wrote a saved model file (by its name), or None."""
    for b in backends():
        if path.name in b.files:
            return b
    return None
