"""The teaching notebooks run top to bottom (quick=True) so they cannot rot; binder/ is checked as far as it
can be here."""
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMES: dict = {}


def test_notebooks_are_built_from_the_source():
    out = subprocess.run([sys.executable, "tools/build_notebooks.py", "--check"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout
    assert [p.stem for p in NOTEBOOKS] == ["00_tour", "01_quantization", "02_pruning", "03_distillation",
                                           "04_factorization", "05_pipeline", "06_your_model",
                                           "07_language_models"]


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(notebook, tmp_path):
    import nbformat
    import papermill

    started = time.time()
    out = tmp_path / notebook.name
    papermill.execute_notebook(str(notebook), str(out), parameters={"quick": True}, cwd=str(tmp_path),
                               kernel_name="python3", progress_bar=False, execution_timeout=600)
    TIMES[notebook.stem] = time.time() - started
    nb = nbformat.read(str(out), as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    print(f"{notebook.stem}: {TIMES[notebook.stem]:.0f} s")


def test_binder_files():
    from packaging.requirements import Requirement

    lines = [ln.strip() for ln in (ROOT / "binder" / "requirements.txt").read_text().splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln and not ln.startswith(("#", "--"))]
    assert any(r.name == "torch" and str(r.specifier) == "==2.13.0" for r in reqs)
    post = ROOT / "binder" / "postBuild"
    assert post.stat().st_mode & stat.S_IXUSR and "set -euo pipefail" in post.read_text()
    assert 'pip install --no-cache-dir -c requirements/constraints.txt -e ".[text]"' in post.read_text()
    assert subprocess.run(["bash", "-n", str(post)]).returncode == 0
    assert os.access(ROOT / "binder" / "start", os.X_OK)
