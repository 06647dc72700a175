"""unpad: a BERT encoder that skips padding gives the original's outputs at real tokens, on torch and ONNX Runtime."""
import copy

import pytest
import torch

import workbench as wb
from workbench.errors import ModelError
from workbench import Recipe, Unpad
from workbench.recipe import from_flags

from .helpers import state_bytes

transformers = pytest.importorskip("transformers")


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    return BertModel(config).eval()


def padded(lengths, total=12, left=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        cols = slice(total - n, total) if left else slice(0, n)
        ids[row, cols] = torch.randint(1, 100, (n,), generator=g)
        mask[row, cols] = 1
    return {"input_ids": ids, "attention_mask": mask}


def encoder_and_data(seed=0):
    """A sentence encoder (tiny BERT + mean pooling) and fidelity data: batches padded to 12, ~half padding."""
    from workbench.modules import SentenceEncoder

    model = SentenceEncoder(tiny_bert(seed)).eval()
    batches = []
    for i in range(4):
        inputs = padded([3 + (i + j) % 7 for j in range(8)], seed=i)
        with torch.no_grad():
            batches.append((inputs, model(**inputs)))
    data = wb.Data(train=batches, val=batches, metric="fidelity",
                   example_inputs={k: v[:1] for k, v in batches[0][0].items()}, name="tiny-bert")
    return model, data


@pytest.mark.parametrize("left", [False, True])
def test_packed_bert_matches_the_original_at_real_tokens(left):
    from workbench.techniques.packed_bert import PackedBert

    bert = tiny_bert()
    inputs = padded([12, 5, 3, 1], left=left)
    packed = PackedBert(bert).eval()
    with torch.no_grad():
        want, got = bert(**inputs), packed(**inputs)
    real = inputs["attention_mask"].bool()
    hidden = got.last_hidden_state
    assert hidden.shape == want.last_hidden_state.shape
    assert torch.allclose(hidden[real], want.last_hidden_state[real], atol=1e-5)
    assert hidden[~real].abs().max() == 0  # padding positions are zeros, not computed
    if not left:  # the pooler reads the first token, real in every row here
        assert torch.allclose(got.pooler_output, want.pooler_output, atol=1e-5)


def test_rounded_sizes_are_few_and_close():
    from workbench.techniques.packed_bert import bucket

    for n in range(0, 5000):
        b = bucket(n, 10 ** 6)
        assert n <= b <= n + max(7, n / 8) and b % 8 == 0
    for k in range(6, 12):  # 8 sizes per doubling
        assert len({bucket(n, 10 ** 6) for n in range(2 ** k, 2 ** (k + 1))} - {2 ** (k + 1)}) == 8
    assert bucket(61, 60) == 60  # never past what there is


@pytest.mark.parametrize("left", [False, True])
def test_a_rounded_packed_bert_gives_the_same_outputs_in_few_shapes(left):
    """Compiled with CUDA graphs (compile after unpad on a GPU), the packed encoder rounds its kept columns and
    packed rows up with padding ones: outputs as without, and one compiled shape for batches that round alike."""
    from workbench.techniques import packed_bert

    bert = tiny_bert()
    packed = packed_bert.PackedBert(bert).eval()
    packed.rounded = True
    inputs = padded([12, 5, 3, 1], left=left)  # 21 real tokens, rounded to 24; 12 columns, kept as they are
    with torch.no_grad():
        want, got = bert(**inputs), packed(**inputs)
    real = inputs["attention_mask"].bool()
    assert torch.allclose(got.last_hidden_state[real], want.last_hidden_state[real], atol=1e-5)
    assert got.last_hidden_state[~real].abs().max() == 0
    g = torch.Generator().manual_seed(0)
    shapes, exact = set(), set()
    for _ in range(100):
        mask = padded(torch.randint(0, 13, (4,), generator=g).tolist(), left=left)["attention_mask"]
        columns, _, tokens, _, _ = packed_bert._layout(mask, True)
        shapes.add((columns.shape[0], tokens.shape[0]))
        columns, _, tokens, _, _ = packed_bert._layout(mask, False)
        exact.add((columns.shape[0], tokens.shape[0]))
        assert tokens.shape[0] == int(mask.sum())
        # what numpy computes on the host is what torch's steps compute where a trace records them
        here, there = packed_bert._layout(mask, False), packed_bert._traced_layout(mask)
        assert all(torch.equal(a, b) for a, b in zip(here, there))
    assert len(shapes) * 2 < len(exact)
    # a trace (ONNX export of a saved compiled result) keeps every size general, as without rounding
    traced = torch.jit.trace(lambda m: packed_bert._layout(m, True)[2], (padded([5, 3, 1, 2])["attention_mask"],))
    assert traced(padded([12, 12, 12, 12])["attention_mask"]).shape[0] == 48

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(packed, backend="eager")
    with torch.no_grad():
        for lengths in ([12, 9, 6, 6], [12, 11, 6, 4], [12, 2, 10, 9]):  # 33, 33 and 33 real tokens: all 40
            inputs = padded(lengths, left=left)
            got, want = compiled(**inputs).last_hidden_state, bert(**inputs).last_hidden_state
            real = inputs["attention_mask"].bool()
            assert torch.allclose(got[real], want[real], atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        compiled(**padded([12, 12, 12, 1], left=left))  # 37: rounds to 40 too
    assert counters["stats"]["unique_graphs"] == graphs  # no new graph


@pytest.mark.parametrize("left", [False, True])
def test_the_dense_forward_of_small_gpu_batches_matches_the_packed_one(left):
    """Under CUDA graphs a GPU runs small batches dense (every position, padding masked): the same outputs, zeros at
    padding, also for a row of padding alone (whose attention has nothing to attend to) in half precision."""
    from workbench.techniques.packed_bert import PackedBert

    packed = PackedBert(tiny_bert()).eval()
    inputs = padded([12, 5, 0, 1], left=left)
    with torch.no_grad():
        got, want = packed._dense(inputs["input_ids"], inputs["attention_mask"], None, None), packed(**inputs)
        assert torch.allclose(got.last_hidden_state, want.last_hidden_state, atol=1e-5)
        assert torch.allclose(got.pooler_output, want.pooler_output, atol=1e-5)
        half = copy.deepcopy(packed).half()._dense(inputs["input_ids"], inputs["attention_mask"], None, None)
        # a float mask, cast to bfloat16 as quant=bf16 casts every float input (numpy has no bfloat16)
        bf16 = copy.deepcopy(packed).bfloat16()(inputs["input_ids"], inputs["attention_mask"].bfloat16())
    assert torch.isfinite(half.last_hidden_state).all() and half.last_hidden_state[2].abs().max() == 0
    assert torch.allclose(bf16.last_hidden_state.float(), want.last_hidden_state, atol=0.1)


def test_on_a_gpu_autotune_tries_compile_then_unpad_with_compile_then_unpad_alone(monkeypatch):
    from workbench.facts import ModelFacts
    from workbench.search.autotune import _seeds
    from workbench.target import Target

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    model, data = encoder_and_data()
    seeds = _seeds(ModelFacts(model, data, Target("cuda")))
    assert [(s["unpad"], s["compile"]) for s in seeds] == [(False, True), (True, True), (True, False)]
    assert all(s["quant"] == "fp16" and s["prune"] == 0 and "recovery" not in s for s in seeds)


def test_compile_after_unpad_rounds_the_packed_tokens_where_it_records_cuda_graphs():
    import types

    from workbench.target import Target
    from workbench.techniques.compile import Compile, apply_compile
    from workbench.techniques.packed_bert import DENSE_BELOW, PackedBert

    for device, rounded in (("cpu", False), ("cuda", True)):
        ctx = types.SimpleNamespace(target=Target(device), notes=[])
        ctx.note = ctx.notes.append
        model = PackedBert(tiny_bert())
        compiled = apply_compile(model, Compile(), ctx)
        assert compiled.module.rounded is rounded and compiled.module.dense_below == (DENSE_BELOW if rounded else 0)
        assert rounded == any("rounds its token count" in n for n in ctx.notes)


@pytest.mark.slow  # in the slow set so that the fast subset stays under 2 minutes
def test_unpad_then_int8_on_onnxruntime_keeps_fidelity_and_runs_other_shapes():


    model, data = encoder_and_data()
    before = state_bytes(model)
    result = wb.optimize(model, "unpad,quant=int8", data=data, study=False, batch_sizes=(1, 8))
    assert state_bytes(model) == before and type(model.encoder).__name__ == "BertModel"
    assert result.backend.startswith("onnxruntime-int8")
    assert result.measurement.metric > 0.98
    assert any("padding" in n and "unpad" in n for n in result.notes)
    from workbench.registry import backend_named
    from workbench.target import resolve
    from workbench.techniques.quantize import UNPAD_ON_OPENVINO

    openvino = "int8-static" in backend_named("openvino").precisions(resolve(device="cpu"))
    assert (UNPAD_ON_OPENVINO in result.notes) == openvino  # where plain int8 would run elsewhere, it says so
    # the exported graph is not tied to the example's shape: another batch size and length, other padding
    other = padded([9, 2, 6], total=20, seed=7)
    with torch.no_grad():
        want = model(**other)
    got = result.model(**other)
    assert got.shape == want.shape
    assert torch.nn.functional.cosine_similarity(got, want).min() > 0.97


def _ops_run(model, inputs, folder) -> set:
    """The operator kinds ONNX Runtime ran for one call (its profile, written under `folder`, not the working
    directory): which branch of a merged graph ran."""
    import json

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(folder / "profile")
    session = ort.InferenceSession(model.onnx_bytes, opts, providers=["CPUExecutionProvider"])
    session.run(None, model.feed(**inputs))
    with open(session.end_profiling()) as f:
        events = json.load(f)
    return {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


@pytest.mark.slow  # in the slow set so that the fast subset stays under 2 minutes
def test_unpad_int8_runs_batches_without_padding_on_the_dense_graph(tmp_path):
    """unpad's int8 graph holds the dense graph (ONNX Runtime's fused QAttention) as a fast path that runs where a
    batch has no padding, and the packed one elsewhere; the two share their weights, save and reload as one."""
    import onnx

    model, data = encoder_and_data()
    result = wb.optimize(model, "unpad,quant=int8-dynamic", data=data, study=False, batch_sizes=(1,))
    assert any("batches without padding" in n for n in result.notes)
    graph = onnx.load_from_string(result.model.onnx_bytes).graph
    assert [n.op_type for n in graph.node][-1] == "If"
    full = padded([12, 12, 12], seed=4)
    some = padded([12, 5, 3], seed=4)
    dense, packed = _ops_run(result.model, full, tmp_path), _ops_run(result.model, some, tmp_path)
    assert "QAttention" in dense and "MultiHeadAttention" not in dense
    assert "MultiHeadAttention" in packed and "QAttention" not in packed
    with torch.no_grad():
        for inputs in (full, some):
            cosine = torch.nn.functional.cosine_similarity(result.model(**inputs), model(**inputs))
            assert cosine.min() > 0.97
    packed_only = wb.optimize(model, "unpad,quant=int8-dynamic:exclude=encoder.layers.0.qkv", data=data,
                              study=False, batch_sizes=(1,))  # Q/K/V kept float: the dense graph fuses no attention
    assert [n.op_type for n in onnx.load_from_string(packed_only.model.onnx_bytes).graph.node][-1] != "If"
    # the fast path adds only Q/K/V laid out for QAttention: weights counted once, a small share more bytes
    counted, alone = result.model.count_params()[0], packed_only.model.count_params()[0]
    every = sum(onnx.numpy_helper.to_array(i).size for i in graph.initializer if i.dims)
    assert abs(counted - alone) < 0.01 * alone and alone < every < 1.5 * alone  # (equal constants stored once)
    reloaded = wb.load(result.save(tmp_path / "merged"))
    assert torch.equal(reloaded(**full), result.model(**full)) and torch.equal(reloaded(**some), result.model(**some))


@pytest.mark.parametrize("cpu", [pytest.param("vnni", marks=pytest.mark.slow), "avx2"])  # vnni: the slow set
def test_the_fast_path_is_built_on_either_cpu_path_and_its_notes_said_once(cpu, monkeypatch):
    """Forced CPU paths: on AVX2 both graphs get 7-bit weights, and the note saying so (the dense twin is lowered
    too) is on the card once."""
    import onnx

    monkeypatch.setenv("WORKBENCH_CPU", cpu)
    model, data = encoder_and_data()
    result = wb.optimize(model, "unpad,quant=int8-dynamic", data=data, study=False, batch_sizes=(1,))
    assert [n.op_type for n in onnx.load_from_string(result.model.onnx_bytes).graph.node][-1] == "If"
    assert len(result.notes) == len(set(result.notes))
    assert sum("reduce_range" in n for n in result.notes) == (cpu == "avx2")


def test_unpad_alone_is_exact_on_torch_and_saves_and_reloads(tmp_path):
    model, data = encoder_and_data()
    result = wb.optimize(model, Unpad(), data=data, backend="torch", study=False, batch_sizes=(1,))
    assert result.measurement.metric > 0.99999
    path = result.save(tmp_path / "unpadded")
    reloaded = wb.load(path, trust_pickle=True)
    inputs = padded([4, 11], seed=3)
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs), model(**inputs), atol=1e-5)


@pytest.mark.parametrize("before", ["prune=0.5:structured=true:scope=layer", "factorize=0.25"])
def test_unpad_after_pruning_or_factorizing_matches_that_model(before):
    model, data = encoder_and_data()
    changed = wb.optimize(model, before, data=data, backend="torch", study=False, batch_sizes=(1,)).model
    unpadded = wb.optimize(changed, "unpad", data=data, backend="torch", study=False, batch_sizes=(1,)).model
    attention = changed.encoder.encoder.layer[0].attention.self
    assert unpadded.encoder.layers[0].heads == attention.num_attention_heads
    if before.startswith("prune"):
        assert attention.num_attention_heads == 2  # half of the 4 heads went
    else:
        assert not isinstance(attention.query, torch.nn.Linear)  # low-rank pair, kept as is beside K and V
    inputs = padded([12, 4, 7], seed=5)
    with torch.no_grad():
        assert torch.allclose(unpadded(**inputs), changed(**inputs), atol=1e-5)
    # laid back out dense (unpad's fast path for batches without padding), on the same weights, same function
    from workbench.techniques.packed_bert import dense_twin

    twin, rename = dense_twin(unpadded)
    full = padded([12, 12], seed=6)
    with torch.no_grad():
        assert torch.allclose(twin(**full), changed(**full), atol=1e-5)
    assert rename("encoder.layers.1.qkv") == tuple(f"encoder.encoder.layer.1.attention.self.{p}"
                                                   for p in ("query", "key", "value"))
    assert rename("encoder.layers.0.ffn_in.linear") == ("encoder.encoder.layer.0.intermediate.dense.linear",)
    assert rename("encoder.layers.1") == ("encoder.encoder.layer.1",) and rename("head") == ("head",)


def test_unpad_on_a_model_without_bert_says_so(digits_mlp):
    model, data = digits_mlp
    with pytest.raises(ModelError, match="no Hugging Face BERT encoder"):
        wb.optimize(model, "unpad", data=data, study=False)


def test_unpad_in_recipes_and_flags():
    assert str(Recipe.parse("unpad,quant=int8")) == "unpad,quant=int8"
    assert Recipe.from_yaml(Recipe.parse("unpad").to_yaml()).steps == [Unpad()]
    steps = from_flags(quant="int8", unpad=True, prune=0.3, order=["quant", "unpad", "prune"])["steps"]
    assert [s["type"] for s in steps] == ["prune", "unpad", "quantize"]  # unpad, then quantization, come last
    from workbench.recipe import flag_order

    assert flag_order("model --unpad --quant int8".split()) == ["unpad", "quant"]


def test_preflight_points_at_padding():
    model, data = encoder_and_data()
    lines = wb.preflight(model, "quant=int8", data)
    assert any(line.startswith("padding:") and "unpad" in line for line in lines)
    assert not any(line.startswith("padding:") for line in wb.preflight(model, "unpad,quant=int8", data))


def test_autotune_tries_unpad_first_on_padded_bert(tmp_path):
    """On ONNX Runtime unpad comes first; where OpenVINO's int8 leads, what quant=int8 runs comes first, then
    unpad (OpenVINO ran unpad's graph 2x slower at batch 1)."""
    from workbench.facts import ModelFacts
    from workbench.search.autotune import _seeds
    from workbench.target import resolve
    from workbench.techniques.quantize import openvino_leads

    model, data = encoder_and_data()
    tuned = wb.autotune(model, data, budget="2min", trials=1, study=False, backend="onnxruntime",
                        storage=f"sqlite:///{tmp_path}/autotune.sqlite")
    assert "unpad" in str(tuned.best.recipe)
    facts = ModelFacts(model, data, resolve(device="cpu"))
    if openvino_leads(facts):
        first, second = _seeds(facts)[:2]
        assert (first["unpad"], first["quant"], first["backend int8-static"]) == (False, "int8-static", "openvino")
        assert (second["unpad"], second["quant"]) == (True, "int8-dynamic")


@pytest.mark.slow
def test_unpad_with_static_int8_and_no_files_left_in_the_cwd(tmp_path, monkeypatch):
    """Static int8 calibrates on batches whose token counts differ after unpad (MinMax copes, histograms are
    refused with a way out); ORT's shape inference leaves no temp files in the user's working directory."""
    monkeypatch.chdir(tmp_path)
    model, data = encoder_and_data()
    result = wb.optimize(model, "unpad,quant=int8-static", data=data, study=False, batch_sizes=(1,))
    assert result.measurement.metric > 0.9
    with pytest.raises(wb.WorkbenchError, match="use calibration='minmax'"):
        wb.optimize(model, "unpad,quant=int8-static:calibration=entropy", data=data, study=False)
    wb.optimize(model, "quant=int8", data=data, study=False, batch_sizes=(1,))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bert_exports_get_onnxruntime_fusions_unless_layers_are_excluded():
    import onnx

    model, data = encoder_and_data()
    ops = {}
    for recipe in ("quant=int8", "quant=int8:exclude=encoder.encoder.layer.0"):
        r = wb.optimize(model, recipe, data=data, study=False, batch_sizes=(1,), backend="onnxruntime")
        ops[recipe] = {n.op_type for n in onnx.load_from_string(r.model.onnx_bytes).graph.node}
        assert r.measurement.metric > 0.98
    assert "QAttention" in ops["quant=int8"]  # fused attention, quantized
    assert not {"QAttention", "Attention"} & ops["quant=int8:exclude=encoder.encoder.layer.0"]  # names kept


@pytest.mark.parametrize("recipe", [[], "unpad"])
def test_onnx_graphs_are_right_for_left_padding_too(recipe):
    """fp32 ONNX graphs (fused attention; unpad) match torch on left-padded batches: the fused attention must read
    the raw mask, whose default form (a length per row) assumes right padding (max diff 5e-3 with it)."""
    import onnx

    model, data = encoder_and_data()
    result = wb.optimize(model, recipe, data=data, backend="onnxruntime", study=False, batch_sizes=(1,))
    if not recipe:
        assert "Attention" in {n.op_type for n in onnx.load_from_string(result.model.onnx_bytes).graph.node}
    inputs = padded([9, 3, 12, 5], left=True, seed=11)
    with torch.no_grad():
        assert torch.allclose(result.model(**inputs), model(**inputs), atol=1e-5)


def test_unpad_refuses_what_it_cannot_do():
    from workbench.errors import RecipeError
    from workbench.techniques.packed_bert import PackedBert

    with pytest.raises(RecipeError, match="comes after unpad"):
        Recipe.parse("unpad,finetune=1")
    model, data = encoder_and_data()
    with pytest.raises(RecipeError, match="no layer named 'encoder.encoder.layer.0'"):
        wb.optimize(model, "unpad,quant=int8:exclude=encoder.encoder.layer.0", data=data, study=False)
    packed = PackedBert(tiny_bert())
    with pytest.raises(ModelError, match="output_hidden_states"):
        packed(**padded([3, 2]), output_hidden_states=True)
    with torch.no_grad():  # a batch of empty rows: zeros, not a reshape error
        none = torch.zeros(2, 5, dtype=torch.long)
        empty = packed(input_ids=none, attention_mask=none)
    assert empty.last_hidden_state.shape == (2, 5, 32) and empty.last_hidden_state.abs().max() == 0


def test_panel_offers_unpad_for_bert_only(digits_mlp):
    model, data = encoder_and_data()
    panel = wb.panel(model, data, study=wb.Study(), name="enc")
    assert panel.enabled["unpad"].value and panel.rows["unpad"].layout.display is None
    assert [s.kind for s in panel.recipe().steps] == ["unpad", "quantize"]
    assert "--unpad --quant int8" in panel.magic_line()
    mlp = wb.panel(digits_mlp[0], digits_mlp[1], study=wb.Study())
    assert not mlp.enabled["unpad"].value and mlp.rows["unpad"].layout.display == "none"
