"""Sweeps: a grid of recipes against one shared baseline, keys derived from the registered techniques."""
import pytest

import workbench as wb
from workbench.errors import RecipeError
from workbench.search.sweep import grid_recipes


@pytest.mark.slow
def test_sweep_of_six_recipes_shows_the_front_with_the_baseline(digits_cnn):
    model, data = digits_cnn
    study = wb.Study()
    seen = []
    swept = wb.sweep(model, data, grid={"prune": [None, 0.25, 0.5, 0.75], "structured": True, "quant": [None, "int8"]},
                   study=study, batch_sizes=(1,), on_result=seen.append)
    assert len(seen) == 7 and len(study) == 8  # one shared baseline row + 7 runs
    assert all(r.baseline_id == seen[0].baseline_id for r in seen)
    fig = swept.figure
    names = [t.name for t in fig.data]
    assert "baseline" in names and "Pareto front" in names
    points = sum(len(t.x) for t in fig.data if t.name not in ("baseline", "Pareto front"))
    assert points == 7
    front = fig.data[names.index("Pareto front")]
    points = [(x, y) for t in fig.data if t.name != "Pareto front" for x, y in zip(t.x, t.y)]
    assert len(front.x) >= 1  # how many points it has depends on the timings; that none is dominated does not
    for fx, fy in zip(front.x, front.y):
        assert not any(x <= fx and y >= fy and (x < fx or y > fy) for x, y in points)


def test_grid_keys_are_the_techniques_flags():
    recipes = grid_recipes({"prune": [None, 0.5], "structured": True, "quant": ["int8"], "epochs": None})
    assert [str(r) for r in recipes] == ["quant=int8", "prune=0.5:structured=true,quant=int8"]
    with pytest.raises(RecipeError, match=r"sweep: unknown grid key\(s\) bake; use prune, factorize"):
        grid_recipes({"bake": [1]})
