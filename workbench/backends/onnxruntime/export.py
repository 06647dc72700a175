"""Export a torch module to ONNX: batch axis dynamic, and the sequence axis of token inputs."""
from __future__ import annotations

import copy
import io
import re
import warnings
from typing import Any

from ...errors import ExportError
from ...tensors import map_tensors

OPSET = 17


def input_layout(example_inputs: Any) -> tuple[str, list[str]]:
    """('tensor' | 'tuple' | 'dict', input names) of a batch's inputs."""
    import torch

    if isinstance(example_inputs, torch.Tensor):
        return "tensor", ["input"]
    if isinstance(example_inputs, dict):
        return "dict", list(example_inputs)
    return "tuple", [f"input_{i}" for i in range(len(example_inputs))]


def _unsupported_operator(message: str) -> str | None:
    for pattern in (r"operator ([\w:.]+) to ONNX", r"operator with unrecognized namespace ([\w:.]+)",
                    r"Unsupported: ONNX export of operator ([\w:.]+)", r"'([\w]+::[\w.]+)'", r"(aten::\w+)"):
        found = re.search(pattern, message)
        if found:
            return found.group(1).rstrip(".")
    return None


def export_onnx(model, example_inputs: Any) -> tuple[bytes, str, list[str]]:
    """Export a copy of `model` (on CPU) to ONNX; returns (bytes, input kind, input names).

    A copy, because tracing a Hugging Face model was seen to change the eager model's later outputs.
    Uses the TorchScript exporter: ~0.1 s per model here where the dynamo exporter takes seconds, and its
    graphs are the ones ONNX Runtime's quantization tools are tested on.
    """
    import torch

    kind, names = input_layout(example_inputs)
    model = copy.deepcopy(model).eval().cpu()
    example_inputs = map_tensors(example_inputs, lambda t: t.cpu())
    args, kwargs = ((example_inputs,), None) if kind == "tensor" else \
        ((), dict(example_inputs)) if kind == "dict" else (tuple(example_inputs), None)
    values = [example_inputs] if kind == "tensor" else list(example_inputs.values()) if kind == "dict" \
        else list(example_inputs)
    dynamic = {n: {0: "batch", 1: "sequence"} if isinstance(v, torch.Tensor) and v.dim() == 2
               and not v.is_floating_point() else {0: "batch"} for n, v in zip(names, values)}
    dynamic["output"] = {0: "batch"}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, buf, kwargs=kwargs, dynamo=False, input_names=names,
                              output_names=["output"], dynamic_axes=dynamic, opset_version=OPSET,
                              do_constant_folding=True)
    except Exception as e:
        op = _unsupported_operator(str(e))
        what = f"operator {op!r} has no ONNX translation" if op else str(e).splitlines()[0]
        raise ExportError(f"ONNX export failed: {what}. Use backend='torch' for this model, or replace that "
                          "operation with standard torch ops.") from e
    return buf.getvalue(), kind, names
