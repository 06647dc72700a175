"""Batches as the user's model takes them (a tensor, a tuple of positional arguments or a dict of keyword
arguments) and copies of modules: pure helpers shared by every layer; nothing here knows devices or backends.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

from .errors import DataError, ModelError, first_line


def call_model(model: Any, inputs: Any):
    """Run `model` on a batch's inputs (tensor, tuple of positional args, or dict of keyword args)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def map_tensors(inputs: Any, fn: Callable):
    """Apply `fn` to every tensor inside a batch's inputs, keeping the structure."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, dict) or _is_mapping_output(inputs):
        return _rebuild_mapping(type(inputs), {k: map_tensors(v, fn) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        items = [map_tensors(v, fn) for v in inputs]
        return type(inputs)(*items) if hasattr(inputs, "_fields") else type(inputs)(items)
    return inputs


def _is_mapping_output(value) -> bool:
    return hasattr(value, "keys") and hasattr(value, "items") and hasattr(value, "__getitem__")


def _rebuild_mapping(cls, items: dict):
    """A dict-like of class `cls` (a dict, an OrderedDict, a Hugging Face ModelOutput) holding `items`."""
    if cls is dict:
        return items
    try:
        return cls(**items)
    except Exception:
        return dict(items)


def flatten_output(output: Any) -> tuple[list, Any]:
    """(tensors, spec): the tensors inside a model's output in order, and a JSON-able description of its
    structure (tensors, tuples, lists, dicts, Hugging Face ModelOutputs; None and plain values kept as they are)
    that `unflatten_output` rebuilds it from. Runtimes that return a flat list of arrays (ONNX Runtime) give the
    user back what the torch model returned."""
    import torch

    leaves: list = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            leaves.append(value)
            return "tensor"
        if isinstance(value, dict) or _is_mapping_output(value):
            cls = type(value)
            name = None if cls is dict else f"{cls.__module__}:{cls.__qualname__}"
            return {"mapping": name, "items": [[str(k), walk(v)] for k, v in value.items()]}
        if isinstance(value, (tuple, list)):
            return {"sequence": "list" if isinstance(value, list) else "tuple", "items": [walk(v) for v in value]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise ModelError(f"the model's output holds a {type(value).__name__}, which cannot be exported as a "
                         "graph output; return tensors (or tuples/dicts of them), e.g. use_cache=False for a "
                         "language model's cache")

    return leaves, walk(output)


def unflatten_output(tensors: list, spec: Any):
    """The output `flatten_output` described, rebuilt around `tensors` (in its order)."""
    import importlib

    it = iter(tensors)

    def build(s):
        if s == "tensor":
            return next(it)
        if "value" in s:
            return s["value"]
        if "sequence" in s:
            items = [build(x) for x in s["items"]]
            return items if s["sequence"] == "list" else tuple(items)
        items = {k: build(v) for k, v in s["items"]}
        cls = dict
        if s["mapping"]:
            module, _, name = s["mapping"].partition(":")
            try:
                cls = importlib.import_module(module)
                for part in name.split("."):
                    cls = getattr(cls, part)
            except (ImportError, AttributeError):
                cls = dict  # the class is not importable here: its keys and values still are
        return _rebuild_mapping(cls, items)

    return build(spec)


def first_tensor(output: Any):
    """The tensor a metric reads from a model's output: the output itself, its first element, or logits."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "keys"):
        for key in ("logits", "sentence_embedding", "last_hidden_state"):
            if key in output:
                return output[key]
        return next(iter(output.values()))
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    raise ModelError(f"the model returned {type(output).__name__}; expected a tensor (or a tuple/dict of tensors)")


def tensors_in(inputs: Any) -> list:
    """The tensors inside a batch's inputs (or a call's arguments), in order."""
    found: list = []
    map_tensors(inputs, found.append)
    return found


def batch_size_of(inputs: Any) -> int:
    """Rows in a batch: the first dimension of its first tensor."""
    found = [t.shape[0] for t in tensors_in(inputs) if t.dim()]
    if not found:
        raise DataError("cannot tell the batch size: the inputs hold no tensor with a batch dimension")
    return found[0]


def concat_rows(pieces: list, rows: int):
    """The first `rows` rows of several batches of the same structure, concatenated."""
    import torch

    def cat(*parts):
        try:
            return torch.cat(parts)[:rows]
        except (RuntimeError, TypeError) as e:
            shapes = [tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__ for p in parts]
            raise DataError(f"cannot make a batch of {rows} from batches shaped {shapes} ({first_line(e)}); "
                            "the validation batches must have the same shape but for the batch size") from None

    first = pieces[0]
    if isinstance(first, torch.Tensor):
        return cat(*pieces)
    if isinstance(first, dict):
        return {k: cat(*(p[k] for p in pieces)) for k in first}
    return type(first)(cat(*(p[i] for p in pieces)) for i in range(len(first)))


def copy_model(model):
    """copy.deepcopy, also for modules holding computed (non-leaf) tensors, e.g. torch.nn.utils.prune's `weight`
    or weight_norm, which the forward pre-hooks recompute anyway."""
    import copy

    import torch

    memo = {id(v): v.detach().clone() for m in model.modules() for v in vars(m).values()
            if isinstance(v, torch.Tensor) and not v.is_leaf}
    return copy.deepcopy(model, memo)


def drop_cached_tensors(model) -> None:
    """Forget tensors the model kept from earlier forwards, which a copy in another dtype or training cannot use:
    caches its modules clear when they enter training (LeViT keeps its attention biases per device, not per dtype:
    a half-precision copy found float32 ones), and functools caches on its classes' methods (BEiT's
    relative-position index, made under `inference_mode`, which autograd then cannot save for backward). Every
    module keeps its train/eval mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    model.train(modes[0][1])  # back through the modules' own train(), then any flag the root's mode did not set
    for m, training in modes:
        if m.training != training:
            m.training = training
    for cls in {type(m) for m in model.modules()}:
        for klass in cls.__mro__:
            if klass.__module__.startswith("torch.") or klass is object:
                continue
            for value in vars(klass).values():
                fn = getattr(value, "__func__", value)
                cells = []
                for cell in getattr(fn, "__closure__", None) or ():
                    try:
                        cells.append(cell.cell_contents)
                    except ValueError:  # an empty cell
                        pass
                for cached in (fn, *cells):  # an lru_cache, or a wrapper that calls one (transformers' for compile)
                    if callable(getattr(cached, "cache_clear", None)):
                        cached.cache_clear()


@contextlib.contextmanager
def rng_preserved():
    """torch's random state restored after the block: iterating a DataLoader (even unshuffled) draws from it, so
    measuring the user's model would otherwise change the random numbers their next cell gets."""
    import torch

    with torch.random.fork_rng(devices=_cuda_devices()):
        yield


@contextlib.contextmanager
def seeded(seed: int = 0):
    """torch's random generators (CPU and every CUDA device) seeded for the block and restored after it:
    reproducible, and the user's own random state is left as it was."""
    import torch

    with torch.random.fork_rng(devices=_cuda_devices()):
        torch.manual_seed(seed)
        yield


def _cuda_devices() -> list[int]:
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
