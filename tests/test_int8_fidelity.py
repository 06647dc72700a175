"""Accuracy-preserving int8 (techniques/smoothing.py): smoothing is exact in float and recovers what outlier
channels cost, mixed precision keeps the layer that stands out, bias correction takes back the mean shift, and a
kept layer no longer costs a BERT its ONNX Runtime fusions."""
import copy

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.techniques import smoothing

from .helpers import int8_weight_bits


def outlier_mlp():
    """A 3-layer MLP fed inputs with two channels 100x the others (as transformers' activations have), and fidelity
    data (train and val differ)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 16)).eval()

    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(4):
            x = torch.randn(32, 64, generator=g)
            x[:, :2] *= 100
            with torch.no_grad():
                out.append((x, model(x)))
        return out

    return model, wb.Data(train=batches(1), val=batches(2), metric="fidelity", name="outliers")


def test_smoothing_is_exact_in_float_on_a_bert_and_its_packed_form():
    pytest.importorskip("transformers")
    from tests.test_unpad import encoder_and_data
    from workbench.techniques.packed_bert import PackedBert

    model, data = encoder_and_data()
    packed = type(model)(PackedBert(model.encoder)).eval()
    inputs = [x for x, _ in data.train_batches()]
    for original in (model, packed):
        smoothed, plan = smoothing.prepare(copy.deepcopy(original), inputs, 0.85, False, 0)
        assert plan.folded and plan.smoothed and plan.keep == []
        with torch.no_grad():
            for x in inputs:
                torch.testing.assert_close(smoothed(**x), original(**x), atol=2e-5, rtol=1e-4)
    # unpad's fast path lays the smoothed packed encoder back out dense (Q/K/V unsmoothed, as BERT leaves them)
    from workbench.techniques.packed_bert import dense_twin
    from workbench.techniques.smoothing import SmoothedLinear

    assert isinstance(smoothed.encoder.layers[0].qkv, SmoothedLinear)
    twin, _ = dense_twin(smoothed)
    assert type(twin.encoder.encoder.layer[0].attention.self.query) is torch.nn.Linear
    full = {k: v[:, :5] for k, v in inputs[0].items() if k != "attention_mask"}
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(twin(**full), smoothed(**full), atol=2e-5, rtol=1e-4)
    assert not any(n.endswith(("query", "key", "value")) for n in smoothing.prepare(
        copy.deepcopy(model), inputs, 0.85, False, 0)[1].smoothed)  # left to the Attention fusion
    assert all(p.grad is None for p in model.parameters())


def test_smoothing_folds_into_values_only_where_the_output_projection_reads_nothing_else():
    """ConvBERT's attention output projection reads its convolution heads' features after the values': the scale
    cannot fold into the value rows (it raised a shape error), so that layer is smoothed in front; still exact."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    model = transformers.ConvBertModel(transformers.ConvBertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        embedding_size=32, head_ratio=2, conv_kernel_size=3)).eval()
    inputs = [{"input_ids": torch.randint(3, 96, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}]
    smoothed, plan = smoothing.prepare(copy.deepcopy(model), inputs, 0.85, False, 0)
    assert "encoder.layer.0.attention.output.dense" in plan.smoothed and not plan.folded
    with torch.no_grad():
        torch.testing.assert_close(smoothed(**inputs[0]).last_hidden_state, model(**inputs[0]).last_hidden_state,
                                   atol=2e-5, rtol=1e-4)


def test_smoothing_recovers_the_fidelity_outlier_channels_cost():
    model, data = outlier_mlp()
    plain = wb.optimize(model, "quant=int8:smooth=none:keep=0", data=data, study=False, batch_sizes=(1,))
    smooth = wb.optimize(model, "quant=int8:keep=0", data=data, study=False, batch_sizes=(1,))
    assert any("SmoothQuant" in n for n in smooth.notes)
    assert not any("SmoothQuant" in n for n in plain.notes)
    x = data.example_inputs  # the user's model is untouched
    assert type(model[0]) is nn.Linear and torch.equal(model(x), outlier_mlp()[0](x))
    lost = (1 - smooth.measurement.metric, 1 - plain.measurement.metric)
    bits, faithful = int8_weight_bits()
    if not faithful:
        pytest.skip("8-bit int8 weights forced on a CPU without VNNI saturate its kernels: no fidelity figure holds")
    # measured: with VNNI's 8-bit weights 0.00046 against 0.0017; with AVX2's 7-bit weights (an AMD EPYC) 0.0012
    # against 0.0019, as the outliers moved into the weights meet a grid half as fine
    assert lost[0] * (3 if bits == 8 else 1.25) < lost[1], lost


def test_mixed_precision_keeps_the_layer_whose_int8_costs_most():
    model, data = outlier_mlp()
    wide = nn.Sequential(*model, nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)).eval()
    data = wb.Data(train=[(x, wide(x).detach()) for x, _ in data.train_batches()],
                   val=[(x, wide(x).detach()) for x, _ in data.val_batches()], metric="fidelity")
    result = wb.optimize(wide, "quant=int8:smooth=none", data=data, study=False, batch_sizes=(1,))
    assert any("mixed precision: 1 Linear layer stays in float" in n and "'0'" not in n and "(0)" in n
               for n in result.notes), result.notes  # the one fed the outlier channels
    import onnx

    graph = onnx.load_from_string(result.model.onnx_bytes).graph
    assert [n.op_type for n in graph.node if n.name.startswith("/model/model.0/")] == ["MatMul", "Add"]  # float
    assert result.measurement.metric > wb.optimize(wide, "quant=int8:smooth=none:keep=0", data=data, study=False,
                                                   batch_sizes=(1,)).measurement.metric
    assert smoothing.choose_keep({"a": 1.0, "b": 0.01, "c": 0.012, "d": 0.011}) == ["a"]
    assert smoothing.choose_keep({"a": 0.011, "b": 0.01, "c": 0.012, "d": 0.011}) == []  # nothing stands out


def test_bias_correction_takes_back_the_mean_shift():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    x = torch.randn(256, 64) + 3.0  # inputs with a large mean, where int8 weights shift outputs most
    model = nn.Sequential(layer).eval()
    want = layer(x).detach()
    shifted = nn.functional.linear(x, smoothing.fake_int8_weight(layer.weight.detach()), layer.bias).detach()
    stats = smoothing.collect(model, [x], ["0"])
    assert smoothing.correct_bias(model, stats) == 1
    fixed = nn.functional.linear(x, smoothing.fake_int8_weight(layer.weight.detach()), layer.bias).detach()
    before, after = (shifted - want).mean(0).abs().mean(), (fixed - want).mean(0).abs().mean()
    assert after < before / 10, (before, after)


def test_int8_without_a_train_split_says_why_it_is_not_smoothed():
    model, data = outlier_mlp()
    bare = wb.Data(val=list(data.val_batches()), metric="fidelity")
    result = wb.optimize(model, "quant=int8", data=bare, study=False, batch_sizes=(1,))
    assert any("no train split" in n for n in result.notes)


def test_a_kept_layer_outside_attention_keeps_the_bert_fusions():
    pytest.importorskip("transformers")
    import onnx

    from tests.test_unpad import encoder_and_data

    model, data = encoder_and_data()
    result = wb.optimize(model, "quant=int8:exclude=encoder.encoder.layer.0.output.dense", data=data, study=False,
                         batch_sizes=(1,))
    nodes = onnx.load_from_string(result.model.onnx_bytes).graph.node
    assert "QAttention" in {n.op_type for n in nodes}
    kept = [n.op_type for n in nodes if "layer.0/output/dense" in n.name]
    assert "MatMul" in kept and "MatMulInteger" not in kept and "DynamicQuantizeMatMul" not in kept, kept


@pytest.mark.parametrize("cpu, bits", [("vnni", 8), ("avx2", 7)])
def test_smoothing_and_sensitivity_follow_the_cpus_weight_bits(cpu, bits, monkeypatch):
    """Without VNNI int8 weights keep 7 bits (reduce_range): the sensitivity that picks kept layers rounds to the
    same grid, and smoothing still pays on either path."""
    monkeypatch.setenv("WORKBENCH_CPU", cpu)
    seen = []
    real = smoothing.prepare
    monkeypatch.setattr(smoothing, "prepare", lambda *a, **k: seen.append(a[-1]) or real(*a, **k))
    model, data = outlier_mlp()
    plain = wb.optimize(model, "quant=int8:smooth=none:keep=0", data=data, study=False, batch_sizes=(1,))
    smooth = wb.optimize(model, "quant=int8:keep=0", data=data, study=False, batch_sizes=(1,))
    assert seen == [bits]  # only the run that smooths calibrates
    if int8_weight_bits()[1]:  # not 8-bit weights forced where the kernels saturate them
        assert 1 - smooth.measurement.metric < 1 - plain.measurement.metric
