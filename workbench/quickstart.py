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

    def progress(message, fraction=None):
        print(f"  .. {message}", file=sys.stderr, flush=True)

    print(f"loading {args.model} (trained and cached on first use)", file=sys.stderr)
    model, data = wb.zoo.load(args.model, progress=progress)
    results = {}
    for recipe in args.recipes.split(";"):
        print(f"optimizing: {recipe}", file=sys.stderr)
        results[recipe] = wb.optimize(model, recipe, data=data, threads=args.threads, progress=progress)
    import pandas as pd

    first = next(iter(results.values()))
    table = pd.concat([first.table().iloc[[0]]] + [r.table().iloc[[1]] for r in results.values()])
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 30)
    print(f"\n{args.model}: {first.env['cpu']}, {first.metrics['threads']} threads, torch {first.env['torch']}, "
          f"onnxruntime {first.env['onnxruntime']}")
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    for recipe, r in results.items():
        for note in r.notes:
            print(f"- {recipe}: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
