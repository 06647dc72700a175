"""The one verdict rule, used by the card, reports, the batch index, autotune and the panel.

- "faster" only when the 95% interval's lower bound is above 1 at every timed batch, on a quiet machine;
- "best" only among candidates within the metric budget that are reliably faster (ranked by their worst lower
  bound); otherwise "no candidate is reliably faster here";
- an unstable measurement makes no verdict on speed and names its cause.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_DROP = 0.01
SMALLER = 0.95  # size ratio below which a candidate counts as smaller


@dataclass
class Verdict:
    within_budget: bool
    faster: bool
    slower: bool
    smaller: bool
    stable: bool
    drop: float
    worst: object  # the Speedup with the lowest lower bound (None when nothing was timed)
    text: str

    def __str__(self) -> str:
        return self.text


def judge(baseline, candidate, max_drop: float = DEFAULT_MAX_DROP) -> Verdict:
    """The verdict on `candidate` (a Measurement with speedups) against `baseline` (a Measurement)."""
    from .measure.measurement import significant

    drop = baseline.metric - candidate.metric
    speedups = list(candidate.speedups.values())
    worst = min(speedups, key=lambda s: s.low) if speedups else None
    stable = bool(speedups) and all(s.stable for s in speedups) and candidate.stability.stable
    faster = stable and all(s.faster for s in speedups)
    slower = stable and any(s.slower for s in speedups)
    smaller = candidate.size_bytes < SMALLER * baseline.size_bytes
    within = drop <= max_drop
    size = f"{significant(candidate.size_bytes / baseline.size_bytes, 2)}x the size"
    if not speedups:
        text = "not timed beside a baseline: no verdict on speed"
    elif not within:
        text = (f"over the metric budget: {candidate.metric_name} drops {significant(drop, 2)} "
                f"(budget {max_drop:g})")
    elif not stable:
        cause = candidate.stability.causes[0] if candidate.stability.causes else "the timing rounds spread widely"
        text = f"timing unstable, no verdict on speed: {cause}" + (f"; {size}" if smaller else "")
    elif faster:
        text = (f"recommended: faster ({worst} at batch {worst.batch}, the slowest gain)"
                + (f" and smaller ({size})" if smaller else ""))
    elif slower:
        text = "slower here" + (f", though smaller ({size})" if smaller else "")
    elif smaller:
        text = f"smaller only ({size}), not reliably faster here"
    else:
        text = "no reliable gain measured"
    generating = _generation(candidate)
    if generating and within and speedups and not stable:  # timed on the same busy machine: not claimed either
        text += "; generation timed in the same conditions, so no verdict on it either"
    elif generating and within:  # a language model: the forward pass is a prompt's prefill, generation the rest
        text = text.replace("slower here", "slower on a whole forward pass here") + f"; {generating}"
    return Verdict(within, faster, slower, smaller, stable, drop, worst, text)


def _generation(candidate) -> str:
    """A causal LM's generation against the original's, slowest and fastest setting (empty when not timed)."""
    from .measure.measurement import interval_text

    settings = [s for s in (candidate.generation.settings if candidate.generation else []) if s.ratio]
    if not settings:
        return ""
    low, high = min(settings, key=lambda s: s.ratio[0]), max(settings, key=lambda s: s.ratio[0])
    what = "faster" if all(s.ratio[1] > 1 for s in settings) else \
        "slower" if all(s.ratio[2] < 1 for s in settings) else "mixed"
    return (f"generating {what}: {interval_text(low.ratio, 'x')} ({low.label()}) to {interval_text(high.ratio, 'x')} "
            f"({high.label()}) the original's tokens/s")


def best(results, max_drop: float = DEFAULT_MAX_DROP):
    """(the Result that is reliably faster within the budget with the highest worst lower bound, or None;
    a one-line headline)."""
    judged = [(r, judge(r.baseline, r.measurement, max_drop)) for r in results]
    good = [(r, v) for r, v in judged if v.within_budget and v.faster]
    if not good:
        unstable = any(not v.stable for _, v in judged)
        why = " (timing was unstable: re-run on a quiet machine)" if unstable else ""
        return None, f"no candidate is reliably faster here within a {max_drop:g} metric budget{why}"
    r, v = max(good, key=lambda rv: rv[1].worst.low)
    gain = v.text[len("recommended: "):]
    return r, f"best within a {max_drop:g} {r.measurement.metric_name} budget: {r.recipe} ({gain})"
