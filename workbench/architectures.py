"""What kind of model this is: the layers techniques act on and the families they treat specially.

Shared by techniques and backends (pruning needs the attention blocks, ONNX Runtime's fusions the BERT encoder),
so that neither imports the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def prunable_layers(model) -> dict:
    """Linear and Conv layers by name: what pruning, factorization and sensitivity analysis act on."""
    from torch import nn

    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or type(m).__name__ == "Conv1D"}


def head_layer(model) -> str | None:
    """The layer that produces the model's outputs (the classifier or language-model head), left alone by default:
    the last prunable layer, unless it sits inside a transformer block (an encoder without a head ends in one)."""
    layers = list(prunable_layers(model))
    if not layers:
        return None
    inside = {id(m) for b in attention_blocks(model) for m in (b.q, b.k, b.v, b.o) if m is not None}
    inside |= {id(m) for b in feed_forward_blocks(model) for m in (*b.ups, b.down)}
    last = layers[-1]
    return None if id(model.get_submodule(last)) in inside else last


# (query, key, value, output) paths inside an attention module; key/value None: one fused QKV projection
ATTENTION = (
    ("self.query", "self.key", "self.value", "output.dense"),  # BERT, RoBERTa (BertAttention)
    ("query", "key", "value", "dense"),  # ALBERT
    ("q_lin", "k_lin", "v_lin", "out_lin"),  # DistilBERT
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # LLaMA, Mistral, Qwen, ViT, Swin
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # CLIP, SigLIP, OPT, BART
    ("q_proj", "k_proj", "v_proj", "dense"),  # Phi
    ("self.query_proj", "self.key_proj", "self.value_proj", "output.dense"),  # DeBERTa-v2/v3
    ("attention.query", "attention.key", "attention.value", "output.dense"),  # MobileViT
    ("c_attn", None, None, "c_proj"),  # GPT-2
    ("qkv_proj", None, None, "o_proj"),  # Phi-3
    ("Wqkv", None, None, "Wo"),  # ModernBERT
    ("Wqkv", None, None, "out_proj"),  # MPT
    ("query_key_value", None, None, "dense"),  # GPT-NeoX (Pythia), Falcon, BLOOM
)
# how a fused QKV projection lays out its rows: 'blocks' [all query heads | key heads | value heads], 'grouped'
# [per key/value group: its query heads, its key head, its value head] (per head [q, k, v] without grouping)
FUSED = {"c_attn": "blocks", "qkv_proj": "blocks", "Wqkv": "blocks", "query_key_value": "grouped"}
# projections beside the query's and key's that produce per-head features the same way, cut with them (by name, in
# the module that holds the query): DeBERTa's disentangled attention projects relative positions per head
ALONGSIDE = {"pos_query_proj": "q", "pos_key_proj": "k"}
# (up projections, down projection) inside a feed-forward module
FEED_FORWARD = (
    (("intermediate.dense",), "output.dense"),  # BERT, RoBERTa (the layer)
    (("ffn",), "ffn_output"),  # ALBERT (the layer)
    (("lin1",), "lin2"),  # DistilBERT
    (("gate_proj", "up_proj"), "down_proj"),  # LLaMA
    (("up_proj",), "down_proj"),  # MPT
    (("fc1",), "fc2"),  # ViT, Swin
    (("c_fc",), "c_proj"),  # GPT-2
    (("gate_up_proj",), "down_proj"),  # Phi-3 (gate and up fused)
    (("Wi",), "Wo"),  # ModernBERT (input and gate fused)
    (("dense_h_to_4h",), "dense_4h_to_h"),  # GPT-NeoX, Falcon, BLOOM
    (("fc_in",), "fc_out"),  # GPT-J
    (("dense1",), "dense2"),  # PVT-v2 (a depthwise convolution between, as in SegFormer's Mix-FFN)
    (("wi_0", "wi_1"), "wo"),  # T5 v1.1, Flan-T5 (gated)
    (("wi",), "wo"),  # T5
    (("linear1",), "linear2"),  # torch's nn.TransformerEncoderLayer and nn.TransformerDecoderLayer (only: see OWNERS)
)
# names common enough in users' own MLPs that they mark an FFN only inside these classes
OWNERS = {"linear2": ("TransformerEncoderLayer", "TransformerDecoderLayer")}
# up projections that compute several parts side by side (a gated unit's gate and up), each as wide as the down
# projection's input
FUSED_UP = {"gate_up_proj": 2, "Wi": 2}
HEAD_COUNTS = ("num_attention_heads", "num_heads", "n_heads")
KV_COUNTS = ("num_key_value_heads", "num_kv_heads")
HEAD_SIZES = ("attention_head_size", "head_dim", "head_size")


@dataclass
class Attention:
    name: str
    module: object
    q: object
    k: object | None
    v: object | None
    o: object
    heads: int
    kv_heads: int
    head_dim: int
    alongside: tuple = ()  # (projection, 'q' or 'k'): cut as the query's or the key's rows are (`ALONGSIDE`)
    fused: str | None = None  # k and v None: the layout of q's rows (`FUSED`)


@dataclass
class FeedForward:
    name: str
    ups: tuple
    down: object
    between: tuple = ()  # depthwise convolutions over the hidden neurons (SegFormer's Mix-FFN), cut with them
    parts: int = 1  # each up projection computes this many parts side by side (`FUSED_UP`)


def _get(module, path: str):
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _is_projection(m) -> bool:
    from torch import nn

    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _out_features(m) -> int:
    return m.nf if type(m).__name__ == "Conv1D" else m.out_features


def in_features(m) -> int:
    return m.nx if type(m).__name__ == "Conv1D" else m.in_features


def _fused_layout(module, q: str) -> str:
    """The layout of a fused QKV projection's rows (`FUSED`): the table's, unless the module says otherwise.
    Falcon's new decoder groups them; Falcon and GPT-BigCode with multi-query attention put the one key and value
    head after the queries, and without it store each head's q, k and v together."""
    if getattr(module, "new_decoder_architecture", False):
        return "grouped"
    multi_query = getattr(module, "multi_query", None)
    return "blocks" if multi_query is True else "grouped" if multi_query is False else FUSED.get(q, "blocks")


def attention_blocks(model) -> list[Attention]:
    """The attention modules of `model` that the table above recognises, with their head counts."""
    found, taken = [], set()
    for name, module in model.named_modules():
        for q, k, v, o in ATTENTION:
            layers = [_get(module, p) if p else None for p in (q, k, v, o)]
            if not all(_is_projection(m) for m in layers if m is not None) or layers[0] is None or layers[3] is None \
                    or (k is not None and None in layers) or id(layers[0]) in taken:
                continue
            owners = [module, _get(module, q.rpartition(".")[0]) if "." in q else module]  # BERT: in `self`
            heads, size, kv = (next((getattr(m, a) for m in owners for a in attrs
                                     if isinstance(getattr(m, a, None), int)), None)
                               for attrs in (HEAD_COUNTS, HEAD_SIZES, KV_COUNTS))
            fused = None if k is not None else _fused_layout(module, q)
            rows = _out_features(layers[0]) if k is None else None  # a fused projection: (heads + 2 kv) x size
            if size is None and heads:
                size = _out_features(layers[3]) // heads if k is None else _out_features(layers[0]) // heads
            if heads is None and size:
                heads = rows // size - 2 * kv if k is None and kv else (rows // 3 if k is None else
                                                                         _out_features(layers[0])) // size
            if not heads or not size:
                continue
            kv = (rows // size - heads) // 2 if k is None else _out_features(layers[1]) // size
            if kv <= 0 or heads % kv or (k is None and rows != (heads + 2 * kv) * size) \
                    or (k is not None and _out_features(layers[0]) != heads * size) \
                    or in_features(layers[3]) != heads * size:  # e.g. an FFN's `output.dense` beside an attention
                continue
            taken.add(id(layers[0]))
            alongside = tuple((m, like) for attr, like in ALONGSIDE.items()
                              if _is_projection(m := getattr(owners[1], attr, None)))
            found.append(Attention(name, module, layers[0], layers[1], layers[2], layers[3], heads, kv, size,
                                   alongside, fused))
    return found


def feed_forward_blocks(model) -> list[FeedForward]:
    from torch import nn

    found, taken = [], set()
    for name, module in model.named_modules():
        for ups, down in FEED_FORWARD:
            layers = [_get(module, p) for p in ups]
            d = _get(module, down)
            if down in OWNERS and not any(c.__name__ in OWNERS[down] for c in type(module).__mro__):
                continue
            if d is None or not _is_projection(d) or not all(m is not None and _is_projection(m) for m in layers) \
                    or id(d) in taken:
                continue
            parts = FUSED_UP.get(ups[0], 1)
            if any(_out_features(m) != parts * in_features(d) for m in layers) \
                    or in_features(d) == _out_features(d) or in_features(layers[0]) != _out_features(d):
                continue  # an FFN widens then narrows back to the hidden size (this also tells BERT's attention
                # output from its FFN's, and a classifier's last two layers from an FFN)
            taken.add(id(d))
            width = in_features(d)  # where the layers are the module's own children, a depthwise convolution inside
            # it runs on the hidden neurons (SegFormer's Mix-FFN: fc1, dwconv.dwconv, fc2)
            between = tuple(m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))
                            and m.groups == m.in_channels == m.out_channels == width) \
                if "." not in down and not any("." in u for u in ups) else ()
            found.append(FeedForward(name, tuple(layers), d, between, parts))
    return found


def is_causal_lm(model: Any) -> bool:
    """A next-token language model (a Hugging Face `...ForCausalLM` / `...LMHeadModel`, or a model whose config
    says it is a decoder): its outputs are scored by perplexity too."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    return name.endswith(("ForCausalLM", "LMHeadModel")) or bool(getattr(config, "is_decoder", False)) and \
        hasattr(model, "lm_head")


def is_hf_bert(module: Any) -> bool:
    """A Hugging Face BertModel (the encoder itself, not a task head around it)."""
    config = getattr(module, "config", None)
    return (type(module).__name__ == "BertModel" and getattr(config, "model_type", None) == "bert"
            and hasattr(module, "embeddings") and hasattr(module, "encoder"))


def packs_tokens(model) -> bool:
    """Whether `model` holds an encoder that packs real tokens (unpad's PackedBert: token counts vary per batch)."""
    return hasattr(model, "modules") and any(getattr(m, "packs_tokens", False) for m in model.modules())


def within(name: str, layers) -> bool:
    """Whether module path `name` is one of `layers` or inside one of them."""
    return any(name == layer or name.startswith(layer + ".") for layer in layers)


def bert_encoders(model) -> list[str]:
    """Names of the Hugging Face BERT encoders inside `model` ('' when the model is one)."""
    return [name for name, m in model.named_modules() if is_hf_bert(m)]


def set_submodule(model, name: str, new) -> None:
    """Replace the submodule at dotted path `name` (not the root)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
