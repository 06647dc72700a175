"""Are the intervals honest? The same comparison run several times on a quiet machine: each run's 95% interval
should contain the median ratio of all runs.

    python benchmarks/stability.py [--runs 5] [--models digits-cnn,minilm] [--threads 2]

For each model and batch size it prints every run's speedup with its interval, the median of the runs' ratios,
and whether each interval contains it. Runs are separate `wb.optimize` calls (a fresh baseline and candidate each
time, as a user re-running a cell gets), in one process.
"""
from __future__ import annotations

import argparse
import os
import statistics

import workbench as wb
from common import available, header

RECIPES = {"digits-cnn": "quant=int8", "minilm": "quant=int8", "digits-mlp": "quant=int8"}
BATCHES = {"digits-cnn": (1, 64), "minilm": (1, 32), "digits-mlp": (1, 64)}


def run(name: str, runs: int, threads: int | None, timing=None) -> bool:
    model, data = wb.zoo.load(name)
    results = [wb.optimize(model, RECIPES[name], data=data, batch_sizes=BATCHES[name], threads=threads,
                           study=False, timing=timing) for _ in range(runs)]
    print(f"\n## {name}: {RECIPES[name]}, {runs} runs\n")
    ok = True
    for b in BATCHES[name]:
        speedups = [r.measurement.speedups[b] for r in results]
        median = statistics.median(s.ratio for s in speedups)
        inside = [s.low <= median <= s.high for s in speedups]
        ok &= all(inside)
        print(f"batch {b}: median of the runs' ratios {median:.3g}")
        for i, (s, hit) in enumerate(zip(speedups, inside), 1):
            print(f"  run {i}: {s}  rounds {s.rounds}  {'stable' if s.stable else 'UNSTABLE'}  "
                  f"{'contains the median' if hit else 'MISSES the median'}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--models", default="digits-cnn,minilm")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seconds", type=float, help="timing window per batch size (default: the engine's)")
    args = parser.parse_args(argv)
    from workbench.measure import TimingPlan

    timing = TimingPlan(min_seconds=args.seconds, max_rounds=400) if args.seconds else None
    header("stability of the speedup intervals", args.threads)
    ok = True
    for name in args.models.split(","):
        if available(name):
            ok &= run(name, args.runs, args.threads, timing)
    print("\nevery interval contains the median of the runs" if ok else "\nsome interval misses the median")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
