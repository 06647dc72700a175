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

from .errors import DataError, WorkbenchError
from .tensors import batch_size_of, call_model, concat_rows, first_tensor, map_tensors

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

    found = []
    map_tensors(inputs, lambda t: found.append(bool(torch.isfinite(t).all())) if t.is_floating_point() else None)
    return all(found)


def _signature(inputs: Any):
    """What must agree between batches: the structure and, per tensor, its dims but the first and its kind."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return ("tensor", tuple(inputs.shape[1:]), inputs.dim(), inputs.is_floating_point())
    if isinstance(inputs, dict):
        return ("dict", tuple((k, _signature(v)) for k, v in inputs.items()))
    if isinstance(inputs, (tuple, list)):
        return ("tuple", tuple(_signature(v) for v in inputs))
    return ("other", type(inputs).__name__)


def _describe(signature) -> str:
    kind = signature[0]
    if kind == "tensor":
        return (f"a {'float' if signature[3] else 'integer'} tensor of {signature[2]} dims"
                + (f" (rows x {' x '.join(map(str, signature[1]))})" if signature[1] else ""))
    if kind == "other":
        return f"a {signature[1]}, not tensors"
    return f"a {kind} of {', '.join(_describe(s[1] if kind == 'dict' else s) for s in signature[1])}"


def accuracy(outputs, targets) -> float:
    """Top-1 accuracy of logits against integer class labels."""
    return (outputs.argmax(dim=-1) == targets).float().mean().item()


def fidelity(outputs, targets) -> float:
    """Mean cosine similarity of outputs (e.g. sentence embeddings) to reference outputs."""
    import torch.nn.functional as F

    return F.cosine_similarity(outputs.float().flatten(1), targets.float().flatten(1), dim=1).mean().item()


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
        while have < batch_size:
            before = have
            for inputs in (source or (b[0] for b in self.val_batches())):
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
                                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Check that "
                                     "the data matches what the model expects.") from e
        return outs

    def evaluate(self, model: Any, target=None, reference: Any = None) -> float:
        """The metric of `model` on the validation split (higher is better), inputs on `target`'s device.

        For `metric="fidelity"` with no targets in the loader, `reference` (the original model) gives them.
        """
        import torch

        if self.eval_fn is not None:
            try:
                value = self.eval_fn(model)
            except (WorkbenchError, Warning):
                raise
            except Exception as e:
                raise DataError(f"the eval_fn {self.metric_name!r} raised {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}") from e
        else:
            metric = _METRIC_FNS.get(self.metric, self.metric) if isinstance(self.metric, str) else self.metric
            outs = self.outputs(model, target)
            targets = [t for _, t in self.val_batches()]
            if any(t is None for t in targets):
                if self.metric != "fidelity" or reference is None:
                    raise DataError(f"the validation batches carry no targets, which metric {self.metric_name!r} needs")
                key = id(reference)
                if key not in self._references:
                    self._references = {key: self.outputs(reference, target)}
                targets = self._references[key]
            try:
                value = metric(torch.cat(outs), torch.cat([torch.as_tensor(t) for t in targets]))
            except DataError:
                raise
            except Exception as e:
                raise DataError(f"the metric {self.metric_name!r} failed on the model's outputs: {e}") from e
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise DataError(f"the metric returned {value!r}; it must return a number") from None
        if not math.isfinite(value):
            shown = "NaN" if value != value else value
            raise DataError(f"the metric {self.metric_name!r} returned {shown}; check the model's outputs and the "
                            "metric function (an empty split or a division by zero?)")
        return value
