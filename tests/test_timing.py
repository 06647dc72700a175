"""Timing a user can trust: interleaved rounds, exact interval arithmetic (a fake clock), one verdict rule, and a
busy machine that is detected and refuses a verdict. No test here asserts on wall-clock time."""
import os
import subprocess
import sys
import time

import pytest

import workbench as wb
from workbench.measure import Latency, Measurement, Speedup, Stability, TimingPlan, time_interleaved
from workbench.measure.measurement import median_interval, significant
from workbench.tables import speedup_text
from workbench.verdict import best, judge


class FakeClock:
    """Time advances only when a fake model runs: exactly its duration per call."""

    def __init__(self):
        self.now, self.log = 0.0, []

    def __call__(self):
        return self.now

    def model(self, label, seconds):
        def call():
            self.log.append(label)
            self.now += seconds
        return call


def test_interleaved_rounds_with_a_fake_clock_give_exact_numbers():
    clock = FakeClock()
    # durations in binary fractions of a second, so the clock's sums are exact
    plan = TimingPlan(sessions=1, min_rounds=10, max_rounds=10, min_seconds=0.0, min_block_s=2 ** -8, warmup_s=0.0)
    lat = time_interleaved({"a": clock.model("a", 2 ** -9), "b": clock.model("b", 2 ** -11)}, plan, clock=clock)
    assert lat["a"].iterations == 2 and lat["b"].iterations == 8  # blocks calibrated to last >= 3.9 ms
    assert lat["a"].samples_ms == (2 ** -9 * 1e3,) * 10 and lat["b"].samples_ms == (2 ** -11 * 1e3,) * 10
    s = Speedup.from_rounds(1, lat["a"].samples_ms, lat["b"].samples_ms)
    assert (s.ratio, s.low, s.high, s.rounds) == (4.0, 4.0, 4.0, 10)
    timed = clock.log[-(2 + 8) * 2 * 2:]  # the last two rounds: settle + timed block of each, order rotated
    assert timed == ["a"] * 4 + ["b"] * 16 + ["b"] * 16 + ["a"] * 4


def test_sessions_make_fresh_instances_and_the_interval_spans_their_medians():
    from workbench.measure import fresh

    clock, made = FakeClock(), []
    slow = iter([2 ** -9, 2 ** -9 * 1.25, 2 ** -9 * 1.5])  # each fresh instance of "a" a little slower

    def a():
        made.append("a")
        return clock.model("a", next(slow))

    plan = TimingPlan(sessions=3, min_rounds=2, max_rounds=2, min_seconds=0.0, min_block_s=2 ** -8, warmup_s=0.0)
    lat = time_interleaved({"a": fresh(a), "b": clock.model("b", 2 ** -11)}, plan, clock=clock)
    assert made == ["a"] * 3 and lat["a"].sessions == (0, 0, 1, 1, 2, 2)
    s = Speedup.from_rounds(1, lat["a"].samples_ms, lat["b"].samples_ms, sessions=lat["a"].sessions)
    assert (s.ratio, s.low, s.high) == (5.0, 4.0, 6.0)  # below 6 sessions: the range of the session medians


def test_the_interval_is_the_sign_test_interval_of_the_per_round_ratios():
    baseline = [2.0] * 10
    candidate = [1.0, 1.1, 0.9, 1.0, 1.25, 0.8, 1.0, 1.0, 0.95, 1.05]
    ratios = sorted(b / c for b, c in zip(baseline, candidate))
    s = Speedup.from_rounds(64, baseline, candidate)
    # n = 10: P(Binomial(10, 1/2) <= 1) = 0.0107 <= 0.025 < P(<= 2), so the interval is [x_(2), x_(9)]
    assert s.ratio == pytest.approx((ratios[4] + ratios[5]) / 2)
    assert (s.low, s.high) == (ratios[1], ratios[8])
    assert median_interval([1, 2, 3, 4, 5]) == (3, 1, 5)  # below 6 values: the whole range
    assert median_interval(list(range(1, 21)))[1:] == (6, 15)  # n = 20: [x_(6), x_(15)]
    assert str(s) == f"2.0x ({significant(ratios[1], 2)}-{significant(ratios[8], 2)})"


def test_significant_figures_and_the_shown_speedup():
    assert [significant(v) for v in (4.3456, 0.012345, 1234.5, 0.0, -2.5e7)] == ["4.35", "0.0123", "1230", "0",
                                                                                 "-2.50e+07"]
    assert speedup_text(4.31, 4.08, 4.52) == "4.3x (4.1-4.5)"
    assert speedup_text(4.31, 4.08, 4.52, stable=False) == "4.3x (4.1-4.5) ?"
    assert speedup_text(1.0, 1.0, 1.0) == "1x"


def _measurement(metric, speedups, stable=True, size=1000):
    m = Measurement(metric=metric, metric_name="accuracy", size_bytes=size)
    for b, (ratio, low, high) in speedups.items():
        m.latency[b] = Latency(b, (1.0,) * 10)
        m.speedups[b] = Speedup(b, ratio, low, high, stable, 10)
    if not stable:
        m.stability = Stability(False, ("2 other processes (python3 x2) used 1.9 of 2 cores while timing",))
    return m


def test_one_verdict_rule():
    base = _measurement(0.99, {})
    assert judge(base, _measurement(0.985, {1: (4.3, 4.1, 4.5), 64: (3.0, 2.8, 3.2)}, size=300)).text == (
        "recommended: faster (3.0x (2.8-3.2) at batch 64, the slowest gain) and smaller (0.30x the size)")
    assert judge(base, _measurement(0.99, {1: (1.3, 0.97, 1.5)})).text == "no reliable gain measured"
    assert judge(base, _measurement(0.99, {1: (1.3, 0.97, 1.5)}, size=100)).text.startswith("smaller only")
    assert judge(base, _measurement(0.99, {1: (0.5, 0.4, 0.6)})).slower
    assert judge(base, _measurement(0.95, {1: (4.0, 3.9, 4.1)})).text.startswith("over the metric budget")
    busy = judge(base, _measurement(0.99, {1: (4580.0, 4000.0, 5000.0)}, stable=False))
    assert not busy.faster and busy.text.startswith("timing unstable, no verdict on speed: 2 other processes")


def test_best_is_only_ever_reliably_faster():
    class R:
        def __init__(self, recipe, m):
            self.recipe, self.measurement, self.baseline = recipe, m, _measurement(0.99, {})

    noisy = R("quant=fp16", _measurement(0.99, {1: (1.05, 0.9, 1.3)}))
    good = R("quant=int8", _measurement(0.99, {1: (4.0, 3.5, 4.5)}))
    better = R("prune", _measurement(0.99, {1: (5.0, 3.6, 8.0)}))
    assert best([noisy])[0] is None and best([noisy])[1].startswith("no candidate is reliably faster here")
    assert best([noisy, good, better])[0] is better  # ranked by the lower bound: 3.6 > 3.5


def test_measurements_round_trip_through_a_study_row_with_their_stability(digits_mlp, tmp_path):
    model, data = digits_mlp
    study = wb.Study(tmp_path / "s.sqlite")
    r = wb.optimize(model, "quant=int8", data=data, batch_sizes=(1, 8), study=study)
    again = study.measurement(r.run_id)
    assert again.speedups[8].low == r.measurement.speedups[8].low
    assert again.latency[1].samples_ms == r.measurement.latency[1].samples_ms
    assert again.stability == r.measurement.stability
    row = study.df.loc[r.run_id]
    assert row["stable"] == r.measurement.stable and row["speedup_b8"] == r.measurement.speedups[8].ratio
    assert list(r.speedups.columns) == ["batch", "ratio", "low", "high", "stable"] and list(r.speedups.batch) == [1, 8]
    assert r.verdict == r.judge().text


def test_the_load_watch_sees_other_processes_on_our_cores():
    from workbench.measure import LoadWatch

    hogs = _busy(os.cpu_count() or 2)
    try:
        time.sleep(0.3)
        with LoadWatch(threads=os.cpu_count()) as busy:
            time.sleep(1.0)
    finally:
        for p in hogs:
            p.kill()
    assert not busy.stability.stable and busy.others_cores > 1.0
    assert "other process" in busy.stability.causes[0] and "python" in busy.stability.causes[0]


def test_on_a_gpu_others_load_is_counted_against_the_launching_thread(monkeypatch):
    """On the H100 (16 cores, torch's 16 threads) 0.4 of a core of another process made GPU timing "unstable":
    a GPU's timing keeps one host thread busy, so others may use the rest."""
    from workbench.measure import load

    monkeypatch.setattr(load.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(load, "_smt", lambda: False)
    assert load.LoadWatch(threads=16)._free() == 0 and load.LoadWatch(threads=16, needs=1)._free() == 15


def _busy(n):
    code = "import time\nend = time.time() + 120\nwhile time.time() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


@pytest.mark.slow
def test_busy_cores_make_the_measurement_unstable_and_no_verdict_says_faster(digits_cnn):
    from workbench.notebook.card import Card

    model, data = digits_cnn
    hogs = _busy(os.cpu_count() or 2)
    try:
        time.sleep(0.5)
        # every core for the measurement, as on a quiet machine (a test worker runs one thread: OMP_NUM_THREADS=1)
        r = wb.optimize(model, "quant=int8", data=data, batch_sizes=(1, 64), study=False, threads=os.cpu_count() or 2,
                        timing=TimingPlan(sessions=2, min_rounds=4, min_seconds=0.1))
    finally:
        for p in hogs:
            p.kill()
    assert not r.speedups.stable.any()
    assert not r.measurement.stable and any("other process" in c for c in r.measurement.stability.causes)
    assert "faster" not in r.verdict and "recommended" not in r.verdict
    assert r.verdict.startswith("timing unstable, no verdict on speed")
    assert repr(Card(r)).splitlines()[1] == r.verdict  # the card says why, in one line, first
    assert best([r])[0] is None
