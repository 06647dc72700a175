"""The support matrix (tools/support_matrix.py): every architecture x technique cell on a tiny offline config works,
or is refused before any work with its reason; and the README's table says what the cells do now."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

TOOL = Path(__file__).resolve().parent.parent / "tools" / "support_matrix.py"


def _tool():
    spec = importlib.util.spec_from_file_location("support_matrix", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_cell_works_or_is_refused_and_the_readme_matrix_is_current():
    from workbench import support

    cells = support.matrix(workers=2)
    counts = support.summary(cells)
    failing = [f"{c.architecture} x {c.technique}: {c.reason}" for c in cells if c.status == "fails"]
    assert not failing, "\n".join(failing)
    assert counts["architectures"] >= 14 and counts["share"] >= 0.9
    assert all(c.reason and len(c.reason.splitlines()) == 1 for c in cells if c.status == "refused")
    documented = _tool().readme_cells(TOOL.parent.parent.joinpath("README.md").read_text())
    stale = []
    for c in cells:
        shown = documented.get((c.architecture, c.technique))
        if c.status == "works":
            ok = shown is not None and (shown[0].isdigit() or shown.startswith("-"))
            documented_value = float(shown.split()[0]) if ok else 0.0
            # int8 differs between CPUs: AVX2 without VNNI keeps 7-bit weights, which can double a cell's loss
            ok = ok and abs(documented_value - c.fidelity) <= max(0.05, 1 - documented_value)
        else:
            ok = shown is not None and shown.startswith({"n/a": "–", "refused": "refused"}.get(c.status, "FAILS"))
        if not ok:
            stale.append(f"{c.architecture} x {c.technique}: README says {shown!r}, the cell {c.text()[:80]!r}")
    assert not stale, "README matrix is stale; run python tools/support_matrix.py --write\n" + "\n".join(stale)


def test_one_cell_of_each_kind_quickly():
    """The fast subset's share: a working cell, a refused one with its way out, and a not-applicable one."""
    from workbench import support

    assert support.run_cell("mlp", "int8").status == "works"
    refused = support.run_cell("gru", "prune (structured)")
    assert refused.status == "refused" and "quant=int8-dynamic" in refused.reason
    assert support.run_cell("mlp", "unpad").status == "n/a"
