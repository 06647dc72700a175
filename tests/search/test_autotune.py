"""Autotune: a budgeted, accuracy-constrained search that always ends with a candidate; the pre-flight check."""

import subprocess
import sys

import pytest

import workbench as wb
from workbench.search.autotune import parse_budget


def test_budget_parsing():
    assert parse_budget(90) == 90 and parse_budget("90s") == 90 and parse_budget("2min") == 120
    assert parse_budget("1.5h") == 5400
    for bad in ("soon", "-5s", 0):
        with pytest.raises(wb.WorkbenchError):
            parse_budget(bad)


@pytest.mark.slow
def test_autotune_respects_the_time_budget_and_the_metric_budget(digits_cnn, tmp_path, monkeypatch):
    import types

    from workbench.search import autotune as module

    model, data = digits_cnn
    study = wb.Study()
    seen, clock = [], [1000.0]
    # a fake clock for the budget (no wall-clock assertion): each measured candidate takes 20 "seconds", so with a
    # 60 s budget (3 s kept to wrap up) the second one ends the search: 40 spent + 20 for another > 57
    monkeypatch.setattr(module, "time", types.SimpleNamespace(time=lambda: clock[0]))

    def on_result(r):
        seen.append(r)
        clock[0] += 20

    tuned = wb.autotune(model, data, max_drop=0.01, budget="60s", storage=f"sqlite:///{tmp_path / 'a.sqlite'}",
                        study=study, on_result=on_result, study_name="t")
    assert len(seen) == 2 and tuned.seconds == 40
    assert tuned.within_budget and tuned.best.baseline.metric - tuned.best.measurement.metric <= 0.01
    worst = min(s.low for s in tuned.best.measurement.speedups.values())
    verdict = tuned.best.judge(0.01)
    assert tuned.reliable == verdict.faster  # "reliable": faster by the verdict's rule
    if verdict.stable:  # a quiet machine: exactly when the interval says faster (a busy one: never)
        assert tuned.reliable == (worst > 1)
    assert len(seen) == len(tuned.results) >= 2 and len(study) == len(tuned.results) + 1  # one baseline row
    assert {"recipe", "metric", "within budget"} <= set(tuned.front.columns) and len(tuned.front) >= 1
    names = [t.name for t in tuned.figure.data]
    assert "baseline" in names and "Pareto front" in names
    trials = tuned.optuna_study.trials
    assert all("recipe" in t.user_attrs for t in trials if t.state.name == "COMPLETE")


@pytest.mark.slow
def test_autotune_shares_an_optuna_storage(digits_mlp, tmp_path):
    model, data = digits_mlp
    storage = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    first = wb.autotune(model, data, budget="8s", storage=storage, study_name="shared", study=False, trials=2)
    after_first = len(first.optuna_study.trials)
    second = wb.autotune(model, data, budget="8s", storage=storage, study_name="shared", study=False, trials=2)
    assert len(second.optuna_study.trials) > after_first >= 2  # one search, continued by a second session


@pytest.mark.slow  # in the slow set so that the fast subset stays under 2 minutes
def test_impossible_budget_still_returns_the_best_found(digits_mlp):
    model, data = digits_mlp
    tuned = wb.autotune(model, data, max_drop=0.0, objective="size", budget="10s", study=False, trials=3,
                        storage="sqlite:///:memory:")
    assert tuned.best is not None and len(tuned.results) >= 1


def test_preflight_names_what_will_not_pay(digits_cnn):
    model, data = digits_cnn
    lines = wb.preflight(model, "prune=0.5,quant=int8-dynamic", data)
    assert any(line.startswith("unstructured sparsity") for line in lines)
    assert any("dynamic int8 of convolutions (98% of the MACs)" in line for line in lines)
    assert not wb.preflight(model, "prune=0.5:structured=true", data)
    mlp = wb.zoo.load("digits-mlp")
    assert any(line.startswith("tiny model") for line in wb.preflight(*mlp[:1], "quant=int8", mlp[1]))


def test_every_card_carries_the_preflight(digits_cnn):
    from workbench.notebook.card import Card

    model, data = digits_cnn
    r = wb.optimize(model, "quant=int8-dynamic", data=data, batch_sizes=(1,), study=False)
    assert any("ConvInteger" in line for line in r.preflight)
    assert "pre-flight" in repr(Card(r)) and "pre-flight" in Card(r)._repr_html_()


def test_a_failing_candidate_does_not_end_the_search(digits_mlp, tmp_path, monkeypatch):
    from workbench.engine import Baseline

    model, data = digits_mlp
    real = Baseline.run

    def flaky(self, recipe, **kwargs):  # the first candidate hits a library limit, the rest work
        if not flaky.calls:
            flaky.calls.append(recipe)
            raise ValueError("setting an array element with a sequence")
        return real(self, recipe, **kwargs)

    flaky.calls = []
    monkeypatch.setattr(Baseline, "run", flaky)
    seen = []
    tuned = wb.autotune(model, data, budget="60s", trials=3, study=False, storage=f"sqlite:///{tmp_path}/a.sqlite",
                        progress=lambda m, f: seen.append(m))
    assert len(tuned.failed) == 1 and "ValueError: setting an array element" in tuned.failed[0][2]
    assert tuned.results and tuned.best is not None
    assert any("failed: ValueError" in m for m in seen)


def test_the_search_proposes_no_step_the_data_cannot_feed(digits_mlp):
    """Without a train split, no pruning with a recovery that trains (on the GPU every such trial failed)."""
    optuna = pytest.importorskip("optuna")
    from workbench.facts import ModelFacts
    from workbench.search.autotune import _suggest
    from workbench.target import Target

    model, data = digits_mlp
    params = {"prune": 0.5, "recovery": "finetune", "recovery_epochs": 2, "factorize_energy": 0.9,
              "quant": "int8-dynamic", "per_channel": True, "smooth": "0.5", "keep": "0",
              "backend int8-dynamic": "onnxruntime"}
    with_train = _suggest(optuna.trial.FixedTrial(params), ModelFacts(model, data, Target("cpu")), "auto")[0]
    assert with_train.startswith("prune=0.5:structured=true") and "finetune=2" in with_train
    assert with_train.endswith("quant=int8-dynamic:per_channel=true:smooth=0.5:keep=0")  # calibrated on train
    val_only = wb.Data(val=data.val, metric=data.metric)
    recipe = _suggest(optuna.trial.FixedTrial(params), ModelFacts(model, val_only, Target("cpu")), "auto")[0]
    assert recipe == "factorize:energy=0.9,quant=int8-dynamic:per_channel=true"


CTRL_C_IN_A_JOURNAL_WRITE = """
import os, signal, sys
from pathlib import Path
import optuna
from workbench.search.autotune import _storage

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever the test runner ignores
folder = Path(sys.argv[1])
storage = _storage(optuna, folder / "search.journal")
unlink = os.unlink

def unlink_then_ctrl_c(path, *args, **kwargs):
    unlink(path, *args, **kwargs)
    if str(path).endswith(".rename"):  # the lock's release, done: the worst moment for the old code
        os.kill(os.getpid(), signal.SIGINT)

os.unlink = unlink_then_ctrl_c
try:
    optuna.create_study(storage=storage, study_name="s")
    print("NOT INTERRUPTED")
except KeyboardInterrupt:
    print("INTERRUPTED")
except BaseException as e:
    print("RAISED", type(e).__name__, e)
os.unlink = unlink
print("HANDLER", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
print("FILES", sorted(p.name for p in folder.iterdir()))
print("TRIALS", optuna.load_study(storage=_storage(optuna, folder / "search.journal"), study_name="s").trials)
"""


def test_ctrl_c_inside_a_journal_write_waits_for_the_lock_then_interrupts(tmp_path):
    """optuna's journal lock, interrupted just after it removed its lock file, raised FileNotFoundError instead of
    KeyboardInterrupt (CI caught it): the workbench's journal holds Ctrl-C until the append and the release are done.
    A real SIGINT, sent in a process of its own (not to a test worker, whose other tests may hold handlers)."""
    done = subprocess.run([sys.executable, "-c", CTRL_C_IN_A_JOURNAL_WRITE, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.splitlines() == ["INTERRUPTED", "HANDLER True", "FILES ['search.journal']", "TRIALS []"], \
        done.stdout + done.stderr[-2000:]
