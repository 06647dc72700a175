"""Saving torch models so they reload without the user's code, and safely.

- `model.pt2`: a `torch.export` program (graph + weights, no pickled code), batch axis dynamic and the sequence
  axis of token inputs too. Pruned models reload as they are: the graph holds the shapes.
- `model.ts`: a TorchScript trace (no Python code either), for what torch.export cannot keep general: recurrent
  layers, which it unrolls at the traced sequence length, and torch.ao's dynamic int8 layers; checked at another
  batch size and sequence length before it is kept.
- `model.pt`: a Python pickle, written only for models neither can capture (data-dependent shapes). Unpickling can
  run code, so loading it needs `trust_pickle=True`.
- `weights.sparse.pt` (beside either, when most weights are zero): the weights as a bitmask plus the non-zero
  values, loaded with `torch.load(weights_only=True)` by `load_sparse_state`.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import WorkbenchError, first_line
from ...contract import (bind, flat_module, layout_of, other_shapes, rebuild, values_of,
                         without_cache)
from ...paths import write_atomic
from ...scoped import quiet
from ...tensors import map_tensors


class ExportedModel(nn.Module):
    """A reloaded `torch.export` program, callable like the original (positional or keyword inputs, the same
    output structure: see `workbench.contract`). Exported graphs are frozen in eval mode, so `train()`/`eval()`
    only set this wrapper's flag."""

    def __init__(self, graph, layout: dict | None = None):
        super().__init__()
        self.graph, self.layout = graph, layout

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def forward(self, *args, **kwargs):
        if self.layout is None:  # saved by workbench 0.2 or earlier: the program takes the original call
            return self.graph(*args, **kwargs)
        return rebuild(self.layout, self.graph(*bind(self.layout, args, kwargs)))


def export_program(model: nn.Module, example_inputs: Any, path: Path) -> dict:
    """Save `model` as a torch.export program taking its inputs as positional tensors, with a dynamic batch
    dimension on every input (and the sequence axis of token and sequence inputs, where the model allows it);
    returns the call layout that `ExportedModel` needs (saved beside it). Traced on CPU, so the program loads on
    a machine without a GPU."""
    unsafe = [type(m).__name__ for m in model.modules() if getattr(m, "torch_export_safe", True) is False]
    if unsafe:
        raise NotImplementedError(f"{unsafe[0]} has data-dependent shapes that torch.export does not keep general")
    recurrent = next((type(m).__name__ for m in model.modules() if isinstance(m, nn.RNNBase)), None)
    if recurrent:  # known before tracing: it would cost seconds, then fail its check at another length
        raise NotImplementedError(f"{recurrent}: torch.export unrolls recurrent layers at the traced sequence length")
    import copy

    model = without_cache(copy.deepcopy(model).eval().cpu())
    batch = torch.export.Dim("batch", min=1, max=1 << 16)

    def two_rows(t):  # torch.export specialises a dimension of size 1, so trace with a batch of 2
        t = t.cpu()
        return t.repeat(2, *[1] * (t.dim() - 1)) if t.shape[0] == 1 else t

    example_inputs = map_tensors(example_inputs, two_rows)
    layout = layout_of(model, example_inputs)
    values = values_of(example_inputs)
    shapes = tuple({0: batch, **({axis: torch.export.Dim.AUTO} if axis else {})} for axis in layout["sequence_axes"])
    with quiet():  # where it cannot keep a shape general, torch.export logs the whole traced graph
        program = torch.export.export(flat_module(model, layout), tuple(values), dynamic_shapes=(shapes,),
                                      strict=False)  # (shapes,): the flat module takes *values
    try:
        with torch.inference_mode():
            general = program.module()
            for inputs in other_shapes(example_inputs, layout, model):
                general(*values_of(inputs))
    except Exception as e:
        raise NotImplementedError("torch.export fixed the batch size or sequence length at the traced one, or "
                                  "assumed more than one row "
                                  f"({first_line(e, 120)})"
                                  ) from e
    torch.export.save(program, str(path))
    return layout


def trace_program(model: nn.Module, example_inputs: Any, path: Path) -> dict:
    """Save `model` as a TorchScript trace (positional tensors in, a tuple out), for what torch.export cannot keep
    general: recurrent layers (torch.export unrolls them at the traced length) and torch.ao's quantized layers.
    A trace bakes in any Python branch it took, so it is checked against the model at another batch size and
    sequence length and refused when it differs. Returns the call layout, as `export_program` does."""
    import copy
    import warnings

    unsafe = [type(m).__name__ for m in model.modules() if getattr(m, "torch_export_safe", True) is False]
    if unsafe:  # a trace would bake in the shapes of the one batch it saw
        raise NotImplementedError(f"{unsafe[0]} has data-dependent shapes that a trace does not keep general")
    model = without_cache(copy.deepcopy(model).eval().cpu())
    example_inputs = map_tensors(example_inputs, lambda t: t.cpu())
    layout = layout_of(model, example_inputs)
    flat = flat_module(model, layout)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notices
        traced = torch.jit.trace(flat, tuple(values_of(example_inputs)), check_trace=False)
        pairs = [(traced(*other), flat(*other))
                 for other in map(values_of, other_shapes(example_inputs, layout, model))]
    same = all(len(got) == len(expected) and all(
        g.shape == e.shape and torch.allclose(g.float(), e.float(), rtol=1e-3,
                                              atol=1e-4 * max(1.0, float(e.abs().max())))
        for g, e in zip(got, expected)) for got, expected in pairs)
    if not same:
        raise NotImplementedError("a TorchScript trace does not reproduce the model at another batch size or "
                                  "sequence length")
    torch.jit.save(traced, str(path))
    return layout


def save(model: nn.Module, example_inputs: Any, directory: Path) -> Path:
    """`model.pt2` where torch.export captures the model, else a checked TorchScript trace `model.ts`, else a
    pickle `model.pt`; plus `weights.sparse.pt` when sparse."""
    from ...measure.counts import serialized_size, sparse_size

    import warnings

    from ...errors import PickleFallback

    reasons = []
    for name, write in (("model.pt2", export_program), ("model.ts", trace_program)):
        target = directory / name
        try:
            layout = write(model, example_inputs, target)
            write_atomic(target.with_suffix(".json"), json.dumps(layout))
            break
        except Exception as e:
            target.unlink(missing_ok=True)
            reasons.append(first_line(e, 160))
    else:
        target = directory / "model.pt"  # see the trust model above
        torch.save(model, target)
        warnings.warn(f"torch.export could not capture this model ({reasons[0]})", PickleFallback, stacklevel=2)
    sparse = sparse_size(model)
    if sparse is not None and sparse < 0.9 * serialized_size(model):
        save_sparse_state(model, directory / "weights.sparse.pt")
    return target


def load(path: Path, device: str, trust_pickle: bool = False) -> nn.Module:
    if path.suffix in (".pt2", ".ts"):
        meta = path.with_suffix(".json")
        layout = json.loads(meta.read_text()) if meta.exists() else None
        if path.suffix == ".pt2":  # a program records the device it was traced on (the CPU): moved as a whole
            with warnings.catch_warnings():  # what a load says that no user can act on: torchao's deprecations
                # (its int8 weights), torch 2.11's "The given buffer is not writable" (seen for those on a GPU)
                warnings.filterwarnings("ignore", category=UserWarning, module="torchao")
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                program = torch.export.load(str(path))
            if torch.device(device).type != "cpu":
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, device)
            graph = program.module()
        else:
            graph = torch.jit.load(str(path), map_location=device)
        return ExportedModel(graph, layout).to(device)
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
