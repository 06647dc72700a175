"""The measurement types: a model's numbers (`Measurement`), its latency at one batch size (`Latency`), and a
speedup against the baseline it was timed with, with its 95% interval (`Speedup`).

One mapping to and from a flat row (`Measurement.to_row` / `from_row`): what the Study stores and DataFrames show.
The row's column names are spelled here and nowhere else (`column`).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

CONFIDENCE = 0.95
MIN_VALUES = 6  # the fewest values whose sign-test interval reaches 95% (the whole range of 6: 96.9%)


def significant(value: float | None, digits: int = 3) -> str:
    """`value` with `digits` significant figures, without a trailing exponent for everyday magnitudes."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–" if value is None else str(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= 6:
        return f"{value:.{digits - 1}e}"
    decimals = digits - 1 - magnitude
    return f"{round(value, decimals):.{max(decimals, 0)}f}"


def median_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(median, low, high): the median of `values` and a distribution-free interval for it.

    The interval is [x_(k), x_(n-k+1)] of the sorted values, with the largest k for which a Binomial(n, 1/2)
    puts at most (1 - confidence)/2 below k (the sign-test interval). It needs no assumption about the shape of
    the distribution, and is exact, so a test with a fake clock can check it to the last digit. Below 6 values
    no k qualifies and the interval is the whole range.
    """
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    tail = (1 - confidence) / 2
    k, below = 0, 0.0
    while True:
        below += math.comb(n, k) / 2 ** n  # P(X <= k)
        if below > tail:
            break
        k += 1
    k = max(k, 1)  # 1-based index of the lower bound: x_(k)
    return statistics.median(xs), xs[k - 1], xs[n - k]


@dataclass
class Latency:
    """Time per call at one batch size: one value per timing round (a calibrated block of `iterations` calls)."""

    batch: int
    samples_ms: tuple
    iterations: int = 1
    sessions: tuple = ()  # the timing session of each round (fresh instances of the models), when known

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p95_ms(self) -> float:
        xs = sorted(self.samples_ms)
        return xs[min(len(xs) - 1, math.ceil(0.95 * len(xs)) - 1)]

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.samples_ms)

    @property
    def cv(self) -> float:
        """Coefficient of variation of the rounds (0 for a single round)."""
        if len(self.samples_ms) < 2:
            return 0.0
        return statistics.stdev(self.samples_ms) / self.mean_ms

    @property
    def spread(self) -> float:
        """Robust relative spread of the rounds: 1.4826 x the median absolute deviation over the median (the CV
        of a normal distribution, without letting one slow round dominate)."""
        med = self.p50_ms
        return statistics.median(abs(x - med) for x in self.samples_ms) * 1.4826 / med if med else 0.0

    @property
    def outliers(self) -> float:
        """Share of rounds further than 3 scaled MADs, and 10%, from the median (a robust outlier rule; the 10%
        keeps a tight distribution's ordinary jitter from counting)."""
        med = self.p50_ms
        mad = statistics.median(abs(x - med) for x in self.samples_ms) * 1.4826
        return sum(abs(x - med) > max(3 * mad, 0.1 * med) for x in self.samples_ms) / len(self.samples_ms)

    @property
    def throughput(self) -> float:
        """Samples per second at the median."""
        return self.batch / (self.p50_ms / 1e3)


@dataclass
class Speedup:
    """Baseline time over candidate time at one batch size: the median of the per-round ratios (both timed in the
    same round) and its 95% interval. `stable` is False when the machine was busy or the rounds spread widely."""

    batch: int
    ratio: float
    low: float
    high: float
    stable: bool = True
    rounds: int = 0

    @classmethod
    def from_rounds(cls, batch: int, baseline_ms, candidate_ms, stable: bool = True, sessions=()) -> "Speedup":
        """From per-round times of both models. With `sessions` (each round's session), the interval is the
        sign-test interval of the sessions' median ratios, so it covers what a fresh instance would measure;
        without, of the rounds' ratios."""
        ratios = [b / c for b, c in zip(baseline_ms, candidate_ms)]
        ratio = statistics.median(ratios)
        groups: dict = {}
        for session, r in zip(sessions, ratios):
            groups.setdefault(session, []).append(r)
        medians = [statistics.median(g) for g in groups.values()]
        if len(medians) >= MIN_VALUES:
            _, low, high = median_interval(medians)
        else:  # too few sessions for an interval of their own: the rounds' interval, widened to every session
            _, low, high = median_interval(ratios)
            low, high = min([low, *medians]), max([high, *medians])
        enough = len(ratios) >= MIN_VALUES  # below 6 values no interval reaches 95%: no verdict on it
        return cls(batch, ratio, min(low, ratio), max(high, ratio), stable and enough, len(ratios))

    @property
    def faster(self) -> bool:
        """Reliably faster: measured on a quiet machine and the whole interval above 1."""
        return self.stable and self.low > 1

    @property
    def slower(self) -> bool:
        return self.stable and self.high < 1

    def __str__(self) -> str:
        return interval_text((self.ratio, self.low, self.high), "x", 2)


@dataclass
class Stability:
    """Whether timing could be trusted, and if not, why (one line per cause, each saying what to do)."""

    stable: bool = True
    causes: tuple = ()

    def __bool__(self) -> bool:
        return self.stable

    def merge(self, other: "Stability") -> "Stability":
        causes = tuple(dict.fromkeys(self.causes + other.causes))
        return Stability(self.stable and other.stable, causes)


def column(what: str, batch: int) -> str:
    """The row/DataFrame column of a per-batch number: column('p50', 64) -> 'latency_p50_ms_b64'."""
    return {"p50": "latency_p50_ms_b{}", "p95": "latency_p95_ms_b{}", "throughput": "throughput_b{}",
            "cv": "latency_cv_b{}", "samples": "latency_samples_ms_b{}", "iterations": "latency_iterations_b{}",
            "sessions": "latency_sessions_b{}", "speedup": "speedup_b{}", "low": "speedup_low_b{}",
            "high": "speedup_high_b{}",
            "stable": "speedup_stable_b{}"}[what].format(batch)


def batches_in(columns) -> list[int]:
    """The batch sizes a table of rows holds latencies for, smallest first."""
    prefix = "latency_p50_ms_b"
    return sorted(int(c[len(prefix):]) for c in columns if str(c).startswith(prefix))


STATIC = ("metric", "metric_name", "perplexity", "size_bytes", "sparse_size_bytes", "params", "nonzero_params", "macs",
          "peak_mem_bytes", "threads", "device", "backend")


@dataclass
class Setting:
    """One generation setting's numbers for one model: time to first token and tokens per second of the decode
    after it (rows x (new tokens - 1) / the time after the first token), each (median, low, high) over runs."""

    batch: int
    prompt: int
    ttft_ms: tuple
    tokens_per_s: tuple
    ratio: tuple | None = None  # tokens per second against the reference's, (median, low, high) of paired runs
    rates: tuple = ()  # tokens per second of each timed run, in the order the runs took turns (pairs line up)

    def label(self) -> str:
        return f"b{self.batch} p{self.prompt}"


@dataclass
class GenerationRun:
    settings: list = field(default_factory=list)  # of Setting
    same_tokens: float | None = None  # share of prompts whose greedy tokens equal the original's (None: the original)
    prompts_compared: int = 0
    same_prefix: float | None = None  # mean count of leading greedy tokens equal to the original's
    new_tokens: int = 64
    skipped: str | None = None  # why it (or some of its settings) was not timed

    def to_dict(self) -> dict:
        return {"settings": [vars(s) for s in self.settings], "same_tokens": self.same_tokens,
                "prompts_compared": self.prompts_compared, "new_tokens": self.new_tokens, "skipped": self.skipped,
                "same_prefix": self.same_prefix}

    @classmethod
    def from_dict(cls, d: dict | None) -> "GenerationRun | None":
        if not d:
            return None
        settings = [Setting(s["batch"], s["prompt"], tuple(s["ttft_ms"]), tuple(s["tokens_per_s"]),
                            tuple(s["ratio"]) if s.get("ratio") else None, tuple(s.get("rates") or ()))
                    for s in d.get("settings", [])]
        return cls(settings=settings, same_tokens=d.get("same_tokens"), prompts_compared=d.get("prompts_compared", 0),
                   same_prefix=d.get("same_prefix"), new_tokens=d.get("new_tokens", 64), skipped=d.get("skipped"))

    def agreement(self) -> str:
        """How far greedy decoding follows the original's, in words."""
        if self.same_tokens is None:
            return "greedy tokens not compared with the original's"
        prefix = f"; on average the first {self.same_prefix:.3g} agree" if self.same_prefix is not None else ""
        return (f"same {self.new_tokens} greedy tokens as the original on {self.same_tokens:.0%} of "
                f"{self.prompts_compared} prompts{prefix}")

    def setting(self, batch: int, prompt: int) -> "Setting | None":
        return next((s for s in self.settings if (s.batch, s.prompt) == (batch, prompt)), None)

    def lines(self) -> list[str]:
        if not self.settings:
            return [f"generation not timed: {self.skipped or 'no setting ran'}"]
        out = [f"{s.label()}: first token {interval_text(s.ttft_ms)} ms, {interval_text(s.tokens_per_s)} tokens/s"
               + (f" ({interval_text(s.ratio, 'x')} the original's)" if s.ratio else "") for s in self.settings]
        if self.skipped:
            out.append(f"some settings not timed: {self.skipped}")
        if self.same_tokens is not None:
            out.append(self.agreement())
        return out


def interval_text(t: tuple, unit: str = "", digits: int = 3) -> str:
    """'median<unit> (low-high)' of a (median, low, high) triple, e.g. '2.9x (2.6-3.1)'."""
    return f"{significant(t[0], digits)}{unit} ({significant(t[1], digits)}-{significant(t[2], digits)})"


@dataclass
class Measurement:
    """Everything measured about one model in one session: the metric on the validation split, latency per batch
    size, speedups against the baseline timed beside it (empty for a baseline), size, parameters, MACs, memory."""

    metric: float
    metric_name: str
    size_bytes: int
    perplexity: float | None = None  # causal language models: exp(mean next-token loss) on the validation text
    sparse_size_bytes: int | None = None
    params: int | None = None
    nonzero_params: int | None = None
    macs: int | None = None
    peak_mem_bytes: int | None = None
    threads: int | None = None
    device: str = "cpu"
    backend: str = "torch"
    latency: dict = field(default_factory=dict)  # batch -> Latency
    speedups: dict = field(default_factory=dict)  # batch -> Speedup
    stability: Stability = field(default_factory=Stability)
    generation: GenerationRun | None = None  # causal language models: greedy decoding timed (workbench.decoding)

    @property
    def batch_sizes(self) -> tuple:
        return tuple(sorted(self.latency))

    def p50(self, batch: int) -> float:
        return self.latency[batch].p50_ms

    @property
    def stable(self) -> bool:
        return self.stability.stable

    def to_row(self) -> dict:
        """A flat dict (JSON-friendly) for the Study and DataFrames."""
        row: dict[str, Any] = {k: getattr(self, k) for k in STATIC}
        row["batch_sizes"] = list(self.batch_sizes)
        row["stable"] = self.stability.stable
        row["unstable_cause"] = " | ".join(self.stability.causes) or None  # for reading
        row["unstable_causes"] = list(self.stability.causes)
        for b, lat in sorted(self.latency.items()):
            row[column("p50", b)] = lat.p50_ms
            row[column("p95", b)] = lat.p95_ms
            row[column("throughput", b)] = lat.throughput
            row[column("cv", b)] = lat.cv
            row[column("samples", b)] = list(lat.samples_ms)
            row[column("iterations", b)] = lat.iterations
            row[column("sessions", b)] = list(lat.sessions)
        row["generation"] = self.generation.to_dict() if self.generation is not None else None
        for b, s in sorted(self.speedups.items()):
            row[column("speedup", b)] = s.ratio
            row[column("low", b)] = s.low
            row[column("high", b)] = s.high
            row[column("stable", b)] = s.stable
        return row

    @classmethod
    def from_row(cls, row: dict) -> "Measurement":
        """The inverse of `to_row` (rows written by older versions without samples give one-sample latencies)."""
        batches = row.get("batch_sizes") or batches_in(row)
        if isinstance(batches, str):  # rows of version 0.1 kept "1,64"
            batches = [int(b) for b in batches.split(",") if b]
        m = cls(**{k: row.get(k) for k in STATIC if k in row})
        for b in map(int, batches):
            samples = row.get(column("samples", b)) or [row[column("p50", b)]]
            m.latency[b] = Latency(b, tuple(samples), int(row.get(column("iterations", b)) or 1),
                                   tuple(row.get(column("sessions", b)) or ()))
            if row.get(column("speedup", b)) is not None:
                m.speedups[b] = Speedup(b, row[column("speedup", b)], row[column("low", b)], row[column("high", b)],
                                        bool(row.get(column("stable", b), True)))
        causes = row.get("unstable_causes") or []  # rows of version 0.1 have none
        m.stability = Stability(bool(row.get("stable", True)), tuple(causes))
        m.generation = GenerationRun.from_dict(row.get("generation"))
        return m
