"""Export a torch module to ONNX: tensors in, tensors out (see `workbench.contract`), the batch axis dynamic and
each input's sequence axis too (`contract.sequence_axes`)."""
from __future__ import annotations

import io
import re
import threading
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any

from ...contract import flat_module, to_trace, values_of
from ...errors import ExportError, first_line
from ...scoped import layer_by_layer

OPSET = 17


def _unsupported_operator(message: str) -> str | None:
    for pattern in (r"operator ([\w:.]+) to ONNX", r"operator with unrecognized namespace ([\w:.]+)",
                    r"Unsupported: ONNX export of operator ([\w:.]+)", r"'([\w]+::[\w.]+)'", r"(aten::\w+)"):
        found = re.search(pattern, message)
        if found:
            return found.group(1).rstrip(".")
    return None


def export_onnx(model, example_inputs: Any, cache: bool = False) -> tuple[bytes, dict]:
    """Export a copy of `model` (on CPU) to ONNX; returns (bytes, layout) (see `workbench.contract.layout_of`).

    cache: a Hugging Face decoder called with input_ids and attention_mask is exported with its key/value cache
    (`export_decoder`); an ExportError says why when it cannot be.

    A copy (`contract.to_trace` says why). Uses the TorchScript exporter: ~0.1 s per model here where the dynamo
    exporter takes seconds, and its graphs are the ones ONNX Runtime's quantization tools are tested on.
    """
    import torch

    model, example_inputs, layout = to_trace(model, example_inputs)
    names, values = layout["input_names"], values_of(example_inputs)
    if not layout["output_ranks"]:
        raise ExportError("the model returns no tensor, so there is nothing to export")
    if cache:
        return export_decoder(model, example_inputs, layout)
    lengths: dict = {}  # inputs of one length share its name (ids and mask); a waveform beside them has its own
    dynamic = {n: {0: "batch", **({axis: lengths.setdefault(v.shape[axis], f"sequence{len(lengths) or ''}")}
                                  if axis else {})} for n, v, axis in zip(names, values, layout["sequence_axes"])}
    with torch.inference_mode():
        outputs = flat_module(model, layout)(*values)
    output_names = [f"output_{i}" for i in range(len(outputs))]
    for name, t in zip(output_names, outputs):  # every axis named: their sizes follow the inputs' (a waveform's
        dynamic[name] = {0: "batch", **{a: f"{name}_{a}" for a in range(1, t.dim())}}  # frames, a cache's length)
    return _traced(flat_module(model, layout), values, names, output_names, dynamic), layout


@contextmanager
def _no_graph_dump():
    """torch's TorchScript exporter turns its ONNX log on for every export (it tests a function for truth, not
    its result) and never off, so that a failed export prints the whole TorchScript graph (thousands of lines) to
    the notebook: here the log stays off."""
    import torch

    try:
        from torch.onnx._internal.torchscript_exporter import utils
    except ImportError:
        utils = None
    original = getattr(utils, "setup_onnx_logging", None)
    if original is not None:
        utils.setup_onnx_logging = lambda verbose: nullcontext()
    torch._C._jit_set_onnx_log_enabled(False)
    try:
        yield
    finally:
        if original is not None:
            utils.setup_onnx_logging = original


def _diff(g, x, n, dim, prepend, append):
    """aten::diff (first order) as ONNX: Concat(prepend, x, append), then its tail minus its head along `dim`.
    transformers 5 calls it to find packed sequences in decoders run without an attention mask (a language model
    fed bare input_ids), so that no ONNX graph of them could be written."""
    import torch
    from torch.onnx._internal.torchscript_exporter import symbolic_helper

    if symbolic_helper._get_const(n, "i", "n") != 1:
        return symbolic_helper._unimplemented("diff", "n > 1")
    dim = symbolic_helper._get_const(dim, "i", "dim")
    parts = [t for t in (prepend, x, append) if not symbolic_helper._is_none(t)]
    x = g.op("Concat", *parts, axis_i=dim) if len(parts) > 1 else x

    def ints(*v):
        return g.op("Constant", value_t=torch.tensor(v, dtype=torch.long))

    tail, head = g.op("Slice", x, ints(1), ints(1 << 62), ints(dim)), g.op("Slice", x, ints(0), ints(-1), ints(dim))
    return g.op("Xor" if symbolic_helper._is_bool(x) else "Sub", tail, head)  # torch: xor of booleans


def _cumsum(g, x, dim, dtype):
    """aten::cumsum that sums booleans and narrow integers in int64, as torch does: the exporter's own gives ONNX's
    CumSum a bool input, which ONNX Runtime refuses as an invalid graph (transformers counts packed sequences that
    way)."""
    from torch.onnx._internal.torchscript_exporter import symbolic_helper, symbolic_opset11

    kind = symbolic_helper._try_get_scalar_type(x)
    if kind is not None and kind.name in ("BOOL", "UINT8", "INT8", "INT16", "INT"):  # INT: int32
        x = g.op("Cast", x, to_i=7)  # INT64
    return symbolic_opset11.cumsum(g, x, dim, dtype)


# operators the TorchScript exporter cannot translate (diff), or translates into graphs ONNX Runtime refuses
SYMBOLICS = {"aten::diff": _diff, "aten::cumsum": _cumsum}


_EXPORTING = threading.Lock()  # one export at a time: the exporter's registry and log are process-wide


@contextmanager
def _symbolics():
    """`SYMBOLICS` registered with the exporter for the block (the caller holds `_EXPORTING`); a name the user
    registered a symbolic for, at any opset, is left alone; nothing on a torch whose exporter is laid out otherwise."""
    try:
        from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic
        from torch.onnx._internal.torchscript_exporter.registration import registry
    except ImportError:
        yield
        return
    added = []
    for name, symbolic in SYMBOLICS.items():
        group = registry.get_function_group(name)
        if group is None or not any(group._functions.overridden(v) for v in range(1, OPSET + 1)):
            register_custom_op_symbolic(name, symbolic, OPSET)
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            unregister_custom_op_symbolic(name, OPSET)


def _traced(module, values, names, output_names, dynamic) -> bytes:
    import torch

    buf = io.BytesIO()
    try:
        # layer by layer: a frozen model, or one traced without grad, takes torch's fused transformer layers,
        # which have no ONNX translation and bypass the traceable attention (`contract.to_trace`)
        with _EXPORTING, warnings.catch_warnings(), _no_graph_dump(), _symbolics(), layer_by_layer():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(values), buf, dynamo=False, input_names=names,
                              output_names=output_names, dynamic_axes=dynamic, opset_version=OPSET,
                              do_constant_folding=True)
    except Exception as e:
        op = _unsupported_operator(str(e))
        what = f"operator {op!r} has no ONNX translation" if op else first_line(e)
        raise ExportError(f"ONNX export failed: {what}. Use backend='torch' for this model, or replace that "
                          "operation with standard torch ops.") from e
    return buf.getvalue()


def export_decoder(model, example_inputs: Any, layout: dict) -> tuple[bytes, dict]:
    """A Hugging Face decoder's graph with its key/value cache: inputs input_ids, attention_mask (past + new
    tokens) and past_key_values.<layer>.key/value (rows x heads x past x head size; past may be 0), outputs the
    logits and present.<layer>.key/value; batch, sequence and past lengths dynamic. Called like the model (the
    past defaults to empty), it returns the logits; `workbench.decoding` generates with the cache."""
    import torch

    from ...decoding import cache_shapes, cached_decoder, past_names, present_names

    if layout["input_kind"] != "dict" or sorted(layout["input_names"]) != ["attention_mask", "input_ids"] \
            or len(layout["output_ranks"]) != 1:
        raise ExportError("the cache is exported for decoders called with input_ids and attention_mask that return "
                          "logits alone")
    shapes = cache_shapes(model)
    if not shapes:
        raise ExportError("the model returns no key/value cache to export")
    ids = example_inputs["input_ids"]
    rows, past_length = ids.shape[0], 2
    past = [torch.zeros(rows, heads, past_length, dim) for heads, dim in shapes for _ in ("key", "value")]
    mask = torch.ones(rows, past_length + ids.shape[1], dtype=example_inputs["attention_mask"].dtype)
    names_in = ["input_ids", "attention_mask", *past_names(len(shapes))]
    names_out = ["logits", *present_names(len(shapes))]
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
               "logits": {0: "batch", 1: "sequence"}, **{n: {0: "batch", 2: "past"} for n in names_in[2:]},
               **{n: {0: "batch", 2: "total"} for n in names_out[1:]}}
    graph = _traced(cached_decoder(model), [ids, mask, *past], names_in, names_out, dynamic)
    layout = {**layout, "input_names": ["input_ids", "attention_mask"],
              "past": [{"name": n, "shape": list(shapes[i // 2])} for i, n in enumerate(names_in[2:])]}
    return graph, layout
