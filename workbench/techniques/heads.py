"""Structured pruning of transformer blocks: whole attention heads (their query, key and value rows and the output
projection's columns) and feed-forward neurons (the up/gate rows and the down projection's columns) are removed,
so the model becomes a smaller dense model with its hidden size, and so its output, unchanged.

The blocks are found by the names the common families give their layers (`architectures.ATTENTION` and
`FEED_FORWARD`), which covers BERT, RoBERTa, ALBERT, DistilBERT, DeBERTa-v2 (its relative-position projections cut
with the heads), ViT, Swin and Swin V2 (their per-head biases), CLIP, OPT, Phi, MobileViT, GPT-2 (fused `Conv1D`
QKV), fused QKV and gate/up projections in both layouts (Phi-3, ModernBERT, GPT-NeoX, Falcon) and LLaMA-style
decoders with grouped-query attention, where a key/value head is removed together with the query heads that share
it, so every group keeps its size; a depthwise convolution between an FFN's two layers (SegFormer's Mix-FFN) keeps
the neurons' channels. Attention forwards in transformers 5 mostly reshape by head size (`view(..., -1, head_dim)`)
or read the head counts the modules keep, which are updated too; some rebuild the output at `embed_dim` or keep
per-head weights elsewhere (BLOOM's ALiBi slopes): `prune.structured` checks each cut against the model with the
removed heads silenced and, where they differ, puts the round back (`undo`) and cuts the FFN neurons alone.
"""
from __future__ import annotations

from contextvars import ContextVar

from ..architectures import (HEAD_COUNTS, KV_COUNTS, Attention, FeedForward, attention_blocks,
                             feed_forward_blocks, in_features)

# -- slicing ---------------------------------------------------------------------------------------------------
def _keep_out(layer, index):
    """The layer with only output features `index` (a new module)."""
    import torch

    with torch.no_grad():
        if type(layer).__name__ == "Conv1D":  # weight (in, out): y = x @ W + b
            new = type(layer)(len(index), layer.nx)
            new.weight.copy_(layer.weight[:, index])
            new.bias.copy_(layer.bias[index])
            return new.to(layer.weight.device, layer.weight.dtype)
        new = torch.nn.Linear(layer.in_features, len(index), bias=layer.bias is not None)
        new.weight.copy_(layer.weight[index])
        if layer.bias is not None:
            new.bias.copy_(layer.bias[index])
        return new.to(layer.weight.device, layer.weight.dtype)


def _keep_in(layer, index):
    import torch

    with torch.no_grad():
        if type(layer).__name__ == "Conv1D":
            new = type(layer)(layer.nf, len(index))
            new.weight.copy_(layer.weight[index, :])
            new.bias.copy_(layer.bias)
            return new.to(layer.weight.device, layer.weight.dtype)
        new = torch.nn.Linear(len(index), layer.out_features, bias=layer.bias is not None)
        new.weight.copy_(layer.weight[:, index])
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
        return new.to(layer.weight.device, layer.weight.dtype)


def _keep_channels(conv, index):
    """A depthwise convolution (a filter per channel) with only channels `index` (a new module)."""
    import torch

    n = len(index)
    cls = torch.nn.Conv2d if isinstance(conv, torch.nn.Conv2d) else torch.nn.Conv1d
    new = cls(n, n, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups=n,
              bias=conv.bias is not None, padding_mode=conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(conv.weight[index])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[index])
    return new.to(conv.weight.device, conv.weight.dtype)


# what a cut changed, as functions that put it back (`prune_transformer(undo=...)`): per thread and task
_UNDO: ContextVar[list | None] = ContextVar("workbench_prune_undo", default=None)


def _set(obj, name: str, value) -> None:
    """setattr, remembered for undoing."""
    undo = _UNDO.get()
    if undo is not None:
        old = getattr(obj, name)
        undo.append(lambda: setattr(obj, name, old))
    setattr(obj, name, value)


def _replace(model, old, new) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if child is old:
                _set(parent, child_name, new)


def _rows(layer) -> tuple:
    """(weight, its gradient or None), each as (out, in): what `_score` ranks."""
    w, g = layer.weight.detach(), layer.weight.grad
    if type(layer).__name__ == "Conv1D":  # weight (in, out)
        return w.t(), None if g is None else g.t()
    return w, g


def _map(pair: tuple, fn) -> tuple:
    """`fn` applied to a weight and to its gradient alike (a slice, a transpose, a reshape)."""
    w, g = pair
    return fn(w), None if g is None else fn(g)


def _score(pair: tuple, criterion: str):
    """Importance of each row of a (rows, ...) weight: its L1/L2 norm, or |w * grad| summed (Taylor; magnitude
    where no gradient was computed)."""
    import torch

    w, g = pair[0].float(), pair[1]
    if criterion == "taylor":
        return (w * g.float()).abs().flatten(1).sum(1) if g is not None else w.abs().flatten(1).sum(1)
    return torch.linalg.vector_norm(w.flatten(1), ord=1 if criterion == "l1" else 2, dim=1)


def _groups_rows(block: Attention):
    """For each key/value group, the rows of its query heads, its key heads and its value heads in the query
    projection (fused) or in q, k and v: three [groups, n] index tensors."""
    import torch

    groups, d = block.kv_heads, block.head_dim
    per = block.heads // groups
    g = torch.arange(groups)[:, None]
    if block.fused == "grouped":  # per group: its query heads, then its key head and its value head
        start = g * (per + 2) * d
        return start + torch.arange(per * d), start + per * d + torch.arange(d), start + (per + 1) * d + torch.arange(d)
    q, kv = _query_rows(block), g * d + torch.arange(d)
    if block.k is None:  # 'blocks': every query head, then every key head, then every value head
        return q, block.heads * d + kv, (block.heads + groups) * d + kv
    return q, kv, kv


def plan_heads(block: Attention, ratio: float, criterion: str):
    """The key/value groups to keep (sorted) when `ratio` of them go, by importance; None when none would go."""
    import torch

    groups = block.kv_heads
    drop = min(int(round(ratio * groups)), groups - 1)  # at least one group stays
    if drop <= 0:
        return None
    rows = _groups_rows(block)
    if block.k is None:
        parts = [_map(_rows(block.q), lambda w, r=r: w[r.flatten()]) for r in rows]
    else:
        parts = [_rows(m) for m in (block.q, block.k, block.v)]
    score = sum(_score(_map(part, lambda w: w.reshape(groups, -1)), criterion) for part in parts)
    score = score + _score(_map(_rows(block.o), lambda w: w.t().reshape(groups, -1)), criterion)
    return sorted(torch.argsort(score, descending=True)[:groups - drop].tolist())


def _query_rows(block: Attention):
    """[groups, n]: each key/value group's query heads' features, as an unfused query projection's rows and the
    output projection's input columns lay them out."""
    import torch

    per, d = block.heads // block.kv_heads, block.head_dim
    return torch.arange(block.kv_heads)[:, None] * per * d + torch.arange(per * d)


def _query_columns(block: Attention, kept_groups):
    """The output projection's input columns of the kept groups' query heads."""
    return _query_rows(block)[kept_groups].flatten()


def silence_heads(block: Attention, kept_groups) -> None:
    """Zero the output projection's columns of the heads that `cut_heads` removes: the same function as the cut
    model computes, in the uncut one (what `prune_transformer` checks the cut against)."""
    _zero_inputs(block.o, _query_columns(block, kept_groups))


def _zero_inputs(layer, keep) -> None:
    """Zero the layer's weights that read any input feature but `keep`."""
    import torch

    drop = torch.ones(in_features(layer), dtype=torch.bool)
    drop[keep] = False
    index = (drop, slice(None)) if type(layer).__name__ == "Conv1D" else (slice(None), drop)  # Conv1D: (in, out)
    weight = layer.weight
    undo = _UNDO.get()
    if undo is not None:  # only what is zeroed is kept to put back
        saved = weight.detach()[index].clone()
        undo.append(lambda: weight.data.__setitem__(index, saved))
    with torch.no_grad():
        weight[index] = 0


def cut_heads(model, block: Attention, kept_groups) -> int:
    """Remove every key/value group but `kept_groups` (with their query heads); returns the heads kept."""
    import copy
    import inspect

    import torch

    q_rows, k_rows, v_rows = (r[kept_groups].flatten() for r in _groups_rows(block))
    q_index, per = _query_columns(block, kept_groups), block.heads // block.kv_heads
    _cut_per_head(model, block, [g * per + j for g in kept_groups for j in range(per)])  # before q/k/v/o change
    if block.k is None:
        _replace(model, block.q, _keep_out(block.q, torch.sort(torch.cat([q_rows, k_rows, v_rows])).values))
    else:
        _replace(model, block.q, _keep_out(block.q, q_rows))
        _replace(model, block.k, _keep_out(block.k, k_rows))
        _replace(model, block.v, _keep_out(block.v, v_rows))
    for layer, like in block.alongside:
        _replace(model, layer, _keep_out(layer, q_rows if like == "q" else k_rows))
    _replace(model, block.o, _keep_in(block.o, q_index))
    heads = len(q_index) // block.head_dim
    m = block.module
    for owner in [m, *m.children()]:  # the counts live in the attention module or (BERT) its `self` child
        for attr in HEAD_COUNTS:
            if isinstance(getattr(owner, attr, None), int):
                _set(owner, attr, heads)
        if isinstance(getattr(owner, "all_head_size", None), int):
            _set(owner, "all_head_size", heads * block.head_dim)
    for attr in KV_COUNTS:
        if isinstance(getattr(m, attr, None), int):
            _set(m, attr, len(kept_groups))
    config = getattr(m, "config", None)  # Phi-3 reads the counts from the model's config: this layer gets its own
    try:
        source = inspect.getsource(type(m).forward)
    except (OSError, TypeError):
        source = ""
    if isinstance(getattr(config, "num_attention_heads", None), int) and "config.num_" in source:
        own = copy.copy(config)  # shallow: a later change to the model's config (its attention implementation)
        own.num_attention_heads = heads  # does not reach this layer
        if isinstance(getattr(config, "num_key_value_heads", None), int):
            own.num_key_value_heads = len(kept_groups)
        _set(m, "config", own)
    if isinstance(getattr(m, "split_size", None), int):  # GPT-2 splits the fused output in three
        _set(m, "split_size", heads * block.head_dim)
    return heads


def _cut_per_head(model, block: Attention, q_heads: list) -> None:
    """Keep the kept heads' entries of the attention's other per-head weights: a parameter of the model's own
    classes (not a norm's) with one axis as long as the head count (Swin's relative-position bias table, Swin V2's
    logit scale), and a position-bias network's last Linear, which gives one value per head (Swin V2's); head counts
    kept in its submodules follow. A guess by shape, which the check against the silenced model confirms."""
    import torch

    projections = {id(x) for x in (block.q, block.k, block.v, block.o, *(m for m, _ in block.alongside))}
    inside = {id(x) for p in (block.q, block.k, block.v, block.o) if p is not None for x in p.modules()}
    index = torch.tensor(q_heads)
    for name, sub in list(block.module.named_modules()):
        if id(sub) in projections or id(sub) in inside:
            continue
        if isinstance(sub, torch.nn.Linear):
            if sub.out_features == block.heads and "position" in name:
                _replace(model, sub, _keep_out(sub, index))
            continue
        if not type(sub).__module__.startswith("torch.") and "norm" not in type(sub).__name__.lower():
            for attr, p in list(sub.named_parameters(recurse=False)):
                axes = [i for i, n in enumerate(p.shape) if n == block.heads]
                if len(axes) == 1:
                    _set(sub, attr, torch.nn.Parameter(p.detach().index_select(axes[0], index.to(p.device)).clone(),
                                                       requires_grad=p.requires_grad))
        for attr in HEAD_COUNTS:
            if isinstance(getattr(sub, attr, None), int) and getattr(sub, attr) == block.heads:
                _set(sub, attr, len(q_heads))


def plan_neurons(block: FeedForward, ratio: float, criterion: str):
    """The hidden neurons to keep (sorted) when `ratio` of them go, by importance; None when none would go."""
    import torch

    width = in_features(block.down)
    keep = max(1, width - int(round(ratio * width)))
    if keep == width:
        return None
    score = sum(_score(_map(_rows(u), lambda w: w.reshape(block.parts, width, -1).transpose(0, 1).reshape(
        width, -1)), criterion) for u in block.ups) + _score(_map(_rows(block.down), lambda w: w.t()), criterion)
    return torch.sort(torch.argsort(score, descending=True)[:keep]).values


def silence_neurons(block: FeedForward, index) -> None:
    """Zero the down projection's columns of the neurons that `cut_neurons` removes (see `silence_heads`)."""
    _zero_inputs(block.down, index)


def cut_neurons(model, block: FeedForward, index) -> int:
    """Keep only the hidden neurons `index`; returns how many."""
    import torch

    width = in_features(block.down)
    rows = torch.cat([index + part * width for part in range(block.parts)])
    for up in block.ups:
        _replace(model, up, _keep_out(up, rows))
    for conv in block.between:
        _replace(model, conv, _keep_channels(conv, index))
    _replace(model, block.down, _keep_in(block.down, index))
    return len(index)


def prune_transformer(model, ratio: float, criterion: str, ignored: set, layer_ratios: dict | None = None,
                      before_cut=None, undo: list | None = None, attention: bool = True) -> dict:
    """Remove `ratio` of the heads (by key/value group) and of the FFN neurons in every recognised block not in
    `ignored` (names); returns {'heads': (before, after), 'neurons': (before, after), 'blocks': n, 'ffn': n}.

    The heads and neurons that go are first silenced (their output columns zeroed) and `before_cut()` called, so
    that the caller can check that the cut model computes what the silenced one does: it must, exactly, unless the
    model uses the head count elsewhere (a per-head bias the table does not know). undo: a list that receives, in
    order, functions that put back what this call changed (call them in reverse). attention=False: the FFN
    neurons alone."""
    token = _UNDO.set(undo)
    try:
        return _prune_transformer(model, ratio, criterion, ignored, layer_ratios, before_cut, attention)
    finally:
        _UNDO.reset(token)


def _prune_transformer(model, ratio, criterion, ignored, layer_ratios, before_cut, attention_too) -> dict:
    names = {id(m): n for n, m in model.named_modules()}
    attention, ffn = attention_blocks(model), feed_forward_blocks(model)

    def left_alone(*layers) -> bool:
        return any(any(names.get(id(m), "") == i or names.get(id(m), "").startswith(i + ".") for i in ignored)
                   for m in layers if m is not None)

    def ratio_of(layer) -> float:
        return (layer_ratios or {}).get(names.get(id(layer), ""), ratio)

    heads = [(b, None if not attention_too or left_alone(b.q, b.k, b.v, b.o) else
              plan_heads(b, ratio_of(b.q), criterion)) for b in attention]
    neurons = [(b, None if left_alone(*b.ups, *b.between, b.down) else plan_neurons(b, ratio_of(b.ups[0]),
                                                                                      criterion)) for b in ffn]
    for block, kept in heads:
        if kept is not None:
            silence_heads(block, kept)
    for block, kept in neurons:
        if kept is not None:
            silence_neurons(block, kept)
    if before_cut is not None:
        before_cut()
    heads_after = sum(block.heads if kept is None else cut_heads(model, block, kept) for block, kept in heads)
    neurons_after = sum(in_features(block.down) if kept is None else cut_neurons(model, block, kept)
                        for block, kept in neurons)
    return {"heads": (sum(b.heads for b in attention), heads_after),
            "neurons": (sum(in_features(b.down) for b in ffn), neurons_after),
            "blocks": len(attention), "ffn": len(ffn)}
