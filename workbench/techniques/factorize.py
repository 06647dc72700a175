"""Factorize: replace layers by low-rank products where that saves MACs.

- Linear (out x in): truncated SVD W ~ (U sqrt(S)) (sqrt(S) V^T) -> Linear(in, r) then Linear(r, out).
- Conv2d (O, I, k, k): Tucker-2 by HOSVD on the output and input modes -> 1x1 (I -> r_in), kxk (r_in -> r_out, the
  core, with the original stride/padding/dilation), 1x1 (r_out -> O, with the bias).

Rank per layer: `rank_ratio` of the full rank, or the smallest rank keeping `energy` of the squared singular
values. A layer is replaced only where the factorized form has fewer MACs; each decision is listed.
"""
from __future__ import annotations

import warnings

from dataclasses import dataclass

from ..architectures import head_layer
from ..errors import RecipeError
from ..recipe import Step, option
from ..registry import technique
from ..tensors import call_model


@dataclass
class Factorize(Step):
    """Replace Linear/Conv layers by low-rank products where that saves MACs (truncated SVD / Tucker-2)."""

    kind = "factorize"
    short = "factorize"
    main_field = "rank_ratio"
    aliases = ("factor",)
    colour = "#9467bd"

    rank_ratio: float | None = option(None, low=0, high=1, low_open=True, optional=True, ui=(0.05, 1.0, 0.05),
                                      help="rank as a share of the full rank")
    energy: float | None = option(None, low=0, high=1, low_open=True, optional=True,
                                  help="or: the smallest rank keeping this share of the singular values' energy")
    layers: str = option("auto", help="auto (all but the output head), all, or comma-separated layer names")

    def check(self):
        if (self.rank_ratio is None) == (self.energy is None):
            raise RecipeError("Factorize: give exactly one of rank_ratio (0, 1] or energy (0, 1]")
        if not isinstance(self.layers, str):
            raise RecipeError(f"Factorize.layers: expected 'auto', 'all' or layer names, got {self.layers!r}")


def choose_rank(singular_values, rank_ratio: float | None, energy: float | None) -> int:
    """Rank from a ratio of the full rank, or the smallest rank whose singular values keep `energy` of the total."""
    import torch

    full = len(singular_values)
    if rank_ratio is not None:
        return max(1, min(full, round(rank_ratio * full)))
    sq = singular_values.double() ** 2
    kept = torch.cumsum(sq, 0) / sq.sum().clamp(min=1e-30)
    wanted = torch.tensor(energy, dtype=kept.dtype, device=kept.device)
    return max(1, min(full, int(torch.searchsorted(kept, wanted).item()) + 1))


def factorize_linear(layer, rank: int):
    """Two Linear layers whose product is the rank-`rank` truncated SVD of `layer`."""
    import torch
    from torch import nn

    u, s, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_((root[:, None] * vh[:rank]).to(layer.weight.dtype))
        second.weight.copy_((u[:, :rank] * root[None, :]).to(layer.weight.dtype))
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second).to(layer.weight.device)


def _mode_svd(weight, mode: int):
    import torch

    unfolded = weight.movedim(mode, 0).reshape(weight.shape[mode], -1)
    u, s, _ = torch.linalg.svd(unfolded, full_matrices=False)
    return u, s


def factorize_conv(layer, rank_out: int, rank_in: int):
    """Tucker-2: 1x1 (I -> rank_in), kxk core (rank_in -> rank_out), 1x1 (rank_out -> O)."""
    import torch
    from torch import nn

    w = layer.weight.detach().double()
    u_out, _ = _mode_svd(w, 0)
    u_in, _ = _mode_svd(w, 1)
    u_out, u_in = u_out[:, :rank_out], u_in[:, :rank_in]
    core = torch.einsum("oikl,or,is->rskl", w, u_out, u_in)
    first = nn.Conv2d(layer.in_channels, rank_in, 1, bias=False)
    middle = nn.Conv2d(rank_in, rank_out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                       dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode)
    last = nn.Conv2d(rank_out, layer.out_channels, 1, bias=layer.bias is not None)
    dtype = layer.weight.dtype
    with torch.no_grad():
        first.weight.copy_(u_in.T[:, :, None, None].to(dtype))
        middle.weight.copy_(core.to(dtype))
        last.weight.copy_(u_out[:, :, None, None].to(dtype))
        if layer.bias is not None:
            last.bias.copy_(layer.bias)
    return nn.Sequential(first, middle, last).to(layer.weight.device)


def _positions(model, inputs, names) -> dict:
    """(input positions, output positions) per conv layer, from one forward pass."""
    modules, seen = dict(model.named_modules()), {}
    hooks = [modules[n].register_forward_hook(
        lambda m, a, o, n=n: seen.__setitem__(n, (a[0].shape[-2] * a[0].shape[-1], o.shape[-2] * o.shape[-1])))
        for n in names]
    import torch

    try:
        with torch.inference_mode():
            call_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _candidates(model, step: Factorize):
    from torch import nn

    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)}
    if step.layers == "auto":
        head = head_layer(model)
        return {n: m for n, m in layers.items() if n != head}
    if step.layers == "all":
        return layers
    wanted = [n.strip() for n in str(step.layers).split(",")]
    missing = [n for n in wanted if n not in layers]
    if missing:
        raise RecipeError(f"Factorize.layers: no Linear/Conv2d layer named {', '.join(map(repr, missing))}")
    return {n: layers[n] for n in wanted}


def _swap(model, name: str, new) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _runs(model, inputs) -> bool:
    import torch

    try:
        with torch.inference_mode():
            call_model(model, inputs)
        return True
    except Exception:
        return False


def _keep_runnable(model, originals: dict, replaced: list[str], inputs) -> list[str]:
    """Names of replaced layers put back because the model stops running with them factorized (a parent that
    reads `layer.weight` itself, as torch's MultiheadAttention and some Hugging Face blocks do); checked all at
    once, then one by one only when that fails."""
    if _runs(model, inputs):
        return []
    swapped = {name: model.get_submodule(name) for name in replaced}
    for name in replaced:
        _swap(model, name, originals[name])
    put_back = []
    for name in replaced:
        _swap(model, name, swapped[name])
        if not _runs(model, inputs):
            _swap(model, name, originals[name])
            put_back.append(name)
    return put_back


def search(trial, facts) -> list[str]:
    """Truncated SVD of Linear-heavy models (on conv nets Tucker-2 measured slower here)."""
    if facts.conv_heavy:
        return []
    energy = trial.suggest_categorical("factorize_energy", [0.0, 0.9, 0.95])
    return [f"factorize:energy={energy}"] if energy else []


def seeds(facts) -> list[dict]:
    return [] if facts.conv_heavy else [{"factorize_energy": 0.0}]


@technique(Factorize, search=search, seeds=seeds)
def factorize(model, step: Factorize, ctx):
    import pandas as pd
    import torch

    layers = _candidates(model, step)
    inputs = ctx.target.move(ctx.data.inputs(1))
    positions = _positions(model, inputs, [n for n, m in layers.items() if isinstance(m, torch.nn.Conv2d)])
    rows, replaced = [], 0
    for name, layer in layers.items():
        ctx.progress(f"factorizing {name}", None)
        if isinstance(layer, torch.nn.Linear):
            s = torch.linalg.svdvals(layer.weight.detach().double())
            rank = choose_rank(s, step.rank_ratio, step.energy)
            before = layer.in_features * layer.out_features
            after = rank * (layer.in_features + layer.out_features)
            build, ranks = (lambda layer=layer, rank=rank: factorize_linear(layer, rank)), str(rank)
        else:
            w = layer.weight.detach().double()
            r_out = choose_rank(_mode_svd(w, 0)[1], step.rank_ratio, step.energy)
            r_in = choose_rank(_mode_svd(w, 1)[1], step.rank_ratio, step.energy)
            if name not in positions:
                continue  # not on the forward path
            p_in, p_out = positions[name]
            k = layer.kernel_size[0] * layer.kernel_size[1]
            before = layer.out_channels * layer.in_channels * k * p_out
            after = layer.in_channels * r_in * p_in + r_in * r_out * k * p_out + r_out * layer.out_channels * p_out
            build, ranks = (lambda layer=layer, a=r_out, b=r_in: factorize_conv(layer, a, b)), f"{r_out}x{r_in}"
        keep = after < before
        if keep:
            _swap(model, name, build())
            replaced += 1
        rows.append({"layer": name, "type": type(layer).__name__, "rank": ranks, "macs_before": before,
                     "macs_after": after if keep else before, "replaced": keep})
    kept_out = _keep_runnable(model, layers, [r["layer"] for r in rows if r["replaced"]], inputs)
    for r in rows:
        if r["layer"] in kept_out:
            r.update(replaced=False, macs_after=r["macs_before"])
    replaced -= len(kept_out)
    if kept_out:
        ctx.note(f"left {len(kept_out)} layer(s) whole because the model reads their weights directly (e.g. "
                 f"{kept_out[0]}), which a low-rank pair does not have")
    table = pd.DataFrame(rows, columns=["layer", "type", "rank", "macs_before", "macs_after", "replaced"])
    ctx.details["factorize"] = table
    if replaced == 0:
        message = ("Factorize: no layer of this model gets fewer MACs from a low-rank form at "
                   f"{'rank_ratio=' + str(step.rank_ratio) if step.rank_ratio else 'energy=' + str(step.energy)}"
                   "; the model is unchanged")
        warnings.warn(message, stacklevel=2)
        ctx.note(message)
        return model
    ctx.note(f"factorized {replaced} of {len(rows)} layers (MACs {table['macs_before'].sum():,} -> "
             f"{table['macs_after'].sum():,} in those layers); see result.details['factorize'] for ranks")
    return model
