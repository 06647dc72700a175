"""Export a torch module to ONNX: tensors in, tensors out (see `workbench.contract`), the batch axis dynamic and
the sequence axis of token and sequence inputs too."""
from __future__ import annotations

import copy
import io
import re
import warnings
from typing import Any

from ...contract import flat_module, has_sequence_axis, layout_of, on_cpu, values_of, without_cache
from ...errors import ExportError, first_line

OPSET = 17


def _unsupported_operator(message: str) -> str | None:
    for pattern in (r"operator ([\w:.]+) to ONNX", r"operator with unrecognized namespace ([\w:.]+)",
                    r"Unsupported: ONNX export of operator ([\w:.]+)", r"'([\w]+::[\w.]+)'", r"(aten::\w+)"):
        found = re.search(pattern, message)
        if found:
            return found.group(1).rstrip(".")
    return None


def export_onnx(model, example_inputs: Any) -> tuple[bytes, dict]:
    """Export a copy of `model` (on CPU) to ONNX; returns (bytes, layout) (see `workbench.contract.layout_of`).

    A copy, because tracing a Hugging Face model was seen to change the eager model's later outputs.
    Uses the TorchScript exporter: ~0.1 s per model here where the dynamo exporter takes seconds, and its
    graphs are the ones ONNX Runtime's quantization tools are tested on.
    """
    import torch

    model = without_cache(copy.deepcopy(model).eval().cpu())
    example_inputs = on_cpu(example_inputs)
    layout = layout_of(model, example_inputs)
    names, values = layout["input_names"], values_of(example_inputs)
    if not layout["output_ranks"]:
        raise ExportError("the model returns no tensor, so there is nothing to export")
    sequence = {v.shape[1] for v in values if has_sequence_axis(v)}
    dynamic = {n: {0: "batch", 1: "sequence"} if has_sequence_axis(v) else {0: "batch"}
               for n, v in zip(names, values)}
    with torch.inference_mode():
        outputs = flat_module(model, layout)(*values)
    output_names = [f"output_{i}" for i in range(len(outputs))]
    for name, t in zip(output_names, outputs):
        dynamic[name] = {0: "batch", **({1: "sequence"} if t.dim() >= 2 and t.shape[1] in sequence else {})}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(flat_module(model, layout), tuple(values), buf, dynamo=False, input_names=names,
                              output_names=output_names, dynamic_axes=dynamic, opset_version=OPSET,
                              do_constant_folding=True)
    except Exception as e:
        op = _unsupported_operator(str(e))
        what = f"operator {op!r} has no ONNX translation" if op else first_line(e)
        raise ExportError(f"ONNX export failed: {what}. Use backend='torch' for this model, or replace that "
                          "operation with standard torch ops.") from e
    return buf.getvalue(), layout
