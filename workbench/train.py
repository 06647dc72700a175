"""Training loops shared by the zoo, FineTune, pruning schedules and (later) distillation.

`fit` keeps the best checkpoint by the validation metric, so an interrupted or diverging run never leaves a model
worse than the one it started from.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

from .data import Data
from .errors import DataError, RecipeError
from .tensors import call_model, drop_cached_tensors, first_tensor, seeded

SEED = 0


def task_loss(data: Data, reference: Any = None) -> Callable:
    """`loss(model, inputs, targets) -> tensor` for the data's task.

    accuracy: cross-entropy on labels; fidelity: 1 - cosine to the targets (the reference outputs, computed with
    `reference` when the batches carry none); a custom metric needs `wb.Data(loss=fn(outputs, targets))`.
    """
    import torch
    import torch.nn.functional as F

    if data.loss is not None:
        return lambda model, inputs, targets: data.loss(first_tensor(call_model(model, inputs)), targets)
    if data.metric == "accuracy":
        return lambda model, inputs, targets: F.cross_entropy(first_tensor(call_model(model, inputs)), targets)
    if data.metric == "fidelity":
        def fidelity_loss(model, inputs, targets):
            if targets is None:
                if reference is None:
                    raise DataError("fidelity training needs targets in the train batches or a reference model")
                with torch.no_grad():
                    targets = first_tensor(call_model(reference, inputs))
            out = first_tensor(call_model(model, inputs))
            return (1 - F.cosine_similarity(out.float().flatten(1), targets.float().flatten(1), dim=1)).mean()

        return fidelity_loss
    raise RecipeError(f"training needs a loss for metric {data.metric_name!r}: build the data with "
                      "wb.Data(..., loss=fn(outputs, targets) -> tensor)")


def fit(model, data: Data, epochs: int, lr: float, loss: Callable | None = None, progress: Callable | None = None,
        keep_best: bool = True, reference: Any = None, label: str = "training", max_batches: int | None = None,
        patience: int | None = None, extra_params=(), start_from_scratch: bool = False, target=None):
    """Train `model` in place on the train split with Adam; returns (model, history).

    keep_best: evaluate on the validation split before and after each epoch and restore the best state
        (with start_from_scratch, the untrained starting point does not count as a candidate).
    patience: stop after this many epochs without a better validation metric.
    extra_params: more parameters to train alongside (e.g. distillation's feature projections).
    On CUDA the forward and loss run under autocast (bf16 where supported, else fp16 with loss scaling).
    history: list of {"epoch", "loss", "metric"}; epoch 0 is the starting point.
    Seeded (the same batches in the same order, whatever ran before); torch's global random state and the
    loader's own generator are restored afterwards.
    """
    import torch

    from .target import of_model

    target = target or of_model(model)
    shuffle = getattr(data.train, "generator", None) or getattr(getattr(data.train, "loader", None), "generator", None)
    shuffle = shuffle if isinstance(shuffle, torch.Generator) else None
    saved = shuffle.get_state() if shuffle is not None else None
    try:
        with seeded(SEED):
            if shuffle is not None:
                shuffle.manual_seed(SEED)
            return _fit(model, data, epochs, lr, loss or task_loss(data, reference), progress, keep_best, reference,
                        label, max_batches, patience, extra_params, start_from_scratch, target)
    finally:
        if shuffle is not None:
            shuffle.set_state(saved)


def _fit(model, data, epochs, lr, loss, progress, keep_best, reference, label, max_batches, patience, extra_params,
         start_from_scratch, target):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RecipeError(f"{label}: the model has no trainable parameters")
    opt = torch.optim.Adam(params + list(extra_params), lr=lr)
    amp_dtype = target.autocast_dtype()
    scaler = torch.amp.GradScaler(target.kind, enabled=amp_dtype is torch.float16)
    # pruned weights stay pruned: entries that are exactly zero in a weight matrix are held at zero
    masks = [(p, p != 0) for p in params if p.dim() > 1 and bool((p == 0).any())]
    history = []
    best_state, best_metric = None, None
    if keep_best:
        start = data.evaluate(model.eval(), target, reference=reference)
        history.append({"epoch": 0, "loss": None, "metric": start})
        if not start_from_scratch:
            best_metric, best_state = start, copy.deepcopy(model.state_dict())
    stale = 0
    for epoch in range(1, epochs + 1):
        model.train()
        drop_cached_tensors(model)  # what forwards under inference_mode left (evaluations) cannot be trained through
        total, count = 0.0, 0
        for inputs, targets in data.train_batches(limit=max_batches):
            inputs = target.move(inputs)
            targets = target.move(targets) if targets is not None else None
            opt.zero_grad()
            with torch.autocast(target.kind, dtype=amp_dtype, enabled=amp_dtype is not None):
                value = loss(model, inputs, targets)
            scaler.scale(value).backward()
            scaler.step(opt)
            scaler.update()
            with torch.no_grad():
                for p, mask in masks:
                    p.mul_(mask)
            total, count = total + value.item(), count + 1
        model.eval()
        row = {"epoch": epoch, "loss": total / max(count, 1)}
        if keep_best:
            row["metric"] = data.evaluate(model, target, reference=reference)
            if best_metric is None or row["metric"] > best_metric:
                best_metric, best_state, stale = row["metric"], copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
        history.append(row)
        if progress:
            shown = f", {data.metric_name} {row['metric']:.4f}" if "metric" in row else ""
            progress(f"{label}: epoch {epoch}/{epochs}, loss {row['loss']:.4f}{shown}", None)
        if patience is not None and stale >= patience:
            if progress:
                progress(f"{label}: no better {data.metric_name} for {patience} epochs, stopping early", None)
            break
    if keep_best and best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), history
