"""PackedBert: a Hugging Face BertModel's inference forward on the real tokens only (see `techniques.unpad`)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..errors import ModelError

_ONNXRUNTIME_ATTENTION = False


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
        bias = (~keep.bool())[:, None, None, :].to(q.dtype) * torch.finfo(q.dtype).min
        scores = split(q) @ split(k).transpose(-1, -2) * (width // heads) ** -0.5 + bias
        return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(batch, length, width)

    @staticmethod
    def symbolic(g, q, k, v, keep, heads: int, width: int):
        zeros = g.op("Constant", value_t=torch.zeros(3 * width))  # the op's projection bias (already added)
        mask = g.op("Cast", keep, to_i=6)  # int32: 1 attends, 0 is padding
        return g.op("com.microsoft::MultiHeadAttention", q, k, v, zeros, mask, num_heads_i=heads)


def _slots(keep):
    """For each position, its index among the kept ones; the count of kept ones (a spare zero row) where not kept."""
    counts = keep.long().cumsum(0)
    return torch.where(keep, counts - 1, counts[-1:])


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
        # h: [1, T, hidden] packed real tokens; slots: [B*L] row of each padded position in h (T: a zero row)
        if self.heads == 0:  # every head pruned: the attention block adds only its output bias
            context = torch.zeros(h.shape[:-1] + (0,), dtype=h.dtype, device=h.device)
        else:
            qkv = self.qkv(h)[0]
            qkv = torch.cat([qkv, qkv.new_zeros(1, qkv.shape[1])])
            width = self.heads * self.head_size
            if _ONNXRUNTIME_ATTENTION and keep is not None and torch.onnx.is_in_onnx_export():
                qkv = _gather_rows(qkv, slots).view(batch, length, 3 * width)
                context = _MultiHeadAttention.apply(qkv[..., :width], qkv[..., width:2 * width],
                                                    qkv[..., 2 * width:], keep, self.heads, width)
                context = context.reshape(batch * length, width)
            else:
                qkv = _gather_rows(qkv, slots).view(batch, length, 3, self.heads, self.head_size)
                q, k, v = qkv.permute(2, 0, 3, 1, 4)
                scores = torch.matmul(q, k.transpose(-1, -2)) * (self.head_size ** -0.5) + mask_bias
                context = torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(batch * length, width)
            context = _gather_rows(context, tokens).unsqueeze(0)
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

    def __init__(self, bert):
        super().__init__()
        self.config = bert.config
        self.embeddings = bert.embeddings
        self.layers = nn.ModuleList(PackedLayer(layer) for layer in bert.encoder.layer)
        self.pooler = getattr(bert, "pooler", None)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, **options):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if input_ids is None:
            raise ModelError("PackedBert needs input_ids (inputs_embeds is not supported)")
        asked = sorted(k for k, v in options.items() if v is not None and v is not False and k != "return_dict")
        if asked:
            raise ModelError(f"PackedBert (unpad) computes last_hidden_state and pooler_output only; it cannot "
                             f"honour {', '.join(asked)}. Leave unpad out for that.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        batch, width = input_ids.shape[0], x.shape[-1]
        real = attention_mask.bool()
        used = real.any(0)
        columns = used.nonzero().squeeze(1)  # columns with a real token in some row
        real = real.index_select(1, columns)
        length = columns.shape[0]
        flat = real.reshape(-1)
        tokens = flat.nonzero().squeeze(1)  # padded position of each real token
        slots = _slots(flat)
        mask_bias = (~real)[:, None, None, :].to(x.dtype) * torch.finfo(x.dtype).min
        h = _gather_rows(x.index_select(1, columns).reshape(batch * length, width), tokens).unsqueeze(0)
        for layer in self.layers:
            h = layer(h, slots, tokens, mask_bias, batch, length, real)
        # back to [batch, full, hidden], zeros at padding
        h = torch.cat([h[0], h.new_zeros(1, h.shape[-1])])
        column_of = _slots(used)
        padded = _gather_rows(h, slots).view(batch, length, width)
        padded = torch.cat([padded, padded.new_zeros(batch, 1, width)], 1)
        hidden = padded.index_select(1, column_of)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
