"""Ctrl-C at random points (a seeded loop of SIGINTs to the process group, as a terminal sends it) during optimize,
autotune, a report and a batch: the user's model, the Study and every written file stay consistent."""
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
ROUNDS = {"optimize": 3, "autotune": 3, "report": 3, "batch": 2}  # a batch round starts a dask cluster: 2

PRELUDE = """
import io, sys, json, torch, workbench as wb
def state(model):
    buf = io.BytesIO(); torch.save(model.state_dict(), buf)
    return buf.getvalue() + repr([(n, m.training) for n, m in model.named_modules()]).encode()
model, data = wb.zoo.load("digits-cnn")
before = state(model)
study = wb.Study(sys.argv[1])
out = sys.argv[2]
print("READY", flush=True)
"""
SCRIPTS = {
    "optimize": PRELUDE + """
try:
    r = wb.optimize(model, "prune=0.5:structured=true:scope=layer,finetune=1,quant=int8", data=data, study=study)
    r.save(out + "/saved")
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
print("INTACT" if state(model) == before else "CHANGED", flush=True)
""",
    "autotune": PRELUDE + """
try:
    wb.autotune(model, data, budget="40s", storage=out + "/search.journal", study_name="s", study=study)
except (KeyboardInterrupt, wb.WorkbenchError) as e:
    print("INTERRUPTED", type(e).__name__, flush=True)
print("INTACT" if state(model) == before else "CHANGED", flush=True)
""",
    "report": PRELUDE + """
try:
    wb.report("pipeline", {"model": "digits-mlp", "recipes": ["quant=int8"], "batch_sizes": [1]},
              output=out + "/r.ipynb", html=out + "/r.html")
except (KeyboardInterrupt, wb.WorkbenchError) as e:
    print("INTERRUPTED", type(e).__name__, flush=True)
print("INTACT" if state(model) == before else "CHANGED", flush=True)
""",
    "batch": PRELUDE + """
spec = {"template": "pipeline", "parameters": {"batch_sizes": [1], "model": "digits-mlp"},
        "runs": [{"recipes": ["quant=int8"]}, {"recipes": ["quant=fp16"]}]}
try:
    wb.reports.batch(spec, workers=1, out=out + "/batch", progress=False)
except (KeyboardInterrupt, wb.WorkbenchError) as e:
    print("INTERRUPTED", type(e).__name__, flush=True)
print("INTACT" if state(model) == before else "CHANGED", flush=True)
""",
}
SPAN = {"optimize": 6.0, "autotune": 12.0, "report": 10.0, "batch": 15.0}  # seconds the work takes, about


def _interrupt(target: str, tmp_path: Path, delay: float) -> str:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPTS[target], str(tmp_path / "study.sqlite"), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "READY"
    time.sleep(delay)
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        pass  # it finished first: then everything must be complete
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the group left behind (kernels, dask workers)
        except ProcessLookupError:
            pass
    assert "INTACT" in out, f"the user's model changed or the process died: {out} {err[-2000:]}"
    return out


def _check_files(tmp_path: Path) -> None:
    import nbformat

    import workbench as wb

    study = tmp_path / "study.sqlite"
    if study.exists():  # readable, whole, and every row a Measurement
        assert sqlite3.connect(study).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        s = wb.Study(study)
        for run_id in s.df.index:
            s.measurement(run_id)
    saved = tmp_path / "saved"
    if saved.exists():
        wb.load(saved)  # complete, and its manifest checks
    assert not list(tmp_path.glob(".*saving-*")) and not list(tmp_path.glob("**/.*.running.ipynb"))
    assert not list(tmp_path.glob(".*.old-*"))
    for notebook in tmp_path.glob("**/*.ipynb"):
        nbformat.read(str(notebook), as_version=4)
    for page in tmp_path.glob("**/*.html"):
        assert page.read_text().rstrip().endswith("</html>")
    for index in tmp_path.glob("**/index.json"):
        json.loads(index.read_text())
    journal = tmp_path / "search.journal"
    if journal.exists():
        import optuna
        from optuna.storages.journal import JournalFileBackend

        optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal))))


@pytest.mark.parametrize("target", list(SCRIPTS))
def test_ctrl_c_at_random_points_leaves_everything_consistent(target, tmp_path):
    rng = random.Random(f"workbench-{target}")
    for i in range(ROUNDS[target]):
        where = tmp_path / f"round-{i}"
        where.mkdir()
        _interrupt(target, where, rng.uniform(0.2, SPAN[target]))
        _check_files(where)
