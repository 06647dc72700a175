"""The target, resolved once: devices, backends, threads and the CPU probe, whose two int8 paths (VNNI, AVX2 only)
are forced here so that both branches run on any machine."""
import pytest

import workbench as wb
from workbench.errors import DeviceError
from workbench.target import FORCED, Target, cpu_info, resolve

from .helpers import FAST


@pytest.fixture(params=["vnni", "avx2"])
def forced_cpu(request, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CPU", request.param)
    return request.param


def test_the_cpu_probe_can_be_forced(forced_cpu):
    cpu = cpu_info()
    assert cpu.forced == forced_cpu and cpu.flags == FORCED[forced_cpu]
    assert cpu.vnni == (forced_cpu == "vnni")
    assert f"(forced: {forced_cpu})" in cpu.describe()


def test_an_unknown_forced_cpu_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("WORKBENCH_CPU", "avx9000")
    with pytest.raises(DeviceError, match="WORKBENCH_CPU='avx9000' is not known; use one of vnni, avx2"):
        cpu_info()


def test_int8_weights_use_7_bits_only_without_vnni(forced_cpu, digits_mlp):
    model, data = digits_mlp
    r = wb.optimize(model, "quant=int8", data=data, **FAST)
    seven_bits = any("7 bits (reduce_range)" in n for n in r.notes)
    assert seven_bits == (forced_cpu == "avx2")
    without_vnni = any(line.startswith("int8 on a CPU without VNNI") for line in r.preflight)
    assert without_vnni == (forced_cpu == "avx2")
    assert r.env["cpu_forced"] == forced_cpu
    assert r.measurement.metric >= r.baseline.metric - 0.01  # both paths keep the accuracy


def test_half_precision_notes_follow_the_cpus_units(forced_cpu, digits_mlp):
    model, data = digits_mlp
    r = wb.optimize(model, "quant=bf16", data=data, **FAST)
    assert any("no native bf16" in n for n in r.notes)  # neither forced probe has AVX-512 BF16 or AMX


def test_resolve_checks_once_and_picks_a_device_that_runs_the_recipe():
    target = resolve("auto", "cpu", threads=2)
    assert target == Target("cpu", "auto", 2) and not target.is_cuda
    with pytest.raises(DeviceError, match="device 'tpu' is not known"):
        resolve(device="tpu")
    with pytest.raises(DeviceError, match="backend 'tensorrt' is not known"):
        resolve("tensorrt")
    with pytest.raises(DeviceError, match="threads=0: give a positive number"):
        resolve(threads=0)


def test_device_auto_never_picks_a_device_where_the_recipe_cannot_run(monkeypatch):
    import torch

    from workbench.backends.torch_eager import lowering

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a GPU, as far as resolve knows
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(lowering, "torchao_available", lambda: False)
    assert resolve(device="auto", precisions=[("fp16",)]).device == "cuda"
    assert resolve(device="auto", precisions=[("int8-dynamic", "int8-static")]).device == "cpu"  # no GPU int8 here
    assert resolve(device="auto").device == "cuda"
    monkeypatch.setattr(lowering, "torchao_available", lambda: True)  # with torchao, int8 runs on the GPU
    assert resolve(device="auto", precisions=[("int8-dynamic", "int8-static")]).device == "cuda"
    # a backend asked for by name, or a model compare is given, that has no CUDA here: the CPU (on the H100 these
    # raised "backend 'onnxruntime' cannot run on 'cuda' here" and "ONNX Runtime here has no CUDAExecutionProvider")
    _onnxruntime_on_the_cpu_only(monkeypatch)
    assert resolve(backend="onnxruntime", device="auto").device == "cpu"
    with pytest.raises(DeviceError, match="backend 'onnxruntime' cannot run on 'cuda' here"):
        resolve(backend="onnxruntime", device="cuda")
    from workbench.registry import backend_named

    assert resolve(device="auto", backends=(backend_named("torch"), backend_named("onnxruntime"))).device == "cpu"


def _onnxruntime_on_the_cpu_only(monkeypatch):
    """ONNX Runtime's CPU build, as here, whether or not this machine has onnxruntime-gpu."""
    from workbench.registry import backend_named

    monkeypatch.setattr(type(backend_named("onnxruntime")), "available", lambda self, target: not target.is_cuda)


def test_compare_on_a_machine_with_a_gpu_runs_an_onnx_graph_on_the_cpu(monkeypatch, digits_mlp):
    import torch

    from workbench.backends.onnxruntime.session import OrtModel

    _onnxruntime_on_the_cpu_only(monkeypatch)
    model, data = digits_mlp
    graph = OrtModel.from_torch(model, data.example_inputs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve would pick the GPU for torch alone
    df = wb.compare({"fp32": model, "ort": graph}, data=data, batch_sizes=(1,), study=False)
    assert list(df["backend"]) == ["torch", "onnxruntime-fp32"] and df.loc["ort", "Δ accuracy"] == 0


def test_the_result_records_the_target_it_ran_on(digits_mlp):
    r = wb.optimize(digits_mlp[0], "quant=fp16", data=digits_mlp[1], device="cpu", **FAST)
    assert r.target.device == "cpu" and r.device == "cpu" and r.env["device"] == "cpu"


def test_a_torch_device_is_welcome_and_odd_devices_are_one_line():
    import torch

    assert resolve(device=torch.device("cpu")).device == "cpu"
    with pytest.raises(DeviceError, match="device 3 is not known"):
        resolve(device=3)
