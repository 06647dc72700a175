"""What every benchmark shares: the machine header (which CPU or GPU produced the numbers), the table printer
(speedups with their 95% interval), pandas display options, and skipping models whose extra is not installed."""
from __future__ import annotations

import pandas as pd

import workbench as wb

pd.set_option("display.width", 250)
pd.set_option("display.max_colwidth", 90)
pd.set_option("display.max_columns", 40)


def header(title: str, threads: int | None, device: str = "cpu") -> None:
    from workbench.registry import backends
    from workbench.target import resolve

    env = resolve(device=device, threads=threads).environment()
    versions = ", ".join(f"{k} {v}" for b in backends() for k, v in b.versions().items())
    gpu = (f", GPU {env['gpu']} (compute {env['gpu_capability']}, CUDA {env['cuda']}, driver {env['gpu_driver']})"
           if env.get("gpu") else ", no GPU")
    print(f"# {title}: {env['cpu']} ({env['cpu_flags']}), {env['threads']} threads{gpu}, torch {env['torch']}, "
          f"{versions}")


def show(table, title: str | None = None, extra=(), columns=None) -> None:
    """A results table for reading (2-3 significant figures, speedup with its 95% interval), then notes."""
    from workbench.tables import display_table

    shown = display_table(table)
    if columns is not None:
        shown = shown[[c for c in shown.columns if c in columns or c == shown.columns[0]]]
    if title:
        print(f"\n## {title}\n")
    print(shown.to_string())
    for line in extra:
        print(f"- {line}")


def available(name: str) -> bool:
    """Whether a built-in loads here; prints the skip line when it does not."""
    if wb.zoo.available(name):
        return True
    print(f"\n## {name}: skipped (pip install 'workbench[text]')")
    return False
