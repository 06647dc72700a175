"""Models built from torch's own layers as tutorials write them (nn.TransformerEncoder over embeddings with a
positional table and a padding mask, a ViT with a class token): every technique works on them, as on the Hugging
Face models they resemble."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import workbench as wb
from workbench import support

QUICK = dict(device="cpu", batch_sizes=(1,), study=False)


class TextClassifier(nn.Module):
    """Embeddings and a sinusoidal positional table, torch's encoder with its padding mask (nested tensors on its
    fast path), a masked mean (`mask.float()`: float32 whatever the weights) and a classifier."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32, padding_idx=0)
        position, scale = torch.arange(64)[:, None], torch.exp(torch.arange(0, 32, 2) * (-math.log(1e4) / 32))
        self.register_buffer("table", torch.cat([torch.sin(position * scale), torch.cos(position * scale)], 1))
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
        self.head = nn.Linear(32, 5)

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids) + self.table[:input_ids.shape[1]]
        h = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((h * mask).sum(1) / mask.sum(1))


class ViT(nn.Module):
    """Convolution patches, a class token and learned positions (the model's own weights, at its width)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 8, 8)
        self.cls = nn.Parameter(torch.zeros(1, 1, 32))
        self.position = nn.Parameter(torch.randn(1, 17, 32) * 0.02)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(
            32, 4, 64, activation="gelu", batch_first=True, norm_first=True), 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.position)[:, 0])


def _text():
    def batch(rows, steps, seed):
        g = torch.Generator().manual_seed(seed)
        ids, mask = torch.randint(1, 50, (rows, steps), generator=g), torch.ones(rows, steps, dtype=torch.long)
        for r in range(1, rows):  # padded at the end by different amounts
            mask[r, steps - r:] = 0
            ids[r, steps - r:] = 0
        return {"input_ids": ids, "attention_mask": mask}, None

    torch.manual_seed(0)
    return TextClassifier().eval(), wb.Data(train=[batch(8, n, n) for n in (12, 16)],
                                            val=[batch(8, n, n + 1) for n in (12, 16)], metric="fidelity")


def _vision():
    torch.manual_seed(0)
    images = [(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)), None) for i in range(3)]
    return ViT().eval(), wb.Data(train=images[:2], val=images[2:], metric="fidelity")


@pytest.mark.slow
def test_int8_calibrates_through_the_encoders_nested_tensors():
    """With a padding mask, nn.TransformerEncoder hands its layers nested tensors on its fast path, which the
    calibration hooks could not read: int8 failed ("NestedTensorImpl doesn't support sizes"). The user's fast-path
    setting is left as it was."""
    model, data = _text()
    result = wb.optimize(model, "quant=int8", data, timing=support._plan(), **QUICK)
    assert result.backend.startswith("onnxruntime-int8") and result.measurement.metric > 0.99
    assert torch.backends.mha.get_fastpath_enabled()


def test_layer_by_layer_restores_the_users_setting_when_the_last_scope_ends():
    from workbench.scoped import layer_by_layer

    for setting in (False, True):
        torch.backends.mha.set_fastpath_enabled(setting)
        with layer_by_layer():
            with layer_by_layer():
                assert not torch.backends.mha.get_fastpath_enabled()
            assert not torch.backends.mha.get_fastpath_enabled()
        assert torch.backends.mha.get_fastpath_enabled() is setting


@pytest.mark.slow
def test_half_precision_of_a_forward_that_makes_float32_tensors_of_its_own(tmp_path):
    """`mask.float()` before the classifier met its fp16 weights: "mat1 and mat2 must have the same dtype". Its
    layers now cast their inputs, which the save keeps."""
    model, data = _text()
    result = wb.optimize(model, "quant=fp16", data, timing=support._plan(), **QUICK)
    assert result.measurement.metric > 0.99 and any("cast their inputs to fp16" in n for n in result.notes)
    assert {p.dtype for p in result.model.parameters()} == {torch.float16}
    inputs = data.inputs(3)
    reloaded = wb.load(result.save(tmp_path / "fp16"), trust_pickle=True)
    assert torch.allclose(reloaded(**inputs), result.model(**inputs))


@pytest.mark.slow
@pytest.mark.parametrize("build", [_text, _vision])
def test_structured_pruning_cuts_ffn_neurons_and_keeps_the_width_its_own_weights_read(build):
    """Torch-Pruning narrowed torch's layers to a width the positional table, the class token or nn.Transformer's
    own check still had: the forward failed, or it was refused. Now the FFN neurons go and the width stays."""
    model, data = build()
    before = copy.deepcopy(model.state_dict())
    result = wb.optimize(model, "prune=0.25:structured=true", data, timing=support._plan(), **QUICK)
    layers = [m for m in result.model.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    assert layers and all(m.linear1.out_features == 48 and m.self_attn.embed_dim == 32 for m in layers)
    assert result.measurement.metric > 0.8 and any("nn.MultiheadAttention" in n for n in result.notes)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class _TorchTransformer(torch.nn.Module):
    """What a model built from torch's own transformer layers calls: an encoder with a causal mask and padding, a
    decoder reading it, and a bare MultiheadAttention with separate key/value widths that returns its weights; its
    layers batch-first or sequence-first (fed batch-first inputs, as the workbench's data are)."""

    def __init__(self, batch_first: bool):
        super().__init__()
        nn = torch.nn
        self.batch_first = batch_first
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first), 1, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0,
                                                                        batch_first=batch_first), 1)
        self.attention = nn.MultiheadAttention(32, 4, kdim=16, vdim=16, batch_first=batch_first)

    def forward(self, x, padding):
        causal = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        x = x if self.batch_first else x.transpose(0, 1)
        memory = self.encoder(x, mask=causal, src_key_padding_mask=padding)
        y = self.decoder(x, memory, tgt_mask=causal, memory_key_padding_mask=padding)
        out, weights = self.attention(y, memory[..., :16], memory[..., :16], key_padding_mask=padding)
        return (out if self.batch_first else out.transpose(0, 1)), weights


@pytest.mark.parametrize("batch_first, frozen", [(True, False), (False, False), (True, True)])
def test_torch_transformer_layers_export_to_onnx_that_runs_at_other_lengths(batch_first, frozen):
    """torch's MultiheadAttention reshapes by the lengths it read as numbers, which the ONNX exporter wrote into
    the graph (pytorch/pytorch#122321): any nn.Transformer* model's graph failed at another length, so int4 was
    refused and int8 left them to torch.ao. The exported copy computes attention with general views. A frozen
    model (no weight requires grad) took torch's fused layers, which have no ONNX translation: the export runs
    them layer by layer."""
    import onnxruntime

    from workbench.backends.onnxruntime.export import export_onnx

    def inputs(rows, steps):
        padding = torch.zeros(rows, steps, dtype=torch.bool)
        padding[0, -2:] = True
        return torch.randn(rows, steps, 32, generator=torch.Generator().manual_seed(steps)), padding

    torch.manual_seed(0)
    model = _TorchTransformer(batch_first).eval().requires_grad_(not frozen)
    graph, layout = export_onnx(model, inputs(2, 7))
    assert type(model.attention) is torch.nn.MultiheadAttention  # the user's layers are left as they were
    session = onnxruntime.InferenceSession(graph)
    for rows, steps in ((3, 10), (1, 4)):
        x, padding = inputs(rows, steps)
        got = session.run(None, dict(zip(layout["input_names"], (x.numpy(), padding.numpy()))))
        with torch.inference_mode():
            expected = model(x, padding)
        for g, e in zip(got, expected):
            assert g.shape == e.shape and torch.allclose(torch.from_numpy(g), e, atol=1e-5)


@pytest.mark.parametrize("batch_first", [False, True])
def test_the_traceable_attention_computes_what_torchs_does(batch_first):
    """Per-head float masks with per-head weights, no weights, a padding mask beside a boolean one, queries that
    see no key (zeros, as torch's fused attention gives, where a softmax gives NaN); with and without biases,
    sequence- and batch-first: the same outputs and weights."""
    import copy

    from workbench.wrappers import traceable_attention

    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(16, 4, bias=batch_first, batch_first=batch_first).eval()
    traced = traceable_attention(copy.deepcopy(attention))
    assert type(traced).__name__ == "TraceableAttention" and type(attention) is torch.nn.MultiheadAttention
    q, kv = torch.randn(3, 5, 16), torch.randn(3, 7, 16)  # (batch, length, width)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    left_padded = torch.zeros(3, 7, dtype=torch.bool)
    left_padded[1, :3] = True  # with a causal mask, its first queries see no key at all
    causal = torch.ones(5, 7, dtype=torch.bool).triu(1)
    for call in (dict(attn_mask=torch.randn(3 * 4, 5, 7), average_attn_weights=False), dict(need_weights=False),
                 dict(key_padding_mask=torch.rand(3, 7) > 0.8, attn_mask=torch.rand(5, 7) > 0.8),
                 dict(key_padding_mask=left_padded, attn_mask=causal, need_weights=False)):
        with torch.inference_mode():
            expected, got = attention(q, kv, kv, **call), traced(q, kv, kv, **call)
        assert (got[1] is None) == (expected[1] is None) and not got[0].isnan().any()
        for g, e in zip(got, expected):
            assert e is None or torch.allclose(g, e, atol=1e-5, equal_nan=True)


def test_linear1_and_linear2_mark_an_ffn_only_inside_torchs_transformer_layers():
    """The names are common in users' own MLPs, whose last layer is the model's output: not an FFN to cut."""
    from workbench.architectures import feed_forward_blocks

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear1, self.linear2 = nn.Linear(8, 32), nn.Linear(32, 8)

    class Layer(nn.TransformerEncoderLayer):  # a user's subclass is still torch's layer
        pass

    assert not feed_forward_blocks(Mlp())
    layer = Layer(8, 2, 32)
    blocks = feed_forward_blocks(layer)
    assert len(blocks) == 1 and blocks[0].down is layer.linear2
