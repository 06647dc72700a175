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


def _readme() -> str:
    return TOOL.parent.parent.joinpath("README.md").read_text()


def _documented() -> dict:
    return _tool().readme_cells(_readme())


def _architectures() -> list[str]:
    from workbench.support import ARCHITECTURES

    return list(ARCHITECTURES)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", _architectures())
def test_every_cell_of_a_row_works_or_is_refused_and_the_readme_row_is_current(architecture):
    """One architecture's row (the rows are separate tests, so parallel workers share them out)."""
    from workbench import support

    cells = support.matrix([architecture])
    failing = [f"{c.architecture} x {c.technique}: {c.reason}" for c in cells if c.status == "fails"]
    assert not failing, "\n".join(failing)
    assert all(c.reason and len(c.reason.splitlines()) == 1 for c in cells if c.status == "refused")
    documented = _documented()
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
    floor, shown = cells[0].floor, documented.get((architecture, "floor"))
    if shown is None or (floor is None) != (shown == "–") or (floor is not None and abs(float(shown) - floor) > 0.05):
        stale.append(f"{architecture} floor: README says {shown!r}, the row's is {floor}")
    assert not stale, "README matrix is stale; run python tools/support_matrix.py --write\n" + "\n".join(stale)


def test_the_readme_matrix_has_every_row_and_column_and_most_cells_work():
    """What the row tests check, cell by cell, adds up to the README's summary: every architecture and technique
    has its row and column, at least 14 architectures, and at least 90% of the applicable cells work."""
    from workbench import support

    tool, text = _tool(), _readme()
    documented = {cell: v for cell, v in tool.readme_cells(text).items() if cell[1] != "floor"}
    assert {a for a, _ in documented} == set(_architectures()) and len(_architectures()) >= 14
    assert {t for _, t in documented} == set(support.TECHNIQUES)
    applicable = [v for v in documented.values() if not v.startswith("–")]
    works = [v for v in applicable if v[0].isdigit() or v.startswith("-")]
    assert len(works) >= 0.9 * len(applicable) and not any(v.startswith("FAILS") for v in applicable)
    block = text[text.index(tool.START):text.index(tool.END)]
    head = next(line for line in block.splitlines() if "applicable cells work" in line)
    assert head.startswith(f"{len(works)} of {len(applicable)} applicable cells work")


def test_one_cell_of_each_kind_quickly():
    """The fast subset's share: a working cell, a refused one with its way out, and a not-applicable one."""
    from workbench import support

    assert support.run_cell("mlp", "int8").status == "works"
    refused = support.run_cell("gru", "prune (structured)")
    assert refused.status == "refused" and "quant=int8-dynamic" in refused.reason
    assert support.run_cell("mlp", "unpad").status == "n/a"


def test_a_row_runs_each_recipe_once_and_the_export_column_checks_int8s_result(monkeypatch):
    """The export column runs `quant=int8` as the int8 column does: a row runs it once and checks both ways."""
    from workbench import engine, support

    ran = []
    run = engine.Baseline.run
    monkeypatch.setattr(engine.Baseline, "run", lambda self, recipe, *a, **k: ran.append(recipe) or
                        run(self, recipe, *a, **k))
    cells = support._row("mlp", ["int8", "export", "fp16"])
    assert [c.status for c in cells] == ["works"] * 3
    assert ran == ["quant=int8", "quant=fp16"]
    assert cells[0].fidelity == cells[1].fidelity


def test_a_refused_recipe_is_tried_once_per_row_and_each_of_its_cells_says_why(monkeypatch):
    from workbench import engine, support
    from workbench.errors import RecipeError

    ran = []

    def refuse(self, recipe, *a, **k):
        ran.append(recipe)
        raise RecipeError(f"{recipe}: not here")

    monkeypatch.setattr(engine.Baseline, "run", refuse)
    cells = support._row("mlp", ["int8", "export"])
    assert ran == ["quant=int8"]
    assert [(c.status, c.reason) for c in cells] == [("refused", "quant=int8: not here")] * 2
