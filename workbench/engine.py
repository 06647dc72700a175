"""The one engine behind the magics, the panel, the CLI, the reports and the search: `optimize`, `run_many`,
`compare`.

    >>> import workbench as wb
    >>> model, data = wb.zoo.load("digits-cnn")
    >>> result = wb.optimize(model, "quant=int8", data=data)
    >>> results = wb.run_many(model, ["quant=int8", "prune=0.5:structured=true,quant=int8"], data=data)

Every candidate is built from a copy of the user's model, then measured against one shared baseline: metric,
size and MACs once for the baseline, and latency in interleaved rounds beside each candidate, so that a speedup
comes with its interval. The target (backend, device, threads) is resolved once here and passed down.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

from .data import Data
from .errors import DataError, DeviceError, ModelError, RecipeError, StepError, WorkbenchError, first_line
from .recipe import Recipe
from .tensors import batch_size_of, call_model, copy_model, rng_preserved

# where a constant output's fidelity reaches this, the card says that fidelity says little (random-weight vision
# classifiers reach 0.91-0.998; trained models' outputs vary more)
FLOOR_NOTED = 0.9


@dataclass
class Context:
    """What a technique may read (data, the original model, the target, facts) and report (notes, progress)."""

    data: Data
    original: Any
    target: Any
    facts: Any
    on_progress: Callable | None = None
    recipe: Any = None  # the whole recipe, for a step whose advice depends on what follows it
    notes: list = field(default_factory=list)
    details: dict = field(default_factory=dict)  # tables a technique leaves for the result (e.g. ranks per layer)

    def note(self, message: str) -> None:
        if message not in self.notes:  # a step that lowers twice (unpad's fast path) says a thing once
            self.notes.append(message)

    def progress(self, message: str, fraction: float | None = None) -> None:
        if self.on_progress is not None:
            self.on_progress(message, fraction)

    def backend_for(self, precision: str, step=None):
        """The backend that runs `precision` on the target (the named one, or the first registered for auto)."""
        from .registry import backends, backends_for

        found = backends_for(precision, self.target)
        if found:
            return found[0]
        where = [b.name for b in backends() if precision in b.precisions(self.target)]
        what = f"{type(step).__name__}: " if step is not None else ""
        if where:
            raise RecipeError(f"{what}{precision} does not run on backend {self.target.backend!r} here; "
                              f"use backend={where[0]!r} or 'auto'")
        on_cpu = [b.name for b in backends() if precision in b.precisions(self.target.__class__("cpu"))]
        raise DeviceError(f"{what}{precision} has no backend on {self.target.device} here"
                          + (f" (on the CPU: {', '.join(on_cpu)}); use device='cpu'" if on_cpu else "")
                          + (", or Quantize('fp16') / Quantize('bf16') on a GPU" if self.target.is_cuda else ""))


def check_model(model: Any):
    """The torch module to optimize (a Result gives its model), or one clear error."""
    import torch

    from .result import Result

    if isinstance(model, Result):
        model = model.model
    from .wrappers import FollowsInputs

    if isinstance(model, FollowsInputs):  # a result on a GPU: the model it wraps, where it is
        model = model.module
    if not isinstance(model, torch.nn.Module) and not _is_graph(model):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}; load a built-in with "
                         "wb.zoo.load('digits-cnn'), pass your own nn.Module, or load a model you have on disk "
                         "with wb.load_model(path) (a Hugging Face directory or an .onnx file)")
    return model


def _is_graph(model) -> bool:
    """A model in a runtime's own form (an ONNX graph the user brought), not a torch module."""
    import torch

    from .registry import backends

    return not isinstance(model, torch.nn.Module) and any(b.accepts(model) for b in backends())


def working_copy(model, data: Data, target):
    """A deep copy in eval mode on the target's device, checked to run on the data's example inputs."""
    if _is_graph(model):
        from .registry import backend_of

        work = backend_of(model).place(model, target)  # a fresh session; the user's object is not touched
        _check_runs(work, data, target, "the model")
        return work
    from .wrappers import to_device

    try:
        work = to_device(copy_model(model).eval(), target.device)
    except Exception as e:
        raise ModelError(f"the model cannot be copied ({e}); the workbench never changes your model in place, "
                         "so it needs copy.deepcopy(model) to work") from e
    _check_runs(work, data, target, "the model")
    return work


def _check_runs(model, data: Data, target, what: str, batch: int | None = None) -> None:
    """One forward pass on the example inputs (or the validation inputs at `batch`), or one clear ModelError."""
    inputs = data.example_inputs if batch is None else data.inputs(batch)
    where = "the data's example inputs" if batch is None else f"the validation inputs at batch {batch}"
    _check_inputs_run(model, inputs, target, where, what)


def _check_inputs_run(model, inputs, target, where: str, what: str = "the model") -> None:
    import torch

    from .tensors import map_tensors

    try:
        with torch.inference_mode():
            call_model(model, target.move(inputs))
    except WorkbenchError:
        raise
    except Exception as e:
        shapes = map_tensors(inputs, lambda t: tuple(t.shape))
        raise ModelError(f"{what}'s forward failed on {where} {shapes}: {first_line(e, named=True)}. Check that "
                         "the data matches what the model expects.") from e


def _apply(tech, model, step, ctx):
    """A technique's handler; what it does not foresee becomes one line naming the step (traceback chained)."""
    try:
        return tech.apply(model, step, ctx)
    except (WorkbenchError, Warning):  # a warning raised as an error was asked for by the user's filters
        raise
    except Exception as e:
        raise StepError(f"{step.describe()} failed on this model: {first_line(e, named=True)}. The model itself "
                        "ran on the example inputs, so this is likely the step's limit here (or the train batches "
                        "differ from them); leave the step out or use another technique") from e


def _still_runs(model, step, ctx) -> None:
    """Every technique hands back a model that runs: checked on the example inputs after each step."""
    import torch

    try:
        with torch.inference_mode():
            call_model(model.eval(), ctx.target.move(ctx.data.example_inputs))
    except WorkbenchError:
        raise
    except Exception as e:
        raise ModelError(f"{step.describe()} left a model whose forward fails ({first_line(e, named=True)}); this "
                         "architecture is not supported by that step here, so leave the step out") from e


def default_batches(data: Data) -> tuple[int, ...]:
    """Batch sizes timed by default: 1 and the validation batch size."""
    first = next(iter(data.val_batches()))[0] if data.val is not None else data.example_inputs
    big = batch_size_of(first)
    return (1, big) if big > 1 else (1,)


def _batch_sizes(batch_sizes, data: Data) -> tuple[int, ...]:
    if batch_sizes is None or (isinstance(batch_sizes, (list, tuple)) and not batch_sizes):
        return default_batches(data)
    if isinstance(batch_sizes, int):
        batch_sizes = (batch_sizes,)
    out = []
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise DataError(f"batch_sizes: {b!r} is not a batch size; give positive whole numbers, e.g. (1, 64)")
        out.append(b)
    return tuple(dict.fromkeys(out))


def _study(study):
    from .study import Study

    if study is False:
        return None
    return Study.default() if study is None else study


class Baseline:
    """The user's model measured once (metric, size, MACs) on a target: what every candidate is judged against.

        >>> base = Baseline(model, data, device="cpu", batch_sizes=(1, 64))
        >>> r1 = base.run("quant=int8"); r2 = base.run("prune=0.5:structured=true")

    Each `run` builds a candidate from a fresh copy of the user's model and times it beside the baseline.
    """

    def __init__(self, model, data=None, *, backend: str = "auto", device: str = "auto", batch_sizes=None,
                 threads: int | None = None, study=None, name: str | None = None, example_inputs=None,
                 progress: Callable | None = None, recipes=(), timing=None):
        with rng_preserved():
            self._measure(model, data, backend, device, batch_sizes, threads, study, name, example_inputs, progress,
                          recipes, timing)

    def _measure(self, model, data, backend, device, batch_sizes, threads, study, name, example_inputs, progress,
                 recipes, timing) -> None:
        from .facts import ModelFacts
        from .measure import measure
        from .target import resolve

        self.original = check_model(model)
        self.data = Data.coerce(data, example_inputs)
        self.recipes = [Recipe.parse(r) for r in recipes]
        self.target = resolve(backend, device, threads, [alts for r in self.recipes for alts in r.precisions])
        self.batch_sizes = _batch_sizes(batch_sizes, self.data)
        from .measure import TimingPlan

        self.study, self.name = _study(study), name or self.data.name or type(model).__name__
        self.timing = timing or TimingPlan.default(self.target.is_cuda)  # a bad WORKBENCH_TIMING fails here, first
        self.row_id: int | None = None
        _progress(progress, "measuring the baseline", 0.0)
        self.data.check_layout()
        self.model = working_copy(self.original, self.data, self.target)
        for b in self.batch_sizes:  # timing runs the validation inputs at each batch size: they must run too
            _check_runs(self.model, self.data, self.target, "the model", b)
        self.facts = ModelFacts(self.model, self.data, self.target)
        self.measurement = measure(self.model, self.data, self.target, reference=self.model)
        self.env = self.target.environment()

    def check(self, recipe) -> tuple[Recipe, list]:
        """The recipe parsed and each step's technique, refused before any work when it cannot run here."""
        with rng_preserved():
            return self._check(recipe)

    def _check(self, recipe) -> tuple[Recipe, list]:
        from .registry import technique_for

        recipe = Recipe.parse(recipe)
        techniques = [technique_for(step) for step in recipe.steps]
        if _is_graph(self.model):
            refused = [step for step, tech in zip(recipe.steps, techniques) if not tech.graphs]
            if refused:
                raise RecipeError(f"{refused[0].describe()}: this model is a runtime graph ({type(self.model).__name__}"
                                  "), and only quantization applies to one; pruning, distillation, factorization "
                                  "and unpad need the torch model it came from")
        for step in recipe.steps:
            if step.needs_train and self.data.train is None:
                raise RecipeError(f"{step.describe()}: this step needs batches to calibrate or train on, and the "
                                  "data has no train split; build it with wb.Data(train=..., val=...)")
        if self.data.train is not None and any(step.reads_train for step in recipe.steps):  # they must run
            self.data.check_layout("train")
            inputs = next(iter(self.data.train_batches(limit=1)))[0]
            _check_inputs_run(self.model, inputs, self.target, "the first train batch")
        return recipe, techniques

    def run(self, recipe, progress: Callable | None = None, backend: str | None = None):
        """Apply `recipe` to a copy of the user's model, measure it beside the baseline, record it; a Result.

        backend: run this candidate on another backend than the baseline's target names (autotune tries both).
        """
        with rng_preserved():
            return self._run(recipe, progress, backend)

    def _run(self, recipe, progress, backend):
        import torch

        from .architectures import is_causal_lm
        from .checks import preflight_lines
        from .measure import layer_table, measure, time_side_by_side
        from .registry import backend_named, backend_of
        from .result import Result

        recipe, techniques = self.check(recipe)
        target = self.target if backend is None else resolve_backend(self.target, backend)
        checks = preflight_lines(recipe, self.facts)
        ctx = Context(data=self.data, original=self.model, target=target, facts=self.facts, on_progress=progress,
                      recipe=recipe)
        total = len(recipe.steps) + 2
        work, float_model, lowered = working_copy(self.original, self.data, self.target), None, None
        for i, (step, tech) in enumerate(zip(recipe.steps, techniques)):
            ctx.progress(f"step {i + 1}/{len(recipe.steps)}: {step.describe()}", (i + 1) / total)
            if lowered and step.stage < 3:  # only a runtime step (compile) follows lowering
                raise RecipeError(f"{step.describe()}: the model was already lowered to {lowered} by an earlier "
                                  f"step; put {step.short} before it (a model is lowered once, last)")
            before = work
            work = _apply(tech, work, step, ctx)
            if step.stage >= 2 or not isinstance(work, torch.nn.Module):
                float_model = float_model if lowered else before
                lowered = backend_of(work).label_of(work)
            _still_runs(work, step, ctx)
        if lowered is None and target.backend != "auto":
            ctx.progress(f"lowering to {target.backend}", None)
            float_model = work
            work = backend_named(target.backend).lower(work, "fp32", ctx)
        label = backend_of(work).label_of(work)

        ctx.progress("measuring the optimized model", (len(recipe.steps) + 1) / total)
        candidate = measure(work, self.data, self.target, reference=self.model, macs_model=float_model)
        baseline = copy.deepcopy(self.measurement)
        time_side_by_side({"baseline": (self.model, baseline), "candidate": (work, candidate)}, self.data,
                          self.batch_sizes, self.target, baseline="baseline", plan=self.timing,
                          progress=ctx.progress)
        if is_causal_lm(self.model) and self.timing.generations:
            from .decoding import generation

            runs = generation({"baseline": self.model, "candidate": work}, self.data, target,
                              repeats=self.timing.generations, reference="baseline", progress=ctx.progress)
            baseline.generation, candidate.generation = runs["baseline"], runs["candidate"]
        floor = self.data.fidelity_floor(self.model)
        if floor is not None:
            ctx.details["fidelity_floor"] = floor
            if floor >= FLOOR_NOTED:
                ctx.note(f"fidelity says little here: a model returning the same output for every input (the "
                         f"mean of the original's on the other inputs) scores {floor:.3f} on these batches, because "
                         "the outputs vary little between inputs; judge by labels: wb.Data(val=..., "
                         "metric='accuracy') or an eval_fn")
        slower = [s for s in candidate.speedups.values() if s.slower]
        if slower:
            fewer = candidate.macs and baseline.macs and candidate.macs < 0.95 * baseline.macs
            ctx.note(("fewer MACs, yet " if fewer else "") + "slower than the baseline here at batch "
                     + ", ".join(f"{s.batch} ({s})" for s in slower) + "; MACs and size do not decide latency, "
                     "the runtime's kernels do")
        from .data import follows_inputs

        result = Result(model=follows_inputs(work, target), recipe=recipe, measurement=candidate, baseline=baseline,
                        notes=ctx.notes,
                        preflight=checks, backend=label, target=target, env=self.env,
                        example_inputs=self.data.example_inputs, details=ctx.details,
                        layers=layer_table(float_model if float_model is not None else work)
                        if hasattr(float_model if float_model is not None else work, "named_modules") else None)
        self._record(result)
        ctx.progress("done", 1.0)
        return result

    def _record(self, result) -> None:
        if self.study is None:
            return
        if self.row_id is None:
            self.row_id = self.study.add("baseline", result.baseline, kind="baseline", model=self.name,
                                         env=self.env)
        result.baseline_id = self.row_id
        result.run_id = self.study.add(str(result.recipe), result.measurement, parent=self.row_id, model=self.name,
                                       recipe=result.recipe, notes=result.notes, env=self.env)


def resolve_backend(target, backend: str):
    """The same target on another backend, checked."""
    from .target import resolve

    return resolve(backend, target.device, target.threads)


def _progress(progress: Callable | None, message: str, fraction: float | None) -> None:
    if progress is not None:
        progress(message, fraction)


def run_many(model, recipes, data=None, *, on_result: Callable | None = None, progress: Callable | None = None,
             **options) -> list:
    """Optimize `model` with each recipe against one shared baseline; returns the Results in order.

    on_result(result) is called as each candidate finishes (a live chart adds it); `progress(message, fraction)`
    spans all recipes. Options are `optimize`'s (backend, device, batch_sizes, threads, study, name, ...).
    """
    recipes = [Recipe.parse(r) for r in (recipes if isinstance(recipes, (list, tuple)) else [recipes])]
    if not recipes:
        raise RecipeError("run_many: no recipes given; e.g. ['quant=int8', 'prune=0.5:structured=true']")
    base = Baseline(model, data, progress=progress, recipes=recipes, **options)
    for recipe in recipes:
        base.check(recipe)  # every recipe refused before any work, not after the first ran
    results = []
    for i, recipe in enumerate(recipes):
        def step_progress(message, fraction=None, i=i, recipe=recipe):
            if progress is not None:
                label = f"[{i + 1}/{len(recipes)}] {recipe}: " if len(recipes) > 1 else ""
                progress(label + message, None if fraction is None else (i + fraction) / len(recipes))

        results.append(base.run(recipe, progress=step_progress))
        if on_result is not None:
            on_result(results[-1])
    return results


def optimize(model, recipe, data=None, *, backend: str = "auto", device: str = "auto", batch_sizes=None,
             threads: int | None = None, study=None, progress: Callable | None = None, example_inputs=None,
             name: str | None = None, timing=None):
    """Apply `recipe` to a copy of `model`, measure it against the original, and return a `Result`.

    recipe: a Recipe, steps, a dict/YAML, or the short form "prune=0.5,quant=int8".
    data: a `wb.Data` bundle or an `eval_fn(model) -> float` (then pass `example_inputs`).
    backend: "auto" (the first registered backend that runs each step's precision here), or a backend's name.
    device: "auto" (CUDA when present and the recipe runs there), "cpu" or "cuda".
    batch_sizes: batch sizes to time (default: 1 and the validation batch size).
    study: where the run is recorded (default `wb.Study.default()`; False for nowhere).
    progress: `fn(message, fraction_or_None)` called as work advances.
    timing: a `workbench.measure.TimingPlan` (rounds, seconds) instead of the defaults.
    """
    return run_many(model, [recipe], data, backend=backend, device=device, batch_sizes=batch_sizes,
                    threads=threads, study=study, progress=progress, example_inputs=example_inputs, name=name,
                    timing=timing)[0]


def compare(models: dict, data=None, *, device: str = "auto", batch_sizes=None, threads: int | None = None,
            baseline: str | None = None, study=None, progress: Callable | None = None, example_inputs=None,
            timing=None):
    """Measure several models side by side in one process, timed interleaved; a DataFrame with speedups (and their
    intervals) against `baseline` (default: the first). When the baseline is a causal language model, greedy
    generation is timed too (tokens/s against the baseline's, per batch and prompt length; see `decoding`).

    models: {"fp32": model, "int8": result, ...}; values are torch modules, models a backend made, or `Result`s.
    """
    if not isinstance(models, dict) or not models:
        raise ModelError("compare needs a non-empty dict of models, e.g. {'fp32': model, 'int8': result}")
    with rng_preserved():
        return _compare(models, data, device, batch_sizes, threads, baseline, study, progress, example_inputs,
                        timing)


def _compare(models, data, device, batch_sizes, threads, baseline, study, progress, example_inputs, timing):
    from .architectures import is_causal_lm
    from .measure import TimingPlan, measure, time_side_by_side
    from .registry import backend_of
    from .result import Result
    from .tables import results_table
    from .target import resolve

    data = Data.coerce(data, example_inputs)
    baseline = baseline or next(iter(models))
    if baseline not in models:
        raise ModelError(f"baseline {baseline!r} is not one of the models: {', '.join(models)}")
    given, counted = {}, {}
    for label, m in models.items():
        if isinstance(m, Result):  # its float model's MACs and parameters, which a runtime graph does not give
            counted[label] = m.measurement
            m = m.model
        try:
            given[label] = (m, backend_of(m))
        except DeviceError:
            raise ModelError(f"compare: {label!r} is a {type(m).__name__}; expected a torch module, a model a "
                             "backend made, or a Result") from None
    # device="auto": the GPU only where every model runs there (an ONNX Runtime graph on its CPU build does not)
    target = resolve(device=device, threads=threads, backends=tuple(b for _, b in given.values()))
    batch_sizes = _batch_sizes(batch_sizes, data)
    prepared = {}
    for label, (m, backend) in given.items():
        prepared[label] = backend.place(m, target)
        _check_runs(prepared[label], data, target, f"compare: {label!r}")
    reference = prepared[baseline]
    entries = {}
    for i, (label, m) in enumerate(prepared.items()):
        _progress(progress, f"measuring {label}", i / (len(prepared) + 1))
        entries[label] = (m, measure(m, data, target, reference=reference))
        if label in counted and entries[label][1].macs is None:
            entries[label][1].macs = counted[label].macs
    plan = timing or TimingPlan.default(target.is_cuda)
    time_side_by_side(entries, data, batch_sizes, target, baseline=baseline, plan=plan, progress=progress)
    if plan.generations and is_causal_lm(reference):  # a language model's speed is its generation's
        from .decoding import generation

        runs = generation({label: m for label, (m, _) in entries.items()}, data, target, repeats=plan.generations,
                          reference=baseline, progress=progress)
        for label, (_, row) in entries.items():
            row.generation = runs[label]
    store = _study(study)
    if store is not None:
        env = target.environment()
        for label, (_, row) in entries.items():
            store.add(label, row, kind="compare", model=label, env=env)
    _progress(progress, "done", 1.0)
    return results_table({label: m for label, (_, m) in entries.items()}, baseline)


__all__ = ["optimize", "run_many", "compare", "Baseline", "Context"]
