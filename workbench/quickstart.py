"""The quickstart: a built-in model, its fp32 baseline and each quantization mode, measured side by side.

    python -m workbench.quickstart [--model digits-cnn] [--threads N]

Prints the comparison table (metric, latency p50/p95, speedup, size, MACs) and what the engine decided.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    import workbench as wb

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits-cnn", help=f"built-in model ({', '.join(wb.zoo.list())})")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for every timing")
    parser.add_argument("--recipes", default="quant=int8;quant=int8-dynamic;quant=fp16",
                        help="';'-separated recipes to try")
    args = parser.parse_args(argv)

    from .progress import Lines

    progress = Lines()

    print(f"loading {args.model} (trained and cached on first use)", file=sys.stderr)
    model, data = wb.zoo.load(args.model, progress=progress)
    results = wb.run_many(model, args.recipes.split(";"), data=data, threads=args.threads, progress=progress)
    import pandas as pd

    from .tables import table

    first = results[0]
    from .registry import backends

    versions = ", ".join(f"{k} {v}" for b in backends() for k, v in b.versions().items())
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(f"\n{args.model}: {first.env['cpu']}, {first.measurement.threads} threads, torch {first.env['torch']}, "
              f"{versions}")
        print(table(results).to_string())
    for r in results:
        print(f"- {r.recipe}: {r.verdict}")
        for note in r.notes:
            print(f"  - {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
