"""The data bundle: train/validation loaders, example inputs and the task's metric.

A batch is `(inputs, targets)`; `inputs` is a tensor, a tuple of tensors (positional arguments) or a dict
(keyword arguments, e.g. a tokenizer's output). Metrics are "higher is better".

    >>> data = Data(train=train_loader, val=val_loader, metric="accuracy")
    >>> data = Data(eval_fn=lambda model: my_score(model), example_inputs=torch.randn(1, 3, 32, 32))
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Callable, Iterable

from .errors import DataError, WorkbenchError, first_line
from .tensors import batch_size_of, call_model, concat_rows, first_tensor, map_tensors, tensors_in

METRICS = ("accuracy", "fidelity")


def _split(batch: Any):
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def _layout(inputs: Any) -> str:
    """'a tensor', 'a tuple of 2', 'a dict with keys [...]' (or the type's name): what a batch's inputs are."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return "a tensor"
    if isinstance(inputs, dict):
        return f"a dict with keys {sorted(map(str, inputs))}"
    if isinstance(inputs, (tuple, list)):
        return f"a {type(inputs).__name__} of {len(inputs)}"
    return f"a {type(inputs).__name__}"


def _alike(batches, split: str, finite: bool = False):
    """(inputs, targets) of each batch, refused in one line when one is built unlike the first (or, with `finite`,
    holds NaN or infinite values: calibration ranges and training losses would be meaningless)."""
    first = None
    for i, batch in enumerate(batches, 1):
        inputs, targets = _split(batch)
        signature = _signature(inputs)
        first = first or signature
        if signature != first:
            raise DataError(f"{split} batch {i} is {_describe(signature)}, unlike the first ({_describe(first)}); "
                            f"every {split} batch must be built alike but for its size")
        if finite and not _finite(inputs):
            raise DataError(f"{split} batch {i} holds NaN or infinite values; clean the data (calibration ranges "
                            "and training losses would be meaningless)")
        yield inputs, targets


def _finite(inputs) -> bool:
    import torch

    return all(bool(torch.isfinite(t).all()) for t in tensors_in(inputs) if t.is_floating_point())


def _signature(inputs: Any):
    """What must agree between batches: the structure and, per tensor, its number of dims and its kind."""
    import torch

    if isinstance(inputs, torch.Tensor):  # sizes may vary (sequence lengths, image sizes), not dims or kind
        return ("tensor", inputs.dim(), inputs.is_floating_point())
    if isinstance(inputs, dict):
        return ("dict", tuple((k, _signature(v)) for k, v in inputs.items()))
    if isinstance(inputs, (tuple, list)):
        return ("tuple", tuple(_signature(v) for v in inputs))
    return ("other", type(inputs).__name__)


def _describe(signature) -> str:
    kind = signature[0]
    if kind == "tensor":
        return f"a {'float' if signature[2] else 'integer'} tensor of {signature[1]} dims"
    if kind == "other":
        return f"a {signature[1]}, not tensors"
    return f"a {kind} of {', '.join(_describe(s[1] if kind == 'dict' else s) for s in signature[1])}"


def accuracy(outputs, targets) -> float:
    """Top-1 accuracy of logits against integer class labels (token labels of -100 are left out, as in Hugging
    Face's losses)."""
    hits, counted = _accuracy_counts(outputs, targets)
    return hits / max(counted, 1)


def _accuracy_counts(outputs, targets, mask=None) -> tuple[int, int]:
    keep = targets != -100
    if mask is not None and mask.shape == targets.shape:
        keep &= mask.bool()
    correct = (outputs.argmax(dim=-1) == targets) & keep
    return int(correct.sum()), int(keep.sum())


def fidelity(outputs, targets) -> float:
    """Mean cosine similarity of outputs (e.g. sentence embeddings) to reference outputs."""
    return _cosines(outputs, targets).mean().item()


def _vectors(t, mask=None):
    """An output's rows as vectors; for token outputs (rows x tokens x features) with the batch's attention mask,
    each real token's vector (padding positions say nothing about the model)."""
    if mask is not None and t.dim() >= 3 and tuple(t.shape[:2]) == tuple(mask.shape):
        return t[mask.bool()].float().flatten(1)
    return t.float().flatten(1)


def _cosines(outputs, targets, mask=None):
    """Cosine of each output row (or real token) to its reference's."""
    import torch.nn.functional as F

    return F.cosine_similarity(_vectors(outputs, mask), _vectors(targets, mask), dim=1)


def _floor(references: list, masks: list) -> float | None:
    """The fidelity of a model that returns the same output for every input, the mean of the other rows' (each
    row left out of the mean it is compared with, which would flatter a small split): what fidelity is worth
    where outputs vary little. None where rows differ in width (images of several sizes) or are fewer than two."""
    import math

    import torch
    import torch.nn.functional as F

    rows = [_vectors(r, m) for r, m in zip(references, masks)]
    if len({v.shape[1] for v in rows}) != 1:
        return None
    rows = torch.cat(rows).double()
    if rows.shape[0] < 2:
        return None
    others = (rows.sum(0, keepdim=True) - rows) / (rows.shape[0] - 1)
    floor = F.cosine_similarity(rows, others, dim=1).mean().item()
    return floor if math.isfinite(floor) else None


def token_mask(inputs):
    """The batch's attention mask (rows x tokens) when its inputs are a tokenizer's dict, else None."""
    if isinstance(inputs, dict):
        mask = inputs.get("attention_mask")
        if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
            return mask.cpu()
    return None


def next_token_nll(logits, inputs) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens) of each real token given the ones before it: what perplexity is
    the exponential of the mean of."""
    import torch.nn.functional as F

    ids = inputs["input_ids"].cpu()
    mask = token_mask(inputs)
    keep = (mask[:, 1:] & mask[:, :-1]).bool() if mask is not None else ids[:, 1:] >= 0
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return float(nll[keep.flatten()].sum()), int(keep.sum())


def _degenerate(references: list) -> str | None:
    """Why reference outputs make cosine fidelity meaningless (None when they do not)."""
    import torch

    largest = max(float(r.abs().max()) if r.numel() else 0.0 for r in references)
    if largest < 1e-12:
        return f"all near zero (largest |value| {largest:.1e})"
    rows = torch.cat([r.float().flatten(1) for r in references if r.dim() >= 1 and r.shape[0]], dim=0) \
        if all(r.dim() >= 1 for r in references) and len({r[0].numel() for r in references}) == 1 else None
    if rows is not None and rows.shape[0] > 1 and float((rows - rows[:1]).abs().max()) <= 1e-6 * largest:
        return "the same for every input (a constant model: every candidate that is constant too would score 1.0)"
    return None


_METRIC_FNS = {"accuracy": accuracy, "fidelity": fidelity}


class Data:
    """Everything the engine needs to judge and time a model.

    train: iterable of batches for calibration and fine-tuning (optional).
    val: iterable of `(inputs, targets)` batches for the metric.
    metric: "accuracy" (logits vs labels), "fidelity" (cosine to reference outputs; targets in `val` are the
        reference, or None to use the original model's outputs), or `fn(outputs, targets) -> float`.
    eval_fn: `fn(model) -> float` replaces loaders and metric entirely.
    example_inputs: one batch of inputs for export and timing (default: the first validation batch).
    """

    def __init__(self, train: Iterable | None = None, val: Iterable | None = None, metric: str | Callable = "accuracy",
                 example_inputs: Any = None, eval_fn: Callable | None = None, name: str | None = None,
                 loss: Callable | None = None, task: str | None = None):
        if isinstance(metric, str) and metric not in METRICS:
            raise DataError(f"metric {metric!r} is not known; use one of {', '.join(METRICS)} or a function "
                            "fn(outputs, targets) -> float")
        if not isinstance(metric, str) and not callable(metric):
            raise DataError(f"metric must be a name or a callable, got {type(metric).__name__}")
        if eval_fn is not None and not callable(eval_fn):
            raise DataError("eval_fn must be a callable fn(model) -> float")
        if eval_fn is None and val is None:
            raise DataError("give a validation loader (val=...) or an eval_fn(model) -> float")
        for split, loader in (("train", train), ("val", val)):
            if isinstance(loader, Iterator):  # without calling iter(): that would start a DataLoader's workers
                raise DataError(f"the {split} loader is a one-shot iterator (a generator?), and it is read several "
                                "times; pass a list of batches or a DataLoader")
        self.train, self.val, self.metric, self.eval_fn = train, val, metric, eval_fn
        self._example_inputs, self.name, self.loss, self.task = example_inputs, name, loss, task
        self._references: dict[int, list] = {}
        self._floors: dict[int, float] = {}

    def __repr__(self) -> str:
        return f"Data(name={self.name!r}, metric={self.metric_name!r})"

    @property
    def metric_name(self) -> str:
        if self.eval_fn is not None:
            return getattr(self.eval_fn, "__name__", "score")
        return self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "metric")

    @classmethod
    def coerce(cls, data: Any, example_inputs: Any = None) -> "Data":
        """Turn what a user passed as `data` into a Data bundle (a Data, or an eval_fn callable)."""
        if isinstance(data, Data):
            if example_inputs is not None:
                data._example_inputs = example_inputs
            return data
        if data is None:
            raise DataError("this needs data: pass data=wb.Data(val=..., metric=...), an eval_fn(model) -> float, "
                            "or use a built-in: model, data = wb.zoo.load('digits-cnn')")
        if callable(data):
            return cls(eval_fn=data, example_inputs=example_inputs)
        raise DataError(f"data must be a wb.Data bundle or an eval_fn(model) -> float, got {type(data).__name__}")

    # -- batches ---------------------------------------------------------------------------------------------
    def _batches(self, loader: Iterable | None, split: str) -> Iterable:
        if loader is None:
            raise DataError(f"the data bundle has no {split} split; build it with wb.Data({split}=...)")
        return loader

    def val_batches(self):
        """(inputs, targets) of the validation split, each checked to be built like the first."""
        count = 0
        for batch in _alike(self._batches(self.val, "val"), "validation"):
            count += 1
            yield batch
        if count == 0:
            raise DataError("the validation loader is empty: it yielded no batch")

    def train_batches(self, limit: int | None = None):
        """(inputs, targets) of the train split, each checked to be built like the first (calibration and
        training would otherwise fail deep inside a library)."""
        count = 0
        for batch in _alike(self._batches(self.train, "train"), "train", finite=True):
            if limit is not None and count >= limit:
                return
            count += 1
            yield batch
        if count == 0:
            raise DataError("the train loader is empty: it yielded no batch")

    @property
    def example_inputs(self):
        if self._example_inputs is None:
            if self.val is None:
                raise DataError("timing and export need example inputs: pass wb.Data(..., example_inputs=x)")
            self._example_inputs = next(iter(self.val_batches()))[0]
        return self._example_inputs

    def check_layout(self, split: str = "example") -> None:
        """Example inputs (or the first train batch's inputs) and validation inputs must be the same kind of batch
        (tensor, tuple or dict, and the same keys or length): timing and export use one, the metric the other,
        calibration and training the train split."""
        if split == "train":
            mine = _layout(next(iter(self.train_batches(limit=1)))[0])
        elif self._example_inputs is None:
            return
        else:
            mine = _layout(self._example_inputs)
        reference = "the example inputs"
        if self.val is not None:
            theirs, reference = _layout(next(iter(self.val_batches()))[0]), "the validation batches' inputs"
        else:
            theirs = _layout(self.example_inputs)
        if mine != theirs and not (split == "example" and self.val is None):
            what = "the example inputs" if split == "example" else "the train batches' inputs"
            raise DataError(f"{what} are {mine} but {reference} are {theirs}; give {split} batches shaped like "
                            "the validation batches")

    def inputs(self, batch_size: int):
        """Inputs with exactly `batch_size` rows, drawn from validation batches (repeated if too few)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch size {batch_size!r}: give a positive whole number of rows")
        pieces, have = [], 0
        source = [self.example_inputs] if self.val is None else None
        shape = None
        while have < batch_size:
            before = have
            for inputs in (source or (b[0] for b in self.val_batches())):
                sizes = map_tensors(inputs, lambda t: tuple(t.shape[1:]))
                shape = shape or sizes
                if sizes != shape:  # batches of another sequence length (or image size) do not stack with these
                    continue
                pieces.append(inputs)
                have += batch_size_of(inputs)
                if have >= batch_size:
                    break
            if have == before:
                raise DataError("the validation batches hold no rows (every batch has size 0): nothing to time")
        return concat_rows(pieces, batch_size)

    # -- evaluation ------------------------------------------------------------------------------------------
    def outputs(self, model: Any, target=None) -> list:
        """Model outputs on every validation batch (first tensor of each, on CPU); inputs moved to `target`."""
        import torch

        from .errors import ModelError, WorkbenchError

        outs = []
        with torch.inference_mode():
            for i, (inputs, _) in enumerate(self.val_batches()):
                inputs = target.move(inputs) if target is not None else inputs
                try:
                    outs.append(first_tensor(call_model(model, inputs)).float().cpu())
                except WorkbenchError:
                    raise
                except Exception as e:
                    shapes = map_tensors(inputs, lambda t: tuple(t.shape))
                    raise ModelError(f"the model's forward failed on validation batch {i + 1} {shapes}: "
                                     f"{first_line(e, named=True)}. Check that "
                                     "the data matches what the model expects.") from e
        return outs

    def evaluate(self, model: Any, target=None, reference: Any = None) -> float:
        """The metric of `model` on the validation split (higher is better), inputs on `target`'s device.

        For `metric="fidelity"` with no targets in the loader, `reference` (the original model) gives them.
        """
        return self.scores(model, target, reference)["metric"]

    def scores(self, model: Any, target=None, reference: Any = None, perplexity: bool = False) -> dict:
        """{'metric': ..., 'perplexity': ... (with `perplexity`, for causal language models)} on the validation
        split. Token outputs are scored over real tokens only (the batches' attention masks), batches may differ in
        sequence length, and a reference that makes fidelity meaningless (all zero, constant) is refused."""
        if self.eval_fn is not None:  # the user's function gets a model that takes inputs where they are
            return {"metric": self._checked(self._call_eval_fn(follows_inputs(model, target)))}
        outs = self.outputs(model, target)
        batches = [(inputs, t) for inputs, t in self.val_batches()]
        targets = [t for _, t in batches]
        masks = [token_mask(inputs) for inputs, _ in batches]
        if any(t is None for t in targets):
            if self.metric != "fidelity" or reference is None:
                raise DataError(f"the validation batches carry no targets, which metric {self.metric_name!r} needs")
            key = id(reference)
            if key not in self._references:
                references = self.outputs(reference, target)
                why = _degenerate(references)
                if why:
                    raise DataError(f"the original model's outputs are {why}, so fidelity to them means nothing; "
                                    "check the model (its weights, the output it returns first) or give "
                                    "wb.Data(val=..., metric=...) with labels")
                self._references = {key: references}
            targets = self._references[key]
        out = {"metric": self._checked(self._score(outs, targets, masks))}
        if perplexity:
            nll, count = 0.0, 0
            for logits, (inputs, _) in zip(outs, batches):
                if not isinstance(inputs, dict) or "input_ids" not in inputs or logits.dim() != 3:
                    return out
                a, b = next_token_nll(logits, inputs)
                nll, count = nll + a, count + b
            out["perplexity"] = math.exp(nll / count) if count else None
        return out

    def fidelity_floor(self, reference=None) -> float | None:
        """The fidelity that a model returning the same output for every input (the mean of the targets: the
        batches' own, or `reference`'s outputs once fidelity to them was scored) gets on the validation split;
        None for other metrics."""
        import torch

        if self.metric != "fidelity" or self.eval_fn is not None:
            return None
        key = id(reference)
        if key not in self._floors:
            batches = list(self.val_batches())
            targets = [t for _, t in batches]
            if any(t is None for t in targets):
                targets = self._references.get(key)
                if targets is None:
                    return None
            try:  # what fidelity is worth is a note on the card: never a reason for a run to fail
                floor = _floor([torch.as_tensor(t) for t in targets], [token_mask(inputs) for inputs, _ in batches])
            except Exception:
                floor = None
            self._floors = {key: floor}
        return self._floors[key]

    def _call_eval_fn(self, model):
        try:
            return self.eval_fn(model)
        except (WorkbenchError, Warning):
            raise
        except Exception as e:
            raise DataError(f"the eval_fn {self.metric_name!r} raised "
                            f"{first_line(e, named=True)}") from e

    def _score(self, outs: list, targets: list, masks: list) -> float:
        import torch

        try:
            targets = [torch.as_tensor(t) for t in targets]
            if self.metric == "fidelity":
                return torch.cat([_cosines(o, t, m) for o, t, m in zip(outs, targets, masks)]).mean().item()
            if self.metric == "accuracy":
                counts = [_accuracy_counts(o, t, m) for o, t, m in zip(outs, targets, masks)]
                return sum(c[0] for c in counts) / max(sum(c[1] for c in counts), 1)
            if len({tuple(o.shape[1:]) for o in outs}) == 1 and len({tuple(t.shape[1:]) for t in targets}) == 1:
                return self.metric(torch.cat(outs), torch.cat(targets))
            rows = [o.shape[0] for o in outs]  # batches of different shapes: the row-weighted mean of each batch's
            return sum(float(self.metric(o, t)) * r for o, t, r in zip(outs, targets, rows)) / sum(rows)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"the metric {self.metric_name!r} failed on the model's outputs: {e}") from e

    def _checked(self, value) -> float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise DataError(f"the metric returned {value!r}; it must return a number") from None
        if not math.isfinite(value):
            shown = "NaN" if value != value else value
            raise DataError(f"the metric {self.metric_name!r} returned {shown}; check the model's outputs and the "
                            "metric function (an empty split or a division by zero?)")
        return value


def follows_inputs(model, target):
    """A torch model on a GPU behind a wrapper that takes inputs on any device (outputs come back where the inputs
    were); anything else as it is."""
    if target is None or not target.is_cuda or not hasattr(model, "named_modules"):
        return model
    from .wrappers import FollowsInputs

    return model if isinstance(model, FollowsInputs) else FollowsInputs(model, target.device)
