"""Unpad: run a BERT-family encoder's dense layers on the real tokens only.

Tokenizers pad every sequence of a batch to a common length (`padding="max_length"` pads to the model's limit),
and an encoder spends most of its time in Linear layers that process the padding like any token. This step
replaces each Hugging Face BERT encoder in (a copy of) the model by `PackedBert`, which keeps the same weights
and, per batch:

- drops the columns that are padding in every row (the batch's longest sequence sets the attention length);
- packs the remaining real tokens into one [tokens, hidden] matrix for the Q/K/V (fused into one matmul),
  attention-output and feed-forward layers, and lays them out [batch, length] only for the attention product.

This is the "effective transformer" idea (FasterTransformer, TurboTransformers, ONNX Runtime's CUDA
RemovePadding). Outputs at real tokens are those of the original encoder up to float rounding; outputs at
padded positions are zeros (the original computes meaningless values there, which masked pooling ignores).
The gain is exactly the share of padding in the batches: none on inputs without padding. The graph is plain
ONNX (NonZero, Gather, CumSum), so ONNX Runtime's int8 quantization applies to its matmuls as usual; quantized on
ONNX Runtime, it carries the dense graph of the same weights (with ONNX Runtime's fused attention) as a fast path
that batches without padding take (`backends/onnxruntime/fast_path.py`), so unpad costs nothing there.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..architectures import bert_encoders, set_submodule
from ..errors import ModelError
from ..recipe import Step, option
from ..registry import technique


@dataclass
class Unpad(Step):
    """Run a BERT-family encoder's dense layers on the real tokens only, skipping padding (same outputs)."""

    kind = "unpad"
    short = "unpad"
    main_field = "enabled"
    stage = 1
    stage_note = "swaps the encoder for an inference-only packed one (only quantization may follow it)"
    colour = "#e377c2"

    enabled: bool = option(True, choices=(True,))


def _why_not(bert) -> str | None:
    config = bert.config
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type={config.position_embedding_type!r} (only 'absolute' is supported)"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "a decoder / cross-attention configuration"
    return None


def preflight(steps: list, facts) -> list[str]:
    padding = facts.padding_share
    if padding is not None and padding > 0.2 and not steps:
        return [f"padding: {padding:.0%} of the validation inputs' token slots are padding, which the encoder's dense "
                "layers compute like real tokens; add unpad (--unpad) to skip them"]
    if padding is not None and padding < 0.05 and steps:
        return [f"padding: only {padding:.0%} of the token slots are padding, so unpad has little to skip"]
    return []


def search(trial, facts) -> list[str]:
    """Tried only when a BERT encoder is fed padded batches."""
    return ["unpad"] if facts.padded and trial.suggest_categorical("unpad", [True, False]) else []


def seeds(facts) -> list[dict]:
    """Where there is padding to skip. On a GPU second and third, compiled and not (`compile.seeds`), after a
    compiled candidate without it (at batch 1 the forward is kernel launches, which unpad does not shorten); where
    OpenVINO's int8 leads, second (its int8 after unpad ran 2x slower at batch 1)."""
    from .quantize import openvino_leads

    if not facts.padded:
        return []
    if facts.target.is_cuda:
        return [{"unpad": False}, {"unpad": True}, {"unpad": True}]
    return [{"unpad": False}, {"unpad": True}] if openvino_leads(facts) else [{"unpad": True}]


@technique(Unpad, preflight=preflight, search=search, seeds=seeds, applies=lambda facts: bool(facts.bert_encoders),
           suggested=lambda facts: facts.padded)
def apply_unpad(model, step: Unpad, ctx):
    from torch import nn

    from .packed_bert import PackedBert

    if not isinstance(model, nn.Module):
        raise ModelError("unpad works on a torch model; put it before quantization in the recipe")
    names = bert_encoders(model)  # "" when the model itself is a BertModel
    if not names:
        raise ModelError("unpad: this model has no Hugging Face BERT encoder (BertModel) to run without padding; "
                         "leave the step out")
    for name in names:
        bert = model if name == "" else model.get_submodule(name)
        why = _why_not(bert)
        if why:
            raise ModelError(f"unpad: {name or 'the model'} has {why}; leave the step out")
        if name == "":
            model = PackedBert(bert)
        else:
            set_submodule(model, name, PackedBert(bert))
    share = ctx.facts.padding_share
    if share is not None:
        ctx.note(f"unpad: dense layers skip padding; {share:.0%} of the validation batches' token slots are "
                 "padding, so that is the most this step can save (nothing on unpadded inputs)")
    return model
