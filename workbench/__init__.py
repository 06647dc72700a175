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
    # the engine
    "optimize": ("engine", "optimize"),
    "run_many": ("engine", "run_many"),
    "compare": ("engine", "compare"),
    "Baseline": ("engine", "Baseline"),
    "Data": ("data", "Data"),
    "Study": ("study", "Study"),
    "Result": ("result", "Result"),
    "table": ("tables", "table"),
    "load": ("storage", "load"),
    "Recipe": ("recipe", "Recipe"),
    "Step": ("recipe", "Step"),
    "option": ("recipe", "option"),
    "technique": ("registry", "technique"),
    "Quantize": ("techniques.quantize", "Quantize"),
    "Prune": ("techniques.prune", "Prune"),
    "Distill": ("techniques.distill", "Distill"),
    "Factorize": ("techniques.factorize", "Factorize"),
    "FineTune": ("techniques.finetune", "FineTune"),
    "Unpad": ("techniques.unpad", "Unpad"),
    "OrtModel": ("backends.onnxruntime.session", "OrtModel"),
    "WorkbenchError": ("errors", "WorkbenchError"),
    "sensitivity": ("measure.sensitivity", "sensitivity"),
    "preflight": ("checks", "preflight"),
    "zoo": ("zoo", None),
    "load_model": ("zoo", "load_model"),
    "measure": ("measure", None),
    # the search layer (optuna for autotune: the [search] extra)
    "sweep": ("search.sweep", "sweep"),
    "autotune": ("search.autotune", "autotune"),
    # the faces
    "charts": ("charts", None),
    "dashboards": ("charts", None),  # the name of 0.1
    "reports": ("reports", None),
    "report": ("reports", "report"),
    "panel": ("notebook.panel", "panel"),
    "LayerMap": ("notebook.layer_map", "LayerMap"),
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
    from .notebook import load_ipython_extension as load

    load(ipython)


def __dir__():
    return sorted(list(globals()) + __all__)
