"""The call contract exporters keep: which axis of each input may vary, found from what the model takes, so that
saves and graphs of waveform, sequence and 1-D convolution models run at lengths they were not traced at."""
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
