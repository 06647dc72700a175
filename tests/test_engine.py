"""optimize / compare / Study / measure on users' own models and data."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import workbench as wb
from workbench import measure
from workbench.backends.onnxruntime.session import OrtModel

from .helpers import FAST, state_bytes, tiny_task
from .helpers import tiny_model as Tiny


def test_the_users_model_is_never_mutated_not_even_its_train_flag():
    model, data = Tiny().train(), tiny_task()
    before = state_bytes(model)
    for recipe in ("quant=int8", "quant=fp16", "quant=int8-static"):
        wb.optimize(model, recipe, data=data, **FAST)
    assert state_bytes(model) == before
    assert model.training


def test_own_model_with_eval_fn_only():
    model, data = Tiny(), tiny_task()
    calls = []

    def score(m):
        calls.append(m)
        return data.evaluate(m)

    x = next(iter(data.val))[0]
    r = wb.optimize(model, "quant=int8", data=score, example_inputs=x[:1], **FAST)
    assert r.measurement.metric_name == "score" and len(calls) == 2
    assert r.measurement.metric == pytest.approx(r.baseline.metric, abs=0.05)


def test_custom_metric_function():
    model, data = Tiny(), tiny_task()

    def neg_mse(outputs, targets):
        return -float(((outputs.softmax(-1)[:, 1] - targets.float()) ** 2).mean())

    data.metric = neg_mse
    r = wb.optimize(model, "quant=int8", data=data, **FAST)
    assert r.measurement.metric_name == "neg_mse" and r.baseline.metric < 0


def test_measurements_are_real_numbers():
    model = nn.Sequential(nn.Linear(64, 10))
    with torch.no_grad():
        model[0].weight[:5] = 0
    assert measure.count_macs(model, torch.randn(1, 64)) == 640
    assert measure.count_params(model) == (650, 650 - 320)
    assert measure.counts.serialized_size(model) > 650 * 4
    x = torch.randn(8, 64)
    plan = measure.TimingPlan(min_rounds=6, min_seconds=0.0, min_block_s=0.001)
    latency = measure.time_interleaved({"m": lambda: model(x)}, plan)["m"]
    assert 0 < latency.p50_ms <= latency.p95_ms and len(latency.samples_ms) >= 6 and latency.iterations >= 1


def test_result_rows_record_environment_threads_and_batches(digits_mlp):
    model, data = digits_mlp
    r = wb.optimize(model, "quant=int8", data=data, batch_sizes=(1, 16), threads=1, study=False)
    assert r.measurement.threads == 1 and r.env["threads"] == 1
    row = r.measurement.to_row()
    assert {"latency_p50_ms_b1", "latency_p95_ms_b16", "throughput_b16", "peak_mem_bytes", "speedup_low_b16"} <= set(row)
    assert r.measurement.batch_sizes == (1, 16) and set(r.measurement.speedups) == {1, 16}
    assert r.env["torch"] == torch.__version__ and r.env["cpu"]
    assert set(r.table().columns) >= {"accuracy", "p50 ms (b=16)", "speedup (b=16)", "size ×", "MACs"}


def test_threads_are_restored_after_measuring(digits_mlp):
    model, data = digits_mlp
    before = torch.get_num_threads()
    wb.optimize(model, "quant=int8", data=data, threads=1, **FAST)
    assert torch.get_num_threads() == before


def test_study_keeps_runs_with_lineage_across_restarts(digits_mlp, tmp_path):
    model, data = digits_mlp
    path = tmp_path / "s.sqlite"
    study = wb.Study(path)
    r = wb.optimize(model, "quant=int8", data=data, batch_sizes=(1,), study=study)
    study.close()
    reopened = wb.Study(path)  # what a kernel restart sees
    df = reopened.df
    assert list(df["kind"]) == ["baseline", "optimize"]
    assert df.loc[r.run_id, "parent"] == r.baseline_id
    assert df.loc[r.run_id, "recipe"] == "quant=int8"
    assert df.loc[r.run_id, "metric"] == pytest.approx(r.measurement.metric)
    assert reopened.lineage(r.run_id) == [r.baseline_id, r.run_id]


def test_default_study_is_the_env_path(digits_mlp, tmp_path, monkeypatch):
    model, data = digits_mlp
    monkeypatch.setenv("WORKBENCH_STUDY", str(tmp_path / "default.sqlite"))
    wb.optimize(model, "quant=int8", data=data, batch_sizes=(1,))
    assert len(wb.Study(tmp_path / "default.sqlite")) == 2


def test_compare_measures_all_in_one_table(digits_mlp):
    model, data = digits_mlp
    r = wb.optimize(model, "quant=int8", data=data, **FAST)
    ort_fp32 = OrtModel.from_torch(model, data.example_inputs)
    study = wb.Study()
    df = wb.compare({"fp32": model, "ort-fp32": ort_fp32, "int8": r}, data=data, batch_sizes=(1,), study=study)
    assert list(df.index) == ["fp32", "ort-fp32", "int8"]
    assert df.loc["fp32", "speedup (b=1)"] == 1.0 and df.loc["fp32", "size ×"] == 1.0
    assert df.loc["ort-fp32", "accuracy"] == pytest.approx(df.loc["fp32", "accuracy"], abs=1e-6)
    assert df.loc["int8", "size ×"] < 0.35
    assert list(study.df["kind"]) == ["compare"] * 3


def test_progress_reports_and_interrupting_loses_nothing(digits_mlp, tmp_path):
    model, data = digits_mlp
    seen = []
    wb.optimize(model, "quant=int8", data=data, batch_sizes=(1,), study=False,
                progress=lambda msg, frac: seen.append((msg, frac)))
    assert seen[0][0] == "measuring the baseline" and seen[-1] == ("done", 1.0)

    def interrupt(msg, frac):
        if msg.startswith("step 1"):
            raise KeyboardInterrupt

    before, study = state_bytes(model), wb.Study(tmp_path / "s.sqlite")
    with pytest.raises(KeyboardInterrupt):
        wb.optimize(model, "quant=int8", data=data, batch_sizes=(1,), study=study, progress=interrupt)
    assert state_bytes(model) == before and len(study) == 0


@pytest.mark.parametrize("recipe, backend, file", [("quant=int8", "auto", "model.onnx"),
                                                   ("quant=fp16", "auto", "model.pt2"),
                                                   ("quant=int8", "torch", "model.ts")])
def test_saved_results_reload_and_give_the_same_outputs(digits_mlp, tmp_path, recipe, backend, file):
    model, data = digits_mlp
    r = wb.optimize(model, recipe, data=data, backend=backend, **FAST)
    path = r.save(tmp_path / "saved")
    assert (path / file).exists() and (path / "recipe.yaml").exists() and (path / "result.json").exists()
    assert not (path / "model.pt").exists()  # torch.ao int8, which torch.export cannot take, is a TorchScript trace
    again = wb.load(path)
    x = data.inputs(8)
    with torch.inference_mode():
        assert torch.equal(r.model(x), again(x))
    assert wb.Recipe.from_yaml((path / "recipe.yaml").read_text()) == r.recipe


def test_onnxruntime_backend_without_quantization_is_exported_fp32(digits_cnn):
    model, data = digits_cnn
    r = wb.optimize(model, [], data=data, backend="onnxruntime", **FAST)
    assert isinstance(r.model, OrtModel) and r.backend == "onnxruntime-fp32"
    x = data.inputs(4)
    with torch.inference_mode():
        assert torch.allclose(r.model(x), model(x), atol=1e-4)
    assert r.measurement.metric == pytest.approx(r.baseline.metric, abs=1e-6)
    assert r.measurement.macs == r.baseline.macs


def test_export_leaves_the_eager_minilm_unchanged(minilm):
    model, data = minilm
    x = data.inputs(2)
    with torch.inference_mode():
        before = model(**x)
    OrtModel.from_torch(model, data.example_inputs)
    with torch.inference_mode():
        assert torch.equal(model(**x), before)


def test_import_workbench_stays_light():
    code = "import sys, workbench; bad = {'torch', 'onnxruntime', 'pandas'} & set(sys.modules); print(sorted(bad))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
