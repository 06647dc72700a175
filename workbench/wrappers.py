"""Modules the workbench wraps a model in: a compiled forward, and a model that follows its caller's device; and
two it puts in a copy that graph exporters trace: an average pool over a whole feature map, and torch's multi-head
attention computed so that a trace keeps its lengths general.

They live at module level so that copies and saves of a wrapped model pickle and reload; each gives back the
module it wraps through `saved_form()`, which is what storage writes and exports.
"""
from __future__ import annotations

import itertools
import types

import torch
from torch import nn

from .tensors import map_tensors


class Compiled(nn.Module):
    """`torch.compile(module, mode=...)`, compiled on first use (and again after a copy or a reload).

    With CUDA graphs (modes reduce-overhead and max-autotune on a GPU) a compiled forward returns tensors in a
    buffer the next call overwrites; this returns copies, so a caller may keep what it gets.
    """

    def __init__(self, module: nn.Module, mode: str = "default", dynamic: bool | None = None, graphs: bool = False):
        super().__init__()
        self.module, self.mode, self.dynamic, self.graphs = module, mode, dynamic, graphs
        self._fn = None

    def __getstate__(self):  # the compiled function is neither copied nor pickled: it is rebuilt on first use
        state = dict(self.__dict__)
        state["_fn"] = None
        return state

    def forward(self, *args, **kwargs):
        if self._fn is None:
            self._fn = torch.compile(_own_entry(), mode=self.mode, dynamic=self.dynamic)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return map_tensors(self._fn(self.module, *args, **kwargs), torch.Tensor.clone)
        return self._fn(self.module, *args, **kwargs)

    def saved_form(self) -> nn.Module:
        return self.module


def _call(module, *args, **kwargs):
    return module(*args, **kwargs)


def _own_entry():
    """A function that calls a module, with a code object of its own. Dynamo keeps its compiled graphs per code
    object, at most `recompile_limit` (8) each: compiled models of one class (every BERT's `forward`) would share
    those 8 slots between them, and past them run uncompiled, silently. An entry of its own gives each compiled
    model its own slots, with no change to torch's global settings."""
    code = _call.__code__.replace(co_name=f"workbench_compiled_{next(_entries)}")
    return types.FunctionType(code, _call.__globals__, code.co_name)


_entries = itertools.count()


class FollowsInputs(nn.Module):
    """A model kept on one device (a GPU) that takes inputs on any device and returns its outputs on the device
    the inputs came on: `result.model(x_cpu)` works like the user's CPU model, `result.model(x_gpu)` stays on the
    GPU with no copy.

    Otherwise it reads as the model it wraps: its attributes (`result.model.fc1`), indexing (`result.model[0]`),
    submodules, layer names and state_dict keys are the wrapped model's, with no `module.` prefix of its own, so a
    state_dict saved from a GPU result loads where the CPU result's would (a float result's into the user's own
    class) and charts and layer tables line up with the original. It is meant to be outermost, as results have it."""

    def __init__(self, module: nn.Module, device: str):
        super().__init__()
        self.module, self.device = module, device

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # "module" is not set yet while unpickling; dunders (__deepcopy__ of a wrapped GraphModule) would make
            # copy and pickle treat the wrapper as the model inside it
            if name == "module" or (name.startswith("__") and name.endswith("__")):
                raise
            return getattr(self.module, name)

    def get_submodule(self, target: str) -> nn.Module:
        return self.module.get_submodule(target) if target else self

    def __getitem__(self, index):
        return self.module[index]

    def __len__(self):
        return len(self.module)

    def __bool__(self):  # a model is true, as nn.Module is, whether or not the wrapped one has a length
        return True

    def __iter__(self):
        return iter(self.module)

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        return self.module.named_modules(memo, prefix, remove_duplicate)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, *args, **kwargs):
        where = next((t.device for t in _tensors((args, kwargs))), None)
        if where is None or same_device(where, self.device):
            return self.module(*args, **kwargs)
        out = self.module(*map_tensors(args, lambda t: t.to(self.device)),
                          **map_tensors(kwargs, lambda t: t.to(self.device)))
        return map_tensors(out, lambda t: t.to(where))

    def saved_form(self) -> nn.Module:
        return self.module


def same_device(a, b) -> bool:
    """Whether two devices are one ('cuda' is the current GPU, as 'cuda:0' usually is)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def to_device(model: nn.Module, device) -> nn.Module:
    """`model.to(device)`, skipped where every parameter and buffer is there already: torchao's quantized weights
    do not implement what `Module.to` asks of them on a GPU, even for a move to where they are."""
    if all(same_device(t.device, device) for t in [*model.parameters(), *model.buffers()]):
        return model
    return model.to(device)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def saved_form(model):
    """The module under the workbench's wrappers (what is saved and exported), or `model` itself."""
    while isinstance(model, (Compiled, FollowsInputs)):
        model = model.saved_form()
    return model


def covers(pool: nn.AvgPool2d, size: tuple) -> bool:
    """Whether an AvgPool2d's one window runs past the whole `size` (h, w) map, so that it computes the map's mean:
    no padding, ceil_mode, and each side shorter than the kernel by less than a stride (torch divides a window that
    runs past the map by the part inside it). Then it does for every map from that size up to the kernel's, so a
    graph traced at one size with the map's sides left dynamic stays right."""
    def pair(v):
        v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
        return v * 2 if len(v) == 1 else v

    kernel, stride = pair(pool.kernel_size), pair(pool.stride or pool.kernel_size)
    return pool.ceil_mode and pair(pool.padding) == (0, 0) and pool.divisor_override is None and all(
        d < k and k - d < s for d, k, s in zip(size, kernel, stride))


class WholeMapAvgPool(nn.Module):
    """An AvgPool2d that, where its one window runs past the whole map (`covers`), computes the map's mean as a
    global average pool (what graph exporters write as GlobalAveragePool); elsewhere the pool itself."""

    def __init__(self, pool: nn.AvgPool2d):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        if covers(self.pool, tuple(x.shape[-2:])):
            return torch.nn.functional.adaptive_avg_pool2d(x, 1)
        return self.pool(x)


def whole_map_pools(model: nn.Module) -> nn.Module:
    """`model` (a copy the caller owns, which graph exporters trace) with its AvgPool2d layers as `WholeMapAvgPool`:
    Hugging Face's EfficientNet pools its last map (7x7 at 224 pixels) with `AvgPool2d(1280, ceil_mode=True)`,
    which OpenVINO refuses (a kernel larger than its input) and whose int8 form in ONNX Runtime returned zeros.
    The two are the same at the traced map's size and at every size up to the kernel's."""
    from .architectures import set_submodule

    for name in [n for n, m in model.named_modules() if n and type(m) is nn.AvgPool2d]:
        set_submodule(model, name, WholeMapAvgPool(model.get_submodule(name)))
    return model


class TraceableAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention computed with views that keep the batch size and lengths general, for graph exporters:
    torch's own forward reshapes by lengths it read as numbers (`q.view(tgt_len, bsz * num_heads, head_dim)`),
    which a trace writes into the graph as constants (pytorch/pytorch#122321), so the ONNX graph or TorchScript
    trace of any nn.Transformer* model ran only at the traced length. The same arithmetic in eval mode (a query
    that every key is masked from gets zeros without weights, as torch's fused attention gives, and NaN weights
    with them, as its own do); training, bias_k/bias_v, add_zero_attn, unbatched inputs, masks neither boolean nor
    float, and a causal hint without its mask go to torch's own forward."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        masks = [m for m in (attn_mask, key_padding_mask) if m is not None]
        if self.training or self.bias_k is not None or self.add_zero_attn or query.dim() != 3 or (
                is_causal and attn_mask is None) or any(m.dtype != torch.bool and not m.is_floating_point()
                                                        for m in masks):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        weights = (self.in_proj_weight.chunk(3) if self._qkv_same_embed_dim
                   else (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q, k, v = (nn.functional.linear(x, w, b).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for x, w, b in zip((query, key, value), weights, biases))  # (batch, heads, length, head_dim)
        scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
        if attn_mask is not None and attn_mask.dim() == 3:  # (batch * heads, target length, source length)
            attn_mask = attn_mask.unflatten(0, (-1, self.num_heads))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[:, None, None, :]
        for mask in (attn_mask, key_padding_mask):
            if mask is not None:  # a boolean mask marks what is not attended to; a float one is added
                scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        attention = scores.softmax(-1)
        if masks and not need_weights:
            attention = attention.masked_fill((scores == float("-inf")).all(-1, keepdim=True), 0.0)
        out = self.out_proj((attention @ v).transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, ((attention.mean(1) if average_attn_weights else attention) if need_weights else None)


def traceable_attention(model: nn.Module) -> nn.Module:
    """`model` (a copy the caller owns, which graph exporters trace) with its nn.MultiheadAttention layers as
    `TraceableAttention` (the same layer and weights; only its forward differs)."""
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = TraceableAttention
    return model
