"""The call and output contract of a user's model, kept by runtimes that only take and return flat lists of
tensors (an ONNX graph, a `torch.export` program): how a batch's inputs are laid out and named, how the forward
binds positional arguments, and the structure of what it returns (a Hugging Face `ModelOutput`, tuples, dicts).

    >>> layout = layout_of(model, example_inputs)          # JSON-able: saved beside the graph
    >>> flat = flat_module(model, layout)                   # what exporters trace: tensors in, tensors out
    >>> values = bind(layout, args, kwargs)                 # a call like the original's -> the graph's inputs
    >>> rebuild(layout, outputs)                            # the graph's outputs -> what the original returned
"""
from __future__ import annotations

import inspect
from typing import Any

from .tensors import _rebuild_mapping, call_model, flatten_output, map_tensors, unflatten_output


def input_layout(example_inputs: Any) -> tuple[str, list[str]]:
    """('tensor' | 'tuple' | 'dict', input names) of a batch's inputs."""
    import torch

    if isinstance(example_inputs, torch.Tensor):
        return "tensor", ["input"]
    if isinstance(example_inputs, dict):
        return "dict", list(example_inputs)
    return "tuple", [f"input_{i}" for i in range(len(example_inputs))]


def positional_names(model, kind: str, names: list[str]) -> list[str]:
    """The names the model's forward gives its positional parameters, so that a graph fed by keyword (a tokenizer's
    dict) can also be called positionally, as the original could (`m(ids, mask)`)."""
    if kind != "dict":
        return names
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return names
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)] or names


def values_of(example_inputs: Any) -> list:
    """A batch's input tensors in the layout's order."""
    import torch

    if isinstance(example_inputs, torch.Tensor):
        return [example_inputs]
    return list(example_inputs.values()) if isinstance(example_inputs, dict) else list(example_inputs)


def layout_of(model, example_inputs: Any) -> dict:
    """The contract of `model` called on `example_inputs` (run once, without gradients), with each input's sequence
    axis (`sequence_axes`)."""
    import torch

    kind, names = input_layout(example_inputs)
    with torch.inference_mode():
        outputs, spec = flatten_output(call_model(model, example_inputs))
    return {"input_kind": kind, "input_names": names, "call_names": positional_names(model, kind, names),
            "outputs": spec, "output_ranks": [t.dim() for t in outputs],
            "sequence_axes": sequence_axes(model, example_inputs)}


def sequence_axes(model, example_inputs: Any) -> list:
    """For each input (the layout's order), the axis that is free to vary between calls, or None: axis 1 of token
    ids and masks (2-D integers); for float inputs, the axis at which the model takes another length, tried in
    one forward each: a waveform's samples ([rows, samples]: a 2-D float, like a table's features, which cannot
    vary), a sequence of vectors' steps ([rows, steps, features]) or a 1-D convolution's ([rows, channels, steps]).
    Token inputs and undecided float inputs whose axis 1 has the tried axis's size grow with it (an attention mask
    beside a waveform, two sequences added together)."""
    import torch

    values = values_of(example_inputs)
    axes = [1 if _tokens(v) else None for v in values]
    for i, v in enumerate(values):
        if axes[i] is not None or not isinstance(v, torch.Tensor) or not v.is_floating_point() \
                or v.dim() not in (2, 3):
            continue
        for axis in range(1, v.dim()):
            size = v.shape[axis]
            beside = [j for j, w in enumerate(values) if j != i and isinstance(w, torch.Tensor) and w.dim() >= 2
                      and w.shape[1] == size and (axes[j] == 1 or (axes[j] is None and w.is_floating_point()))]
            grown = [_grow(w, axis) if j == i else _grow(w, 1) if j in beside else w for j, w in enumerate(values)]
            if _runs(model, example_inputs, grown):
                axes[i] = axis
                for j in beside:  # a float mask or a second sequence of the same length
                    axes[j] = 1
                break
    return axes


def _tokens(t) -> bool:
    import torch

    return isinstance(t, torch.Tensor) and t.dim() == 2 and not t.is_floating_point()


def _grow(t, axis: int):
    """`t` three steps longer along `axis` (copies of its first step)."""
    import torch

    return torch.cat([t, t.narrow(axis, 0, 1).repeat_interleave(3, dim=axis)], dim=axis)


def _runs(model, example_inputs: Any, values: list) -> bool:
    import torch

    from .scoped import quiet

    try:
        with torch.inference_mode(), quiet():
            call_model(model, _like(example_inputs, values))
        return True
    except Exception:
        return False


def _like(example_inputs: Any, values: list):
    """`values` laid out as `example_inputs` are (a tensor, a tuple or a dict)."""
    import torch

    if isinstance(example_inputs, torch.Tensor):
        return values[0]
    if isinstance(example_inputs, dict):
        return _rebuild_mapping(type(example_inputs), dict(zip(example_inputs, values)))
    if hasattr(example_inputs, "_fields"):  # a namedtuple
        return type(example_inputs)(*values)
    return type(example_inputs)(values) if isinstance(example_inputs, tuple) else list(values)


def flat_module(model, layout: dict):
    """A module whose forward takes the inputs as positional tensors (the layout's order) and returns the model's
    output tensors as a flat tuple: the shape exporters trace."""
    import torch

    kind, names = layout["input_kind"], layout["input_names"]

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *values):
            inputs = values[0] if kind == "tensor" else dict(zip(names, values)) if kind == "dict" else tuple(values)
            return tuple(flatten_output(call_model(self.model, inputs))[0])

    return Flat()


def bind(layout: dict, args: tuple, kwargs: dict) -> list:
    """The graph's inputs, in order, for a call like the original model's: positional, keyword or a mix, bound
    as its forward's signature binds them. One clear TypeError when they do not fit."""
    import torch

    names = layout["input_names"]
    if layout["input_kind"] != "dict":
        if kwargs or len(args) != len(names):
            raise TypeError(f"the model takes {len(names)} positional input(s), got {len(args)}"
                            + (f" and keywords {', '.join(kwargs)}" if kwargs else ""))
        return list(args)
    call_names = layout.get("call_names") or names
    if len(args) > len(call_names):
        raise TypeError(f"the model takes at most {len(call_names)} positional inputs ({', '.join(call_names)}), "
                        f"got {len(args)}")
    given = {k: v for k, v in {**dict(zip(call_names, args)), **kwargs}.items() if isinstance(v, torch.Tensor)}
    missing = [n for n in names if n not in given]
    if missing:
        raise TypeError(f"missing input {', '.join(map(repr, missing))}; this model was exported with "
                        f"{', '.join(names)}")
    extra = [n for n in given if n not in names]
    if extra:
        raise TypeError(f"input {', '.join(map(repr, extra))} was not an input when this model was exported (it "
                        f"takes {', '.join(names)})")
    return [given[n] for n in names]


def rebuild(layout: dict, outputs: list):
    """What the original model returned, around the graph's output tensors."""
    spec = layout.get("outputs")
    return unflatten_output(list(outputs), spec) if spec is not None else outputs[0]


def uses_cache(model) -> bool:
    """Whether a Hugging Face model returns a key/value cache object by default."""
    return hasattr(model, "modules") and any(getattr(getattr(m, "config", None), "use_cache", None)
                                             for m in model.modules())


def cache_free(model):
    """`model` itself, or a copy with its key/value cache off when it returns one: what an exported graph is
    compared with."""
    import copy

    return without_cache(copy.deepcopy(model)) if uses_cache(model) else model


def without_cache(model):
    """`model` (a copy the caller owns) with a Hugging Face model's key/value cache off: an exported graph returns
    tensors, not a cache object, and the first-pass logits are the same."""
    for m in model.modules():
        config = getattr(m, "config", None)
        if getattr(config, "use_cache", None):
            config.use_cache = False
    return model


def on_cpu(example_inputs: Any):
    return map_tensors(example_inputs, lambda t: t.cpu())


def to_trace(model, example_inputs: Any) -> tuple:
    """(a copy of `model` in eval mode on the CPU without its key/value cache, the inputs on the CPU, its layout):
    what a graph exporter traces. A copy, because tracing a Hugging Face model was seen to change the eager
    model's later outputs; its whole-map average pools as global ones (`wrappers.whole_map_pools`), its multi-head
    attention with general lengths (`wrappers.traceable_attention`)."""
    import copy

    from .wrappers import traceable_attention, whole_map_pools

    model = traceable_attention(whole_map_pools(without_cache(copy.deepcopy(model).eval().cpu())))
    example_inputs = on_cpu(example_inputs)
    return model, example_inputs, layout_of(model, example_inputs)


def other_shape(example_inputs: Any, layout: dict, rows: int | None = None, length: str = "longer"):
    """The example inputs at a batch size and sequence length they do not have, to check that an exported graph is
    general rather than traced to one shape: one row more (or `rows` rows), and along each input's sequence axis
    three steps more, copied from the first (length 'longer'), the same steps ('same') or a third fewer, at least
    two, the first ones kept ('shorter')."""
    import torch

    def batch(v):
        return v[:rows] if rows else torch.cat([v, v[:1]])

    def steps(v, axis):
        n = v.shape[axis]
        return _grow(v, axis) if length == "longer" else v if length == "same" else \
            v.narrow(axis, 0, max(2, n - max(1, n // 3)))

    values = values_of(example_inputs)
    grown = [steps(batch(v), axis) if axis is not None else batch(v) if isinstance(v, torch.Tensor) and v.dim()
             else v for v, axis in zip(values, _axes(values, layout))]
    return _like(example_inputs, grown)


def _axes(values: list, layout: dict) -> list:
    return layout.get("sequence_axes") or [1 if _tokens(v) else None for v in values]  # or a layout saved before


def other_shapes(example_inputs: Any, layout: dict, model=None) -> list:
    """`other_shape`s that an exported graph must run at, as the model does: one row more; one row (a program
    traced at several rows may assume more than one: torch.export was seen to), each three steps longer where
    inputs have a sequence axis; and a third shorter at the example's rows (three steps more can land where the
    traced length's own conditions still hold: a convolutional front end's frame count, a length padded to a
    window's multiple). With `model`, the shapes it runs at itself: at its longest length (inputs padded to it) the
    rows change alone. Where it runs at none of them, all of them, so that a check fails as the model does rather
    than pass unchecked."""
    from .tensors import batch_size_of

    values = values_of(example_inputs)
    lengths = [v.shape[axis] for v, axis in zip(values, _axes(values, layout)) if axis is not None]

    def runs(inputs) -> bool:
        return model is None or _runs(model, example_inputs, values_of(inputs))

    taken, refused = [], []
    for rows in (None, 1):
        tried = [other_shape(example_inputs, layout, rows)]
        if lengths:
            tried.append(other_shape(example_inputs, layout, rows, length="same"))
        fits = next((inputs for inputs in tried if runs(inputs)), None)
        (taken.append(fits) if fits is not None else refused.append(tried[0]))
    if lengths and min(lengths) >= 3:
        shorter = other_shape(example_inputs, layout, batch_size_of(example_inputs), length="shorter")
        (taken if runs(shorter) else refused).append(shorter)
    return taken or refused
