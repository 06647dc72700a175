"""Registries: techniques keyed by step type, backends keyed by name. Adding one is one new module.

    @technique(Quantize)
    def quantize(model, step, ctx): ...   # returns a new model; never touches `model`
"""
from __future__ import annotations

from typing import Callable

from .errors import RecipeError

TECHNIQUES: dict[type, Callable] = {}
BACKENDS: dict[str, object] = {}


def technique(step_type: type):
    """Bind `fn(model, step, ctx) -> model` to a step type."""

    def register(fn: Callable) -> Callable:
        TECHNIQUES[step_type] = fn
        return fn

    return register


def backend(name: str):
    """Register a backend object (with `available(device)` and `compile(model, ctx)`) under `name`."""

    def register(obj):
        BACKENDS[name] = obj
        return obj

    return register


def _load_builtins() -> None:
    from . import backends, techniques  # noqa: F401  (modules register themselves on import)


def technique_for(step) -> Callable:
    _load_builtins()
    fn = TECHNIQUES.get(type(step))
    if fn is None:
        raise RecipeError(
            f"no technique is registered for step {type(step).__name__!r} yet; available: "
            f"{', '.join(t.__name__ for t in TECHNIQUES)}")
    return fn


def backend_named(name: str):
    _load_builtins()
    if name not in BACKENDS:
        raise RecipeError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    return BACKENDS[name]
