"""Timing several models so that their ratio can be trusted on a busy machine, and its interval is honest.

The rules of pyperf and `torch.utils.benchmark`, with the baseline timed beside each candidate:
- each model runs in calibrated blocks (enough calls that a block lasts `min_block_s`, so the timer's resolution
  and per-call jitter do not matter), after warm-up blocks that run until two in a row agree;
- a timed block follows an untimed one of the same model, so that what the previous model left running (thread
  pools spinning down, caches) is gone before the clock starts: each block is that model in its steady state;
- the models take turns within each round (A B C, then B C A, ...), so drift, thermal or clock changes and
  neighbours' load hit all of them alike; a round's ratio compares two blocks timed moments apart;
- the rounds are spread over several sessions, each on a fresh instance of every model (a new copy, a new
  inference session): where memory lands and how a runtime set itself up shift a model's speed by a few percent
  for as long as that instance lives (measured here: 1-3%), which rounds of one instance cannot show. pyperf
  spawns several processes for the same reason. The interval is computed over the sessions' medians;
- device work is synchronized before the clock stops (`target.sync`).

The machine's load is watched while timing (`workbench.measure.load`); a busy machine or widely spread rounds
make the measurement unstable, and an unstable measurement never makes a verdict.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from .measurement import Latency, Speedup, Stability

MAX_SPREAD = 0.15  # rounds spread wider than this (robust CV: scaled MAD / median) make a measurement unstable
MAX_OUTLIERS = 0.34  # so do more than a third of the rounds outlying (beyond 3 scaled MADs and 10%)


@dataclass
class TimingPlan:
    """How long to time. The defaults keep a small model's comparison around a second per batch size.

    sessions: fresh instances of every model, one after the other (8 sessions: the interval is the range of their
        medians, a 99% interval for the median session's ratio, so that re-running the cell lands inside it);
    rounds: per session, at least `min_rounds` and until `min_seconds` have passed, at most `max_rounds`;
    max_seconds: the whole timing of one batch size stops adding rounds after this.
    """

    sessions: int = 8
    min_rounds: int = 2
    max_rounds: int = 30
    min_seconds: float = 0.08
    max_seconds: float = 60.0
    min_block_s: float = 0.01
    warmup_s: float = 0.03  # on CUDA at least 0.5 s: GPU clocks ramp up under load
    max_warmup_blocks: int = 10
    generations: int = 7  # causal language models: greedy generations timed per model and setting (0: none)

    @classmethod
    def default(cls, cuda: bool = False) -> "TimingPlan":
        """The plan `optimize` uses: these defaults, or `WORKBENCH_TIMING=quick` (2 short sessions: for test
        suites and CI, where behaviour is under test, not the numbers)."""
        import os

        mode = os.environ.get("WORKBENCH_TIMING", "")
        if mode not in ("", "default", "quick"):
            from ..errors import WorkbenchError

            raise WorkbenchError(f"WORKBENCH_TIMING={mode!r} is not known; use 'quick' or leave it unset")
        if mode == "quick":
            return cls(sessions=2, min_rounds=3, max_rounds=3, min_seconds=0.0, min_block_s=0.005, warmup_s=0.0,
                       max_warmup_blocks=2, generations=2)
        return cls(warmup_s=0.5) if cuda else cls()


def _block(fn: Callable, n: int, clock: Callable, sync: Callable) -> float:
    """Seconds per call over a block of `n` calls."""
    t0 = clock()
    for _ in range(n):
        fn()
    sync()
    return (clock() - t0) / n


def calibrate(fn: Callable, plan: TimingPlan, clock: Callable = time.perf_counter,
              sync: Callable = lambda: None) -> int:
    """Calls per block: doubled from 1 until a block lasts at least `min_block_s`; then the warm-up: blocks
    until two in a row agree within 10% (or `warmup_s` and `max_warmup_blocks` are spent)."""
    fn()  # the first call of a fresh instance is slow (allocation, lazy set-up): not a measure of a call
    sync()
    n = 1
    per_call = _block(fn, n, clock, sync)
    while per_call * n < plan.min_block_s and n < 1 << 20:
        n = max(n * 2, min(math.ceil(plan.min_block_s / max(per_call, 1e-12) - 1e-9), n * 16))
        per_call = _block(fn, n, clock, sync)
    started, previous = clock(), per_call
    for _ in range(plan.max_warmup_blocks):
        current = _block(fn, n, clock, sync)
        settled = abs(current - previous) <= 0.1 * max(previous, 1e-12)
        previous = current
        if settled and clock() - started >= plan.warmup_s:
            break
    return n


def time_interleaved(calls: dict[str, Callable], plan: TimingPlan | None = None, *,
                     clock: Callable = time.perf_counter, sync: Callable = lambda: None) -> dict[str, Latency]:
    """Time each zero-argument callable in interleaved rounds; returns {label: Latency (ms per call per round)}.

    `calls` values are the calls themselves, or factories `fresh()` returning a call on a fresh instance (marked
    by `time_sessions`), used once per session. `clock` and `sync` are parameters so that a fake clock can
    check the arithmetic exactly.
    """
    plan = plan or TimingPlan()
    labels = list(calls)
    samples: dict[str, list[float]] = {label: [] for label in labels}
    sessions: list[int] = []
    started = clock()
    for session in range(plan.sessions):
        current = {label: calls[label]() if getattr(calls[label], "fresh", False) else calls[label]
                   for label in labels}
        iterations = {label: calibrate(current[label], plan, clock, sync) for label in labels}
        session_start, rounds = clock(), 0
        while True:
            order = labels[rounds % len(labels):] + labels[:rounds % len(labels)]
            for label in order:
                if len(labels) > 1:
                    _block(current[label], iterations[label], clock, sync)  # settling, untimed
                samples[label].append(_block(current[label], iterations[label], clock, sync) * 1e3)
            rounds += 1
            sessions.append(session)
            if rounds >= plan.max_rounds or clock() - started >= plan.max_seconds or \
                    (rounds >= plan.min_rounds and clock() - session_start >= plan.min_seconds):
                break
        if clock() - started >= plan.max_seconds and session >= 1:
            break
    return {label: Latency(0, tuple(samples[label]), iterations[label], tuple(sessions)) for label in labels}


def fresh(factory: Callable) -> Callable:
    """Mark `factory` (returning a call) as making a fresh instance of a model for each timing session."""
    factory.fresh = True
    return factory


def spread(latency: Latency) -> Stability:
    """Unstable when the rounds spread widely: the machine was not steady while timing."""
    causes = []
    if latency.spread > MAX_SPREAD:
        causes.append(f"timings at batch {latency.batch} spread widely ({latency.spread:.0%} across rounds): "
                      "something else ran meanwhile; re-run when the machine is quiet")
    elif latency.outliers > MAX_OUTLIERS:
        causes.append(f"{latency.outliers:.0%} of the timing rounds at batch {latency.batch} were outliers: "
                      "something else ran meanwhile; re-run when the machine is quiet")
    return Stability(not causes, tuple(causes))


def speedups(latencies: dict[str, Latency], baseline: str, stability: Stability) -> dict[str, Speedup]:
    """Per candidate label: its Speedup against `baseline`, from the rounds they shared."""
    base = latencies[baseline]
    out = {}
    for label, lat in latencies.items():
        if label == baseline:
            continue
        stable = stability.stable and spread(base).stable and spread(lat).stable
        out[label] = Speedup.from_rounds(lat.batch, base.samples_ms, lat.samples_ms, stable, lat.sessions)
    return out
