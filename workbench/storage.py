"""Saving and loading optimized models so that they reload without the user's code, and safely.

Each backend writes its own form (`Backend.save` / `Backend.load`): ONNX Runtime a `model.onnx`, torch a
`torch.export` program (`model.pt2`: graph and weights, no pickled code) or, only for models torch.export cannot
capture, a pickled `model.pt` that `load` refuses unless `trust_pickle=True` (unpickling can run code).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import WorkbenchError


def save_model(model, example_inputs: Any, directory: Path) -> Path:
    """Write the model into `directory` in its backend's safest format; returns the file written."""
    from .registry import backend_of

    return backend_of(model).save(model, example_inputs, Path(directory))


def load(path, device: str = "cpu", trust_pickle: bool = False):
    """Load a model saved by `Result.save` (its directory) or one model file (.onnx, .pt2, .pt)."""
    from .registry import backend_for_file, backends
    from .target import resolve

    path = Path(path)
    if not path.exists():
        raise WorkbenchError(f"{path} does not exist; give the directory Result.save wrote, or a model file")
    if path.is_dir():
        names = [name for b in backends() for name in b.files]
        found = [path / name for name in names if (path / name).exists()]
        if not found:
            raise WorkbenchError(f"{path} holds no {', '.join(names)}; was it written by Result.save?")
        path = found[0]
    backend = backend_for_file(path) or next((b for b in backends() for f in b.files
                                              if Path(f).suffix == path.suffix), None)
    if backend is None:
        raise WorkbenchError(f"{path.name}: not a model file the workbench knows (expected one of "
                             f"{', '.join(sorted({Path(f).suffix for b in backends() for f in b.files}))})")
    return backend.load(path, resolve(device=device), trust_pickle=trust_pickle)


def load_sparse_state(path) -> dict:
    """The dense state dict from a `weights.sparse.pt` file (weights stored as bitmask + non-zeros)."""
    from .backends.torch_eager.storage import load_sparse_state as load_state

    return load_state(path)
