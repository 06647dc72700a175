"""Autotune: an accuracy-budgeted search across techniques with optuna, that honours a time budget and always
returns the best candidate found so far plus the whole Pareto front.

    >>> tuned = wb.autotune(model, data, max_drop=0.01, objective="latency", budget="5min")
    >>> tuned.best.table(); tuned.front; tuned.figure

Several machines can share one search: give each the same `storage` (any SQL URL optuna accepts) and study
name, e.g. `workbench autotune digits-cnn --storage postgresql://host/db --study cnn` on each.
"""
from __future__ import annotations

import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import WorkbenchError

DEFAULT_STORAGE = Path(".workbench") / "autotune.sqlite"


def parse_budget(budget: Any) -> float:
    """Seconds from 120, "90s", "2min", "1.5h"."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        seconds = float(budget)
    else:
        found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hours?)?\s*", str(budget))
        if not found:
            raise WorkbenchError(f"budget {budget!r} is not a duration; use e.g. 120, '90s', '5min' or '1h'")
        unit = (found.group(2) or "s")[0]
        seconds = float(found.group(1)) * {"s": 1, "m": 60, "h": 3600}[unit]
    if seconds <= 0:
        raise WorkbenchError(f"budget must be positive, got {budget!r}")
    return seconds


@dataclass
class Tuned:
    """What autotune returns: `best` (a Result inside the metric budget, or the best metric found if none is),
    every trial's Result, the Pareto front as a DataFrame, the chart, and the candidates that failed
    (`failed`: (recipe, backend, error line, full traceback) each)."""

    best: Any
    results: list
    front: Any
    figure: Any
    within_budget: bool
    seconds: float
    failed: list = field(default_factory=list)
    optuna_study: Any = field(repr=False, default=None)

    def table(self):
        return self.best.table()


def _suggest(trial, conv_heavy: bool, linear_heavy: bool, on_cuda: bool, padded: bool = False,
             backend: str = "auto") -> tuple[str, str]:
    """One recipe from the search space, in the short form, and the backend to run it on."""
    steps = []
    prune = trial.suggest_categorical("prune", [0.0, 0.25, 0.4, 0.5])
    if prune:
        steps.append(f"prune={prune}:structured=true:scope=layer")
        recovery = trial.suggest_categorical("recovery", ["finetune", "distill"])
        epochs = trial.suggest_int("recovery_epochs", 1, 3)
        steps.append(f"{recovery}={epochs}")
    if linear_heavy:
        energy = trial.suggest_categorical("factorize_energy", [0.0, 0.9, 0.95])
        if energy:
            steps.append(f"factorize:energy={energy}")
    unpad = padded and trial.suggest_categorical("unpad", [True, False])
    if unpad:
        steps.append("unpad")
    quant_options = ["fp16", "none"] if on_cuda else ["int8-dynamic", "int8-static", "none"]
    quant = trial.suggest_categorical("quant", quant_options)
    if quant.startswith("int8"):
        per_channel = trial.suggest_categorical("per_channel", [True, False])
        part = f"quant={quant}:per_channel={'true' if per_channel else 'false'}"
        if quant == "int8-static":  # after unpad, ORT's histogram calibrators fail on varying token counts
            part += ":calibration=" + ("minmax" if unpad else
                                       trial.suggest_categorical("calibration", ["minmax", "entropy", "percentile"]))
        steps.append(part)
    elif quant == "fp16":
        steps.append("quant=fp16")
    elif backend == "auto" and not on_cuda:  # a float model: torch eager or ONNX Runtime's optimized graph
        backend = trial.suggest_categorical("backend", ["torch", "onnxruntime"])
    return ",".join(steps), backend


def autotune(model, data, max_drop: float = 0.01, objective: str = "latency", batch: int | None = None,
             budget: Any = "10min", backend: str = "auto", device: str = "auto", storage: str | None = None,
             study_name: str | None = None, trials: int | None = None, study=None,
             progress: Callable | None = None, on_result: Callable | None = None, seed: int = 0) -> Tuned:
    """Search recipes (quantization mode/granularity/calibration, structured pruning + fine-tune/distill recovery,
    factorization, skipping padding in BERT encoders, backend) for the fastest (or smallest) model whose metric
    drops at most `max_drop` below the baseline on the validation split, within `budget` of wall time.
    """
    import optuna

    from . import dashboards
    from .data import Data
    from .engine import _check_model, optimize, resolve_device
    from .measure import conv_share
    from .techniques.unpad import padding_share, supported

    if objective not in ("latency", "size"):
        raise WorkbenchError(f"objective {objective!r} is not known; use 'latency' or 'size'")
    if not 0 <= max_drop < 1:
        raise WorkbenchError(f"max_drop {max_drop!r} must be in [0, 1)")
    seconds = parse_budget(budget)
    model, data = _check_model(model), Data.coerce(data)
    device = resolve_device(device)
    started = time.time()
    share = conv_share(model, data.inputs(1))
    batch = batch or (64 if share > 0.5 else 1)
    batch_sizes = (batch,)
    share_padding = padding_share(data) if supported(model) else None
    padded = bool(share_padding and share_padding > 0.05)  # BERT encoder fed padded batches: try skipping it

    if storage is None:
        DEFAULT_STORAGE.parent.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{DEFAULT_STORAGE}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = study_name or f"autotune-{data.name or type(model).__name__}-{objective}-{int(started)}"
    sampler = optuna.samplers.TPESampler(seed=seed)
    ostudy = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, sampler=sampler,
                                 directions=["maximize", "minimize"])
    # start from what usually works, so even a short budget ends with a candidate
    quant = {"quant": "int8-static" if share > 0.5 else "int8-dynamic", "per_channel": True, "calibration": "minmax",
             "factorize_energy": 0.0, **({"unpad": True} if padded else {})}
    for first in ({"prune": 0.0, **quant}, {"prune": 0.5, "recovery": "finetune", "recovery_epochs": 2, **quant}):
        ostudy.enqueue_trial(first, skip_if_exists=True)

    results: list = []
    failed: list = []  # (recipe, backend, error, traceback) of candidates that raised
    durations: list = []
    by_recipe: dict = {}

    def run_trial(trial) -> tuple[float, float]:
        t0 = time.time()
        recipe, runtime = _suggest(trial, share > 0.5, share <= 0.5, device.startswith("cuda"), padded, backend)
        if (recipe, runtime) in by_recipe:  # the same candidate again: reuse, do not re-measure
            r = by_recipe[recipe, runtime]
        elif not recipe and runtime != "onnxruntime":
            raise optuna.TrialPruned("empty recipe")
        else:
            try:
                r = optimize(model, recipe or [], data=data, backend=runtime, device=device, batch_sizes=batch_sizes,
                             study=study, baseline=results[0] if results else None, name=data.name)
            except Exception as e:  # one candidate failing (a library limit, a bad export) does not end the search
                durations.append(time.time() - t0)
                error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                failed.append((recipe, runtime, error, traceback.format_exc()))
                if progress:
                    progress(f"trial {len(durations)}: {recipe} [{runtime}] failed: {error}",
                             min((time.time() - started) / seconds, 1.0))
                trial.set_user_attr("error", error)
                raise optuna.TrialPruned(error) from None
            results.append(r)
            by_recipe[recipe, runtime] = r
            if on_result:
                on_result(r)
        drop = r.baseline["metric"] - r.metrics["metric"]
        trial.set_constraint("metric_drop", drop - max_drop)  # feasible when <= 0
        trial.set_user_attr("drop", drop)
        trial.set_user_attr("recipe", recipe)
        trial.set_user_attr("backend", r.backend)
        cost = r.metrics[f"latency_p50_ms_b{batch}"] if objective == "latency" else r.metrics["size_bytes"]
        durations.append(time.time() - t0)
        if progress:
            progress(f"trial {len(durations)}: {recipe or '(no steps)'} [{r.backend}]: {r.metrics['metric_name']} "
                     f"{r.metrics['metric']:.4f}, {objective} {cost:.4g}", min((time.time() - started) / seconds, 1.0))
        return r.metrics["metric"], cost

    wrap_up = min(5.0, 0.05 * seconds)  # time kept for choosing the best and drawing the chart

    def stop_in_time(st, trial) -> None:
        spent = time.time() - started
        longest = max(durations) if durations else 0  # do not start a trial that may not finish in time
        if spent + longest + wrap_up > seconds or (trials is not None and len(durations) >= trials):
            st.stop()

    try:
        ostudy.optimize(run_trial, timeout=max(seconds - wrap_up - (time.time() - started), 1.0),
                        callbacks=[stop_in_time], n_trials=None)
    except KeyboardInterrupt:
        pass  # keep what was found so far
    if not results:
        why = f"; {len(failed)} failed, the first with {failed[0][2]}" if failed else ""
        raise WorkbenchError(f"autotune finished no trial within {seconds:.0f} s{why}; give a larger budget")
    cost_key = f"latency_p50_ms_b{batch}" if objective == "latency" else "size_bytes"
    feasible = [r for r in results if r.baseline["metric"] - r.metrics["metric"] <= max_drop]
    best = min(feasible, key=lambda r: r.metrics[cost_key]) if feasible else \
        max(results, key=lambda r: r.metrics["metric"])
    import pandas as pd

    rows = pd.DataFrame([{"recipe": str(r.recipe), "backend": r.backend, "metric": r.metrics["metric"],
                          cost_key: r.metrics[cost_key], "size_bytes": r.metrics["size_bytes"],
                          "within budget": r in feasible} for r in results])
    front = rows.loc[dashboards.pareto_front(rows, "metric", cost_key)]
    figure = dashboards.pareto(results, batch=batch, title=f"autotune: {len(results)} candidates, {best.recipe} chosen")
    return Tuned(best=best, results=results, front=front.sort_values(cost_key), figure=figure,
                 within_budget=bool(feasible), seconds=time.time() - started, failed=failed, optuna_study=ostudy)

