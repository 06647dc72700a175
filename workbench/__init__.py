"""workbench: make PyTorch models smaller and faster, measured honestly, from a notebook.

    >>> import workbench as wb
    >>> model, data = wb.zoo.load("digits-cnn")
    >>> result = wb.optimize(model, "quant=int8", data=data)
    >>> result.table()

`import workbench` stays light: torch, ONNX Runtime and pandas load only when a command needs them.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "optimize": ("engine", "optimize"),
    "compare": ("engine", "compare"),
    "Data": ("data", "Data"),
    "Study": ("study", "Study"),
    "Result": ("result", "Result"),
    "load": ("storage", "load"),
    "OrtModel": ("backends.ort", "OrtModel"),
    "Recipe": ("recipe", "Recipe"),
    "Quantize": ("recipe", "Quantize"),
    "Prune": ("recipe", "Prune"),
    "Distill": ("recipe", "Distill"),
    "Factorize": ("recipe", "Factorize"),
    "FineTune": ("recipe", "FineTune"),
    "Unpad": ("recipe", "Unpad"),
    "WorkbenchError": ("errors", "WorkbenchError"),
    "sensitivity": ("layerwise", "sensitivity"),
    "sweep": ("grid", "sweep"),
    "autotune": ("tuning", "autotune"),
    "preflight": ("checks", "preflight"),
    "dashboards": ("dashboards", None),
    "reports": ("reports", None),
    "report": ("reports", "report"),
    "panel": ("ui.panel", "panel"),
    "LayerMap": ("ui.layer_map", "LayerMap"),
    "zoo": ("zoo", None),
    "measure": ("measure", None),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(f".{module_name}", __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def load_ipython_extension(ipython) -> None:
    """`%load_ext workbench`: registers %optimize, %%recipe, %compare and %profile (idempotent, fast)."""
    from .magics import WorkbenchMagics

    ipython.register_magics(WorkbenchMagics)


def __dir__():
    return sorted(list(globals()) + __all__)
