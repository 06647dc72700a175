"""ModelFacts: what techniques, pre-flight and autotune need to know about a model, its data and the target,
computed once and lazily (a forward pass under the FLOP counter, a pass over the validation masks).
"""
from __future__ import annotations

from functools import cached_property
from typing import Any

CONV_HEAVY = 0.5  # share of MACs in convolutions above which a model is treated as a conv net
# MACs per sample under which a GPU forward at batch 1 waits on kernel launches (~5 us each) rather than on its
# tensor cores (~0.4 PFLOP/s of fp16): a MiniLM-shaped BERT at 64 tokens is ~1.4 GMACs
LAUNCH_BOUND_MACS = 4e9


def padding_share(data) -> float | None:
    """Share of padded token slots in the validation batches (None when they carry no attention_mask)."""
    from .data import Data
    from .errors import DataError

    total = real = 0
    try:
        for inputs, _ in Data.coerce(data).val_batches():
            if not isinstance(inputs, dict) or "attention_mask" not in inputs:
                return None
            mask = inputs["attention_mask"]
            total += mask.numel()
            real += int(mask.sum())
    except DataError:
        return None
    return 1 - real / total if total else None


class ModelFacts:
    """Facts about `model` on `data` at `target` (any of model, data may be None where a fact does not need it)."""

    def __init__(self, model: Any, data: Any, target):
        self.model, self.data, self.target = model, data, target

    @cached_property
    def macs_by_op(self) -> dict[str, int]:
        """MACs per aten operator for one sample; empty where the model cannot be counted."""
        from .measure.counts import macs_by_op

        if self.data is None:
            return {}
        try:
            return macs_by_op(self.model, self.target.move(self.data.inputs(1)))
        except Exception:
            return {}

    @cached_property
    def macs(self) -> int | None:
        return sum(self.macs_by_op.values()) or None

    @property
    def conv_share(self) -> float:
        from .measure.counts import conv_share

        return conv_share(self.macs_by_op)

    @property
    def conv_heavy(self) -> bool:
        return self.conv_share > CONV_HEAVY

    @property
    def launch_bound(self) -> bool:
        """On a GPU, whether batch 1 is too little arithmetic to keep it busy (its time is kernel launches)."""
        return self.target.is_cuda and self.macs is not None and self.macs < LAUNCH_BOUND_MACS

    @property
    def has_train(self) -> bool:
        return self.data is not None and getattr(self.data, "train", None) is not None

    @cached_property
    def bert_encoders(self) -> list[str]:
        from .architectures import bert_encoders

        return bert_encoders(self.model) if hasattr(self.model, "named_modules") else []

    @cached_property
    def padding_share(self) -> float | None:
        """Share of padding in the validation batches' token slots, for BERT encoders (None otherwise)."""
        return padding_share(self.data) if self.data is not None and self.bert_encoders else None

    @property
    def padded(self) -> bool:
        """A BERT encoder fed batches with more than 5% padding: skipping it may pay."""
        return bool(self.padding_share and self.padding_share > 0.05)
