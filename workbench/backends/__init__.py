"""Backends: what runs a model. Each is one package with one object implementing `Backend`, registered on import.

The engine and the techniques never ask which backend they have: they ask the registry for one that runs a
precision on the target (`registry.backends_for`), and the model's own backend for its size, its saved form, and
so on (`registry.backend_of`).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar

from ..tensors import call_model


class Backend:
    """The interface every backend implements.

    name: registry key (`backend=` in the API, `--backend` on the command line).
    files: the file names its saved models use (`storage.load` picks the backend by them).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    files: ClassVar[tuple] = ()

    def available(self, target) -> bool:
        """Whether it can run on the target's device on this machine."""
        raise NotImplementedError

    def precisions(self, target) -> tuple:
        """What `lower` can produce on the target: 'fp32', 'fp16', 'bf16', 'int8-dynamic', 'int8-static'."""
        raise NotImplementedError

    def accepts(self, model: Any) -> bool:
        """Whether `model` is this backend's runtime form."""
        raise NotImplementedError

    def lower(self, model, precision: str, ctx, **options) -> Any:
        """The torch `model` in this backend's runtime form at `precision` (a new object; `model` is not changed).
        ctx: the engine's Context (target, data for calibration, notes)."""
        raise NotImplementedError

    def place(self, model, target) -> Any:
        """A fresh instance of `model` ready to run on the target (a copy, a new session), the caller's object
        unchanged: timing spreads its rounds over several instances."""
        return model

    def run(self, model, inputs) -> Any:
        """Outputs for a batch of inputs (a tensor, tuple or dict), like the torch model's."""
        return call_model(model, inputs)

    def label_of(self, model) -> str:
        """What the result card calls this runtime form, e.g. 'onnxruntime-int8-dynamic'."""
        return self.name

    def size_bytes(self, model) -> int:
        raise NotImplementedError

    def sparse_size_bytes(self, model) -> int | None:
        return None

    def count_params(self, model) -> tuple[int, int]:
        raise NotImplementedError

    def save(self, model, example_inputs, directory: Path) -> Path:
        """Write the model into `directory`; returns the file written (one of `files`)."""
        raise NotImplementedError

    def load(self, path: Path, target, trust_pickle: bool = False) -> Any:
        raise NotImplementedError

    calibrates_int8: ClassVar[bool] = False  # its int8 smooths and corrects itself (the workbench's is skipped)
    deploy_suffix: ClassVar[str] = ""  # the deployable file's kind; `also_exports` lists others it writes
    also_exports: ClassVar[tuple] = ()

    def export(self, model, example_inputs, path: Path) -> Path:
        """Write the one file a deployment needs (no workbench to load it) at `path`; returns it."""
        raise NotImplementedError

    def usage(self, model, path: Path, input_names: list[str]) -> list[str]:
        """The lines of Python that load the exported file and run it, without the workbench."""
        return []

    def versions(self) -> dict:
        """Library versions for the environment record."""
        return {}


def check_parity(runtime, model, example_inputs, what: str, instead: str, rtol: float = 1e-3) -> float:
    """Max abs difference between a backend's `runtime` model and the torch `model` on `example_inputs` (the
    runtime fed CPU tensors); an ExportError naming `what` disagrees and `instead` (e.g. "backend='torch'") when
    the shapes differ or the difference passes `rtol` of the largest output."""
    import torch

    from ..contract import cache_free
    from ..errors import ExportError
    from ..tensors import first_tensor, map_tensors, tensors_in

    with torch.inference_mode():
        expected = first_tensor(call_model(cache_free(model), example_inputs)).float().cpu()
    got = first_tensor(call_model(runtime, map_tensors(example_inputs, lambda t: t.cpu()))).float()
    if got.shape != expected.shape:
        raise ExportError(f"{what} returns shape {tuple(got.shape)}, torch returns {tuple(expected.shape)}")
    diff = (got - expected).abs().max().item()
    if diff > rtol * max(1.0, expected.abs().max().item()):
        shapes = [tuple(t.shape) for t in tensors_in(example_inputs)]
        raise ExportError(f"{what} disagrees with the torch model (max abs diff {diff:.3g} on inputs shaped "
                          f"{shapes[0] if shapes else '()'}); use {instead} for this model")
    return diff


def installed_versions(*distributions: str) -> dict:
    """{distribution: its installed version, or None}, read from the package metadata without importing it: an
    environment record only names versions, and importing nncf or transformers for that took seconds."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in distributions:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def optional(module: str):
    """The named module where it is installed, else None: a backend imports its runtime only when it is used."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _load_builtins() -> None:
    # registration order is the order `backend="auto"` prefers for a precision both run: OpenVINO last, so it
    # runs a model when asked for by name (backend="openvino") or chosen by autotune's search
    from . import onnxruntime, torch_eager  # noqa: F401
    from . import openvino  # noqa: F401


_load_builtins()
