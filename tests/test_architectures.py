"""Any model a user brings: Hugging Face families built offline from tiny configs (workbench.support), their call and
output contracts on every backend, token-level fidelity, perplexity, saves at new shapes, models on disk, export."""
from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

import workbench as wb
from workbench import support
from workbench.errors import DataError, RecipeError

pytest.importorskip("transformers")

QUICK = dict(device="cpu", batch_sizes=(1,), study=False)


def _optimize(model, recipe, data):
    return wb.optimize(model, recipe, data, timing=support._plan(), **QUICK)


@pytest.mark.parametrize("name", ["bert", pytest.param("gpt2", marks=pytest.mark.slow),
                                  pytest.param("llama", marks=pytest.mark.slow)])
def test_int8_keeps_the_contract_reports_fidelity_and_perplexity_and_reloads_at_new_shapes(name, tmp_path):
    model, data = support.load(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _optimize(model, "quant=int8", data)
    assert result.measurement.metric >= 0.99
    inputs = next(iter(data.val_batches()))[0]
    out, reference = result.model(**inputs), model(**inputs)
    if name == "bert":
        assert type(out) is type(reference) and out.last_hidden_state.shape == reference.last_hidden_state.shape
        assert result.measurement.perplexity is None
    else:  # causal LMs: `.logits` kept, perplexity measured for both models
        assert type(out) is type(reference) and out.logits.shape == reference.logits.shape
        assert result.baseline.perplexity > 1 and result.measurement.perplexity > 1
        assert abs(result.measurement.perplexity / result.baseline.perplexity - 1) < 0.05
    path = result.save(tmp_path / name)
    reloaded = wb.load(path)
    for shape in support.NEW_SHAPES:  # batch sizes and lengths no batch had
        new = support._new_shape("causal" if name != "bert" else "text", shape)
        assert new["input_ids"].shape not in {b[0]["input_ids"].shape for b in data.val_batches()}
        again, direct = reloaded(**new), result.model(**new)
        assert type(again) is type(direct)
        torch.testing.assert_close(again[0], direct[0])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched


@pytest.mark.slow
def test_an_onnx_result_takes_the_original_positional_call_and_says_what_is_missing():
    model, data = support.load("bert")
    result = _optimize(model, "quant=int8", data)
    ids, mask = (next(iter(data.val_batches()))[0][k] for k in ("input_ids", "attention_mask"))
    torch.testing.assert_close(result.model(ids, mask).last_hidden_state,
                               result.model(input_ids=ids, attention_mask=mask).last_hidden_state)
    with pytest.raises(TypeError, match="missing input 'attention_mask'"):
        result.model(ids)


def test_fp16_returns_the_model_output_class_not_a_dict():
    model, data = support.load("gpt2")
    result = _optimize(model, "quant=fp16", data)
    out = result.model(**next(iter(data.val_batches()))[0])
    assert type(out).__name__ == "CausalLMOutputWithCrossAttentions" and out.logits.dtype == torch.float32


def test_fidelity_counts_real_tokens_only_so_lossless_unpad_scores_one():
    model, data = support.load("bert")  # batches of 12 and 16 tokens, rows padded at the end
    result = _optimize(model, "unpad", data)
    assert result.measurement.metric > 0.9999


def test_a_degenerate_reference_is_refused_in_one_line():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.mul_(1e-30)
        model[0].bias.zero_()
    data = wb.Data(val=[(torch.randn(8, 4), None)], metric="fidelity")
    with pytest.raises(DataError, match="all near zero"):
        _optimize(model, "quant=int8", data)
    constant = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with torch.no_grad():
        constant[0].weight.zero_()
    with pytest.raises(DataError, match="the same for every input"):
        _optimize(constant, "quant=int8", wb.Data(val=[(torch.randn(8, 4), None)], metric="fidelity"))


def test_the_card_says_when_a_constant_output_would_score_a_high_fidelity():
    """A sigmoid output near 0.5 for every input (an autoencoder's pixels, untrained): any model, even one that
    ignores its input, scores ~1.0 cosine fidelity. The card says so and what to use instead; outputs that vary
    get no such line. The floor is computed the same from the batches' own targets."""
    torch.manual_seed(0)
    inputs = [torch.randn(8, 6) for _ in range(2)]
    squashed = torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.Sigmoid())
    with torch.no_grad():
        squashed[0].weight.mul_(0.05)
    result = _optimize(squashed, "quant=fp16", wb.Data(val=[(x, None) for x in inputs], metric="fidelity"))
    floor = result.details["fidelity_floor"]
    assert floor > 0.99 and any(f"scores {floor:.3f}" in n and "metric='accuracy'" in n for n in result.notes)
    with torch.no_grad():
        targets = [squashed(x) for x in inputs]
    given = wb.Data(val=list(zip(inputs, targets)), metric="fidelity")
    assert given.fidelity_floor() == pytest.approx(floor, abs=1e-6)
    varied = torch.nn.Sequential(torch.nn.Linear(6, 20))
    result = _optimize(varied, "quant=fp16", wb.Data(val=[(x, None) for x in inputs], metric="fidelity"))
    assert result.details["fidelity_floor"] < 0.9 and not any("fidelity says little" in n for n in result.notes)


@pytest.mark.parametrize("name", ["llama", "gpt2", pytest.param("distilbert", marks=pytest.mark.slow),
                                  pytest.param("vit", marks=pytest.mark.slow)])
def test_structured_pruning_removes_heads_consistently(name):
    from workbench.architectures import attention_blocks

    model, data = support.load(name)
    before = attention_blocks(model)
    result = _optimize(model, "prune=0.5:structured=true", data)
    after = attention_blocks(result.model)
    assert [b.heads for b in after] == [b.heads // 2 for b in before]
    assert all(b.heads % b.kv_heads == 0 and b.kv_heads == max(1, a.kv_heads // 2) for a, b in zip(before, after))
    assert result.measurement.params < result.baseline.params
    assert "attention heads" in " ".join(result.notes)


def test_recurrent_layers_prune_unstructured_and_are_refused_structured_with_the_way_out():
    model, data = support.load("lstm")
    result = _optimize(model, "prune=0.5", data)
    assert (result.model.rnn.weight_ih_l0 == 0).float().mean() > 0.3
    with pytest.raises(RecipeError, match="quant=int8-dynamic"):
        _optimize(model, "prune=0.5:structured=true", data)


@pytest.mark.slow
def test_recurrent_saves_are_torchscript_and_run_at_a_new_sequence_length(tmp_path):
    model, data = support.load("gru")
    result = _optimize(model, "quant=fp16", data)
    path = result.save(tmp_path / "gru")
    assert (path / "model.ts").exists() and not (path / "model.pt").exists()  # no pickle
    new = support._new_shape("sequence")
    torch.testing.assert_close(wb.load(path)(new), result.model(new))


@pytest.mark.slow
def test_models_on_disk_hugging_face_directories_and_onnx_files(tmp_path):
    model, data = support.load("roberta")
    model.save_pretrained(tmp_path / "roberta")
    loaded = wb.load_model(tmp_path / "roberta")
    assert type(loaded) is type(model)
    result = _optimize(loaded, "quant=int8", data)
    with pytest.raises(RecipeError, match="already quantized"):
        _optimize(wb.load_model(result.export(tmp_path / "int8.onnx")), "quant=int8", data)
    graph_file = tmp_path / "roberta.onnx"
    graph_file.write_bytes(wb.OrtModel.from_torch(loaded, data.example_inputs).onnx_bytes)  # a float graph
    graph = wb.load_model(graph_file)
    again = _optimize(graph, "quant=int8-static", data)
    assert again.backend.startswith("onnxruntime-int8-static") and again.measurement.metric > 0.98
    with pytest.raises(RecipeError, match="only quantization applies"):
        _optimize(graph, "prune=0.5", data)
    with pytest.raises(wb.WorkbenchError, match="neither a Hugging Face model directory"):
        wb.load_model(tmp_path)


_openvino = importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("nncf") is not None


@pytest.mark.parametrize("recipe, suffix", [
    ("quant=int8-dynamic", ".onnx"),
    pytest.param("quant=int8", ".xml", marks=[pytest.mark.slow,
                                             pytest.mark.skipif(not _openvino, reason="needs the openvino extra")]),
    pytest.param("quant=fp16", ".pt2", marks=pytest.mark.slow)])
def test_export_writes_a_deployable_file_that_its_three_lines_run(recipe, suffix, tmp_path, monkeypatch):
    from workbench.notebook.card import Card

    model, data = support.load("bert")
    result = _optimize(model, recipe, data)
    assert "result.export(" in repr(Card(result))
    monkeypatch.chdir(tmp_path)
    path = result.export()
    assert path == tmp_path / f"model{suffix}" and "deployable file" in repr(Card(result))
    inputs = next(iter(data.val_batches()))[0]
    names = {k: (v.numpy() if suffix in (".onnx", ".xml") else v) for k, v in inputs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec("\n".join(result.deploy), names)  # the card's lines, without the workbench
    first = torch.as_tensor(names["outputs"][0])
    torch.testing.assert_close(first, result.model(**inputs).last_hidden_state, rtol=1e-3, atol=1e-3)
    with pytest.raises(wb.WorkbenchError, match="exports to a"):
        result.export(tmp_path / "model.bin")


@pytest.mark.slow
def test_a_pool_wider_than_its_map_runs_on_openvino_and_keeps_int8_fidelity_on_onnxruntime():
    """Hugging Face's EfficientNet pools its last map with `AvgPool2d(1280, ceil_mode=True)`: OpenVINO refused the
    kernel larger than its input and ONNX Runtime's int8 returned zeros. Graphs now pool the whole map as a mean."""
    import copy

    from torch import nn

    from workbench.wrappers import WholeMapAvgPool, covers, whole_map_pools

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, stride=2), nn.BatchNorm2d(64), nn.SiLU(),
                          nn.AvgPool2d(1280, ceil_mode=True), nn.Flatten(), nn.Linear(64, 5)).eval()
    train = [(torch.randn(8, 3, 9, 9), None) for _ in range(4)]
    data = wb.Data(train=train, val=[(torch.randn(8, 3, 9, 9), None)], metric="fidelity")
    with torch.no_grad():
        model.train()
        [model(x) for x, _ in train]  # batch-norm statistics from the data
        model.eval()
    # the same outputs at the map sizes a window covers; a map it does not cover is pooled as before
    wrapped = whole_map_pools(copy.deepcopy(model))
    assert isinstance(wrapped[3], WholeMapAvgPool) and isinstance(model[3], nn.AvgPool2d)
    for size in (8, 17, 33):
        x = torch.randn(2, 3, size, size)
        torch.testing.assert_close(wrapped(x), model(x))
    assert covers(nn.AvgPool2d(64, ceil_mode=True), (8, 8)) and covers(nn.AvgPool2d((64,), ceil_mode=True), (8, 8))
    assert not covers(nn.AvgPool2d(8), (8, 8))  # a window that fits the map exactly: left as it is
    assert not covers(nn.AvgPool2d((5,), ceil_mode=True), (5, 7))  # 5x5 windows on a 5x7 map: two of them
    assert not covers(nn.AvgPool2d(64, ceil_mode=True, padding=1), (8, 8))
    small = whole_map_pools(nn.Sequential(nn.AvgPool2d(4)))
    x = torch.randn(2, 3, 8, 8)
    assert isinstance(small[0], WholeMapAvgPool) and small(x).shape == (2, 3, 2, 2)  # not covered: pooled as before
    torch.testing.assert_close(small(x), nn.AvgPool2d(4)(x))
    # without the rewrite: OpenVINO refused the model, ONNX Runtime's int8 scored 0.84 here
    for backend, least in (("openvino", 0.95), ("onnxruntime", 0.99)):
        if not importlib.util.find_spec(backend):
            continue
        r = wb.optimize(model, "quant=int8-static", data, backend=backend, timing=support._plan(), **QUICK)
        assert r.measurement.metric > least, (backend, r.measurement.metric)


def test_tensors_cached_by_earlier_forwards_are_dropped_for_half_precision_and_for_training():
    """LeViT keeps its attention biases per device, not per dtype: an fp16 copy found the float32 ones of the
    user's earlier forwards ('expected scalar type Float but found Half'). BEiT caches its relative-position index
    process-wide: made under inference_mode, autograd could not save it for backward, so distillation failed."""
    transformers = pytest.importorskip("transformers")
    from workbench.backends.torch_eager.lowering import to_dtype
    from workbench.tensors import drop_cached_tensors

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    levit = transformers.LevitForImageClassification(transformers.LevitConfig(
        image_size=32, num_labels=5, hidden_sizes=[32, 48], num_attention_heads=[2, 3], depths=[1, 1],
        key_dim=[8, 8], mlp_ratio=[2, 2], attention_ratio=[2, 2], down_ops=[["Subsample", 8, 2, 4, 2, 2]])).eval()
    with torch.inference_mode():
        expected = levit(x).logits  # fills the cache in float32
        got = to_dtype(levit, "fp16")(x).logits
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    beit = transformers.BeitModel(transformers.BeitConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, use_relative_position_bias=True)).eval()
    with torch.inference_mode():
        beit(x)
    drop_cached_tensors(beit)
    assert not beit.training  # modes are kept
    beit.train()
    beit(x).last_hidden_state.sum().backward()
    tables = [p for n, p in beit.named_parameters() if n.endswith("relative_position_bias_table")]
    assert tables and all(p.grad is not None for p in tables)


@pytest.mark.slow
def test_a_language_model_fed_bare_input_ids_exports_to_onnx_and_the_exporter_is_left_as_it_was():
    """transformers 5 finds packed sequences with torch.diff and a boolean cumsum when a decoder gets no attention
    mask (a language model evaluated on equal-length chunks): torch's exporter has no diff, and its cumsum gives ONNX
    Runtime a graph it refuses. int8 fell back to torch.ao, and int8-static and int4 were refused."""
    transformers = pytest.importorskip("transformers")
    from torch.onnx._internal.torchscript_exporter.registration import registry

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64)).eval()
    ids = [torch.randint(3, 96, (4, n), generator=torch.Generator().manual_seed(n)) for n in (12, 16)]
    data = wb.Data(train=[(x, None) for x in ids], val=[(x, None) for x in ids], metric="fidelity")
    for recipe, backend in (("quant=int8", "onnxruntime-int8-dynamic"), ("quant=int4", "onnxruntime-int4-weight")):
        r = wb.optimize(model, recipe, data=data, backend="onnxruntime", study=False, batch_sizes=(1,))
        assert r.backend == backend and r.measurement.metric > 0.98
    for name in ("aten::diff", "aten::cumsum"):  # the exporter's own symbolics are back (diff: none)
        group = registry.get_function_group(name)
        assert group is None or not group._functions.overridden(17)


class _DiffAndCumsum(torch.nn.Module):
    def forward(self, x, b):
        return (torch.diff(x, dim=-1, prepend=x[:, :1] - 1), torch.diff(b, dim=1), b.cumsum(-1),
                x.int().cumsum(0))


def test_diff_and_cumsum_export_to_onnx_as_torch_computes_them_at_other_shapes():
    """The translations the export adds: diff with a prepend and of booleans (xor), cumsum of booleans and int32
    (summed in int64, as torch does)."""
    import onnxruntime

    from workbench.backends.onnxruntime.export import _traced

    x, b = torch.randint(0, 5, (3, 6)), torch.rand(3, 6) > 0.5
    axes = {0: "rows", 1: "steps"}
    graph = _traced(_DiffAndCumsum(), [x, b], ["x", "b"], ["a", "c", "d", "e"], {"x": axes, "b": axes})
    x, b = torch.randint(0, 5, (2, 9)), torch.rand(2, 9) > 0.5
    got = onnxruntime.InferenceSession(graph).run(None, {"x": x.numpy(), "b": b.numpy()})
    for g, e in zip(got, _DiffAndCumsum()(x, b)):
        assert g.dtype == e.numpy().dtype and (g == e.numpy()).all()
