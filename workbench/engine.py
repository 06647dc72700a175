"""The one engine behind the magics, widgets, CLI and templates: `optimize` and `compare`.

    >>> import workbench as wb
    >>> model, data = wb.zoo.load("digits-cnn")
    >>> result = wb.optimize(model, "quant=int8", data=data)
    >>> result.table()
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

from .data import Data, call_model, map_tensors
from .errors import DeviceError, ModelError, RecipeError, WorkbenchError
from .recipe import Recipe

BACKENDS = ("auto", "torch", "onnxruntime")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Context:
    """What a technique may read (data, original model, backend, device) and report (notes, progress)."""

    data: Data
    original: Any
    backend: str
    device: str
    threads: int | None
    on_progress: Callable | None = None
    notes: list = field(default_factory=list)
    details: dict = field(default_factory=dict)  # tables a technique leaves for the result (e.g. ranks per layer)
    lowered: str | None = None  # set by a technique that turns the model into a runtime form (int8, ORT, fp16)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def progress(self, message: str, fraction: float | None = None) -> None:
        if self.on_progress is not None:
            self.on_progress(message, fraction)


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise DeviceError(f"device {device!r} is not known; use 'auto', 'cpu' or 'cuda'")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("CUDA was asked for but this machine has no usable GPU (torch.cuda.is_available() is "
                          "False); use device='cpu' or device='auto'")
    return device


def resolve_backend(backend: str, device: str) -> str:
    from .registry import backend_named

    if backend == "auto":
        return backend
    impl = backend_named(backend)
    if not impl.available(device):
        raise DeviceError(f"backend {backend!r} cannot run on {device!r} here; use backend='auto'")
    return backend


def _check_model(model: Any) -> Any:
    import torch

    from .result import Result

    if isinstance(model, Result):
        model = model.model
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}; load a built-in with "
                         "wb.zoo.load('digits-cnn') or pass your own nn.Module")
    return model


def copy_model(model):
    """copy.deepcopy, also for modules holding computed (non-leaf) tensors, e.g. torch.nn.utils.prune's `weight`
    or weight_norm, which the forward pre-hooks recompute anyway."""
    import torch

    memo = {id(v): v.detach().clone() for m in model.modules() for v in vars(m).values()
            if isinstance(v, torch.Tensor) and not v.is_leaf}
    return copy.deepcopy(model, memo)


def _working_copy(model, data: Data, device: str):
    """A deep copy in eval mode on `device`, checked to run on the data's example inputs."""
    try:
        work = copy_model(model).eval().to(device)
    except Exception as e:
        raise ModelError(f"the model cannot be copied ({e}); the workbench never changes your model in place, "
                         "so it needs copy.deepcopy(model) to work") from e
    import torch

    inputs = map_tensors(data.example_inputs, lambda t: t.to(device))
    try:
        with torch.inference_mode():
            call_model(work, inputs)
    except WorkbenchError:
        raise
    except Exception as e:
        shapes = map_tensors(inputs, lambda t: tuple(t.shape))
        raise ModelError(f"the model's forward failed on the data's example inputs {shapes}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Check that the data "
                         "matches what the model expects.") from e
    return work


def _default_batches(data: Data) -> tuple[int, ...]:
    from .data import batch_size_of

    first = next(iter(data.val_batches()))[0] if data.val is not None else data.example_inputs
    big = batch_size_of(first)
    return (1, big) if big > 1 else (1,)


def _study(study):
    from .study import Study

    if study is False:
        return None
    return Study.default() if study is None else study


def optimize(model, recipe, data=None, *, backend: str = "auto", device: str = "auto", batch_sizes=None,
             threads: int | None = None, study=None, progress: Callable | None = None, example_inputs=None,
             name: str | None = None, baseline=None):
    """Apply `recipe` to a copy of `model`, measure it against the original, and return a `Result`.

    recipe: a Recipe, steps, a dict/YAML, or the short form "prune=0.5,quant=int8".
    data: a `wb.Data` bundle or an `eval_fn(model) -> float`.
    backend: "auto" (ONNX Runtime for int8 on CPU, torch otherwise), "torch" or "onnxruntime".
    batch_sizes: batch sizes to time (default: 1 and the validation batch size).
    study: where the run is recorded (default `wb.Study.default()`; False for nowhere).
    progress: `fn(message, fraction_or_None)` called as work advances.
    baseline: an earlier Result of the same model and data whose baseline measurement (and Study row) to reuse,
        as a sweep does.
    """
    from .measure import environment, is_torch_module, layer_table, measure
    from .registry import technique_for
    from .result import Result

    model = _check_model(model)
    recipe = Recipe.parse(recipe)
    data = Data.coerce(data, example_inputs)
    if backend not in BACKENDS:
        raise DeviceError(f"backend {backend!r} is not known; use one of {', '.join(BACKENDS)}")
    device = resolve_device(device)
    backend = resolve_backend(backend, device)
    handlers = [technique_for(step) for step in recipe.steps]  # fail on an unknown step before any work
    for step in recipe.steps:
        if step.needs_train and data.train is None:
            raise RecipeError(f"{step.describe()}: this step needs batches to calibrate or train on, and the data "
                              "has no train split; build it with wb.Data(train=..., val=...)")
    batch_sizes = tuple(batch_sizes or (baseline.baseline["batch_sizes"].split(",") if baseline else None)
                        or _default_batches(data))
    batch_sizes = tuple(int(b) for b in batch_sizes)
    ctx = Context(data=data, original=model, backend=backend, device=device, threads=threads, on_progress=progress)

    ctx.progress("measuring the baseline", 0.0)
    baseline_model = _working_copy(model, data, device)
    from .checks import preflight

    checks = preflight(baseline_model, recipe, data, device)
    earlier = baseline
    if earlier is not None and earlier.baseline["batch_sizes"] == ",".join(map(str, batch_sizes)):
        baseline = earlier.baseline
    else:
        earlier = None
        baseline = measure(baseline_model, data, batch_sizes, device=device, threads=threads,
                           reference=baseline_model)
        baseline["backend"] = "torch"

    work, float_model = _working_copy(model, data, device), None
    for i, (step, handler) in enumerate(zip(recipe.steps, handlers)):
        ctx.progress(f"step {i + 1}/{len(recipe.steps)}: {step.describe()}", (i + 1) / (len(recipe.steps) + 2))
        before = work
        work = handler(work, step, ctx)
        if ctx.lowered and float_model is None:
            float_model = before
    if backend == "onnxruntime" and is_torch_module(work):
        from .backends.ort import OrtModel

        ctx.progress("exporting to ONNX Runtime", None)
        float_model = work
        work = OrtModel.from_torch(work, data.example_inputs, device=device, threads=threads)
        ctx.lowered = "onnxruntime-fp32"
    backend_label = ctx.lowered or "torch"

    ctx.progress("measuring the optimized model", (len(recipe.steps) + 1) / (len(recipe.steps) + 2))
    metrics = measure(work, data, batch_sizes, device=device, threads=threads, reference=baseline_model,
                      macs_model=float_model)
    metrics["backend"] = backend_label
    slower = [b for b in batch_sizes if metrics[f"latency_p50_ms_b{b}"] > 1.05 * baseline[f"latency_p50_ms_b{b}"]]
    if slower:
        fewer = metrics.get("macs") and baseline.get("macs") and metrics["macs"] < 0.95 * baseline["macs"]
        ctx.note(("fewer MACs, yet " if fewer else "") + "slower than the baseline here at batch "
                 + ", ".join(map(str, slower)) + " (measured p50); MACs and size do not decide latency, the "
                 "runtime's kernels do")
    env = environment(metrics["threads"], device)
    result = Result(model=work, recipe=recipe, metrics=metrics, baseline=baseline, notes=ctx.notes, preflight=checks,
                    backend=backend_label, device=device, env=env, example_inputs=data.example_inputs,
                    layers=layer_table(float_model if float_model is not None else work), details=ctx.details)
    store = _study(study)
    if store is not None:
        model_name = name or data.name or type(model).__name__
        result.baseline_id = earlier.baseline_id if earlier is not None and earlier.baseline_id else store.add(
            "baseline", baseline, kind="baseline", model=model_name, backend="torch", device=device, env=env)
        result.run_id = store.add(str(recipe), metrics, parent=result.baseline_id, model=model_name, recipe=recipe,
                                  backend=backend_label, device=device, notes=ctx.notes, env=env)
    ctx.progress("done", 1.0)
    return result


def compare(models: dict, data=None, *, device: str = "auto", batch_sizes=None, threads: int | None = None,
            baseline: str | None = None, study=None, progress: Callable | None = None, example_inputs=None):
    """Measure several models side by side in one process; returns a DataFrame (ratios against `baseline`).

    models: {"fp32": model, "int8": result, ...}; values are torch modules, `OrtModel`s or `Result`s.
    """
    from .backends.ort import OrtModel
    from .measure import environment, is_torch_module, measure
    from .result import Result, summary_table

    if not isinstance(models, dict) or not models:
        raise ModelError("compare needs a non-empty dict of models, e.g. {'fp32': model, 'int8': result}")
    data = Data.coerce(data, example_inputs)
    device = resolve_device(device)
    batch_sizes = tuple(batch_sizes or _default_batches(data))
    baseline = baseline or next(iter(models))
    if baseline not in models:
        raise ModelError(f"baseline {baseline!r} is not one of the models: {', '.join(models)}")
    prepared = {}
    for label, m in models.items():
        if isinstance(m, Result):
            m = m.model
        if is_torch_module(m):
            m = _working_copy(m, data, device)
        elif not isinstance(m, OrtModel):
            raise ModelError(f"compare: {label!r} is a {type(m).__name__}; expected a torch module, an OrtModel or "
                             "a Result")
        prepared[label] = m
    reference = prepared[baseline]
    rows = {}
    for i, (label, m) in enumerate(prepared.items()):
        if progress:
            progress(f"measuring {label}", i / len(prepared))
        rows[label] = measure(m, data, batch_sizes, device=device, threads=threads, reference=reference)
        rows[label]["backend"] = "onnxruntime" if isinstance(m, OrtModel) else "torch"
    store = _study(study)
    if store is not None:
        env = environment(threads, device)
        for label, row in rows.items():
            store.add(label, row, kind="compare", model=label, backend=row["backend"], device=device, env=env)
    return summary_table(rows, baseline)


__all__ = ["optimize", "compare", "Context"]
