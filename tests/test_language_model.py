"""Causal language models: the docs-lm built-in, the key/value cache kept through export, weight-only int4/int8,
greedy generation timed, saves that reload and generate the same tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench as wb
from workbench import decoding
from workbench.errors import RecipeError, WorkbenchError

pytest.importorskip("transformers")


def _ort(model, example):
    from workbench.backends.onnxruntime.session import OrtModel

    return OrtModel.from_torch(model, example)


def test_docs_lm_is_a_trained_decoder_on_held_out_text(docs_lm_tiny):
    model, data = docs_lm_tiny
    assert type(model).__name__ == "GPT2LMHeadModel" and data.task == "language-model"
    texts = wb.zoo.docs_text()
    held = max(1, int(len(texts) * wb.zoo.DOCS_LM_HELD_OUT))
    val_text = data.tokenizer.decode(next(iter(data.val))[0]["input_ids"][0])
    assert val_text[:200] in "".join(texts[-held:]) and val_text[:200] not in "".join(texts[:-held])
    scores = data.scores(model, perplexity=True)
    vocab = model.config.vocab_size
    assert 1 < scores["perplexity"] < vocab / 2, scores  # learnt something: far better than guessing uniformly
    again, _ = wb.zoo.load("docs-lm-tiny")  # cached: the same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert wb.zoo.available("docs-lm") and "docs-lm" in wb.zoo.list()


def test_the_onnx_graph_keeps_the_cache_and_generates_what_torch_does(docs_lm_tiny):
    model, data = docs_lm_tiny
    graph = _ort(model, data.example_inputs)
    assert [p["name"] for p in graph.layout["past"]][:2] == ["past_key_values.0.key", "past_key_values.0.value"]
    ids = decoding.prompts(data, 3, 40)
    want, _, _ = decoding.greedy(model, ids, 12)
    got, first, total = decoding.greedy(graph, ids, 12)
    assert torch.equal(want, got) and want.shape == (3, 12) and first <= total
    # called like the model (no past given), it returns the model's logits
    logits = graph(**data.example_inputs)
    with torch.no_grad():
        torch.testing.assert_close(logits.logits, model(**data.example_inputs).logits, atol=1e-4, rtol=1e-3)


def test_llama_with_grouped_query_attention_exports_its_cache():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 97, (2, 9))
    graph = _ort(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert graph.layout["past"][0]["shape"] == [2, 8]  # 2 key/value heads of 8, not 4
    want, _, _ = decoding.greedy(model, ids, 10)
    got, _, _ = decoding.greedy(graph, ids, 10)
    assert torch.equal(want, got)


def test_what_cannot_generate_says_why(digits_mlp, docs_lm_tiny):
    from workbench.backends.onnxruntime.session import OrtModel

    with pytest.raises(WorkbenchError, match="does not generate here"):
        decoding.steps_for(digits_mlp[0])
    model, data = docs_lm_tiny
    from workbench.backends.onnxruntime.export import export_onnx

    plain = OrtModel(*export_onnx(model, data.example_inputs))
    with pytest.raises(WorkbenchError, match="exported without the key/value cache"):
        decoding.steps_for(plain)


def test_gemm_rewritten_as_matmul_computes_the_same():
    import onnx
    import onnxruntime as ort

    from workbench.backends.onnxruntime.quantize import gemms_as_matmuls

    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4, bias=False)).eval()
    graph = _ort(model, torch.randn(3, 16))
    proto = onnx.load_from_string(graph.onnx_bytes)
    assert "Gemm" in {n.op_type for n in proto.graph.node}
    rewritten = gemms_as_matmuls(proto)
    assert "Gemm" not in {n.op_type for n in rewritten.graph.node}
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    before = ort.InferenceSession(graph.onnx_bytes).run(None, {"input": x})[0]
    after = ort.InferenceSession(rewritten.SerializeToString()).run(None, {"input": x})[0]
    np.testing.assert_allclose(before, after, rtol=1e-5, atol=1e-6)


def test_weight_only_spellings():
    from workbench.techniques.quantize import Quantize

    step = Quantize("int8-weight")
    assert (step.dtype, step.method, step.precisions(), step.reads_train) == ("int8", "weight", ("int8-weight",),
                                                                              False)
    four = Quantize("int4", group_size=64)
    assert four.precisions() == ("int4-weight",) and not four.reads_train
    with pytest.raises(RecipeError):
        Quantize("int4", method="static")
    with pytest.raises(RecipeError):
        wb.Recipe.parse("quant=int4:group_size=48")


@pytest.fixture(scope="module")
def int4_result(docs_lm_tiny):
    model, data = docs_lm_tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = wb.optimize(model, "quant=int4", data=data, study=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model untouched
    return r


@pytest.mark.slow
def test_int4_on_docs_lm_prints_perplexity_and_generation_and_reloads(docs_lm_tiny, int4_result, tmp_path):
    import onnx

    model, data = docs_lm_tiny
    r = int4_result
    ops = {n.op_type for n in onnx.load_from_string(r.model.onnx_bytes).graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "Gemm" not in ops
    assert r.measurement.size_bytes < 0.5 * r.baseline.size_bytes
    assert abs(r.measurement.perplexity / r.baseline.perplexity - 1) < 0.05
    g, b = r.measurement.generation, r.baseline.generation
    assert {(s.batch, s.prompt) for s in g.settings} == {(1, 32), (1, 256), (8, 32), (8, 256)}
    assert all(s.ratio is not None and s.ratio[1] <= s.ratio[0] <= s.ratio[2] for s in g.settings)
    assert b.same_tokens is None and 0 <= g.same_tokens <= 1 and g.prompts_compared == 16
    assert g.same_tokens * 64 <= g.same_prefix <= 64  # prompts agreeing in full count 64 leading tokens
    text = repr(r)
    assert "perplexity" in text and "tokens/s" in text and "first token" in text
    from workbench.notebook.card import Card

    assert "generation: greedy, 64 new tokens" in repr(Card(r)) and "tokens/s ratio" in Card(r)._repr_html_()
    saved = r.save(tmp_path / "int4")
    loaded = wb.load(saved)
    ids = decoding.prompts(data, 4, 32)
    want, _, _ = decoding.greedy(r.model, ids, 16)
    got, _, _ = decoding.greedy(loaded, ids, 16)
    assert torch.equal(want, got)
    row = r.measurement.to_row()  # what a Study keeps
    assert wb.measure.Measurement.from_row(row).generation.settings[0].ratio == g.settings[0].ratio


@pytest.mark.slow
def test_compare_times_generation_of_language_models(docs_lm_tiny, int4_result, digits_mlp):
    from workbench.tables import display_table

    model, data = docs_lm_tiny
    table = wb.compare({"fp32": model, "int4": int4_result}, data=data, batch_sizes=(1,), study=False)
    where = "(b=1, p=32)"
    assert table.loc["fp32", f"tokens/s × {where}"] == 1.0 and table.loc["fp32", "same greedy tokens"] == 1.0
    low, ratio, high = (table.loc["int4", f"tokens/s × {c}{where}"] for c in ("low ", "", "high "))
    assert 0 < low <= ratio <= high and table.loc["int4", f"tokens/s {where}"] > 0
    assert 0 <= table.loc["int4", "same greedy tokens"] <= 1
    shown = display_table(table)
    assert shown.loc["fp32", f"tokens/s × {where}"] == "1x" and "x (" in shown.loc["int4", f"tokens/s × {where}"]
    plain = wb.compare({"mlp": digits_mlp[0]}, data=digits_mlp[1], batch_sizes=(1,), study=False)
    assert not [c for c in plain.columns if c.startswith("tokens/s")]  # only language models generate


@pytest.mark.slow
def test_int8_weight_only_and_pruning_of_a_decoder_generate(docs_lm_tiny):
    model, data = docs_lm_tiny
    r = wb.optimize(model, "quant=int8-weight", data=data, study=False)
    assert r.model.label == "int8-weight" and r.measurement.generation.settings
    assert r.measurement.perplexity is not None
    pruned = wb.optimize(model, "prune=0.25:structured=true", data=data, study=False)
    assert pruned.measurement.generation.settings  # a torch decoder with fewer heads and neurons still generates


def test_generation_is_skipped_with_the_reason_where_it_cannot_run(digits_mlp):
    from workbench.target import resolve

    model, data = digits_mlp
    runs = decoding.generation({"a": model}, data, resolve(device="cpu"), repeats=1)
    assert "does not generate here" in runs["a"].skipped
    assert runs["a"].lines() == [f"generation not timed: {runs['a'].skipped}"]


def test_a_shallower_distilled_decoder_generates_with_a_cache_of_its_depth(docs_lm_tiny):
    from workbench.techniques.distill import build_student

    model, data = docs_lm_tiny
    student = build_student("depth=0.5", model)
    assert len(student.transformer.h) == 1 and student.config.num_hidden_layers == 1
    assert len(model.transformer.h) == 2 and model.config.num_hidden_layers == 2  # the teacher untouched
    graph = _ort(student, data.example_inputs)
    assert len(graph.layout["past"]) == 2  # one layer's key and value
    ids = decoding.prompts(data, 2, 32)
    assert torch.equal(decoding.greedy(student, ids, 8)[0], decoding.greedy(graph, ids, 8)[0])


def test_generation_refuses_settings_it_cannot_time_in_one_line(docs_lm_tiny):
    from workbench.target import resolve

    model, data = docs_lm_tiny
    for bad in ({"new_tokens": 1}, {"repeats": 0}):
        with pytest.raises(WorkbenchError, match="generation timing needs new_tokens >= 2"):
            decoding.generation({"a": model}, data, resolve(device="cpu"), **bad)
    with pytest.raises(WorkbenchError, match="too few rows that long"):
        decoding.greedy(model, decoding.prompts(data, 1, 10_000), 4)
    runs = decoding.generation({"a": model}, data, resolve(device="cpu"), batches=(1,), lengths=(16, 10_000),
                               new_tokens=3, repeats=1)
    lines = runs["a"].lines()
    assert [s.prompt for s in runs["a"].settings] == [16] and "fewer than 1 rows of 10000" in runs["a"].skipped
    assert lines[0].startswith("b1 p16: first token") and lines[-1].startswith("some settings not timed")


def test_a_decoder_graph_without_its_sidecar_still_generates(docs_lm_tiny, tmp_path):
    from workbench.backends.onnxruntime.session import OrtModel

    model, data = docs_lm_tiny
    graph = _ort(model, data.example_inputs)
    path = graph.save(tmp_path / "model.onnx")
    path.with_suffix(".json").unlink()  # a graph from elsewhere: only the .onnx file
    loaded = OrtModel.load(path)
    assert loaded.layout["past"] == graph.layout["past"]
    ids = decoding.prompts(data, 2, 20)
    assert torch.equal(decoding.greedy(graph, ids, 6)[0], decoding.greedy(loaded, ids, 6)[0])
    # called like the model, it returns the logits (its first output: the sidecar's output structure is gone)
    torch.testing.assert_close(loaded(**data.example_inputs), graph(**data.example_inputs).logits)


@pytest.mark.slow
def test_card_and_report_say_why_generation_was_not_timed(int4_result):
    import copy

    from workbench.measure.measurement import GenerationRun
    from workbench.notebook.card import Card

    r = int4_result
    skipped = copy.copy(r)
    skipped.measurement = copy.copy(r.measurement)
    skipped.measurement.generation = GenerationRun(skipped="generation is timed on the CPU here")
    assert "generation not timed: generation is timed on the CPU here" in repr(Card(skipped))
    assert "generation not timed" in Card(skipped)._repr_html_()
    assert "generating" not in skipped.verdict  # nothing timed, nothing claimed
    from workbench.measure.measurement import Stability
    from workbench.verdict import judge

    busy = copy.copy(r.measurement)
    busy.stability = Stability(False, ("the machine was busy while timing",))
    text = judge(r.baseline, busy, max_drop=1).text  # timed while busy: neither forward pass nor generation judged
    assert text.startswith("timing unstable") and "generating" not in text and "no verdict on it either" in text
    from IPython.utils.capture import capture_output

    import pandas as pd

    with capture_output() as out, pd.option_context("display.max_columns", None, "display.width", 1000,
                                                    "display.max_colwidth", 200):
        wb.reports.generation([r, skipped])
    shown = out.stdout + "".join(str(o.data.get("text/plain", "")) for o in out.outputs)  # no kernel: stdout
    assert "timed" in shown and "generation not timed: generation is timed on the CPU here" in shown
