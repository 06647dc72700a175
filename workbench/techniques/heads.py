"""Structured pruning of transformer blocks: whole attention heads (their query, key and value rows and the output
projection's columns) and feed-forward neurons (the up/gate rows and the down projection's columns) are removed,
so the model becomes a smaller dense model with its hidden size, and so its output, unchanged.

The blocks are found by the names the common families give their layers (`architectures.ATTENTION` and
`FEED_FORWARD`), which covers BERT, RoBERTa, ALBERT, DistilBERT, DeBERTa-v2 (its relative-position projections cut
with the heads), ViT, Swin, CLIP, OPT, Phi, MobileViT, GPT-2 (fused `Conv1D` QKV) and LLaMA-style decoders with
grouped-query attention, where a key/value head is removed together with the query heads that share it, so every
group keeps its size; a depthwise convolution between an FFN's two layers (SegFormer's Mix-FFN) keeps the neurons'
channels. Attention forwards in transformers 5 mostly reshape by head size (`view(..., -1, head_dim)`) or read the
head counts the modules keep, which are updated too; some rebuild the output at `embed_dim`, which is not: their
forward then fails after pruning, and `prune.structured` refuses the step in one line.
"""
from __future__ import annotations

from ..architectures import (HEAD_COUNTS, Attention, FeedForward, attention_blocks, feed_forward_blocks,
                             in_features)

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


def _replace(model, old, new) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if child is old:
                setattr(parent, child_name, new)


def _out_rows(layer):
    """The weight as (out, in)."""
    return layer.weight.t() if type(layer).__name__ == "Conv1D" else layer.weight


def _score(rows, criterion: str):
    """Importance of each row of a (rows, ...) tensor: its L1/L2 norm, or |w * grad| summed (Taylor)."""
    import torch

    w = rows.detach().float()
    if criterion == "taylor":
        g = getattr(rows, "grad", None)
        return (w * g.float()).abs().flatten(1).sum(1) if g is not None else w.abs().flatten(1).sum(1)
    return torch.linalg.vector_norm(w.flatten(1), ord=1 if criterion == "l1" else 2, dim=1)


def _taylor_rows(layer):
    """(out, in) weight rows with their gradient attached for the Taylor criterion."""
    w = _out_rows(layer)
    g = layer.weight.grad
    if g is not None:
        w = w.detach().clone()
        w.grad = g.t() if type(layer).__name__ == "Conv1D" else g
    return w


def prune_heads(model, block: Attention, ratio: float, criterion: str) -> int:
    """Remove `ratio` of the block's key/value groups (with their query heads); returns the heads kept."""
    import torch

    groups = block.kv_heads
    per_group = block.heads // groups
    drop = min(int(round(ratio * groups)), groups - 1)  # at least one group stays
    if drop <= 0:
        return block.heads
    d = block.head_dim
    if block.k is None:  # fused QKV: q, k and v each `heads * d` wide, side by side
        rows = _taylor_rows(block.q)
        width = block.heads * d
        score = sum(_score(rows[part * width:(part + 1) * width].reshape(block.heads, -1), criterion)
                    for part in range(3))
    else:
        score = _score(_taylor_rows(block.q).reshape(groups, -1), criterion) \
            + _score(_taylor_rows(block.k).reshape(groups, -1), criterion) \
            + _score(_taylor_rows(block.v).reshape(groups, -1), criterion)
    score = score + _score(_taylor_rows(block.o).t().reshape(groups, -1), criterion)
    kept_groups = sorted(torch.argsort(score, descending=True)[:groups - drop].tolist())
    q_heads = [g * per_group + j for g in kept_groups for j in range(per_group)]
    q_index = torch.tensor([h * d + i for h in q_heads for i in range(d)])
    kv_index = torch.tensor([g * d + i for g in kept_groups for i in range(d)])
    if block.k is None:
        width = block.heads * d
        fused = torch.cat([q_index + part * width for part in range(3)])
        _replace(model, block.q, _keep_out(block.q, fused))
    else:
        _replace(model, block.q, _keep_out(block.q, q_index))
        _replace(model, block.k, _keep_out(block.k, kv_index))
        _replace(model, block.v, _keep_out(block.v, kv_index))
    for layer, like in block.alongside:
        _replace(model, layer, _keep_out(layer, q_index if like == "q" else kv_index))
    _replace(model, block.o, _keep_in(block.o, q_index))
    heads = len(q_heads)
    m = block.module
    for owner in [m, *m.children()]:  # the counts live in the attention module or (BERT) its `self` child
        for attr in HEAD_COUNTS:
            if isinstance(getattr(owner, attr, None), int):
                setattr(owner, attr, heads)
        if isinstance(getattr(owner, "all_head_size", None), int):
            owner.all_head_size = heads * d
    if isinstance(getattr(m, "num_key_value_heads", None), int):
        m.num_key_value_heads = len(kept_groups)
    if isinstance(getattr(m, "split_size", None), int):  # GPT-2 splits the fused output in three
        m.split_size = heads * d
    bias = getattr(m, "relative_position_bias", None)  # Swin: a bias table column per head
    table = getattr(bias, "relative_position_bias_table", None)
    if table is not None and table.shape[-1] == block.heads:
        with torch.no_grad():
            bias.relative_position_bias_table = torch.nn.Parameter(table[..., q_heads].clone())
        for attr in HEAD_COUNTS:
            if isinstance(getattr(bias, attr, None), int):
                setattr(bias, attr, heads)
    return heads


def prune_neurons(model, block: FeedForward, ratio: float, criterion: str) -> int:
    """Remove `ratio` of the feed-forward block's hidden neurons; returns the neurons kept."""
    import torch

    width = in_features(block.down)
    keep = max(1, width - int(round(ratio * width)))
    if keep == width:
        return width
    score = sum(_score(_taylor_rows(u), criterion) for u in block.ups) + _score(_taylor_rows(block.down).t(),
                                                                             criterion)
    index = torch.sort(torch.argsort(score, descending=True)[:keep]).values
    for up in block.ups:
        _replace(model, up, _keep_out(up, index))
    for conv in block.between:
        _replace(model, conv, _keep_channels(conv, index))
    _replace(model, block.down, _keep_in(block.down, index))
    return keep


def prune_transformer(model, ratio: float, criterion: str, ignored: set, layer_ratios: dict | None = None) -> dict:
    """Remove `ratio` of the heads (by key/value group) and of the FFN neurons in every recognised block not in
    `ignored` (names); returns {'heads': (before, after), 'neurons': (before, after), 'blocks': n}."""
    names = {id(m): n for n, m in model.named_modules()}
    attention, ffn = attention_blocks(model), feed_forward_blocks(model)
    heads_before = sum(b.heads for b in attention)
    neurons_before = sum(in_features(b.down) for b in ffn)
    heads_after = neurons_after = 0

    def left_alone(*layers) -> bool:
        return any(any(names.get(id(m), "") == i or names.get(id(m), "").startswith(i + ".") for i in ignored)
                   for m in layers if m is not None)

    def ratio_of(layer) -> float:
        return (layer_ratios or {}).get(names.get(id(layer), ""), ratio)

    for block in attention:
        heads_after += block.heads if left_alone(block.q, block.k, block.v, block.o) else \
            prune_heads(model, block, ratio_of(block.q), criterion)
    for block in ffn:
        neurons_after += in_features(block.down) if left_alone(*block.ups, *block.between, block.down) else \
            prune_neurons(model, block, ratio_of(block.ups[0]), criterion)
    return {"heads": (heads_before, heads_after), "neurons": (neurons_before, neurons_after),
            "blocks": len(attention), "ffn": len(ffn)}
