"""The house: packages by layer, the engine free of the faces, no global side effects, package data that installs.

Layers (a module may import from its own layer and the ones below it):
  core: errors, tensors, contract, target, registry, recipe, data, facts, architectures, measure/, backends/,
        techniques/, engine, result, tables, verdict, study, storage, checks, train, zoo, modules, paths, scoped,
        progress, support
  search/ (sweep, autotune)     charts     notebook/ (magics, card, panel, layer map)     reports/     cli
"""
import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "workbench"
FACES = {"notebook", "reports", "charts", "search", "cli", "quickstart"}
HEAVY = {"IPython", "ipywidgets", "papermill", "plotly", "dask", "optuna", "anywidget", "nbconvert", "nbformat"}


def _imports(path: Path) -> set[str]:
    """Top-level (module import time) imports of a file, as absolute dotted names."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out |= {f"{module}.{a.name}" if not node.module else module for a in node.names}
    return out


def _core_modules():
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] not in FACES:
            yield path


def test_the_engine_imports_none_of_the_faces_or_their_libraries():
    code = ("import workbench.engine, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'IPython','ipywidgets','papermill','plotly','dask','optuna'} or m.split('.')[:2] in "
            "(['workbench', 'notebook'], ['workbench', 'reports'], ['workbench', 'charts'], ['workbench', 'search'])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_the_engine_runs_with_the_faces_blocked(tmp_path):
    """An optimize with IPython, plotly, papermill, dask and optuna unimportable (what a minimal install has)."""
    code = ("import sys\n"
            "for name in ('IPython', 'ipywidgets', 'papermill', 'plotly', 'dask', 'optuna', 'anywidget'):\n"
            "    sys.modules[name] = None\n"
            "import torch, workbench as wb\n"
            "from torch.utils.data import DataLoader, TensorDataset\n"
            "x = torch.randn(64, 8); y = (x[:, 0] > 0).long()\n"
            "data = wb.Data(val=DataLoader(TensorDataset(x, y), batch_size=16))\n"
            "r = wb.optimize(torch.nn.Linear(8, 2), 'quant=int8', data=data, batch_sizes=(1,), study=False)\n"
            "print(r.backend, r.measurement.speedups[1].rounds >= 6)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["onnxruntime-int8-dynamic", "True"]
    assert list(tmp_path.iterdir()) == []  # nothing written into the working directory


def test_core_modules_import_no_face_at_import_time():
    offenders = []
    for path in _core_modules():
        for name in _imports(path):
            top = name.split(".")
            if top[0] in HEAVY or (top[0] == "workbench" and len(top) > 1 and top[1] in FACES):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_device_strings_are_read_only_by_the_target_and_the_backends():
    found = [f"{p.relative_to(ROOT)}:{i}" for p in PACKAGE.rglob("*.py") for i, line in
             enumerate(p.read_text().splitlines(), 1) if 'startswith("cuda")' in line
             and p.name != "target.py" and "backends" not in p.parts]
    assert found == []


def test_only_the_onnxruntime_backend_names_itself():
    found = [f"{p.relative_to(ROOT)}:{i}" for p in PACKAGE.rglob("*.py") for i, line in
             enumerate(p.read_text().splitlines(), 1) if '"onnxruntime"' in line
             and "onnxruntime" not in p.parts and p.name != "registry.py"]
    assert found == []


def test_the_study_defaults_to_the_data_directory_not_the_working_directory(tmp_path, monkeypatch):
    import os

    from workbench.study import Study

    monkeypatch.delenv("WORKBENCH_STUDY")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert Study.default().path.parent == Path(os.environ["WORKBENCH_DATA"]).resolve()
    assert list((tmp_path / "cwd").iterdir()) == []


def test_scoped_changes_are_restored():
    import logging
    import os
    import sys as _sys

    from workbench.scoped import environ, logger_level, quiet

    root, before_stdout = logging.getLogger(), _sys.stdout
    filters = list(root.filters)
    with quiet():
        print("swallowed")
        logging.getLogger().warning("swallowed too")
    assert _sys.stdout is before_stdout and root.filters == filters
    level = logging.getLogger("papermill").level
    with logger_level("papermill", logging.ERROR):
        assert logging.getLogger("papermill").level == logging.ERROR
    assert logging.getLogger("papermill").level == level
    with environ(WORKBENCH_TEST_VAR="1"):
        assert os.environ["WORKBENCH_TEST_VAR"] == "1"
    assert "WORKBENCH_TEST_VAR" not in os.environ


def test_training_leaves_the_users_random_state_alone(digits_mlp):
    import torch

    import workbench as wb

    model, data = digits_mlp
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    wb.optimize(model, "finetune=1", data=data, batch_sizes=(1,), study=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
def test_the_wheel_carries_the_templates_and_widget_assets(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("workbench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for template in ("quickstart", "quantization", "pruning", "distillation", "pipeline"):
        assert f"workbench/reports/templates/{template}.ipynb" in names
    assert {"workbench/notebook/widgets/layer_map.js", "workbench/notebook/widgets/layer_map.css"} <= set(names)


def test_quiet_scopes_of_two_threads_may_end_in_any_order():
    import sys as _sys
    import threading
    import warnings

    from workbench.scoped import quiet

    real_stdout, real_show = _sys.stdout, warnings.showwarning
    entered, release = threading.Event(), threading.Event()

    def other():
        with quiet():
            entered.set()
            release.wait(5)

    with quiet():
        t = threading.Thread(target=other)
        t.start()
        entered.wait(5)
    # the main thread left first; the other is still quiet, yet the main thread prints again
    assert _sys.stdout is not real_stdout and _sys.stdout.write("visible\n") == len("visible\n")
    release.set()
    t.join()
    assert _sys.stdout is real_stdout and warnings.showwarning is real_show
