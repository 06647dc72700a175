"""Techniques, one module each; each binds a handler to its step type on import."""
from . import finetune, prune, quantize  # noqa: F401
