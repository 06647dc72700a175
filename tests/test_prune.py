"""Pruning: unstructured (compressible) and structured (smaller and faster), schedules, sensitivity, reload."""
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.storage import load_sparse_state
from workbench.architectures import prunable_layers

from .helpers import FAST, state_bytes



def sparsity_of(module):
    return float((module.weight == 0).float().mean())


def test_unstructured_80_global_on_mlp(digits_mlp, tmp_path):
    model, data = digits_mlp
    before = state_bytes(model)
    r = wb.optimize(model, "prune=0.8,finetune=2", data=data, **FAST)
    state = r.model.state_dict()
    assert not any(k.endswith(("weight_orig", "weight_mask")) for k in state)  # made permanent
    layers = prunable_layers(r.model)
    pruned = [m for n, m in layers.items() if n != "5"]
    zeros = sum(int((m.weight == 0).sum()) for m in pruned) / sum(m.weight.numel() for m in pruned)
    assert zeros == pytest.approx(0.8, abs=0.01)  # fine-tuning kept the zeros at zero
    assert sparsity_of(layers["5"]) == 0  # the classifier head is left alone by default
    assert r.layers.loc["5", "sparsity"] == 0 and r.layers.loc["1", "sparsity"] > 0.5  # reported per layer
    assert r.measurement.metric >= r.baseline.metric - 0.01
    assert r.measurement.sparse_size_bytes <= 0.35 * r.baseline.size_bytes
    assert r.measurement.size_bytes == r.baseline.size_bytes  # dense storage does not shrink
    assert any("expect no speedup" in n for n in r.notes)
    assert "sparse size ×" in r.table().columns
    path = r.save(tmp_path / "sparse")
    dense_file = tmp_path / "dense.pt"
    torch.save(r.model.state_dict(), dense_file)
    assert (path / "weights.sparse.pt").stat().st_size <= 0.35 * dense_file.stat().st_size
    restored = load_sparse_state(path / "weights.sparse.pt")
    assert all(torch.equal(restored[k], v) for k, v in state.items())
    assert state_bytes(model) == before


@pytest.mark.parametrize("criterion", ["l1", "taylor"])
def test_unstructured_per_layer(digits_mlp, criterion):
    model, data = digits_mlp
    r = wb.optimize(model, wb.Prune(0.5, scope="layer", criterion=criterion), data=data, **FAST)
    for name, m in prunable_layers(r.model).items():
        assert sparsity_of(m) == pytest.approx(0 if name == "5" else 0.5, abs=0.01)


def test_structured_cnn_is_physically_smaller_and_recovers(digits_cnn, tmp_path):
    model, data = digits_cnn
    r = wb.optimize(model, [wb.Prune(0.5, structured=True, scope="layer"), wb.FineTune(2)], data=data, **FAST)
    convs = [m for m in r.model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 32]
    assert r.measurement.macs <= 0.35 * r.baseline.macs
    assert r.measurement.params < 0.6 * r.baseline.params
    assert r.measurement.size_bytes < 0.6 * r.baseline.size_bytes
    assert r.measurement.metric >= r.baseline.metric - 0.015
    assert r.model[-1].out_features == 10  # output head kept
    again = wb.load(r.save(tmp_path / "small"))  # a torch.export program: no user code, no pickle
    x = data.inputs(7)
    with torch.inference_mode():
        assert torch.allclose(again(x), r.model(x), atol=1e-5)


@pytest.mark.slow  # in the slow set so that the fast subset stays under 2 minutes
def test_structured_then_int8_composes(digits_cnn):
    model, data = digits_cnn
    r = wb.optimize(model, "prune=0.5:structured=true:scope=layer,finetune=1,quant=int8", data=data, **FAST)
    assert r.backend == "onnxruntime-int8-static-qdq"
    assert r.measurement.macs <= 0.35 * r.baseline.macs  # counted on the pruned float graph
    assert r.measurement.size_bytes < 0.1 * r.baseline.size_bytes
    assert r.measurement.metric >= r.baseline.metric - 0.03


class Residual(nn.Module):
    """A small ResNet-style net with a depthwise (grouped) conv: coupled channels that must stay consistent."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(h + self.block(h)))


def test_structured_keeps_residual_and_grouped_convs_consistent(digits_cnn):
    _, data = digits_cnn
    model = Residual()
    r = wb.optimize(model, wb.Prune(0.5, structured=True, scope="layer"), data=data, **FAST)
    stem, depthwise, pointwise = r.model.stem[0], r.model.block[0], r.model.block[3]
    assert stem.out_channels == depthwise.in_channels == depthwise.groups == pointwise.out_channels == 8
    assert r.model(data.inputs(3)).shape == (3, 10)
    assert r.measurement.macs < 0.5 * r.baseline.macs


def test_minilm_heads_and_ffn_pruned_hidden_size_kept(minilm):
    model, data = minilm
    r = wb.optimize(model, wb.Prune(0.3, structured=True), data=data, **FAST)
    layer = r.model.encoder.encoder.layer[0]
    assert layer.attention.self.num_attention_heads < 12
    assert layer.attention.self.query.out_features == 32 * layer.attention.self.num_attention_heads
    assert layer.intermediate.dense.out_features < 1536
    assert r.model.encoder.pooler.dense.out_features == 384  # hidden size kept: the pooler still fits
    out = r.model(**data.inputs(2))
    assert out.shape == (2, 384)
    assert r.measurement.macs < 0.8 * r.baseline.macs
    assert r.measurement.size_bytes < r.baseline.size_bytes
    assert 0 < r.measurement.metric < 1  # fidelity before recovery, reported


@pytest.mark.slow
def test_iterative_schedule_prunes_in_rounds_with_recovery(digits_cnn):
    model, data = digits_cnn
    seen = []
    r = wb.optimize(model, [wb.Prune(0.5, structured=True, scope="layer", schedule="iterative:3"), wb.FineTune(1)],
                    data=data, progress=lambda m, f: seen.append(m), **FAST)
    assert [m for m in seen if m.startswith("pruning round")] == [
        "pruning round 1/3: 17% of channels", "pruning round 2/3: 33% of channels", "pruning round 3/3: 50% of channels"]
    assert any(m.startswith("recovery after pruning round 2/3") for m in seen)
    assert [c.out_channels for c in r.model.modules() if isinstance(c, nn.Conv2d)] == [16, 32, 32]
    assert r.measurement.metric >= r.baseline.metric - 0.02


def test_schedules():
    assert wb.Prune(0.6, schedule="iterative:3").ratios() == pytest.approx([0.2, 0.4, 0.6])
    cubic = wb.Prune(0.8, schedule="cubic:4").ratios()
    assert cubic[-1] == pytest.approx(0.8) and cubic[0] > 0.8 / 4  # prunes fast first, then slowly
    assert wb.Prune(0.5).ratios() == [0.5]


@pytest.mark.slow
def test_sensitivity_table(digits_cnn):
    model, data = digits_cnn
    before = state_bytes(model)
    df = wb.sensitivity(model, data, technique="prune", levels=[0.25, 0.75])
    assert list(df.columns) == ["layer", "type", "level", "metric", "delta", "params", "macs_share", "head"]
    assert len(df) == 2 * len(prunable_layers(model))
    by_level = df.groupby("level")["delta"].mean()
    assert by_level[0.75] < by_level[0.25] <= 0.01  # pruning more hurts more
    assert df.groupby("layer")["macs_share"].first().sum() == pytest.approx(1.0, abs=0.01)
    quant = wb.sensitivity(model, data, technique="quant")
    assert set(quant["level"]) == {"int8"} and (quant["delta"].abs() < 0.05).all()
    assert state_bytes(model) == before


def test_per_layer_ratios_from_sensitivity(digits_mlp):
    model, data = digits_mlp
    r = wb.optimize(model, wb.Prune(0.85, per_layer="sensitivity"), data=data, **FAST)
    note = next(n for n in r.notes if n.startswith("per-layer ratios from sensitivity"))
    ratios = [float(p.split()[-1].rstrip("%")) / 100 for p in note.split(": ", 1)[1].split(", ")]
    assert sum(ratios) / len(ratios) == pytest.approx(0.85, abs=0.01)
    assert ratios[0] > ratios[1]  # layer 1 loses nothing at 85% alone, layer 3 loses 1.7 points: prune it less


class Scaled(nn.Module):
    """Has its own weight used in a way Torch-Pruning cannot follow (a matrix product with a raw Parameter)."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(32, 32))

    def forward(self, x):
        return x @ self.mix


def test_structured_on_an_unsupported_layer_names_it_and_the_way_out(digits_mlp):
    _, data = digits_mlp
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), Scaled(), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(wb.WorkbenchError, match=r"layer '2' \(Scaled\).*ignore=\('2',\)"):
        wb.optimize(model, wb.Prune(0.5, structured=True), data=data, **FAST)


class KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, *, pixels):
        return self.fc2(torch.relu(self.fc1(pixels.flatten(1))))


def test_structured_on_a_model_with_keyword_inputs(digits_mlp):
    _, data = digits_mlp
    kw = wb.Data(val=[({"pixels": x}, y) for x, y in data.val], metric="accuracy")
    r = wb.optimize(KeywordOnly(), wb.Prune(0.5, structured=True), data=kw, **FAST)
    assert r.model.fc1.out_features == 32 and r.model(pixels=data.inputs(2)).shape == (2, 10)


def test_pruning_an_onnxruntime_model_is_refused(digits_mlp):
    model, data = digits_mlp
    seen = []
    with pytest.raises(wb.WorkbenchError, match="prune=0.5 comes after quant=int8, which lowers the model .*; "
                                                "put prune before it"):
        wb.optimize(model, "quant=int8,prune=0.5", data=data, progress=lambda m, f: seen.append(m), **FAST)
    assert seen == []  # refused before any work


def test_semi_structured_keeps_2_of_every_4_through_fine_tuning_and_says_where_it_pays(digits_mlp):
    from workbench.techniques.prune import is_two_four

    model, data = digits_mlp
    before = state_bytes(model)
    r = wb.optimize(model, "prune:semi_structured=true:criterion=taylor,finetune=1", data=data, device="cpu", **FAST)
    layers = prunable_layers(r.model)
    for name in ("1", "3"):  # every 4 consecutive weights of a row keep 2, the fine-tuning after it too
        w = layers[name].weight
        assert is_two_four(w) and float((w == 0).float().mean()) == 0.5
    assert sparsity_of(layers["5"]) == 0 and r.details["semi_structured"] == ["1", "3"]  # the head is left alone
    assert r.measurement.metric >= r.baseline.metric - 0.03
    assert any("2:4 semi-structured: 2 Linear layers keep 2 of every 4" in n and "no faster" in n for n in r.notes)
    assert any("runs no faster on a CPU" in p for p in r.preflight)
    assert state_bytes(model) == before
    assert not is_two_four(torch.ones(2, 8)) and is_two_four(torch.tensor([[1.0, 0, 0, 2, 0, 3, 4, 0]]))
    for spec, why in (("prune=0.3:semi_structured=true", "drop sparsity=0.3"),
                      ("prune:semi_structured=true:structured=true", "drop structured=true")):
        with pytest.raises(wb.WorkbenchError, match=why):
            wb.optimize(model, spec, data=data, device="cpu", **FAST)


def test_two_four_weights_stay_dense_with_the_reason_where_the_sparse_kernels_refuse(monkeypatch):
    """On a GPU the fp16/bf16 lowering moves 2:4 Linear weights to sparse tensor cores; where the kernels refuse a
    layer (here: CPU tensors, as a GPU refuses shapes off its tiles) the model stays dense and the card says why."""
    from workbench.backends.torch_eager.lowering import densified, sparse_two_four, two_four_layers
    from workbench.engine import Context
    from workbench.target import Target

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([1.0, 1, 0, 0] * 2))
    assert list(two_four_layers(model)) == ["0"]
    ctx = Context(data=None, original=model, target=Target("cuda"), facts=None)
    assert sparse_two_four(model, ctx, torch.randn(2, 8)) is model and type(model[0].weight) is nn.Parameter
    assert "the sparse kernels take none of the 1 2:4 layers (0: " in ctx.notes[0] and "stay dense" in ctx.notes[0]
    assert densified(model) is model  # nothing sparse: saved as it is


_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_FAMILIES = {  # (model class, config class, config, input): attention layouts beyond the support matrix's rows
    "clip": ("CLIPVisionModel", "CLIPVisionConfig", dict(_TINY, image_size=32, patch_size=8), "pixels"),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32), "ids"),
    "phi": ("PhiForCausalLM", "PhiConfig", dict(_TINY, vocab_size=96), "ids"),
    "deberta-v2": ("DebertaV2Model", "DebertaV2Config", dict(_TINY, vocab_size=96, relative_attention=True,
                                                             position_buckets=16, pos_att_type=["p2c", "c2p"]),
                   "ids"),
    "mobilevit": ("MobileViTModel", "MobileViTConfig", dict(image_size=32, hidden_sizes=[32, 40, 48],
                                                           neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64]), "pixels"),
    "segformer": ("SegformerModel", "SegformerConfig",  # a depthwise convolution between its FFN's two layers
                  dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                       patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[2, 2], mlp_ratios=[2, 2]),
                  "pixels"),
}


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_head_pruning_of_each_attention_layout_removes_exactly_the_heads_it_drops(family):
    """With the heads and feed-forward neurons that pruning will drop made silent (their projections' rows and the
    output's columns zero, so they score lowest), the pruned model computes what the original does: nothing else was cut, and every
    count the forward reads (heads, head size, DeBERTa's relative-position projections) followed."""
    transformers = pytest.importorskip("transformers")
    import copy

    from workbench.architectures import attention_blocks, feed_forward_blocks
    from workbench.techniques.heads import prune_transformer

    cls, config, kwargs, kind = _FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config)(**kwargs)).eval()
    blocks = attention_blocks(model)
    assert blocks, f"{family}: no attention block recognised"
    with torch.no_grad():
        for b in blocks:
            d, silent = b.head_dim, range(b.heads // 2)  # the first half of the heads (key/value groups: none)
            rows = [i for h in silent for i in range(h * d, (h + 1) * d)]
            for layer in (b.q, b.k, b.v, *(m for m, _ in b.alongside)):
                layer.weight[rows] = 0
                layer.bias[rows] = 0
            b.o.weight[:, rows] = 0
        for f in feed_forward_blocks(model):  # and half the feed-forward neurons, which it prunes too
            rows = range(f.down.in_features // 2)
            for up in f.ups:
                up.weight[rows] = 0
                up.bias[rows] = 0
            f.down.weight[:, rows] = 0
    x = torch.randint(3, 96, (2, 12)) if kind == "ids" else torch.randn(2, 3, 32, 32)
    pruned = copy.deepcopy(model)
    counts = prune_transformer(pruned, 0.5, "l1", set())
    assert counts["heads"] == (sum(b.heads for b in blocks), sum(b.heads // 2 for b in blocks))
    with torch.no_grad():
        expected, got = model(x)[0], pruned(x)[0]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


_CAUSAL = dict(_TINY, vocab_size=96, max_position_embeddings=64)
_FUSED = {  # fused query/key/value (and gate/up) projections: model class, config class, config
    "modernbert": ("ModernBertModel", "ModernBertConfig", dict(_TINY, vocab_size=96, pad_token_id=0, bos_token_id=1,
                                                               eos_token_id=2, cls_token_id=1, sep_token_id=2)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(_CAUSAL, num_key_value_heads=2, pad_token_id=0)),
    "gpt-neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", _CAUSAL),
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(_TINY, vocab_size=96, new_decoder_architecture=True,
                                                         num_kv_heads=2)),
    # not fused, but per-head weights beside the projections: a logit scale and a position-bias MLP's output
    "swinv2": ("Swinv2Model", "Swinv2Config", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                   num_heads=[2, 4], window_size=4)),
}


@pytest.mark.parametrize("family", list(_FUSED))
def test_fused_projections_lose_whole_heads_and_neurons_and_compute_what_the_silenced_model_did(family):
    """Fused QKV in both layouts (all queries, then keys, then values: Phi-3, ModernBERT; per key/value group:
    GPT-NeoX, Falcon), fused gate/up FFNs and Swin V2's per-head weights: half the key/value groups and neurons
    go, and the cut model computes exactly what the model computed with their outputs zeroed (`before_cut`)."""
    transformers = pytest.importorskip("transformers")
    import copy

    from workbench.architectures import attention_blocks, feed_forward_blocks
    from workbench.techniques.heads import prune_transformer

    cls, config, kwargs = _FUSED[family]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config)(**kwargs)).eval()
    blocks, ffn = attention_blocks(model), feed_forward_blocks(model)
    assert blocks and all((b.k is None) == (family != "swinv2") for b in blocks) and len(ffn) == len(blocks)
    x = torch.randn(2, 3, 32, 32) if family == "swinv2" else torch.randint(3, 96, (2, 12))
    pruned, silenced = copy.deepcopy(model), []
    with torch.no_grad():
        counts = prune_transformer(pruned, 0.5, "l1", set(),
                                   before_cut=lambda: silenced.append(pruned(x)[0].clone()))
        got, original = pruned(x)[0], model(x)[0]
    groups = sum(b.kv_heads for b in blocks)
    assert counts["heads"][1] == counts["heads"][0] * (groups - groups // 2) // groups
    assert counts["neurons"] == (sum(f.down.in_features for f in ffn), sum(f.down.in_features // 2 for f in ffn))
    torch.testing.assert_close(got, silenced[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, original, atol=1e-3)  # something was cut


def test_a_layout_read_wrongly_is_caught_by_comparing_with_the_silenced_model(monkeypatch):
    """GPT-NeoX's fused QKV read as [queries | keys | values] (it is per head [q, k, v]): the shapes still fit, so
    only the check against the silenced model sees that other heads' rows were kept; the heads stay, the round's
    cut is put back whole, and the FFN neurons are pruned alone."""
    transformers = pytest.importorskip("transformers")
    from workbench import architectures

    monkeypatch.setitem(architectures.FUSED, "query_key_value", "blocks")
    torch.manual_seed(0)
    model = transformers.GPTNeoXModel(transformers.GPTNeoXConfig(**_CAUSAL)).eval()
    data = wb.Data(val=[({"input_ids": torch.randint(3, 96, (4, 12))}, None)], metric="fidelity")
    r = wb.optimize(model, "prune=0.5:structured=true", data=data, **FAST)
    assert "no longer computes what it did with the removed heads" in r.details["structured"]["attention_left_whole"]
    assert r.details["structured"]["heads"] == (8, 8)
    assert all(layer.attention.query_key_value.out_features == 96 for layer in r.model.layers)
    assert r.measurement.metric > 0.9  # the FFN-only cut of a random model, not a scrambled attention


def test_taylor_importance_ranks_heads_and_neurons_by_their_gradients():
    """Weights of equal magnitude, gradients that single out the last head and the last neuron: the Taylor
    criterion keeps those (it had ranked by magnitude alone wherever a weight was sliced or transposed)."""
    transformers = pytest.importorskip("transformers")
    from workbench.architectures import attention_blocks, feed_forward_blocks
    from workbench.techniques.heads import plan_heads, plan_neurons

    model = transformers.BertModel(transformers.BertConfig(**_TINY, vocab_size=96))
    block, ffn = attention_blocks(model)[0], feed_forward_blocks(model)[0]
    for layer in (block.q, block.k, block.v, block.o, *ffn.ups, ffn.down):
        with torch.no_grad():
            layer.weight.fill_(1.0)
        layer.weight.grad = torch.full_like(layer.weight, 1e-3)
    block.o.weight.grad[:, -block.head_dim:] = 1.0  # the last head's output columns
    ffn.down.weight.grad[:, -1] = 1.0  # the last neuron's
    assert plan_heads(block, 0.75, "taylor") == [block.heads - 1]
    assert plan_neurons(ffn, 0.5, "taylor")[-1] == ffn.down.in_features - 1


def test_a_deadline_stops_a_python_loop_that_never_ends_even_one_that_swallows_it_once():
    import time

    from workbench.scoped import DeadlineExceeded, deadline

    swallowed = 0
    with pytest.raises(DeadlineExceeded, match="still running after 0.2 s"):
        with deadline(0.2, again_every=0.1):
            while True:
                try:  # a library's bare `except:` swallows the first; it is raised again
                    time.sleep(0.01)
                except BaseException:
                    swallowed += 1
                    if swallowed > 1:
                        raise


class _Timers:
    """threading.Timer that never runs by itself: the test fires it where it wants."""

    def __init__(self):
        self.armed = []

    def __call__(self, after, fn):
        timers = self

        class Timer:
            daemon = False

            def start(self):
                timers.armed.append(fn)

            def cancel(self):
                pass

        return Timer()


def test_a_deadline_firing_as_its_block_ends_raises_nothing_after_it_and_the_blocks_own_error_wins(monkeypatch):
    from workbench import scoped

    timers = _Timers()
    monkeypatch.setattr(scoped.threading, "Timer", timers)
    with scoped.deadline(5):
        pass
    timers.armed[0]()  # fires after the block ended: nothing is raised, here or later
    sum(range(1000))
    with pytest.raises(scoped.DeadlineExceeded):
        with scoped.deadline(5):
            timers.armed[-1]()  # fires inside: raised at the next bytecode
            sum(range(1000))
    with pytest.raises(ValueError, match="its own"):
        with scoped.deadline(5):
            try:
                timers.armed[-1]()
                sum(range(1000))
            except scoped._Expired:
                raise ValueError("its own")
    sum(range(1000))


@pytest.mark.parametrize("family", ["phi3", "swinv2"])
def test_undoing_a_cut_puts_the_model_back_exactly(family):
    """What `prune_transformer(undo=...)` records puts back every module, count, config and zeroed weight."""
    transformers = pytest.importorskip("transformers")
    from workbench.architectures import attention_blocks
    from workbench.techniques.heads import prune_transformer

    cls, config, kwargs = _FUSED[family]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config)(**kwargs)).eval()
    heads = sum(b.heads for b in attention_blocks(model))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    kept = {n: {a: getattr(m, a) for a in ("num_heads", "num_attention_heads", "num_key_value_heads", "config")
                if hasattr(m, a)} for n, m in modules.items()}
    undo = []
    prune_transformer(model, 0.5, "l1", set(), undo=undo)
    assert sum(b.heads for b in attention_blocks(model)) < heads
    for put_back in reversed(undo):
        put_back()
    assert dict(model.named_modules()) == modules  # the very same modules
    assert all(getattr(modules[n], a) is v for n, values in kept.items() for a, v in values.items())
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.slow
def test_torch_prunings_graph_that_never_finishes_is_refused_in_one_line(monkeypatch):
    """Torch-Pruning's grouping loops forever on FocalNet's focal modulation (seen: 45 minutes on a tiny model)."""
    transformers = pytest.importorskip("transformers")
    from workbench.errors import ModelError
    from workbench.techniques import prune

    monkeypatch.setattr(prune, "TP_GRAPH_SECONDS", 3.0)
    torch.manual_seed(0)
    model = transformers.FocalNetForImageClassification(transformers.FocalNetConfig(
        image_size=32, num_labels=5, patch_size=4, embed_dim=16, depths=[1, 1], focal_levels=[2, 2],
        focal_windows=[3, 3])).eval()
    data = wb.Data(val=[(torch.randn(4, 3, 32, 32), None)], metric="fidelity")
    with pytest.raises(ModelError, match="dependency graph of this model was still being built after 3 s") as e:
        wb.optimize(model, "prune=0.25:structured=true", data=data, **FAST)
    assert len(str(e.value).splitlines()) == 1


class _EncoderWithPooledHead(nn.Module):
    """Returns (hidden states, logits), as an encoder with a pooler does: the last prunable layer (the head) is
    not the one that writes the first output."""

    def __init__(self):
        super().__init__()
        self.up, self.down, self.skip = nn.Linear(8, 32), nn.Linear(32, 16), nn.Linear(8, 16)
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, x):
        hidden = self.norm(self.down(torch.relu(self.up(x))) + self.skip(x))
        return hidden, self.head(hidden[:, 0])


def test_structured_pruning_that_would_change_an_outputs_width_is_refused_in_one_line():
    from workbench.errors import ModelError

    torch.manual_seed(0)
    data = wb.Data(val=[(torch.randn(4, 5, 8), None)], metric="fidelity")
    with pytest.raises(ModelError, match=r"Torch-Pruning, the model.s output shape would change from \(4, 5, 16\) to \(4, 5, \d+\).*Prune\(ignore=") as e:
        wb.optimize(_EncoderWithPooledHead().eval(), "prune=0.5:structured=true", data=data, **FAST)
    assert len(str(e.value).splitlines()) == 1
    r = wb.optimize(_EncoderWithPooledHead().eval(), "prune=0.5:structured=true:ignore=norm", data=data, **FAST)
    assert r.model(torch.randn(2, 5, 8))[0].shape == (2, 5, 16)


def test_an_attention_whose_heads_cannot_be_removed_is_left_whole_and_its_ffn_pruned():
    """XGLM's attention matches the q/k/v/out_proj layout but reshapes its output to `embed_dim`: the forward
    after head pruning fails, so the round is put back and the FFN neurons are cut alone, and the card says why."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    model = transformers.XGLMForCausalLM(transformers.XGLMConfig(
        vocab_size=96, d_model=32, num_layers=2, attention_heads=4, ffn_dim=64, max_position_embeddings=64)).eval()
    before = state_bytes(model)
    data = wb.Data(val=[(torch.randint(3, 96, (4, 12)), None)], metric="fidelity")
    r = wb.optimize(model, "prune=0.5:structured=true", data=data, **FAST)
    structured = r.details["structured"]
    assert structured["heads"] == (8, 8) and structured["neurons"] == (128, 64)
    assert "XGLMAttention" in structured["attention_left_whole"]
    assert "forward fails" in structured["attention_left_whole"]
    assert any("no heads were removed, because after removing attention heads from XGLMAttention" in n
               for n in r.notes)
    assert all(layer.self_attn.q_proj.out_features == 32 for layer in r.model.model.layers)
    assert r.model(torch.randint(3, 96, (2, 7))).logits.shape == (2, 7, 96)
    assert state_bytes(model) == before


class _ResidualMLP(nn.Module):
    """No attention, but a block with fc1/fc2 children as a transformer's FFN has."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 128), nn.Linear(128, 32)
        self.mid, self.head = nn.Linear(32, 64), nn.Linear(64, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(torch.relu(self.mid(h)))


def test_a_model_without_attention_prunes_through_the_dependency_graph_even_with_an_ffn_shaped_block():
    torch.manual_seed(0)
    data = wb.Data(val=[(torch.randn(8, 16), None)], metric="fidelity")
    r = wb.optimize(_ResidualMLP().eval(), "prune=0.5:structured=true", data=data, **FAST)
    assert r.model.stem.out_features < 32 and r.model.mid.out_features < 64  # not the FFN's neurons alone
    assert any("channels/neurons" in n for n in r.notes)


@pytest.mark.slow
def test_per_channel_parameters_of_any_rank_are_cut_with_their_channels():
    """ConvNeXt-V2's GRN keeps [1, 1, 1, C] weights, which Torch-Pruning cuts with the channels they scale (it was
    refused as a layer type it cannot prune)."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    model = transformers.ConvNextV2Model(transformers.ConvNextV2Config(
        num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1])).eval()
    data = wb.Data(val=[(torch.randn(4, 3, 32, 32), None)], metric="fidelity")
    r = wb.optimize(model, "prune=0.5:structured=true", data=data, **FAST)
    layer = r.model.encoder.stages[0].layers[0]
    assert layer.pwconv1.out_features < 64
    assert layer.grn.weight.shape == layer.grn.bias.shape == (1, 1, 1, layer.pwconv1.out_features)
    assert r.model(torch.randn(2, 3, 40, 40)).last_hidden_state.shape[1] == 32  # the output's width kept


class _Gated(nn.Module):
    """A one-element learned gate (ReZero's) scaling a layer's output."""

    def __init__(self):
        super().__init__()
        self.up, self.gate, self.down = nn.Linear(16, 32), nn.Parameter(torch.ones(1)), nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)) * self.gate)))


def test_a_one_element_gate_does_not_keep_the_channels_it_scales():
    torch.manual_seed(0)
    data = wb.Data(val=[(torch.randn(8, 16), None)], metric="fidelity")
    r = wb.optimize(_Gated().eval(), "prune=0.5:structured=true", data=data, **FAST)
    assert r.model.up.out_features < 32 and r.model.gate.shape == (1,)


@pytest.mark.slow
def test_a_wrapped_transformer_and_one_returning_attention_maps_prune_by_heads_and_neurons():
    """The user's wrapper around a Hugging Face encoder whose attention the pruner does not know (MPNet, pooled as
    sentence-transformers does) takes the FFN-only route; attention maps in the outputs change with the heads and
    are no reason to refuse."""
    transformers = pytest.importorskip("transformers")

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = transformers.MPNetModel(transformers.MPNetConfig(
                vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64))

        def forward(self, input_ids):
            return self.encoder(input_ids=input_ids).last_hidden_state.mean(1)

    torch.manual_seed(0)
    data = wb.Data(val=[(torch.randint(3, 96, (4, 12)), None)], metric="fidelity")
    r = wb.optimize(Pooled().eval(), "prune=0.5:structured=true", data=data, **FAST)
    assert "attention left whole" in r.notes[0] and "FFN neurons 128 -> 64" in r.notes[0]
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        output_attentions=True, attn_implementation="eager")).eval()
    r = wb.optimize(bert, "prune=0.5:structured=true", data=data, **FAST)
    assert "attention heads 8 -> 4" in r.notes[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mpt", "pvt-v2", "flan-t5"])
def test_ffn_layouts_of_mpt_pvt_v2_and_t5_are_pruned_by_neurons(family):
    """MPT (up/down projections, a fused Wqkv beside out_proj) went to Torch-Pruning and failed with an IndexError;
    its heads cannot go (ALiBi slopes are built per head at the model level), so its FFN neurons are cut alone.
    PVT-v2's FFN (dense1, a depthwise convolution, dense2) broke Torch-Pruning's reshapes: its neurons are cut with
    the convolution's channels. T5's (gated in Flan-T5: wi_0, wi_1, wo) could not be traced by Torch-Pruning."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    if family == "mpt":
        model = transformers.MptForCausalLM(transformers.MptConfig(
            vocab_size=96, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64)).eval()
        x, other = torch.randint(3, 96, (4, 12)), torch.randint(3, 96, (2, 7))
    elif family == "flan-t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
            decoder_start_token_id=0)).eval()

        def x_of(rows, length):
            return {"input_ids": torch.randint(3, 96, (rows, length)), "decoder_input_ids": torch.randint(
                3, 96, (rows, length // 2))}

        x, other = x_of(4, 12), x_of(2, 7)
    else:
        model = transformers.PvtV2ForImageClassification(transformers.PvtV2Config(
            num_labels=5, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
            patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2])).eval()
        x, other = torch.randn(4, 3, 32, 32), torch.randn(2, 3, 32, 32)
    before = state_bytes(model)
    r = wb.optimize(model, "prune=0.5:structured=true", data=wb.Data(val=[(x, None)], metric="fidelity"), **FAST)
    structured = r.details["structured"]
    assert structured["neurons"][1] == structured["neurons"][0] // 2
    assert structured["heads"][0] == structured["heads"][1]
    if family == "mpt":
        assert "MptAttention" in structured["attention_left_whole"]
        assert all(b.ffn.up_proj.out_features == 64 for b in r.model.transformer.blocks)
    elif family == "flan-t5":
        ffn = [m for n, m in r.model.named_modules() if n.endswith("DenseReluDense")]
        assert len(ffn) == 4 and all(f.wi_0.out_features == f.wi_1.out_features == f.wo.in_features == 32
                                     for f in ffn)
    else:
        convs = [m for n, m in r.model.named_modules() if n.endswith("dwconv.dwconv")]
        assert convs and all(c.in_channels == c.out_channels == c.groups == 16 * (i + 1) for i, c in enumerate(convs))
    call = (lambda m: m(**other)) if isinstance(other, dict) else (lambda m: m(other))
    with torch.no_grad():
        assert call(r.model)[0].shape == call(model)[0].shape
    assert r.measurement.metric > (0.85 if family == "flan-t5" else 0.9) and state_bytes(model) == before
