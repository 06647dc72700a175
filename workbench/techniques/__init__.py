"""Techniques, one module each; each binds a handler to its step type on import."""
from . import distill, factorize, finetune, prune, quantize, unpad  # noqa: F401
