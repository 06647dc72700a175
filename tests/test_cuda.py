"""GPU paths (marker `cuda`): they run where torch sees a CUDA device and skip with the reason elsewhere.

What a CPU can check about devices is tested on the CPU (tests/test_target.py, tests/test_gpu_paths.py); these need
the GPU itself: every technique on it, int8 there (torchao, or the stated fp16 fallback), compile with CUDA graphs,
autotune, saves that go GPU -> CPU -> GPU, the panel and a report.
"""
import importlib.util

import pytest
import torch

import workbench as wb
from workbench.measure import TimingPlan

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")]

QUICK = TimingPlan(sessions=2, min_rounds=3)
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


def gpu_run(model, data, recipe, **options):
    options = {"device": "cuda", "batch_sizes": (1, 64), "study": False, "timing": QUICK, **options}
    return wb.optimize(model, recipe, data=data, **options)


def test_half_precision_on_the_gpu_is_timed_synchronized(digits_cnn):
    model, data = digits_cnn
    r = gpu_run(model, data, "quant=fp16")
    assert r.device == "cuda" and r.backend == "torch-fp16"
    assert abs(r.baseline.metric - r.measurement.metric) < 0.01
    assert set(r.measurement.speedups) == {1, 64} and r.env["gpu"] and r.env["cuda"]
    assert r.env["gpu_driver"] and r.env["gpu_capability"]


@pytest.mark.parametrize("recipe", [
    "quant=bf16",
    "prune=0.5",
    "prune=0.5:structured=true:scope=layer,finetune=1",
    "factorize:energy=0.9,finetune=1",
    "distill=1:student=width=0.5",
])
def test_every_technique_runs_on_the_gpu(digits_cnn, recipe):
    model, data = digits_cnn
    r = gpu_run(model, data, recipe, batch_sizes=(64,))
    assert r.device == "cuda" and r.measurement.metric > 0.5 and 64 in r.measurement.speedups
    assert next(model.parameters()).device.type == "cpu"  # the user's model stays where it was


def test_int8_on_the_gpu_runs_there_or_says_why_not(digits_mlp):
    model, data = digits_mlp
    r = gpu_run(model, data, "quant=int8")
    assert r.device == "cuda"
    if HAS_TORCHAO:
        assert r.backend == "torchao-int8-dynamic" and abs(r.baseline.metric - r.measurement.metric) < 0.02
    else:
        assert r.backend == "torch-fp16" and any("needs torchao" in n for n in r.notes)


def test_device_auto_with_int8_runs_on_a_gpu_int8_path_or_on_the_cpu(digits_cnn):
    model, data = digits_cnn
    r = wb.optimize(model, "quant=int8", data=data, batch_sizes=(1,), study=False, timing=QUICK)
    if HAS_TORCHAO:
        assert r.device == "cuda" and r.backend == "torchao-int8-dynamic"
    else:
        assert r.device == "cpu" and r.backend.startswith("onnxruntime-int8")


def test_fp8_runs_where_the_gpu_has_it_else_fp16_with_the_reason(digits_mlp):
    model, data = digits_mlp
    r = gpu_run(model, data, "quant=fp8", batch_sizes=(64,))
    fp8 = HAS_TORCHAO and torch.cuda.get_device_capability() >= (8, 9)
    assert r.backend == ("torchao-fp8" if fp8 else "torch-fp16")
    assert abs(r.baseline.metric - r.measurement.metric) < 0.03


def test_compile_with_cuda_graphs_returns_outputs_a_caller_can_keep(digits_mlp):
    model, data = digits_mlp
    r = gpu_run(model, data, "quant=fp16,compile", batch_sizes=(1, 64))
    assert r.backend == "torch-fp16+compile" and any("CUDA graphs" in n for n in r.notes)
    assert abs(r.baseline.metric - r.measurement.metric) < 0.01
    x, y = data.inputs(8), data.inputs(8) + 1
    first = r.model(x.cuda())
    second = r.model(y.cuda())  # a replay of the same graph: the first output must not change under it
    assert not torch.equal(first, second) and torch.allclose(first, r.model(x.cuda()), atol=1e-3)


def test_unpad_with_compile_runs_small_batches_dense_and_large_ones_packed_and_keeps_the_outputs():
    """Under CUDA graphs small batches run dense and larger ones packed, with rounded token counts (what that
    bounds, one compiled shape per rounded size, is checked on the CPU: tests/test_unpad.py)."""
    pytest.importorskip("transformers")
    from workbench.techniques.packed_bert import DENSE_BELOW, PackedBert

    from .test_unpad import encoder_and_data, padded

    model, data = encoder_and_data()
    # batch 8 only, as the data's batches: each further batch size would compile each graph again (~20 s a shape)
    r = gpu_run(model, data, "unpad,quant=fp16,compile", batch_sizes=(8,))
    assert r.backend == "torch-fp16+compile" and any("rounds its token count" in n for n in r.notes)
    packed = [m for m in r.model.modules() if isinstance(m, PackedBert)]
    assert [(m.rounded, m.dense_below) for m in packed] == [(True, DENSE_BELOW)]
    assert r.measurement.metric >= 0.999
    # 41 and 45 real tokens (both rounded to 48), 63 (64) and 8 (8)
    batches = [padded(lengths) for lengths in ([12, 9, 6, 6, 3, 2, 2, 1], [12, 11, 6, 4, 5, 3, 2, 2],
                                               [12] * 5 + [1] * 3, [1] * 8)]
    for dense_below in (DENSE_BELOW, 0):  # these 8 x 12 batches run dense; then packed
        packed[0].dense_below = dense_below
        for inputs in batches:
            with torch.inference_mode():
                got, want = r.model(**inputs), model(**inputs)
            assert got.device.type == "cpu"
            assert torch.nn.functional.cosine_similarity(got.float(), want).min() > 0.999


def test_results_and_eval_fns_take_inputs_on_either_device(digits_mlp):
    model, data = digits_mlp
    seen = []

    def score(m):  # a user's eval_fn written for a CPU model
        seen.append(m(data.inputs(4)).device.type)
        return 1.0

    r = wb.optimize(model, "quant=fp16", data=score, example_inputs=data.inputs(1), device="cuda",
                    batch_sizes=(1,), study=False, timing=QUICK)
    assert set(seen) == {"cpu"}
    x = data.inputs(4)
    assert r.model(x).device.type == "cpu" and r.model(x.cuda()).device.type == "cuda"


def test_profile_synchronizes_so_layer_times_add_up_to_the_forward(digits_cnn):
    from workbench.measure import profile_layers
    from workbench.target import Target

    model, data = digits_cnn
    df = profile_layers(model.cuda(), data.inputs(64), Target("cuda"), repeats=5)
    model.cpu()
    assert 0.5 < df["time_share"].sum() < 1.5  # launch-only times would sum to a small fraction


def test_a_model_saved_on_the_gpu_reloads_on_the_cpu_and_back(digits_mlp, tmp_path):
    model, data = digits_mlp
    r = gpu_run(model, data, "quant=fp16,compile:mode=default", batch_sizes=(1,))
    path = r.save(tmp_path / "gpu")
    assert (path / "model.pt2").exists()  # exported on the CPU, never a pickle; the compiled form is not saved
    x = data.inputs(4)
    expected = r.model(x).float()
    on_cpu = wb.load(path, device="cpu")
    on_gpu = wb.load(path, device="cuda")
    with torch.inference_mode():
        assert torch.allclose(on_cpu(x).float(), expected, atol=1e-2)
        assert torch.allclose(on_gpu(x.cuda()).float().cpu(), expected, atol=1e-2)
        assert on_gpu(x).device.type == "cpu"  # a reloaded GPU model takes CPU inputs too


def test_factorize_by_energy_on_the_gpu(digits_mlp):
    model, data = digits_mlp
    r = gpu_run(model, data, "factorize:energy=0.95", batch_sizes=(64,))
    assert r.device == "cuda" and r.details.get("factorize") is not None


def test_two_four_sparsity_runs_on_sparse_tensor_cores_and_saves_dense(tmp_path):
    from torch import nn

    from workbench.techniques.prune import is_two_four

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 16))
    x = torch.randn(256, 1024)
    data = wb.Data(val=[(x, None)], metric="fidelity")
    r = gpu_run(model, data, "prune:semi_structured=true,quant=fp16", batch_sizes=(256,))
    # the card says why where the sparse kernels were not used
    assert r.backend == "torch-fp16+2:4", r.notes
    assert any("2 Linear layers run on sparse tensor cores" in n for n in r.notes), r.notes
    path = r.save(tmp_path / "sparse")
    on_cpu = wb.load(path, device="cpu")  # saved dense, with its zeros
    square = [t for t in on_cpu.state_dict().values() if tuple(t.shape) == (1024, 1024)]
    assert len(square) == 2 and all(is_two_four(t) for t in square)
    with torch.inference_mode():
        got, expected = on_cpu(x[:8]).float(), r.model(x[:8]).float()
    assert torch.nn.functional.cosine_similarity(got, expected).min() > 0.999


@pytest.mark.slow
def test_autotune_on_the_gpu_ends_with_a_candidate(digits_mlp, tmp_path):
    pytest.importorskip("optuna")
    model, data = digits_mlp
    tuned = wb.autotune(model, data, max_drop=0.02, budget="90s", device="cuda", trials=3, timing=QUICK,
                        storage=str(tmp_path / "a.journal"), study=False)
    assert tuned.results and tuned.best.device == "cuda" and not tuned.failed


@pytest.mark.slow
def test_the_panel_runs_on_the_gpu(digits_mlp):
    pytest.importorskip("ipywidgets")
    model, data = digits_mlp
    p = wb.panel(model, data, study=wb.Study())
    p.device.value = "cuda"
    p.enabled["quant"].value, p.main["quant"].value = True, "fp16"
    p.run(wait=True)
    assert p.points == 1 and p.progress.description == "done" and "--device cuda" in p.magic_line()


@pytest.mark.slow
def test_a_gpu_report_names_the_gpu(tmp_path):
    pytest.importorskip("papermill")
    wb.report("quickstart", {"model": "digits-mlp", "batch_sizes": [1], "device": "cuda",
                             "recipes": ["quant=fp16", "quant=int8"]},
              output=tmp_path / "r.ipynb", html=tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert torch.cuda.get_device_name(0) in page and "gpu_driver" in page


def test_a_decoder_on_the_gpu_decodes_there_and_its_card_says_generation_is_timed_on_the_cpu():
    pytest.importorskip("transformers")
    import copy

    from workbench import decoding

    model, data = wb.zoo.load("docs-lm-tiny")
    ids = decoding.prompts(data, 2, 16)
    tokens, _, _ = decoding.greedy(copy.deepcopy(model).cuda(), ids, 8)  # prompts move to the model's device
    assert tokens.shape == (2, 8) and tokens.device.type == "cpu"
    r = gpu_run(model, data, "quant=fp16", batch_sizes=(1,))
    assert r.measurement.perplexity is not None
    assert "generation is timed on the CPU here" in r.measurement.generation.lines()[0]
