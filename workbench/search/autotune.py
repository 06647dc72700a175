"""Autotune: an accuracy-budgeted search across techniques with optuna, that honours a time budget and always
returns the best candidate found so far plus the whole Pareto front.

    >>> tuned = wb.autotune(model, data, max_drop=0.01, objective="latency", budget="5min")
    >>> tuned.best.table(); tuned.front; tuned.figure; tuned.headline

The search space is the registered techniques' own (`search` hooks: structured pruning with its recovery,
factorization, skipping padding, quantization modes) plus, for float candidates, the backends that run fp32 here;
it starts from what usually wins (`seeds` hooks). Candidates are ranked by the lower bound of their speedup's 95%
interval, not by a single median, and "best" is only ever a candidate that is reliably faster.

Several machines can share one search: give each the same `storage` (any SQL URL optuna accepts) and study
name, e.g. `workbench autotune digits-cnn --storage postgresql://host/db --study cnn` on each.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import WorkbenchError, require, first_line
from ..verdict import judge


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
    if not seconds > 0:
        raise WorkbenchError(f"budget must be positive, got {budget!r}")
    return seconds


@dataclass
class Tuned:
    """What autotune returns.

    best: the candidate within the metric budget that is reliably fastest (highest lower bound of its speedup), or
        smallest for objective="size"; when none qualifies, the closest one, and `reliable` is False.
    results: every trial's Result; front: the Pareto front as a DataFrame; headline: the one-line verdict;
    failed: (recipe, backend, error line, full traceback) of candidates that raised.
    """

    best: Any
    results: list
    front: Any
    within_budget: bool
    reliable: bool
    headline: str
    seconds: float
    failed: list = field(default_factory=list)
    optuna_study: Any = field(repr=False, default=None)

    def table(self):
        return self.best.table()

    @property
    def figure(self):
        from .. import charts

        batch = self.best.measurement.batch_sizes[0]
        return charts.pareto(self.results, batch=batch,
                             title=f"autotune: {len(self.results)} candidates, {self.best.recipe} chosen")


def _seeds(facts) -> list[dict]:
    """Trial parameters to start from: the i-th seed of every technique that has seeds, merged."""
    from ..registry import techniques

    from ..registry import backends_for

    lists = [t.seeds(facts) for t in techniques() if t.seeds is not None]
    lists = [seeds for seeds in lists if seeds]
    # a lowered seed runs where backend="auto" would run it (OpenVINO, say, is searched after)
    firsts = {f"backend {p}": runs[0].name for p in ("int8-dynamic", "int8-static", "fp16", "bf16", "fp8")
              for runs in [backends_for(p, facts.target)] if len(runs) > 1}
    return [{**firsts, **{k: v for seeds in lists for k, v in seeds[min(i, len(seeds) - 1)].items()}}
            for i in range(max((len(s) for s in lists), default=0))]


def _suggest(trial, facts, backend: str) -> tuple[str, str | None]:
    """One candidate: short-form steps from every technique's search, and the backend that runs it where several
    run its precision here (fp32 for a float model)."""
    from ..recipe import Recipe
    from ..registry import backends, techniques

    steps = [s for t in techniques() if t.search is not None for s in t.search(trial, facts)]
    recipe = ",".join(steps)
    lowering = [s for s in Recipe.parse(recipe).steps if s.stage == 2] if recipe else []
    precisions = lowering[-1].precisions() if lowering else ("fp32",)
    runtime = None
    if backend == "auto" and len(precisions) == 1:  # which runtime runs it fastest here: fp32, or a named precision
        names = [b.name for b in backends() if b.available(facts.target)
                 and precisions[0] in b.precisions(facts.target)]
        if len(names) > 1:
            runtime = trial.suggest_categorical("backend" if not lowering else f"backend {precisions[0]}", names)
    return recipe, runtime


def _storage(optuna, storage):
    """An optuna storage: a journal file (several processes on one machine; the default, in the data directory),
    or any SQL URL optuna takes (several machines: postgresql://host/db)."""
    from pathlib import Path

    text = str(storage)
    if "://" in text:
        return text
    path = Path(text[len("journal:"):] if text.startswith("journal:") else text).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend

    from ..paths import interrupts_held

    class Journal(JournalFileBackend):
        """Each append whole, Ctrl-C or not: the interrupt waits for the lock's release."""

        def append_logs(self, logs):
            with interrupts_held():
                super().append_logs(logs)

    return optuna.storages.JournalStorage(Journal(str(path)))


def _study_best(ostudy, max_drop: float, objective: str, ours: set):
    """(recipe, runtime) of the whole study's best trial when another process measured it, else None."""
    good = []
    for t in ostudy.get_trials(deepcopy=False):
        attrs = t.user_attrs
        if t.state.name != "COMPLETE" or "recipe" not in attrs or attrs.get("drop", 1.0) > max_drop:
            continue
        if objective == "size":
            good.append((-attrs.get("size", float("inf")), attrs))
        elif attrs.get("faster") and attrs.get("low") is not None:
            good.append((attrs["low"], attrs))
    if not good:
        return None
    attrs = max(good, key=lambda g: g[0])[1]
    key = (attrs["recipe"], attrs.get("runtime"))
    return None if key in ours else key


def _cost(result, objective: str) -> float:
    """What optuna minimizes: for latency, the baseline-relative time at the interval's pessimistic end (1 / the
    lower bound of the speedup), so a noisy gain does not win; for size, bytes."""
    if objective == "size":
        return float(result.measurement.size_bytes)
    speedups = list(result.measurement.speedups.values())
    return 1 / min(s.low for s in speedups) if speedups else float("inf")


def autotune(model, data, max_drop: float = 0.01, objective: str = "latency", batch: int | None = None,
             budget: Any = "10min", backend: str = "auto", device: str = "auto", storage: str | None = None,
             study_name: str | None = None, trials: int | None = None, study=None,
             progress: Callable | None = None, on_result: Callable | None = None, seed: int = 0,
             threads: int | None = None, timing=None) -> Tuned:
    """Search recipes for the fastest (or smallest) model whose metric drops at most `max_drop` below the
    baseline on the validation split, within `budget` of wall time.

    batch: the batch size latency is optimized for (default 64 for conv nets, else 1).
    storage: where the search lives, shared by every process that names it: a journal file path (several
        processes on one machine; default `autotune.journal` in the workbench's data directory) or an SQL URL
        (several machines, e.g. postgresql://host/db). study_name: the search's name in it. Each process ends with
        the best of the whole study: a better candidate another process found is measured here too.
    """
    optuna = require("optuna", "search", "autotune")
    from ..engine import Baseline
    from ..paths import data_dir
    from ..registry import backend_named
    from ..scoped import logger_level

    if objective not in ("latency", "size"):
        raise WorkbenchError(f"objective {objective!r} is not known; use 'latency' or 'size'")
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop < 1:
        raise WorkbenchError(f"max_drop {max_drop!r} must be a number in [0, 1)")
    seconds = parse_budget(budget)
    started = time.time()
    base = Baseline(model, data, backend=backend, device=device, study=study, threads=threads, timing=timing,
                    progress=progress)
    facts = base.facts
    batch = batch or (64 if facts.conv_heavy else 1)
    base.batch_sizes = (batch,)
    # trials rank on the forward pass at `batch`; a causal LM's generation timing (tens of seconds) would be paid by
    # every trial and ranks nothing, so it is left to wb.optimize of the chosen recipe
    base.timing = dataclasses.replace(base.timing, generations=0)
    name = study_name or f"autotune-{base.name}-{objective}-{int(started)}"

    results: list = []
    failed: list = []  # (recipe, backend, error, traceback) of candidates that raised
    durations: list = []
    by_recipe: dict = {}

    def report(message: str) -> None:
        if progress:
            progress(message, min((time.time() - started) / seconds, 0.99))

    def run_trial(trial) -> tuple[float, float]:
        t0 = time.time()
        recipe, runtime = _suggest(trial, facts, backend)
        if (recipe, runtime or backend) in by_recipe:  # the same candidate again: reuse, do not re-measure
            r = by_recipe[recipe, runtime or backend]
        elif not recipe and (runtime is None or backend_named(runtime).accepts(base.model)):
            raise optuna.TrialPruned("the baseline itself")  # no steps, and a runtime that runs it as it is
        else:
            try:
                r = base.run(recipe or [], backend=runtime)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one candidate failing (a library limit, a bad export) does not end the search
                durations.append(time.time() - t0)
                error = f"{first_line(e, named=True)}"
                failed.append((recipe, runtime, error, traceback.format_exc()))
                report(f"trial {len(durations)}: {recipe} [{runtime or 'auto'}] failed: {error}")
                trial.set_user_attr("error", error)
                raise optuna.TrialPruned(error) from None
            results.append(r)
            by_recipe[recipe, runtime or backend] = r
            if on_result:
                on_result(r)
        drop = r.baseline.metric - r.measurement.metric
        verdict = judge(r.baseline, r.measurement, max_drop)
        trial.set_constraint("metric_drop", drop - max_drop)  # feasible when <= 0
        for key, value in {"drop": drop, "recipe": recipe, "backend": r.backend, "runtime": runtime or backend,
                           "faster": verdict.faster, "low": verdict.worst.low if verdict.worst else None,
                           "size": r.measurement.size_bytes}.items():
            trial.set_user_attr(key, value)  # what another process needs to know the best of the whole study
        cost = _cost(r, objective)
        durations.append(time.time() - t0)
        speed = r.measurement.speedups.get(batch)
        report(f"trial {len(durations)}: {recipe or '(no steps)'} [{r.backend}]: {r.measurement.metric_name} "
               f"{r.measurement.metric:.4g}, " + (f"{speed} at batch {batch}" if objective == "latency" and speed
                                                  else f"{r.measurement.size_bytes / 1e6:.3g} MB"))
        return r.measurement.metric, cost

    wrap_up = min(5.0, 0.05 * seconds)  # time kept for choosing the best and drawing the chart

    def stop_in_time(st, trial) -> None:
        spent = time.time() - started
        longest = max(durations) if durations else 0  # do not start a trial that may not finish in time
        if spent + longest + wrap_up > seconds or (trials is not None and len(durations) >= trials):
            st.stop()

    interrupted = False
    with logger_level("optuna", logging.WARNING):
        where = storage or data_dir() / "autotune.journal"
        try:
            ostudy = optuna.create_study(
                study_name=name, storage=_storage(optuna, where), load_if_exists=True,
                directions=["maximize", "minimize"], sampler=optuna.samplers.TPESampler(seed=seed))
        except Exception as e:
            hint = (" (a SQL URL needs its driver: for PostgreSQL pip install psycopg2-binary and write "
                    "postgresql+psycopg2://user@host/db)" if isinstance(e, ImportError) else "")
            raise WorkbenchError(f"autotune cannot open the search storage {where}: "
                                 f"{first_line(e, named=True)}{hint}") from e
        for params in _seeds(facts):  # what usually works first, so even a short budget ends with a candidate
            ostudy.enqueue_trial(params, skip_if_exists=True)
        try:
            ostudy.optimize(run_trial, timeout=max(seconds - wrap_up - (time.time() - started), 1.0),
                            callbacks=[stop_in_time], n_trials=None)
        except KeyboardInterrupt:
            interrupted = True  # keep what was found so far
        theirs = None if interrupted else _study_best(ostudy, max_drop, objective, set(by_recipe))
        longest = max(durations) if durations else 0
        if theirs is not None and time.time() - started + longest > seconds:
            report(f"the study's best, {theirs[0]} from another process, is not measured here: no time left")
        elif theirs is not None:  # the study's best came from another process: measure it here too
            report(f"measuring the study's best candidate from another process here: {theirs[0] or '(no steps)'}")
            try:
                r = base.run(theirs[0] or [], backend=None if theirs[1] == "auto" else theirs[1])
                results.append(r)
                if on_result:
                    on_result(r)
            except KeyboardInterrupt:
                pass  # keep what was found so far
            except Exception as e:
                failed.append((theirs[0], theirs[1], f"{type(e).__name__}: {e}", traceback.format_exc()))
    if not results:
        why = f"; {len(failed)} failed, the first with {failed[0][2]}" if failed else ""
        if interrupted:
            raise WorkbenchError(f"autotune was interrupted before a trial finished{why}")
        raise WorkbenchError(f"autotune finished no trial within {seconds:.0f} s{why}; give a larger budget")
    return _tuned(results, failed, max_drop, objective, batch, time.time() - started, ostudy)


def _tuned(results, failed, max_drop, objective, batch, seconds, ostudy) -> Tuned:
    import pandas as pd

    from ..tables import pareto_front

    verdicts = [judge(r.baseline, r.measurement, max_drop) for r in results]
    feasible = [(r, v) for r, v in zip(results, verdicts) if v.within_budget]
    if objective == "size":
        good = feasible
        best = min(good, key=lambda rv: rv[0].measurement.size_bytes)[0] if good else None
    else:
        good = [(r, v) for r, v in feasible if v.faster]
        best = max(good, key=lambda rv: rv[1].worst.low)[0] if good else None
    reliable = best is not None
    if best is None:  # the closest: within the budget with the best lower bound, else the most accurate
        pool = feasible or list(zip(results, verdicts))
        best = max(pool, key=lambda rv: (rv[1].within_budget, -_cost(rv[0], objective)
                                         if feasible else rv[0].measurement.metric))[0]
    verdict = judge(best.baseline, best.measurement, max_drop)
    if reliable:
        headline = f"best within a {max_drop:g} metric budget: {best.recipe} [{best.backend}]: {verdict.text}"
    elif feasible:
        headline = (f"no candidate is reliably faster here within a {max_drop:g} metric budget; the closest: "
                    f"{best.recipe} [{best.backend}]: {verdict.text}")
    else:
        headline = f"none stayed within a {max_drop:g} metric drop; the most accurate: {best.recipe} [{best.backend}]"
    rows = pd.DataFrame([{"recipe": str(r.recipe), "backend": r.backend, "metric": r.measurement.metric,
                          "speedup": getattr(r.measurement.speedups.get(batch), "ratio", None),
                          "speedup low": getattr(r.measurement.speedups.get(batch), "low", None),
                          "size_bytes": r.measurement.size_bytes, "within budget": v.within_budget,
                          "verdict": v.text} for r, v in zip(results, verdicts)])
    cost = "size_bytes" if objective == "size" else "relative latency (pessimistic)"
    if objective != "size":
        rows[cost] = [_cost(r, objective) for r in results]
    front = rows.loc[pareto_front(rows, "metric", cost)].sort_values(cost)
    return Tuned(best=best, results=results, front=front, within_budget=verdict.within_budget, reliable=reliable,
                 headline=headline, seconds=seconds, failed=failed, optuna_study=ostudy)
