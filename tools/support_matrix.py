"""The README's support matrix (architecture x technique), generated: every cell run on a tiny offline config.

    python tools/support_matrix.py            # print the table and the summary
    python tools/support_matrix.py --write    # and replace the table in README.md

tests/test_support_matrix.py runs the same cells and checks the README against them, so the table cannot go stale.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"


def block(cells, seconds: float | None = None) -> str:
    from workbench import support
    from workbench.target import resolve

    s = support.summary(cells)
    cpu = resolve(device="cpu").cpu.describe()
    took = f" in {seconds:.0f} s" if seconds else ""
    head = (f"{s['works']} of {s['applicable']} applicable cells work ({s['share']:.0%}), {s['refused']} are refused "
            f"before any work with the reason below, {s['fails']} fail; {s['architectures']} architectures. "
            f"Numbers are fidelity (cosine to the original's outputs, real tokens only) of tiny random-weight "
            f"models, measured by `python tools/support_matrix.py --write` on {cpu}{took}. \"(pickle)\": saved as a "
            f"pickle (data-dependent shapes), which reloads with `trust_pickle=True`. \"floor\": the fidelity of a "
            f"model that returns the same output for every input (the mean of the original's on the other inputs); "
            f"where it is high, the outputs vary little between inputs and a row's numbers say little (the card says "
            f"so too).")
    return f"{START}\n{head}\n\n{support.markdown(cells)}\n{END}"


def readme_cells(text: str) -> dict:
    """{(architecture, technique): 'works 0.998' | 'refused' | 'n/a' | 'FAILS'} from the README's table, and
    {(architecture, 'floor'): '0.650'}."""
    inside = text[text.index(START):text.index(END)]
    rows = [line for line in inside.splitlines() if line.startswith("| ") and not line.startswith("| architecture")]
    header = next(line for line in inside.splitlines() if line.startswith("| architecture"))
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    out = {}
    for line in rows:
        parts = [p.strip() for p in line.strip("|").split("|")]
        name = re.sub(r" \(.*\)$", "", parts[0])
        for column, value in zip(columns, parts[1:]):
            out[(name, column)] = value
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each (default 2)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from workbench import support

    started = time.time()
    cells = support.matrix(progress=lambda message, fraction: print(f"[{fraction:4.0%}] {message}", file=sys.stderr),
                           workers=args.workers)
    text = block(cells, time.time() - started)
    print(text)
    if args.write:
        readme = README.read_text()
        if START not in readme:
            raise SystemExit(f"README.md has no {START} ... {END} block to replace")
        README.write_text(readme[:readme.index(START)] + text + readme[readme.index(END) + len(END):])
    return 0 if not support.summary(cells)["fails"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
