"""The call contract exporters keep: which axis of each input may vary, found from what the model takes, so that
saves and graphs of waveform, sequence and 1-D convolution models run at lengths they were not traced at."""
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import workbench as wb
from workbench.contract import layout_of, other_shape, sequence_axes

from .helpers import FAST


class Waveform(nn.Module):
    """A wav2vec2-like front end: strided 1-D convolutions over [rows, samples], a weight-normed positional
    convolution, then mean-pooled features."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(1, 8, 10, stride=5), nn.GELU(), nn.Conv1d(8, 16, 3, stride=2))
        self.position = weight_norm(nn.Conv1d(16, 16, 5, padding=2, groups=4), name="weight", dim=2)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = self.features(x.unsqueeze(1))
        h = h + self.position(h)
        return self.head(h.transpose(1, 2)).mean(1)


class Steps(nn.Module):
    """A 1-D convolution over [rows, channels, steps]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(6, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x).amax(-1)


class Masked(nn.Module):
    """A waveform with an attention mask of the same length beside it."""

    def forward(self, values, mask):
        return (values * mask).sum(1, keepdim=True)


class _Weighted(nn.Module):
    """Steps weighted by a float mask of the same length."""

    def forward(self, x, weights):
        return (x * weights[..., None]).sum(1)


def test_each_inputs_free_axis_is_found_from_what_the_model_takes():
    assert sequence_axes(nn.Linear(20, 3), torch.randn(4, 20)) == [None]  # a table's features are fixed
    assert sequence_axes(Waveform(), torch.randn(2, 400)) == [1]  # a waveform's samples are not
    assert sequence_axes(Steps(), torch.randn(2, 6, 12)) == [2]  # channels first: the steps are axis 2
    assert sequence_axes(nn.LSTM(5, 7, batch_first=True), torch.randn(2, 9, 5)) == [1]
    assert sequence_axes(nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)) == [None]  # images: no sequence
    masked = {"values": torch.randn(2, 50), "mask": torch.ones(2, 50, dtype=torch.long)}
    assert sequence_axes(Masked(), masked) == [1, 1]  # grown together: alone, neither would fit the other
    floats = (torch.randn(2, 7, 5), torch.ones(2, 7))  # a float mask beside a sequence: they grow together
    assert sequence_axes(_Weighted(), floats) == [1, 1]
    layout = layout_of(Steps(), torch.randn(2, 6, 12))
    assert other_shape(torch.randn(2, 6, 12), layout).shape == (3, 6, 15)


@pytest.mark.parametrize("recipe", ["quant=int8", "quant=fp16", "prune=0.5"])
def test_a_waveform_model_runs_saved_and_exported_at_lengths_it_never_saw(recipe, tmp_path):
    torch.manual_seed(0)
    model = Waveform().eval()
    data = wb.Data(val=[(torch.randn(8, 400), None), (torch.randn(8, 560), None)], metric="fidelity")
    r = wb.optimize(model, recipe, data=data, backend="onnxruntime" if recipe == "quant=int8" else "torch",
                    device="cpu", **FAST)
    loaded = wb.load(r.save(tmp_path / "saved"))
    for rows, samples in ((3, 333), (1, 1000)):
        x = torch.randn(rows, samples)
        with torch.inference_mode():
            expected, got = r.model(x), loaded(x)
        assert got.shape == expected.shape == (rows, 4)
        assert torch.allclose(got.float(), expected.float(), atol=1e-3 * float(expected.abs().max()) + 1e-4)
    assert "ParametrizedConv1d" in type(model.position).__name__ and hasattr(model.position, "weight")


class _Histogram(nn.Module):
    def forward(self, x):
        return torch.histc(x, bins=4) + x.sum()


def test_a_failed_onnx_export_is_one_line_and_prints_no_graph(capfd):
    """torch's exporter leaves its log on and dumps the whole TorchScript graph when an export fails: a Mixtral
    printed thousands of lines into the notebook."""
    from workbench.backends.onnxruntime.export import export_onnx
    from workbench.errors import ExportError

    for _ in range(2):  # the second export too: torch leaves the log on after the first
        with pytest.raises(ExportError, match="aten::histc"):
            export_onnx(_Histogram(), torch.randn(2, 5))
    printed = capfd.readouterr()
    assert "graph(" not in printed.err + printed.out and "Torch IR" not in printed.err + printed.out


class _Branches(nn.Module):
    """Takes up to 16 steps, and computes differently below 10: a trace at 12 steps keeps the long branch, which a
    check three steps longer (15) cannot tell from the model."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)

    def forward(self, ids):
        if ids.shape[1] > 16:
            raise ValueError("at most 16 steps")
        h = self.embed(ids).sum(1)
        return h * 2 if ids.shape[1] >= 10 else h * 3


def test_exports_are_checked_shorter_too_and_only_at_shapes_the_model_takes():
    from workbench.backends.onnxruntime.session import OrtModel
    from workbench.backends.torch_eager.storage import export_program, trace_program
    from workbench.contract import other_shapes
    from workbench.errors import ExportError

    model, ids = _Branches().eval(), torch.randint(0, 20, (4, 12))
    shapes = [tuple(s.shape) for s in other_shapes(ids, layout_of(model, ids))]
    assert shapes == [(5, 15), (1, 15), (4, 8)]
    at_most = torch.randint(0, 20, (4, 16))  # at the model's longest: three steps more is not a shape it takes
    assert [tuple(s.shape) for s in other_shapes(at_most, layout_of(model, at_most), model)] == \
        [(5, 16), (1, 16), (4, 11)]  # the rows change alone where three steps more pass the model's longest
    assert [tuple(s.shape) for s in other_shapes(ids[:, :2], layout_of(model, ids[:, :2]))] == [(5, 5), (1, 5)]
    with pytest.raises(ExportError, match="runs only at the batch size or sequence length it was traced with"):
        OrtModel.from_torch(model, ids)  # the graph kept the long branch: wrong below 10 steps
    with pytest.raises(NotImplementedError):
        trace_program(model, ids, Path(tempfile.mkdtemp()) / "model.ts")
    # torch.export keeps the branch as a condition on the length, and the program refuses shorter inputs
    with pytest.raises(NotImplementedError, match="fixed the batch size or sequence length"):
        export_program(model, ids, Path(tempfile.mkdtemp()) / "model.pt2")
    OrtModel.from_torch(_Longest().eval(), at_most)  # its longest length exported: checked below it, not above


class _Longest(nn.Module):
    """Position embeddings for 16 steps, as a BERT has for 512: inputs padded to the longest are common."""

    def __init__(self):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(20, 8), nn.Embedding(16, 8)

    def forward(self, ids):
        return (self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))).mean(1)


def test_quiet_silences_stderr_and_the_loggers_that_keep_their_own_handlers(capsys):
    """torch's loggers do not pass records to the root, and a failed torch.export prints its partial graph to
    stderr: both reached the notebook through `quiet()`."""
    import io
    import logging
    import sys

    from workbench.scoped import quiet

    logger, stream = logging.getLogger("workbench-test-apart"), io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        with quiet():
            print("partial graph", file=sys.stderr)
            logger.warning("chatter")
            logger.error("kept")
        print("after", file=sys.stderr)
        logger.warning("heard again")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "partial graph" not in err and "after" in err
    assert stream.getvalue().splitlines() == ["kept", "heard again"]
