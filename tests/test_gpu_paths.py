"""What a CPU can check of the GPU paths (issue 17): the search space and int8's plan per device, the wrappers a GPU
result comes in (compiled forward, inputs on either device), torchao's lowering, compile end to end on the CPU.
The GPU itself is exercised by tests/test_cuda.py (marker `cuda`)."""
import copy
import pickle
import types

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.backends.torch_eager import lowering
from workbench.facts import ModelFacts
from workbench.recipe import Recipe
from workbench.target import Target

from .helpers import FAST


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch believes it has an Ampere GPU (no fp8); torchao's presence is the test's to set."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))

    def torchao(present: bool):
        monkeypatch.setattr(lowering, "torchao_available", lambda: present)

    return torchao


def facts_on(target, model, data):
    return ModelFacts(model, data, target)


def test_the_search_space_follows_the_device(fake_gpu, digits_cnn):
    from workbench.search.autotune import _seeds
    from workbench.techniques.quantize import _options

    model, data = digits_cnn
    cpu, gpu = facts_on(Target("cpu"), model, data), facts_on(Target("cuda"), model, data)
    gpu.__dict__["macs_by_op"] = cpu.macs_by_op  # counted on the CPU: the fake GPU cannot run the model
    fake_gpu(False)
    assert _options(gpu) == ["fp16", "bf16", "none"]  # no int8 on this GPU without torchao: never asked for
    assert "int8-static" in _options(cpu) and "compile" not in str(_seeds(cpu))
    first, second = _seeds(gpu)
    assert first["quant"] == "fp16" and first["compile"] is True  # what usually wins on a GPU, tried first
    assert second["compile"] is False
    fake_gpu(True)
    assert _options(gpu) == ["int8-dynamic", "fp16", "bf16", "none"]


@pytest.mark.parametrize("torchao", [False, True])
def test_int8_on_a_gpu_is_torchao_or_fp16_with_the_reason_never_an_error(fake_gpu, torchao, digits_cnn):
    from workbench.facts import ModelFacts
    from workbench.techniques.quantize import plan

    fake_gpu(torchao)
    model, data = digits_cnn
    gpu = Target("cuda")
    ctx = types.SimpleNamespace(target=gpu, data=data, recipe=None)
    facts = ModelFacts(model, data, gpu)
    for recipe in ("quant=int8", "quant=int8-static", "quant=int8-dynamic"):
        precision, why = plan(Recipe.parse(recipe).steps[0], facts, ctx)
        assert precision == ("int8-dynamic" if torchao else "fp16")
        assert torchao or "needs torchao" in why[-1]
        assert not torchao or "put compile after it (quant=int8,compile)" in why[-1]
    if torchao:  # a recipe that compiles is not told to
        ctx.recipe = Recipe.parse("quant=int8,compile")
        precision, why = plan(ctx.recipe.steps[0], facts, ctx)
        assert precision == "int8-dynamic" and not any("compile" in line for line in why)
    precision, why = plan(Recipe.parse("quant=fp8").steps[0], facts, ctx)  # an Ampere GPU: no fp8 units
    assert precision == "fp16" and "compute capability 8.9" in why[-1]


def test_fp8_on_a_cpu_is_one_clear_line(digits_mlp):
    model, data = digits_mlp
    with pytest.raises(wb.WorkbenchError, match="fp8 runs on GPUs only; use quant=int8 on a CPU"):
        wb.optimize(model, "quant=fp8", data=data, device="cpu", **FAST)


def test_a_compiled_model_copies_and_pickles_without_its_compiled_function():
    from workbench.wrappers import Compiled, saved_form

    inner = nn.Sequential(nn.Linear(4, 3))
    wrapped = Compiled(inner, mode="default")
    wrapped._fn = lambda *a: None  # as after a first call: something that is no file
    again = copy.deepcopy(wrapped)
    assert again._fn is None and saved_form(again) is not inner and isinstance(saved_form(again), nn.Sequential)
    loaded = pickle.loads(pickle.dumps(wrapped))
    assert loaded._fn is None and torch.equal(loaded.module[0].weight, inner[0].weight)
    assert wb.registry.backend_of(wrapped).label_of(wrapped) == "torch+compile"


def test_a_model_that_follows_its_inputs_device():
    from workbench.wrappers import FollowsInputs, same_device, saved_form

    inner = nn.Linear(4, 2)
    wrapped = FollowsInputs(inner, "cpu")
    x = torch.randn(3, 4)
    assert torch.equal(wrapped(x), inner(x)) and torch.equal(wrapped(input=x), inner(x))
    assert saved_form(wrapped) is inner
    assert same_device("cpu", torch.device("cpu")) and not same_device("cpu", "meta")


def test_a_gpu_result_reads_as_the_users_model():
    """On the GPU the result's model is wrapped to follow its inputs' device; it must still read as the user's
    model: attributes, indexing, layer names and state_dict keys (on the H100, 11 tests failed on `module.` names,
    `'FollowsInputs' object has no attribute 'fc1'` and `... is not subscriptable`)."""
    from workbench import charts
    from workbench.measure.counts import layer_table
    from workbench.wrappers import FollowsInputs

    torch.manual_seed(0)
    user = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    user.classes = list("ab")  # a plain attribute of the user's model
    wrapped = FollowsInputs(copy.deepcopy(user), "cpu")
    assert wrapped.classes == ["a", "b"] and wrapped[0] is wrapped.module[0] and getattr(wrapped, "2") is wrapped[2]
    assert len(wrapped) == 3 and list(wrapped)[1] is wrapped[1]
    assert list(wrapped.state_dict()) == list(user.state_dict())
    assert [n for n, _ in wrapped.named_modules()] == [n for n, _ in user.named_modules()]
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in user.named_parameters()]
    assert list(layer_table(wrapped).index) == ["0", "2"]
    with torch.no_grad():
        wrapped[0].weight.zero_()
    user.load_state_dict(wrapped.state_dict())  # a state_dict saved from the result loads into the user's class
    assert torch.count_nonzero(user[0].weight) == 0
    wrapped.load_state_dict(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).state_dict())
    assert charts.weight_histograms(user, wrapped).layout.title.text == "weights of 0"
    with pytest.raises(AttributeError, match="no_such"):
        wrapped.no_such
    assert FollowsInputs(nn.Linear(2, 2), "cpu")  # true, as a module is, though a Linear has no length
    assert wrapped.get_submodule("2") is wrapped[2] and wrapped.get_submodule("") is wrapped
    graph = FollowsInputs(torch.fx.symbolic_trace(nn.Linear(2, 2)), "cpu")  # a GraphModule has its own __deepcopy__
    assert type(copy.deepcopy(graph)) is FollowsInputs and type(pickle.loads(pickle.dumps(graph))) is FollowsInputs
    again = pickle.loads(pickle.dumps(wrapped))
    assert torch.equal(again[0].weight, wrapped[0].weight) and copy.deepcopy(wrapped)[2] is not wrapped[2]


def test_an_eval_fn_gets_a_model_that_takes_cpu_inputs_on_a_gpu_target(monkeypatch):
    from workbench.data import follows_inputs
    from workbench.wrappers import FollowsInputs

    model = nn.Linear(4, 2)
    assert follows_inputs(model, Target("cpu")) is model  # nothing changes on the CPU
    wrapped = follows_inputs(model, Target("cuda"))
    assert isinstance(wrapped, FollowsInputs) and wrapped.device == "cuda" and wrapped.module is model
    assert follows_inputs(wrapped, Target("cuda")) is wrapped


def test_torchao_int8_lowering_keeps_the_outputs_and_the_excluded_layers():
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.randn(32, 64)
    q = lowering.torchao_quantize(model, "int8-dynamic", exclude=("4",))
    assert "1 of 3 Linear layers stay in float" in lowering.torchao_coverage(q, "int8-dynamic")
    tiled = lowering.torchao_quantize(nn.Sequential(nn.Linear(64, 32)), "int8-dynamic")
    assert lowering.torchao_coverage(tiled, "int8-dynamic") is None
    odd = lowering.torchao_quantize(nn.Sequential(nn.Linear(64, 10)), "int8-dynamic")  # 10 outputs: off the tiles
    assert "none of the 1 Linear layers is quantized (1 with sizes not multiples of 16 (its kernels' tiles): 0)" \
        in lowering.torchao_coverage(odd, "int8-dynamic")
    conv = lowering.torchao_quantize(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(64, 32)), "int8-dynamic")
    assert lowering.torchao_coverage(conv, "int8-dynamic") == "torchao int8-dynamic: every Linear layer is " \
        "quantized; convolutions stay in float (torchao quantizes Linear layers only)"
    only_conv = lowering.torchao_quantize(nn.Sequential(nn.Conv2d(1, 4, 3)), "int8-dynamic")
    assert "has no Linear layer, so nothing is quantized" in lowering.torchao_coverage(only_conv, "int8-dynamic")
    assert q.workbench_label == "torchao-int8-dynamic" and type(model[0].weight) is nn.Parameter  # not mutated
    assert type(q[0].weight).__name__ != "Parameter" and type(q[4].weight) is nn.Parameter  # excluded: fp32
    assert wb.registry.backend_of(q).label_of(q) == "torchao-int8-dynamic"
    with torch.inference_mode():
        ref, got = model(x), q(x)
    assert torch.nn.functional.cosine_similarity(ref, got).min() > 0.99
    from workbench.measure.counts import count_params, layer_table, sparse_size

    # measuring it must not ask torchao's weights for what they do not implement (count_nonzero failed on the GPU)
    assert count_params(q) == count_params(model) and sparse_size(q) is None and len(layer_table(q)) == 3


@pytest.mark.slow
def test_compile_end_to_end_on_the_cpu(digits_mlp, tmp_path):
    model, data = digits_mlp
    r = wb.optimize(model, "quant=fp16,compile:mode=reduce-overhead", data=data, device="cpu", **FAST)
    assert r.backend == "torch-fp16+compile" and r.measurement.metric >= r.baseline.metric - 0.01
    assert any("CUDA graphs, which need a GPU" in line for line in r.preflight)
    path = r.save(tmp_path / "c")
    assert (path / "model.pt2").exists()  # the compiled function is not saved; the model it runs is
    x = data.inputs(4)
    with torch.inference_mode():
        assert torch.allclose(wb.load(path)(x), r.model(x), atol=1e-3)
    with pytest.raises(wb.WorkbenchError, match="put prune before it"):
        wb.optimize(model, "compile,prune=0.5", data=data, **FAST)


def test_each_compiled_model_has_its_own_recompile_slots(monkeypatch):
    """Dynamo keeps at most `recompile_limit` graphs per code object and runs the rest uncompiled: compiled models
    of one class must not share those slots (on the GPU, the third compiled BERT in a process ran eager)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from workbench.wrappers import Compiled

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, dynamic=None: real(fn, backend="eager",
                                                                                     dynamic=dynamic))
    torch._dynamo.reset()
    counters.clear()
    # torch's own patch: pytest's monkeypatch undoes a config attribute by deleting it, which hides it for good
    with torch._dynamo.config.patch(recompile_limit=2):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):  # three models: graphs that cannot be shared
            model = Compiled(nn.Sequential(nn.Linear(4, 4)).to(dtype), dynamic=False)
            for rows in (1, 2):
                model(torch.randn(rows, 4, dtype=dtype))
    assert counters["stats"]["unique_graphs"] == 6


def test_counting_macs_leaves_a_users_compiled_model_compiled():
    """`wb.compare` counts MACs with a forward pass under torch's FlopCounterMode. A model the user compiled
    (`torch.compile`, the peer rows of benchmarks/autotune.py --gpu) that first ran there was left uncompiled for
    good: on the GPU those rows timed as eager (0.89x where CUDA graphs give 6x)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from workbench.measure.counts import count_macs

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), backend="eager")
    assert count_macs(compiled, torch.randn(2, 4)) == 2 * 4 * 4
    compiled(torch.randn(2, 4))
    assert counters["stats"]["unique_graphs"] == 1  # compiled on its first call outside the counter


def test_a_model_already_on_its_device_is_not_moved(monkeypatch):
    """On the GPU, `Module.to` of torchao's quantized weights failed even for a move to where they were."""
    from workbench.registry import backend_named
    from workbench.wrappers import to_device

    model = nn.Sequential(nn.Linear(4, 2))
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: pytest.fail("moved a model that was in place"))
    assert to_device(model, "cpu") is model
    placed = backend_named("torch").place(model, Target("cpu"))
    assert placed is not model and torch.equal(placed[0].weight, model[0].weight)


def test_an_exported_program_moves_to_another_device_as_a_whole(digits_mlp, tmp_path):
    """A .pt2 records the CPU it was traced on; loaded for a GPU it is moved with torch.export's pass. Checked here
    on the meta device, which a CPU machine has too."""
    from workbench.backends.torch_eager.storage import load

    model, data = digits_mlp
    path = wb.optimize(model, "quant=fp16", data=data, device="cpu", **FAST).save(tmp_path / "r")
    moved = load(path / "model.pt2", "meta")
    out = moved(data.inputs(3).to("meta"))
    assert out.device.type == "meta" and out.shape == (3, 10)


def test_the_gpu_preflight_names_layers_off_the_tensor_core_shapes():
    from workbench.techniques.quantize import Quantize, preflight

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 100), nn.ReLU(), nn.Linear(100, 10))
    gpu = types.SimpleNamespace(target=Target("cuda"), model=model, conv_heavy=False)
    lines = preflight([Quantize("fp16")], gpu)
    assert any("2 of 3 Linear layers" in line and "'2', 128 x 100" in line for line in lines), lines
    cpu = types.SimpleNamespace(target=Target("cpu"), model=model, conv_heavy=False)
    assert not any("tensor cores" in line for line in preflight([Quantize("fp16")], cpu))
