"""Saving torch models so they reload without the user's code, and safely.

- `model.pt2`: a `torch.export` program (graph + weights, no pickled code), batch axis dynamic and the sequence
  axis of token inputs too. Pruned models reload as they are: the graph holds the shapes.
- `model.pt`: a Python pickle, written only for models `torch.export` cannot capture (torch.ao dynamic int8,
  data-dependent shapes). Unpickling can run code, so loading it needs `trust_pickle=True`.
- `weights.sparse.pt` (beside either, when most weights are zero): the weights as a bitmask plus the non-zero
  values, loaded with `torch.load(weights_only=True)` by `load_sparse_state`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import WorkbenchError
from ...tensors import map_tensors


class ExportedModel(nn.Module):
    """A reloaded `torch.export` program, callable like the original. Exported graphs are frozen in eval mode,
    so `train()`/`eval()` only set this wrapper's flag."""

    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def forward(self, *args, **kwargs):
        return self.graph(*args, **kwargs)


def export_program(model: nn.Module, example_inputs: Any, path: Path) -> None:
    """Save `model` as a torch.export program with a dynamic batch dimension on every input (and the sequence
    length of token inputs). Traced on CPU, so the program loads on a machine without a GPU."""
    unsafe = [type(m).__name__ for m in model.modules() if getattr(m, "torch_export_safe", True) is False]
    if unsafe:
        raise NotImplementedError(f"{unsafe[0]} has data-dependent shapes that torch.export does not keep general")
    import copy

    model = copy.deepcopy(model).eval().cpu()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)

    def two_rows(t):  # torch.export specialises a dimension of size 1, so trace with a batch of 2
        t = t.cpu()
        return t.repeat(2, *[1] * (t.dim() - 1)) if t.shape[0] == 1 else t

    example_inputs = map_tensors(example_inputs, two_rows)
    if isinstance(example_inputs, dict):
        args, kwargs = (), example_inputs
    else:
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        kwargs = None
    shapes = torch.export.ShapesCollection()  # batch dimension dynamic, whatever the forward's signature

    def dynamic(t):  # and the sequence axis of token inputs (2-D integer tensors), where the model allows it
        token = t.dim() == 2 and not t.is_floating_point()
        shapes[t] = {0: batch, 1: torch.export.Dim.AUTO} if token else {0: batch}

    map_tensors((args, kwargs), dynamic)
    program = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=shapes, strict=False)
    torch.export.save(program, str(path))


def save(model: nn.Module, example_inputs: Any, directory: Path) -> Path:
    """`model.pt2` where torch.export captures the model, else `model.pt`; plus `weights.sparse.pt` when sparse."""
    from ...measure.counts import serialized_size, sparse_size

    import warnings

    from ...errors import PickleFallback

    target = directory / "model.pt2"
    try:
        export_program(model, example_inputs, target)
    except Exception as e:
        target.unlink(missing_ok=True)
        target = directory / "model.pt"  # see the trust model above
        torch.save(model, target)
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        warnings.warn(f"torch.export could not capture this model ({why})", PickleFallback, stacklevel=2)
    sparse = sparse_size(model)
    if sparse is not None and sparse < 0.9 * serialized_size(model):
        save_sparse_state(model, directory / "weights.sparse.pt")
    return target


def load(path: Path, device: str, trust_pickle: bool = False) -> nn.Module:
    if path.suffix == ".pt2":
        return ExportedModel(torch.export.load(str(path)).module()).to(device)
    if not trust_pickle:
        raise WorkbenchError(f"{path.name} is a Python pickle, and loading a pickle can run code from the file; "
                             "if you trust where it came from, use wb.load(path, trust_pickle=True)")
    return torch.load(path, map_location=device, weights_only=False).eval()


def save_sparse_state(model: nn.Module, path: Path) -> int:
    """Write the state dict with mostly-zero float tensors as (bitmask, values); returns the bytes written."""
    import numpy as np

    state = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if t.is_floating_point() and (t.numel() + 7) // 8 + int(t.count_nonzero()) * t.element_size() < \
                t.numel() * t.element_size():
            mask = (t != 0).flatten()
            state[name] = {"shape": list(t.shape), "bits": torch.from_numpy(np.packbits(mask.numpy())),
                           "values": t.flatten()[mask].clone()}
        else:
            state[name] = t
    torch.save(state, path)
    return path.stat().st_size


def load_sparse_state(path) -> dict:
    """The dense state dict from a `weights.sparse.pt` file (loaded with weights_only=True)."""
    import numpy as np

    out = {}
    for name, v in torch.load(path, weights_only=True).items():
        if isinstance(v, dict):
            n = int(np.prod(v["shape"])) if v["shape"] else 1
            mask = torch.from_numpy(np.unpackbits(v["bits"].numpy())[:n].astype(bool))
            dense = torch.zeros(n, dtype=v["values"].dtype)
            dense[mask] = v["values"]
            out[name] = dense.reshape(v["shape"])
        else:
            out[name] = v
    return out
