"""Backends that run a model: torch eager and ONNX Runtime. Each registers itself on import."""
from . import ort, torch_eager  # noqa: F401
