"""What build_templates.py and build_notebooks.py share: turn cell lists into .ipynb text, write or check them."""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_notebook

KERNELSPEC = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}


def build(specs: dict) -> dict:
    """{name: cells} -> {name: notebook text}, with stable cell ids so rebuilding gives identical files."""
    out = {}
    for name, cells in specs.items():
        nb = new_notebook(cells=cells, metadata=KERNELSPEC)
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"{name}-{i}"
        out[name] = nbformat.writes(nb) + "\n"
    return out


def main(argv, specs: dict, out_dir: Path, script: str) -> int:
    """Write the notebooks, or with --check exit 1 when a committed one differs from what `specs` builds."""
    built = build(specs)
    if "--check" in argv:
        stale = [n for n, text in built.items()
                 if not (out_dir / f"{n}.ipynb").exists() or (out_dir / f"{n}.ipynb").read_text() != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run python {script}")
            return 1
        return 0
    out_dir.mkdir(exist_ok=True)
    for name, text in built.items():
        (out_dir / f"{name}.ipynb").write_text(text)
    print(f"wrote {len(built)} notebooks to {out_dir}")
    return 0
