"""Saving and loading optimized models so that they reload without the user's code, safely and verifiably.

Each backend writes its own form (`Backend.save` / `Backend.load`): ONNX Runtime a `model.onnx`, torch a
`torch.export` program (`model.pt2`: graph and weights, no pickled code), else a checked TorchScript trace
(`model.ts`: recurrent layers, torch.ao int8), or, only for models neither captures, a pickled `model.pt` that `load`
refuses unless `trust_pickle=True` (unpickling can run code); the save says so with a warning and the manifest keeps
the reason. Each keeps the original's call and output structure (`model.json`, see `workbench.contract`).

`Result.save(dir)` writes into a temporary directory beside `dir` and renames it into place once every file is
written, so an interrupted or failed save leaves the previous save (or nothing), never half of one. Its
`manifest.json` records the format version and the SHA-256 and size of every file; `load` checks them and says in one
line what is wrong (missing, truncated, changed, from a newer version) and what to do.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from .errors import PickleFallback, WorkbenchError, first_line
from .paths import check_parents, disk_error, fsync_directory, readable, replace_directory

FORMAT = 1
MANIFEST = "manifest.json"
OLD_SAVE = ("model.onnx", "model.json", "model.pt2", "model.pt", "weights.sparse.pt", "recipe.yaml", "result.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(model, example_inputs: Any, directory: Path) -> Path:
    """Write the model into `directory` in its backend's safest format; returns the file written."""
    from .registry import backend_of

    return backend_of(model).save(model, example_inputs, Path(directory))


def export_deployable(backend, model, example_inputs: Any, path=None) -> Path:
    """The deployable file for `model` at `path` (a file, or a directory to write `model<suffix>` in), checked: it
    is loaded back with its runtime alone and must match the model on the example inputs, or it is removed."""
    from .errors import ExportError

    suffix = backend.deploy_suffix
    if not suffix:
        raise ExportError(f"the {backend.title or backend.name} backend has no deployable file format")
    folder = Path.cwd() if path is None else Path(path) if Path(path).is_dir() else None
    if folder is not None:  # no file named: the backend's own kind, else the next it writes
        errors = []
        for kind in (suffix, *backend.also_exports):
            try:
                return export_deployable(backend, model, example_inputs, folder / f"model{kind}")
            except ExportError as e:
                errors.append(e)
        raise errors[0]
    path = Path(path)
    if path.suffix not in (suffix, *backend.also_exports):
        kinds = " or ".join((suffix, *backend.also_exports))
        raise ExportError(f"a {backend.title or backend.name} model exports to a {kinds} file; name it like "
                          f"{path.with_suffix(suffix).name}")
    check_parents(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        backend.export(model, example_inputs, path)
        check_deployable(model, example_inputs, path)
    except OSError as e:
        raise disk_error(e, path) from e
    except Exception:
        path.unlink(missing_ok=True)
        raise
    return path


def check_deployable(model, example_inputs: Any, path: Path) -> None:
    """Load the exported file with its runtime alone and compare its first output with the model's."""
    import torch

    from .contract import cache_free, values_of
    from .decoding import empty_past, graph_past
    from .errors import ExportError
    from .tensors import call_model, flatten_output, map_tensors

    inputs = map_tensors(example_inputs, lambda t: t.cpu())
    if isinstance(model, torch.nn.Module):  # a model on a GPU is compared on CPU inputs too, as the file runs
        from .target import of_model
        from .wrappers import FollowsInputs

        model = FollowsInputs(cache_free(model), of_model(model).device)
    with torch.inference_mode():
        expected = flatten_output(call_model(model, inputs))[0][0].float()
        values = values_of(inputs)
        if path.suffix == ".onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            names = [i.name for i in session.get_inputs()]
            layout_names = getattr(model, "input_names", names)
            feed = {n: v.numpy() for n, v in zip(layout_names, values) if n in names}
            feed.update(empty_past(graph_past(session.get_inputs()), values[0].shape[0]))  # a decoder's: empty
            got = torch.from_numpy(session.run(None, feed)[0]).float()
        elif path.suffix == ".xml":  # OpenVINO IR, its .bin beside it; computed in f32 as it was measured
            import openvino as ov

            compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            names = [n for port in compiled.inputs for n in port.get_names()]
            feed = {n: v.numpy() for n, v in zip(getattr(model, "input_names", names), values) if n in names}
            got = torch.from_numpy(compiled(feed)[compiled.outputs[0]].copy()).float()
        elif path.suffix == ".ts":
            got = torch.jit.load(str(path))(*values)[0].float()
        else:
            got = torch.export.load(str(path)).module()(*values)[0].float()
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * max(
            1.0, float(expected.abs().max()))):
        raise ExportError(f"the exported {path.suffix} file does not reproduce the model's outputs on the example "
                          "inputs, so it was not kept")


def save_result(result, path) -> Path:
    """Write `result`'s model, recipe.yaml, result.json and manifest.json into directory `path`, atomically."""
    from . import __version__

    final = Path(path).expanduser()
    if final.is_symlink():  # save where the link points, and keep the link
        final = final.resolve()
    check_parents(final)
    if final.exists() and not final.is_dir():
        raise WorkbenchError(f"{final} exists and is not a directory; give a directory to save into")
    if final.is_dir() and os.path.ismount(final):
        raise WorkbenchError(f"{final} is a mount point, which a save cannot replace whole; save into a directory "
                             "inside it")
    _refuse_others_files(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{final.name}.saving-", dir=final.parent))
        readable(staged, directory=True)
    except OSError as e:
        raise WorkbenchError(disk_error(final, e)) from None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model_file = save_model(result.model, result.example_inputs, staged)
        pickled = model_file.suffix == ".pt"
        (staged / "recipe.yaml").write_text(result.recipe.to_yaml())
        (staged / "result.json").write_text(json.dumps(
            {"model_file": model_file.name, "measurement": result.measurement.to_row(),
             "baseline": result.baseline.to_row(), "notes": result.notes, "backend": result.backend,
             "env": result.env}, indent=2, default=str))
        files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(staged.iterdir())}
        manifest = {"format": FORMAT, "workbench": __version__, "created": time.time(), "model_file": model_file.name,
                    "backend": result.backend, "pickle": pickled, "files": files}
        if pickled:
            manifest["pickle_reason"] = next((str(w.message) for w in caught if issubclass(w.category, PickleFallback)),
                                             "torch.export could not capture it")
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2))
        for p in staged.iterdir():  # on disk before the rename makes the save visible
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_directory(staged)
        replace_directory(staged, final)
    except OSError as e:
        shutil.rmtree(staged, ignore_errors=True)
        raise WorkbenchError(disk_error(final, e)) from None
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if pickled:
        warnings.warn(f"{final / model_file.name} is a pickle: {manifest['pickle_reason']}; loading it will need "
                      "wb.load(path, trust_pickle=True)", PickleFallback, stacklevel=3)
    return final


def _refuse_others_files(final: Path) -> None:
    """A save replaces a previous save whole, and nothing else: a directory holding files the previous save did
    not write (or that no save wrote) is refused, so nothing of the user's is deleted."""
    if not final.is_dir():
        return
    present = {p.name for p in final.iterdir()}
    if not present:
        return
    manifest = final / MANIFEST
    try:
        ours = set(json.loads(manifest.read_text())["files"]) | {MANIFEST} if manifest.exists() else set(OLD_SAVE)
    except (OSError, ValueError, KeyError, TypeError):
        ours = set()
    others = sorted(present - ours)
    if others or not (manifest.exists() or "result.json" in present):
        raise WorkbenchError(f"{final} holds files a save did not write ({', '.join(others[:3]) or 'its own'}"
                             f"{' ...' if len(others) > 3 else ''}); give a new directory, or move them (the "
                             "workbench never overwrites files it did not write)")


def _check_entry(directory: Path, name, expected) -> Path:
    """A manifest's file entry, checked to name a plain file inside `directory`."""
    if not isinstance(name, str) or name in ("", ".", "..") or name != Path(name).name or "\\" in name:
        raise ValueError(f"the manifest names {name!r}, not a file of the save")
    if not isinstance(expected, dict) or not isinstance(expected.get("bytes"), int) or \
            not isinstance(expected.get("sha256"), str):
        raise ValueError(f"the manifest's entry for {name} is not a size and a SHA-256")
    return directory / name


def check_manifest(directory: Path) -> dict | None:
    """Check a saved directory against its manifest; the manifest, or None for a save without one (version 0.1).
    Raises one clear WorkbenchError for a missing, truncated or changed file, or a save from a newer version."""
    path = directory / MANIFEST
    if not path.exists():
        leftover = sorted(directory.parent.glob(f".{directory.name}.old-*"))
        if leftover and not any(directory.iterdir()):
            raise WorkbenchError(f"{directory} is empty and an interrupted save left the previous one in "
                                 f"{leftover[0]}; rename that back to {directory.name}")
        return None
    try:
        manifest = json.loads(path.read_text())
        version = manifest["format"]
        if isinstance(version, int) and version > FORMAT:
            raise WorkbenchError(f"{directory} was saved by workbench {manifest.get('workbench', '?')} in format "
                                 f"{version}, newer than this workbench reads ({FORMAT}); upgrade: "
                                 "pip install -U workbench")
        files, model_file = manifest["files"], manifest["model_file"]
        if not isinstance(version, int) or not isinstance(files, dict) or not files or model_file not in files:
            raise ValueError("the manifest lists no files, or not the model file")
        entries = {name: (_check_entry(directory, name, expected), expected) for name, expected in files.items()}
    except WorkbenchError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f" ({e})" if isinstance(e, ValueError) and "manifest" in str(e) else ""
        raise WorkbenchError(f"{path} is damaged (not the manifest Result.save writes){why}; save the model "
                             "again") from None
    for name, (file, expected) in entries.items():
        if not file.exists():
            raise WorkbenchError(f"{file} is missing (the manifest lists it): the save is incomplete or was moved "
                                 "in parts; save the model again, or copy the whole directory")
        if file.is_symlink() or not file.is_file():
            raise WorkbenchError(f"{file} is not a plain file of the save; save the model again")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise WorkbenchError(f"{file} is {'truncated' if size < expected['bytes'] else 'longer than saved'} "
                                 f"({size:,} bytes, {expected['bytes']:,} saved): the copy is incomplete or damaged; "
                                 "copy it again or save the model again")
        if _sha256(file) != expected["sha256"]:
            raise WorkbenchError(f"{file} has changed since it was saved (its SHA-256 differs from the manifest's): "
                                 "its weights may not be what was measured; save the model again, or pass "
                                 "verify=False if you changed it on purpose")
    return manifest


def load(path, device: str = "cpu", trust_pickle: bool = False, verify: bool = True):
    """Load a model saved by `Result.save` (its directory, checked against its manifest unless `verify=False`) or
    one model file (.onnx, .pt2, .pt)."""
    from .registry import backend_for_file, backends
    from .target import resolve

    path = Path(path).expanduser()
    if not path.exists():
        raise WorkbenchError(f"{path} does not exist; give the directory Result.save wrote, or a model file")
    if path.is_dir():
        manifest = check_manifest(path) if verify else None
        names = [name for b in backends() for name in b.files]
        found = [path / manifest["model_file"]] if manifest else [path / n for n in names if (path / n).exists()]
        if not found:
            raise WorkbenchError(f"{path} holds no {', '.join(names)}; was it written by Result.save?")
        path = found[0]
    backend = backend_for_file(path) or next((b for b in backends() for f in b.files
                                              if Path(f).suffix == path.suffix), None)
    if backend is None:
        raise WorkbenchError(f"{path.name}: not a model file the workbench knows (expected one of "
                             f"{', '.join(sorted({Path(f).suffix for b in backends() for f in b.files}))})")
    if path.stat().st_size == 0:
        raise WorkbenchError(f"{path} is empty: the save did not finish; save the model again")
    try:
        return backend.load(path, resolve(device=device), trust_pickle=trust_pickle)
    except WorkbenchError:
        raise
    except Exception as e:
        first = first_line(e, 200)
        raise WorkbenchError(f"{path} could not be read as a {backend.title} model ({first}); the file is damaged "
                             "or not a model: save the model again") from None


def load_sparse_state(path) -> dict:
    """The dense state dict from a `weights.sparse.pt` file (weights stored as bitmask + non-zeros)."""
    from .backends.torch_eager.storage import load_sparse_state as load_state

    return load_state(path)
