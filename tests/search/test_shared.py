"""One autotune search shared by several processes: a journal file on one machine, a real PostgreSQL server across
machines (started here on loopback; skipped with the reason where it cannot start). Every process ends with the
best candidate of the whole study, measured on its own machine."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import workbench as wb
import workbench.search.autotune as autotune_module

pytestmark = pytest.mark.slow
# objective="size": which candidate is best does not depend on timing, so a busy machine cannot change the outcome
OTHER_PROCESS = """
import sys, workbench as wb
model, data = wb.zoo.load("digits-cnn")
tuned = wb.autotune(model, data, max_drop=0.01, objective="size", budget="120s", trials=1, storage=sys.argv[1],
                    study_name="shared", study=False)
print("BEST", tuned.best.recipe, tuned.reliable)
"""
BAD = "prune=0.9:structured=true:scope=layer"  # nine tenths of the channels gone: far over any metric budget


def _other_process(storage: str, tmp_path: Path) -> str:
    out = subprocess.run([sys.executable, "-c", OTHER_PROCESS, storage], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("BEST"))
    return line.split()[1]


def _this_process_finds_only_a_bad_candidate(storage, digits_cnn, monkeypatch):
    monkeypatch.setattr(autotune_module, "_suggest", lambda trial, facts, backend: (BAD, None))
    model, data = digits_cnn
    return wb.autotune(model, data, max_drop=0.01, objective="size", budget="120s", trials=1, storage=storage,
                       study_name="shared", study=False)


def _check_best_of_the_whole_study(tuned, theirs: str):
    assert BAD in [str(r.recipe) for r in tuned.results]  # its own (bad) trial ran
    assert str(tuned.best.recipe) == theirs  # and it ends with the other process's best, measured here
    assert tuned.within_budget and tuned.reliable and tuned.headline.startswith("best within")


def test_processes_on_one_machine_share_a_journal_and_each_ends_with_the_best(tmp_path, digits_cnn, monkeypatch):
    journal = str(tmp_path / "search.journal")
    theirs = _other_process(journal, tmp_path)
    _check_best_of_the_whole_study(_this_process_finds_only_a_bad_candidate(journal, digits_cnn, monkeypatch), theirs)


def test_two_processes_at_once_on_one_journal(tmp_path):
    journal = str(tmp_path / "search.journal")
    procs = [subprocess.Popen([sys.executable, "-c", OTHER_PROCESS, journal], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    import optuna

    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="shared", storage=optuna.storages.JournalStorage(JournalFileBackend(journal)))
    assert sum(t.state.name == "COMPLETE" for t in study.trials) >= 2  # both processes' trials, in one study


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of Debian's packages on loopback, for this test only."""
    pytest.importorskip("psycopg2", reason="psycopg2 (the [dev] extra) drives PostgreSQL from SQLAlchemy")
    bindir = next((Path(p).resolve().parent for p in [shutil.which("initdb") or ""] +
                   sorted(map(str, Path("/usr/lib/postgresql").glob("*/bin/initdb")))
                   if p and Path(p).exists()), None)
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (Debian's postgresql package; make test installs it)")
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses to run as root
    datadir = Path(tempfile.mkdtemp(prefix="wb-pg-"))
    if run_as:
        shutil.chown(datadir, "postgres", "postgres")
    port = _free_port()

    def pg(*args, **kw):
        return subprocess.run(run_as + [str(bindir / args[0]), *args[1:]], capture_output=True, text=True,
                              timeout=60, **kw)

    started = False
    try:
        steps = [pg("initdb", "-D", str(datadir), "-A", "trust", "-U", "wb"),
                 pg("pg_ctl", "-D", str(datadir), "-w", "-l", str(datadir / "log"), "-o",
                    f"-p {port} -k {datadir} -c listen_addresses=127.0.0.1", "start")]
        started = steps[-1].returncode == 0
        steps.append(pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "wb", "autotune"))
        failed = next((s for s in steps if s.returncode != 0), None)
        if failed is not None:
            pytest.skip(f"PostgreSQL could not start here: {(failed.stderr or failed.stdout).strip()[-300:]}")
        yield f"postgresql+psycopg2://wb@127.0.0.1:{port}/autotune"
    finally:
        if started:
            pg("pg_ctl", "-D", str(datadir), "-m", "fast", "stop")
        shutil.rmtree(datadir, ignore_errors=True)


def test_machines_share_a_postgresql_study_and_each_ends_with_the_best(postgres_url, tmp_path, digits_cnn,
                                                                       monkeypatch):
    theirs = _other_process(postgres_url, tmp_path)
    time.sleep(0.1)
    _check_best_of_the_whole_study(_this_process_finds_only_a_bad_candidate(postgres_url, digits_cnn, monkeypatch),
                                   theirs)
