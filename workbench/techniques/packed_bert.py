"""PackedBert: a Hugging Face BertModel's inference forward on the real tokens only (see `techniques.unpad`)."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ..errors import ModelError

_ONNXRUNTIME_ATTENTION = False
DENSE_BELOW = 8192  # token slots below which a GPU forward under CUDA graphs runs dense (`PackedBert.dense_below`)


@contextmanager
def onnxruntime_attention():
    """While ONNX Runtime's export traces, each layer's attention becomes one com.microsoft MultiHeadAttention node
    (scores, mask, softmax and the weighted sum in one CPU kernel) instead of ~10 small ops: at batch 1 they cost
    more than the matrix products they surround. Other runtimes (OpenVINO) read the plain ops."""
    global _ONNXRUNTIME_ATTENTION
    before, _ONNXRUNTIME_ATTENTION = _ONNXRUNTIME_ATTENTION, True
    try:
        yield
    finally:
        _ONNXRUNTIME_ATTENTION = before


class _MultiHeadAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + mask) v on [batch, length, heads * d] inputs; exported as ONNX Runtime's op."""

    @staticmethod
    def forward(ctx, q, k, v, keep, heads: int, width: int):
        batch, length = q.shape[:2]
        split = lambda t: t.view(batch, length, heads, width // heads).transpose(1, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) * (width // heads) ** -0.5 + _mask_bias(keep.bool(), q.dtype)
        return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(batch, length, width)

    @staticmethod
    def symbolic(g, q, k, v, keep, heads: int, width: int):
        zeros = g.op("Constant", value_t=torch.zeros(3 * width))  # the op's projection bias (already added)
        mask = g.op("Cast", keep, to_i=6)  # int32: 1 attends, 0 is padding
        return g.op("com.microsoft::MultiHeadAttention", q, k, v, zeros, mask, num_heads_i=heads)


def _slots(keep, spare=None):
    """For each position, its index among the kept ones; where not kept, `spare` (default: the count of kept ones,
    read from the tensor so that a trace keeps it general), the index of a zero row appended after them. Numpy
    arrays (with `spare`) or torch tensors."""
    if isinstance(keep, np.ndarray):
        return np.where(keep, keep.cumsum(0) - 1, spare)
    counts = keep.long().cumsum(0)  # ONNX's CumSum takes no booleans
    return torch.where(keep, counts - 1, counts[-1:] if spare is None else spare)


def bucket(count: int, total: int) -> int:
    """`count` rounded up to one of a few sizes, at most `total`: a multiple of 8, and of 2**(k - 4) for a count of
    k bits, so at most 1/8 more from 64 on (33 -> 40, 200 -> 208, 1000 -> 1024). CUDA graphs replay fixed shapes: a
    packed encoder whose token count changed with every batch would record a graph per batch; rounded, it records
    one per size, 8 sizes per doubling."""
    step = max(8, 1 << max(0, count.bit_length() - 4))
    return min(total, -(-count // step) * step)


def _kept(keep, rounded: bool):
    """The indices of the kept positions (numpy); rounded: then of positions not kept (padding) up to the count's
    `bucket`."""
    if not rounded:
        return np.flatnonzero(keep)
    size = bucket(int(np.count_nonzero(keep)), keep.shape[0])
    return np.concatenate([np.flatnonzero(keep), np.flatnonzero(~keep)])[:size]


def _traced() -> bool:
    """Whether a trace (a jit trace, an ONNX export) records this forward: it would keep sizes found from this
    batch's mask as constants."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _mask_bias(real, dtype):
    """[batch, 1, 1, length]: 0 where a key is a real token, the dtype's lowest value where it is padding."""
    return (~real)[:, None, None, :].to(dtype) * torch.finfo(dtype).min


@torch.compiler.disable  # data-dependent sizes: run eagerly, so that what is compiled sees the (rounded) sizes
def _layout(attention_mask, rounded: bool):
    """Where the real tokens are: (columns kept, their real-token mask [batch, length], the padded position of each
    packed row, each padded position's packed row (a zero row for padding), each original column's kept index).

    Computed on the host with numpy (a mask on a GPU is copied over: a sync) and copied back in two transfers: on
    the GPU it would be a score of tiny kernels and a sync for each data-dependent size, and with torch on the CPU
    its ~15 small steps cost 1.7-2.8x numpy's (measured at 1 to 256 rows). A trace (ONNX export) records torch's
    steps instead (`_traced_layout`).

    rounded: the kept columns and the packed rows are rounded up (`bucket`) with padding ones, which compute values
    nothing reads. Under a trace nothing is rounded: it would keep this batch's rounded sizes as constants."""
    if _traced():
        return _traced_layout(attention_mask)
    real = (attention_mask.detach() != 0).cpu().numpy()  # a byte a slot (numpy has no bfloat16)
    used = real.any(0)
    columns = _kept(used, rounded)
    real = np.ascontiguousarray(real[:, columns])  # numpy's fancy index leaves it column-major
    flat = real.reshape(-1)
    tokens = _kept(flat, rounded)
    indices = [columns, tokens, _slots(flat, len(tokens)), _slots(used, len(columns))]
    device = attention_mask.device
    columns, tokens, slots, column_of = torch.from_numpy(np.concatenate(indices)).to(device).split(
        [len(i) for i in indices])
    return columns, torch.from_numpy(real).to(device), tokens, slots, column_of


def _traced_layout(attention_mask):
    """`_layout` in torch's steps, every size from the mask, as the ONNX exporters trace it."""
    real = attention_mask.bool()
    used = real.any(0)
    columns = used.nonzero().squeeze(1)
    real = real.index_select(1, columns)
    flat = real.reshape(-1)
    return columns, real, flat.nonzero().squeeze(1), _slots(flat), _slots(used)


def _gather_rows(x, index):
    return x.index_select(0, index)


class _Concat(nn.Module):
    def __init__(self, *parts):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x):
        return torch.cat([p(x) for p in self.parts], -1)


class PackedLayer(nn.Module):
    """One BertLayer on packed tokens; Q, K and V fused into one Linear."""

    def __init__(self, layer):
        super().__init__()
        attn = layer.attention.self
        self.heads, self.head_size = attn.num_attention_heads, attn.attention_head_size
        q, k, v = attn.query, attn.key, attn.value
        if all(type(m) is nn.Linear and m.bias is not None for m in (q, k, v)):
            self.qkv = nn.Linear(q.in_features, q.out_features * 3, bias=True, device=q.weight.device,
                                 dtype=q.weight.dtype)
            with torch.no_grad():
                self.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
                self.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        else:  # e.g. factorized projections: keep them, run them side by side
            self.qkv = _Concat(q, k, v)
        self.attn_out, self.attn_norm = layer.attention.output.dense, layer.attention.output.LayerNorm
        self.ffn_in, self.act = layer.intermediate.dense, layer.intermediate.intermediate_act_fn
        self.ffn_out, self.ffn_norm = layer.output.dense, layer.output.LayerNorm

    def forward(self, h, slots, tokens, mask_bias, batch: int, length: int, keep=None):
        # h: [1, T, hidden] packed real tokens; slots: [B*L] row of each padded position in h (T: a zero row);
        # slots and tokens None: h is every position ([1, B*L, hidden], the dense forward)
        if self.heads == 0:  # every head pruned: the attention block adds only its output bias
            context = torch.zeros(h.shape[:-1] + (0,), dtype=h.dtype, device=h.device)
        else:
            qkv = self.qkv(h)[0]
            if slots is not None:
                qkv = _gather_rows(torch.cat([qkv, qkv.new_zeros(1, qkv.shape[1])]), slots)
            width = self.heads * self.head_size
            if _ONNXRUNTIME_ATTENTION and keep is not None and torch.onnx.is_in_onnx_export():
                qkv = qkv.view(batch, length, 3 * width)
                context = _MultiHeadAttention.apply(qkv[..., :width], qkv[..., width:2 * width],
                                                    qkv[..., 2 * width:], keep, self.heads, width)
                context = context.reshape(batch * length, width)
            else:
                qkv = qkv.view(batch, length, 3, self.heads, self.head_size)
                q, k, v = qkv.permute(2, 0, 3, 1, 4)
                scores = torch.matmul(q, k.transpose(-1, -2)) * (self.head_size ** -0.5) + mask_bias
                context = torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(batch * length, width)
            context = (context if tokens is None else _gather_rows(context, tokens)).unsqueeze(0)
        a = self.attn_norm(self.attn_out(context) + h)
        return self.ffn_norm(self.ffn_out(self.act(self.ffn_in(a))) + a)


class PackedBert(nn.Module):
    """A Hugging Face BertModel's inference forward that skips padding; same weights, same outputs at real tokens.

    Returns a `BaseModelOutputWithPooling` like the original (`last_hidden_state`, and `pooler_output` when the
    original has a pooler). The pooler reads the first position: with left padding that position is padding,
    zeros here, so `pooler_output` differs there (the original pools a padding token's state).
    """

    # torch.export captures this forward, but its program then asserts the traced token counts on other inputs;
    # storage therefore pickles it (ONNX export, which int8 uses, stays general)
    torch_export_safe = False
    packs_tokens = True  # the token count varies per batch (what histogram calibration cannot take)
    # Set where a compiled forward records CUDA graphs (compile after unpad, on a GPU): rounded, the kept columns and
    # packed tokens are rounded up to a few sizes (`bucket`), so that it records a graph per size, not per batch;
    # and on a GPU a batch of fewer than `dense_below` token slots runs dense, every position: there a forward is
    # launch-bound (a MiniLM-shaped BERT under CUDA graphs took 0.45 ms at 1 x 64 and at 32 x 64 slots, 1.8 ms at
    # 256 x 64; issue 17), so skipping padding saves nothing while finding it costs a sync and a trip to the host
    rounded = False
    dense_below = 0  # DENSE_BELOW where set

    def __init__(self, bert):
        super().__init__()
        self.config = bert.config
        self.embeddings = bert.embeddings
        self.layers = nn.ModuleList(PackedLayer(layer) for layer in bert.encoder.layer)
        self.pooler = getattr(bert, "pooler", None)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, **options):
        if input_ids is None:
            raise ModelError("PackedBert needs input_ids (inputs_embeds is not supported)")
        asked = sorted(k for k, v in options.items() if v is not None and v is not False and k != "return_dict")
        if asked:
            raise ModelError(f"PackedBert (unpad) computes last_hidden_state and pooler_output only; it cannot "
                             f"honour {', '.join(asked)}. Leave unpad out for that.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if input_ids.is_cuda and input_ids.numel() < self.dense_below and not _traced():
            return self._dense(input_ids, attention_mask, token_type_ids, position_ids)
        columns, real, tokens, slots, column_of = _layout(attention_mask, self.rounded)  # first: it may sync
        x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        batch, width = input_ids.shape[0], x.shape[-1]
        length = columns.shape[0]
        mask_bias = _mask_bias(real, x.dtype)
        h = _gather_rows(x.index_select(1, columns).reshape(batch * length, width), tokens).unsqueeze(0)
        for layer in self.layers:
            h = layer(h, slots, tokens, mask_bias, batch, length, real)
        # back to [batch, full, hidden], zeros at padding
        h = torch.cat([h[0], h.new_zeros(1, h.shape[-1])])
        padded = _gather_rows(h, slots).view(batch, length, width)
        padded = torch.cat([padded, padded.new_zeros(batch, 1, width)], 1)
        return self._outputs(padded.index_select(1, column_of))

    def _dense(self, input_ids, attention_mask, token_type_ids, position_ids):
        """The same forward on every position, padding masked out of attention and zeroed in the outputs."""
        x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        batch, length, width = x.shape
        real = attention_mask.bool()
        mask_bias = _mask_bias(real, x.dtype)
        h = x.reshape(1, batch * length, width)
        for layer in self.layers:
            h = layer(h, None, None, mask_bias, batch, length, real)
        # zeros at padding (a row of padding alone attends to nothing: NaN)
        return self._outputs(h.view(batch, length, width).masked_fill(~real[..., None], 0))

    def _outputs(self, hidden):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pooled = self.pooler(hidden) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


# PackedLayer's parts and where each sits in a BertLayer
_DENSE_PARTS = {"qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
                "attn_out": ("attention.output.dense",), "attn_norm": ("attention.output.LayerNorm",),
                "ffn_in": ("intermediate.dense",), "ffn_out": ("output.dense",), "ffn_norm": ("output.LayerNorm",)}


def _split_qkv(qkv) -> tuple | None:
    """Q, K and V as three modules computing what `qkv` computes, or None for a projection of another kind."""
    from .smoothing import SmoothedLinear

    if isinstance(qkv, _Concat):
        return tuple(qkv.parts)
    scale = None
    if isinstance(qkv, SmoothedLinear):  # undone: the same function in float, and Q/K/V as BERT leaves them
        qkv, scale = qkv.linear, qkv.inverse_scale
    if type(qkv) is not nn.Linear or qkv.bias is None or qkv.out_features % 3:
        return None
    weight = qkv.weight.detach() * scale if scale is not None else qkv.weight.detach()
    parts = []
    for w, b in zip(weight.chunk(3), qkv.bias.detach().chunk(3)):
        linear = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(b)
        parts.append(linear)
    return tuple(parts)


def dense_bert(packed: PackedBert):
    """A BertModel on PackedBert's own modules (Q/K/V split out of the fused projection): the same function on
    batches without padding, laid out [batch, length] as ONNX Runtime's fused attention wants. None where a layer
    cannot be laid back (every head pruned, a projection of another kind)."""
    from transformers import BertModel

    with torch.device("meta"):  # the structure only: every weight is replaced by PackedBert's below
        bert = BertModel(packed.config, add_pooling_layer=packed.pooler is not None)
    bert.embeddings, bert.pooler = packed.embeddings, packed.pooler
    for dense, layer in zip(bert.encoder.layer, packed.layers):
        qkv = _split_qkv(layer.qkv) if layer.heads else None
        if qkv is None:
            return None
        attn = dense.attention.self
        attn.query, attn.key, attn.value = qkv
        attn.num_attention_heads, attn.attention_head_size = layer.heads, layer.head_size
        attn.all_head_size = layer.heads * layer.head_size
        dense.attention.output.dense, dense.attention.output.LayerNorm = layer.attn_out, layer.attn_norm
        dense.intermediate.dense, dense.intermediate.intermediate_act_fn = layer.ffn_in, layer.act
        dense.output.dense, dense.output.LayerNorm = layer.ffn_out, layer.ffn_norm
    if any(t.is_meta for t in [*bert.parameters(), *bert.buffers()]):
        return None
    return bert.eval()


def dense_twin(model):
    """(a model computing what `model` does, each PackedBert laid back as a BertModel on the same weights, and a
    function from a layer name of `model` to that layer's names in the twin), or None where a PackedBert cannot be
    laid back. Nothing is copied but Q/K/V."""
    import copy
    import re

    packed = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedBert)]
    if not packed:
        return None
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # share every weight, copy the structure
    twin = copy.deepcopy(model, memo)
    for name, _ in packed:
        dense = dense_bert(twin if name == "" else twin.get_submodule(name))
        if dense is None:
            return None
        if name == "":
            twin = dense
        else:
            from ..architectures import set_submodule

            set_submodule(twin, name, dense)
    prefixes = "|".join(re.escape(f"{n}.") if n else "" for n, _ in packed)
    pattern = re.compile(rf"^({prefixes})layers(?:\.(\d+)(?:\.(\w+)(.*))?)?$")

    def rename(name: str) -> tuple[str, ...]:
        match = pattern.match(name)
        if not match:
            return (name,)
        prefix, index, part, rest = match.groups()
        if index is None:
            return (f"{prefix}encoder.layer",)
        if part is None:
            return (f"{prefix}encoder.layer.{index}",)
        if part == "qkv":  # split into plain Linear layers
            return tuple(f"{prefix}encoder.layer.{index}.{p}" for p in _DENSE_PARTS[part])
        return tuple(f"{prefix}encoder.layer.{index}.{p}{rest}" for p in _DENSE_PARTS.get(part, (part,)))

    return twin, rename
