"""GPU paths (marker `cuda`): they run where torch sees a CUDA device and skip with the reason elsewhere.

What a CPU can check about devices is tested on the CPU (tests/test_target.py); these need the GPU itself.
"""
import pytest
import torch

import workbench as wb
from workbench.measure import TimingPlan

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")]


def test_half_precision_on_the_gpu_is_timed_synchronized(digits_cnn):
    model, data = digits_cnn
    r = wb.optimize(model, "quant=fp16", data=data, device="cuda", batch_sizes=(1, 64), study=False,
                    timing=TimingPlan(sessions=3, min_rounds=3))
    assert r.device == "cuda" and r.backend == "torch-fp16"
    assert abs(r.baseline.metric - r.measurement.metric) < 0.01
    assert set(r.measurement.speedups) == {1, 64} and r.env["gpu"]


def test_device_auto_with_int8_runs_on_the_cpu_instead_of_failing(digits_cnn):
    model, data = digits_cnn
    r = wb.optimize(model, "quant=int8", data=data, batch_sizes=(1,), study=False)
    assert r.device == "cpu" and r.backend.startswith("onnxruntime-int8")


def test_profile_synchronizes_so_layer_times_add_up_to_the_forward(digits_cnn):
    from workbench.measure import profile_layers
    from workbench.target import Target

    model, data = digits_cnn
    gpu = Target("cuda")
    df = profile_layers(model.cuda(), data.inputs(64), gpu, repeats=5)
    model.cpu()
    assert 0.5 < df["time_share"].sum() < 1.5  # launch-only times would sum to a small fraction


def test_a_model_saved_on_the_gpu_reloads_on_the_cpu(digits_mlp, tmp_path):
    model, data = digits_mlp
    r = wb.optimize(model, "quant=fp16", data=data, device="cuda", batch_sizes=(1,), study=False)
    path = r.save(tmp_path / "gpu")
    assert (path / "model.pt2").exists()  # exported on the CPU, never a pickle
    again = wb.load(path, device="cpu")
    x = data.inputs(4)
    with torch.inference_mode():
        assert torch.allclose(again(x).float(), r.model(x.cuda()).float().cpu(), atol=1e-2)
