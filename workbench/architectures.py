"""What kind of model this is: the layers techniques act on and the families they treat specially.

Shared by techniques and backends (pruning needs the attention blocks, ONNX Runtime's fusions the BERT encoder),
so that neither imports the other.
"""
from __future__ import annotations

from typing import Any


def prunable_layers(model) -> dict:
    """Linear and Conv layers by name: what pruning, factorization and sensitivity analysis act on."""
    from torch import nn

    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}


def attention_modules(model) -> list:
    """BERT-family self-attention blocks: modules with query/key/value Linears and a head count."""
    from torch import nn

    return [m for m in model.modules()
            if all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value"))
            and hasattr(m, "num_attention_heads")]


def head_layer(model) -> str | None:
    """The layer that produces the model's outputs (the classifier head), left alone by default: the last
    prunable layer, for models without attention (a transformer's last Linear is an FFN or pooler, not a head)."""
    layers = list(prunable_layers(model))
    if not layers or attention_modules(model):
        return None
    return layers[-1]


def is_hf_bert(module: Any) -> bool:
    """A Hugging Face BertModel (the encoder itself, not a task head around it)."""
    config = getattr(module, "config", None)
    return (type(module).__name__ == "BertModel" and getattr(config, "model_type", None) == "bert"
            and hasattr(module, "embeddings") and hasattr(module, "encoder"))


def bert_encoders(model) -> list[str]:
    """Names of the Hugging Face BERT encoders inside `model` ('' when the model is one)."""
    return [name for name, m in model.named_modules() if is_hf_bert(m)]


def set_submodule(model, name: str, new) -> None:
    """Replace the submodule at dotted path `name` (not the root)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
