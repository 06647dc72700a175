"""Distillation and factorization, measured side by side in one process with threads fixed.

    python benchmarks/distill_factorize.py [--threads 2] [--epochs 5,8] [--skip-minilm]

1. digits-cnn: a half-width student distilled from the fp32 teacher, against the same student trained on the
   labels alone for the same epochs (same seed, same optimizer, best epoch kept for both).
2. digits-mlp: Factorize(energy=0.9) per layer, metric before and after 2 fine-tune epochs.
3. minilm: Factorize(energy=0.9) per layer, fidelity before and after embedding distillation, latency ratio.
4. The four-technique recipe on digits-cnn: Prune(0.4, structured) -> Distill -> Factorize(0.9) -> Quantize(int8).
"""
from __future__ import annotations

import argparse
import os


import workbench as wb
from workbench.techniques.distill import build_student
from workbench.train import fit

from common import available, header, show


def table(df, title, notes=()):
    show(df, title, notes)


def cnn_student(threads, epochs):
    model, data = wb.zoo.load("digits-cnn")
    distilled = wb.optimize(model, wb.Distill(epochs=epochs, student="width=0.5", patience=None), data=data,
                            threads=threads, batch_sizes=(1,), study=False)
    alone = build_student("width=0.5", model)
    alone, _ = fit(alone, data, epochs=epochs, lr=1e-3, label="labels only", start_from_scratch=True)
    df = wb.compare({"teacher (fp32, full width)": model, "student, distilled": distilled.model,
                     "student, labels only": alone}, data=data, batch_sizes=(1, 64), threads=threads, study=False)
    table(df, f"digits-cnn: half-width student, {epochs} epochs", distilled.notes)


def factorized(name, threads, recover):
    model, data = wb.zoo.load(name)
    before = wb.optimize(model, wb.Factorize(energy=0.9), data=data, threads=threads, batch_sizes=(1,),
                         study=False)
    after = wb.optimize(model, [wb.Factorize(energy=0.9), recover], data=data, threads=threads, batch_sizes=(1,),
                        study=False)
    big = 32 if name == "minilm" else 64
    df = wb.compare({"dense": model, "factorized": before.model, f"factorized + {recover.describe()}": after.model},
                    data=data, batch_sizes=(1, big), threads=threads, study=False)
    details = before.details["factorize"]
    print(f"\n## {name}: Factorize(energy=0.9) per layer\n")
    print(details.to_string(index=False, max_rows=12))
    table(df, f"{name}: factorized, then {recover.describe()}", after.notes)


def four_techniques(threads):
    model, data = wb.zoo.load("digits-cnn")
    recipe = wb.Recipe([wb.Prune(0.4, structured=True, scope="layer"), wb.Distill(epochs=3),
                        wb.Factorize(energy=0.9), wb.Quantize("int8")])
    r = wb.optimize(model, recipe, data=data, threads=threads, batch_sizes=(1, 64), study=False)
    show(r.table(), f"digits-cnn: {recipe}", [r.verdict] + r.notes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--epochs", default="5,8", help="comma-separated epoch budgets for the student comparison")
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args(argv)
    header("distillation and factorization", args.threads)
    for epochs in map(int, args.epochs.split(",")):
        cnn_student(args.threads, epochs)
    factorized("digits-mlp", args.threads, wb.FineTune(2))
    if not args.skip_minilm and available("minilm"):
        factorized("minilm", args.threads, wb.Distill(epochs=2))
    four_techniques(args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
