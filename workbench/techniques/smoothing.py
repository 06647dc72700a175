"""Accuracy-preserving int8 for Linear layers: activation smoothing (SmoothQuant), bias correction, and mixed
precision guided by each layer's measured quantization error. Applied by `Quantize` before the backend lowers
the model; every change here is exact in float (the smoothed model computes what the original did, up to
rounding), so only the int8 rounding it steers differs.

- Smoothing (Xiao et al., SmoothQuant, 2023): int8 activations share one scale per tensor, so a few channels with
  large values (transformers have them: all-MiniLM-L6-v2's feed-forward inputs reach 14x their median channel)
  leave the others a handful of levels. Dividing input channel j by s_j = max|X_j|^a / max|W_j|^(1-a) and
  multiplying the weight's column j by s_j moves that range into the weights, which are quantized per output
  channel. Where the division can be folded into the layer before (BERT's attention output takes a mix of the
  value projection's channels: the value rows take it), it is free; elsewhere it is one elementwise multiply
  in front of the matrix product. BERT's query/key/value inputs are left alone: a multiply there would hide
  them from ONNX Runtime's Attention fusion, which is worth more than their small outliers.
- Bias correction (Nagel et al., 2019): int8 weights shift each output by (W_q - W) E[x]; the bias takes it back.
- Mixed precision: how far the model's outputs move when only one layer runs with int8 weights and activations
  is measured on the first rows of a calibration batch (a pass per layer); the few layers whose cost stands out
  stay in float.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import set_submodule
from ..scoped import layer_by_layer
from ..tensors import batch_size_of, call_model, first_tensor, map_tensors


@dataclass
class InputStats:
    """Per input channel of one Linear layer, over the calibration batches: max |x| and mean x."""

    absmax: torch.Tensor | None = None
    total: torch.Tensor | None = None
    rows: int = 0

    @property
    def mean(self):
        return self.total / max(self.rows, 1)


@dataclass
class Plan:
    """What `prepare` did, for the result's notes."""

    smoothed: list = field(default_factory=list)
    folded: list = field(default_factory=list)
    corrected: int = 0
    keep: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)
    skipped: str = ""  # why smoothing was undone


SENSITIVITY_ROWS = 16  # per layer, one pass over the first calibration batch's first 16 rows: on all-MiniLM-L6-v2
# they rank its layers as its 32 do (Spearman 0.995, the same layer kept) in half the time; 8 gave 0.991


class SmoothedLinear(nn.Module):
    """x -> linear(x / s), the linear layer's weight columns multiplied by s: the same outputs in float, with the
    input's outlier channels moved into the weights."""

    def __init__(self, linear: nn.Linear, scale):
        super().__init__()
        with torch.no_grad():
            linear.weight.mul_(scale)
        self.linear = linear
        self.register_buffer("inverse_scale", (1.0 / scale).to(linear.weight.dtype))

    def forward(self, x):
        return self.linear(x * self.inverse_scale)


def fake_int8_weight(weight, bits: int = 8):
    """Per output channel symmetric rounding of a weight (what int8 weights become)."""
    top = 2 ** (bits - 1) - 1
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / top
    return torch.round(weight / scale).clamp(-top, top) * scale


def fake_uint8_activation(x):
    """Per tensor asymmetric uint8 rounding (ONNX Runtime's DynamicQuantizeLinear; the range includes 0)."""
    low, high = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = ((high - low) / 255).clamp(min=1e-12)
    zero = torch.round(-low / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def linears(model) -> dict:
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n}


def collect(model, batches, names) -> dict:
    """InputStats per named Linear layer over `batches` (inputs only)."""
    modules = linears(model)
    stats, hooks = {n: InputStats() for n in names}, []

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            s = stats[name]
            top, total = x.abs().amax(0), x.sum(0)
            s.absmax = top if s.absmax is None else torch.maximum(s.absmax, top)
            s.total = total if s.total is None else s.total + total
            s.rows += x.shape[0]
        return record

    for name in names:
        hooks.append(modules[name].register_forward_hook(hook(name)))
    try:
        with torch.inference_mode(), layer_by_layer():
            for inputs in batches:
                call_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return {n: s for n, s in stats.items() if s.rows}


def _folds(model) -> tuple[dict, set]:
    """({Linear name: (producer Linear, rows)}: layers whose input channels are a producer's output rows, so the
    smoothing folds into the producer; names never to smooth). Knows Hugging Face BERT layers and PackedBert's."""
    from .packed_bert import PackedLayer

    folds, never = {}, set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        attention = getattr(module, "attention", None)
        value, out = getattr(getattr(attention, "self", None), "value", None), \
            getattr(getattr(attention, "output", None), "dense", None)
        if isinstance(value, nn.Linear) and isinstance(out, nn.Linear) and value.out_features == out.in_features:
            # (ConvBERT's output projection also reads its convolution heads' features, after the values')
            folds[f"{prefix}attention.output.dense"] = (value, slice(0, value.out_features))
            never.update(f"{prefix}attention.self.{p}" for p in ("query", "key", "value"))
        elif isinstance(module, PackedLayer) and hasattr(module.qkv, "weight"):
            width = module.qkv.out_features // 3
            folds[f"{prefix}attn_out"] = (module.qkv, slice(2 * width, 3 * width))
    return folds, never


def smooth(model, stats: dict, alpha: float) -> Plan:
    """Smooth every Linear layer in `stats` (in place): folded into its producer where one is known, else by a
    multiply in front of it."""
    plan = Plan()
    modules = linears(model)
    folds, never = _folds(model)
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for name, s in stats.items():
        if name in never or name not in modules:
            continue
        linear = modules[name]
        producer = folds.get(name, (linear,))[0]
        if uses[id(linear.weight)] > 1 or uses[id(producer.weight)] > 1:  # tied (GPT-2's head is its embedding)
            continue
        weight_max = linear.weight.detach().abs().amax(0).float().clamp(min=1e-5)
        act_max = s.absmax.clamp(min=1e-5)
        scale = (act_max ** alpha / weight_max ** (1 - alpha)).clamp(1e-4, 1e4)
        scale = torch.where(s.absmax > 0, scale, torch.ones_like(scale)).to(linear.weight.dtype)
        with torch.no_grad():
            if name in folds:
                producer, rows = folds[name]
                producer.weight[rows].div_(scale[:, None])
                if producer.bias is not None:
                    producer.bias[rows].div_(scale)
                linear.weight.mul_(scale)
                plan.folded.append(name)
            else:
                set_submodule(model, name, SmoothedLinear(linear, scale))
                plan.smoothed.append(name)
    return plan


def correct_bias(model, stats: dict, weight_bits: int = 8) -> int:
    """Take each layer's expected int8 weight error (W_q - W) E[x] back out of its bias; layers without one are
    left. Returns how many were corrected."""
    modules = linears(model)
    done = 0
    for name, s in stats.items():
        linear = modules.get(name)
        if linear is None or linear.bias is None:
            continue
        w = linear.weight.detach().float()
        shift = (fake_int8_weight(w, weight_bits) - w) @ s.mean
        with torch.no_grad():
            linear.bias.sub_(shift.to(linear.bias.dtype))
        done += 1
    return done


def sensitivities(model, batches, names, weight_bits: int = 8) -> dict:
    """{Linear name: 1 - cosine of the model's outputs to its float outputs when only that layer runs with int8
    weights and activations}, over `batches`: where int8 costs the model most, as the output sees it (a layer's
    own error says little: BERT's value projections have the largest and matter least)."""
    modules = linears(model)

    def outputs():
        with torch.inference_mode(), layer_by_layer():
            return [first_tensor(call_model(model, b)).float().flatten(1) for b in batches]

    def drop(got, want):  # batches may differ in width (token outputs of varying length): cosine per row
        return float(1 - torch.cat([F.cosine_similarity(g, w, dim=1) for g, w in zip(got, want)]).mean())

    reference, drops = outputs(), {}
    for name in names:
        module = modules[name]
        weight = fake_int8_weight(module.weight.detach().float(), weight_bits).to(module.weight.dtype)
        handle = module.register_forward_hook(
            lambda m, args, out, w=weight: F.linear(fake_uint8_activation(args[0]), w, m.bias))
        try:
            drops[name] = drop(outputs(), reference)
        finally:
            handle.remove()
    return drops


def choose_keep(drops: dict, share: float = 0.1, factor: float = 3.0) -> list[str]:
    """The layers whose int8 cost stands out (at least `factor` x the median), at most `share` of them, worst
    first."""
    import statistics

    if len(drops) < 4:
        return []
    median = statistics.median(drops.values())
    cap = max(1, int(share * len(drops)))
    worst = sorted((n for n, e in drops.items() if e > factor * median and e > 0), key=drops.get, reverse=True)
    return worst[:cap]


def _first_rows(model, inputs, rows: int):
    """The first `rows` rows of a batch's inputs (tensors whose first dimension is the batch's; others as they are),
    or the whole batch where the model does not take them (a tensor that only looked batched, cut)."""
    n = batch_size_of(inputs)
    if n <= rows:
        return inputs
    sliced = map_tensors(inputs, lambda t: t[:rows] if t.dim() and t.shape[0] == n else t)
    try:
        with torch.inference_mode():
            call_model(model, sliced)
    except Exception:
        return inputs
    return sliced


def _outputs(model, batches) -> list:
    with torch.inference_mode():
        return [first_tensor(call_model(model, b)).float().flatten(1) for b in batches]


def _differs(model, batches, reference) -> str | None:
    """Why the smoothed `model` does not compute what it did (None when it does, up to float rounding)."""
    try:
        got = _outputs(model, batches)
    except Exception as e:
        return f"the smoothed model fails ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
    worst = min(float(F.cosine_similarity(g, r, dim=1).min()) for g, r in zip(got, reference))
    return None if worst > 0.9999 else f"the smoothed model's outputs moved (cosine {worst:.4f})"


def prepare(model, batches, alpha: float | None, bias_correction: bool, keep: int | None,
            weight_bits: int = 8) -> tuple:
    """(model, Plan): `model` (a copy the caller owns) smoothed, bias-corrected and its layers to keep in float,
    from the calibration `batches` (a list of inputs). keep: how many layers stay in float (None: those whose
    error stands out; 0: none)."""
    names = list(linears(model))
    plan = Plan()
    if alpha:
        original, reference = copy.deepcopy(model), _outputs(model, batches[:1])
        plan = smooth(model, collect(model, batches, names), alpha)
        why = _differs(model, batches[:1], reference)
        if why:  # a module that reads a layer's weight without calling it (a fused fast path) sees no multiply
            model, plan = original, Plan(skipped=why)
        names = list(linears(model))  # a smoothed layer is now `<name>.linear`
    if bias_correction:
        plan.corrected = correct_bias(model, collect(model, batches, names), weight_bits)
    if keep != 0:
        _, fused = _folds(model)  # kept in float, these would cost ONNX Runtime's Attention fusion
        plan.errors = sensitivities(model, [_first_rows(model, batches[0], SENSITIVITY_ROWS)],
                                    [n for n in names if n not in fused], weight_bits)
        plan.keep = choose_keep(plan.errors) if keep is None else \
            sorted(plan.errors, key=plan.errors.get, reverse=True)[:keep]
    plan.keep = [n[:-len(".linear")] if n.endswith(".linear") else n for n in plan.keep]
    return model, plan
