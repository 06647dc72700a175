"""Saves you can trust: a manifest checked on load, atomic saves, one clear line for every damaged file."""
import json
import os
import warnings

import pytest
import torch

import workbench as wb
from workbench.errors import PickleFallback, WorkbenchError
from workbench.storage import FORMAT, MANIFEST

from .helpers import FAST


@pytest.fixture(scope="module")
def saved(tmp_path_factory, builtins):
    """A saved ONNX Runtime result and a saved torch.export result, written once for the module."""
    model, data = builtins["digits-mlp"]
    root = tmp_path_factory.mktemp("saves")
    onnx = wb.optimize(model, "quant=int8", data=data, **FAST).save(root / "onnx")
    pt2 = wb.optimize(model, "quant=fp16", data=data, **FAST).save(root / "pt2")
    return {"onnx": onnx, "pt2": pt2, "data": data}


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_save_carries_a_manifest_of_every_file(saved):
    manifest = json.loads((saved["onnx"] / MANIFEST).read_text())
    assert manifest["format"] == FORMAT and manifest["model_file"] == "model.onnx" and not manifest["pickle"]
    assert set(manifest["files"]) == {"model.onnx", "model.json", "recipe.yaml", "result.json"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in manifest["files"].values())
    x = saved["data"].inputs(3)
    assert wb.load(saved["onnx"])(x).shape == (3, 10) and wb.load(saved["pt2"])(x).shape == (3, 10)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.onnx").unlink(), r"model.onnx is missing \(the manifest lists it\)"),
    (lambda d: (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:1000]), r"model.onnx is truncated"),
    (lambda d: (d / "model.onnx").write_bytes(bytes(reversed((d / "model.onnx").read_bytes()))),
     r"model.onnx has changed since it was saved"),
    (lambda d: (d / MANIFEST).write_text(json.dumps({**json.loads((d / MANIFEST).read_text()), "format": 99,
                                                     "workbench": "9.0"})),
     r"saved by workbench 9.0 in format 99, newer than this workbench reads .*pip install -U workbench"),
    (lambda d: (d / MANIFEST).write_text("{not json"), r"manifest.json is damaged"),
])
def test_a_damaged_save_is_one_clear_line(saved, tmp_path, damage, message):
    directory = _copy(saved["onnx"], tmp_path / "copy")
    damage(directory)
    with pytest.raises(WorkbenchError, match=message):
        wb.load(directory)


def test_flipped_bytes_in_the_weights_are_caught(saved, tmp_path):
    directory = _copy(saved["onnx"], tmp_path / "copy")
    data = bytearray((directory / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the model would load and run with other outputs
    (directory / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(WorkbenchError, match="has changed since it was saved"):
        wb.load(directory)


def test_verify_false_loads_a_save_changed_on_purpose(saved, tmp_path):
    directory = _copy(saved["onnx"], tmp_path / "copy")
    sidecar = json.loads((directory / "model.json").read_text())
    (directory / "model.json").write_text(json.dumps({**sidecar, "label": "renamed by hand"}))
    with pytest.raises(WorkbenchError, match="model.json is longer than saved"):
        wb.load(directory)
    model = wb.load(directory, verify=False)
    assert model.label == "renamed by hand" and model(saved["data"].inputs(2)).shape == (2, 10)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["files"].update({"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}),
     r"names '../../etc/passwd', not a file of the save"),
    (lambda m: m["files"].update({"/dev/zero": {"sha256": "0" * 64, "bytes": 0}}), r"names '/dev/zero'"),
    (lambda m: m.update(model_file="/tmp/evil.pt"), r"lists no files, or not the model file"),
    (lambda m: m.update(files={}), r"lists no files"),
    (lambda m: m["files"].update({"model.onnx": []}), r"entry for model.onnx is not a size and a SHA-256"),
])
def test_a_manifest_cannot_point_outside_its_save(saved, tmp_path, change, message):
    directory = _copy(saved["onnx"], tmp_path / "copy")
    manifest = json.loads((directory / MANIFEST).read_text())
    change(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(WorkbenchError, match=message):
        wb.load(directory, trust_pickle=True)


def test_an_interrupted_exchange_points_at_the_previous_save(saved, tmp_path):
    import shutil

    directory = tmp_path / "model"
    shutil.copytree(saved["onnx"], tmp_path / ".model.old-123")
    directory.mkdir()  # what a crash between the two renames of a non-Linux save leaves
    with pytest.raises(WorkbenchError, match=r"an interrupted save left the previous one in .*\.model\.old-123"):
        wb.load(directory)


def test_saves_follow_symlinks_and_stay_readable(saved, tmp_path, digits_mlp):
    model, data = digits_mlp
    real = _copy(saved["onnx"], tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    wb.optimize(model, "quant=fp16", data=data, **FAST).save(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (real / "model.pt2").exists()
    umask = os.umask(0o022)
    os.umask(umask)
    assert (real.stat().st_mode & 0o777) == 0o777 & ~umask
    assert ((real / "model.pt2").stat().st_mode & 0o777) == 0o666 & ~umask


@pytest.mark.parametrize("name, content, message", [
    ("model.onnx", b"", r"model.onnx is empty: the save did not finish"),
    ("model.onnx", b"not an onnx graph at all", r"could not be read as a ONNX Runtime model"),
    ("model.pt2", b"PK\x03\x04 truncated zip", r"could not be read as a torch eager model"),
    ("model.txt", b"hello", r"not a model file the workbench knows"),
])
def test_a_damaged_model_file_is_one_clear_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(WorkbenchError, match=message):
        wb.load(path)


def test_a_missing_path_is_not_called_a_pickle(tmp_path):
    with pytest.raises(WorkbenchError, match=r"nope does not exist; give the directory Result.save wrote"):
        wb.load(tmp_path / "nope")


class DataDependent(torch.nn.Module):
    """A model whose shapes depend on the data (it says so, as unpad's packed encoder does): neither torch.export
    nor a trace keeps it general, so it is saved as a pickle."""

    torch_export_safe = False

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, x):
        return self.linear(x.flatten(1))


def test_the_pickle_fallback_is_never_silent(digits_mlp, tmp_path):
    _, data = digits_mlp
    r = wb.optimize(DataDependent(), [], data=data, backend="torch", **FAST)
    with pytest.warns(PickleFallback, match=r"model.pt is a pickle: torch.export could not capture this model"):
        path = r.save(tmp_path / "ao")
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["pickle"] and "torch.export could not capture" in manifest["pickle_reason"]
    with pytest.raises(WorkbenchError, match="loading a pickle can run code"):
        wb.load(path)
    assert wb.load(path, trust_pickle=True)(data.inputs(2)).shape == (2, 10)


def test_saving_again_replaces_the_save_whole_and_never_others_files(saved, tmp_path, digits_mlp):
    model, data = digits_mlp
    target = _copy(saved["onnx"], tmp_path / "again")
    r = wb.optimize(model, "quant=fp16", data=data, **FAST)
    r.save(target)
    assert (target / "model.pt2").exists() and not (target / "model.onnx").exists()  # the old save is gone whole
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no staging or backup directory left behind
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(WorkbenchError, match=r"holds files a save did not write \(notes.txt\)"):
        r.save(theirs)
    assert (theirs / "notes.txt").read_text() == "mine"
    (target / "notes.txt").write_text("beside an earlier save")  # a save with the user's file added to it
    with pytest.raises(WorkbenchError, match=r"holds files a save did not write \(notes.txt\)"):
        r.save(target)
    assert (target / "notes.txt").exists()


def test_a_save_where_the_disk_refuses_is_one_line(digits_mlp, tmp_path):
    model, data = digits_mlp
    r = wb.optimize(model, "quant=int8", data=data, **FAST)
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(WorkbenchError, match=r"cannot write .*a-file/model: .*a-file is a file, not a directory"):
        r.save(tmp_path / "a-file" / "model")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_an_interrupted_save_leaves_the_previous_save(saved, tmp_path, digits_mlp, monkeypatch):
    import workbench.storage as storage

    model, data = digits_mlp
    target = _copy(saved["onnx"], tmp_path / "kept")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    r = wb.optimize(model, "quant=fp16", data=data, **FAST)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "replace_directory", interrupted)
    with pytest.raises(KeyboardInterrupt):
        r.save(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert wb.load(target)(data.inputs(1)).shape == (1, 10)


def test_full_disk_while_writing_a_file_leaves_nothing_half_written(tmp_path, monkeypatch):
    import errno

    from workbench.paths import write_atomic

    write_atomic(tmp_path / "index.html", "old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(WorkbenchError, match=r"cannot write .*index.html: No space left on device"):
        write_atomic(tmp_path / "index.html", "new " * 50_000)
    assert (tmp_path / "index.html").read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_a_loaded_model_gives_the_saved_outputs(saved):
    x = saved["data"].inputs(5)
    again = wb.load(saved["pt2"])
    with torch.inference_mode():
        assert again(x).shape == (5, 10) and torch.isfinite(again(x)).all()
