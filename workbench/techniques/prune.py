"""Prune: unstructured magnitude/Taylor pruning (torch.nn.utils.prune, made permanent) and structured pruning that
physically removes channels, neurons and attention heads (Torch-Pruning's DepGraph keeps coupled layers consistent).

Only structured pruning makes a model faster on dense runtimes; unstructured pruning makes it compressible. The
result's notes say which one happened and what to expect.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..architectures import attention_blocks, feed_forward_blocks, head_layer, prunable_layers
from ..errors import ModelError, RecipeError, first_line
from ..recipe import Step, option
from ..registry import technique
from ..scoped import DeadlineExceeded, deadline
from ..tensors import call_model

TAYLOR_BATCHES = 4
MAX_LAYER_RATIO = 0.9  # never remove a whole layer
TP_GRAPH_SECONDS = 180.0  # Torch-Pruning's grouping loops forever on some graphs (FocalNet): refused after this


@dataclass
class Prune(Step):
    """Remove weights (unstructured) or whole channels/neurons/heads (structured) by importance."""

    kind = "prune"
    short = "prune"
    main_field = "sparsity"
    colour = "#d62728"

    sparsity: float = option(0.5, low=0, high=1, high_open=True, ui=(0.05, 0.95, 0.05),
                             help="share of weights (or channels, structured) to remove")
    structured: bool = option(False, choices=(True, False), flag="--structured",
                              help="remove whole channels/neurons/heads (the kind that runs faster)")
    scope: str = option("global", choices=("global", "layer"))
    criterion: str = option("l1", choices=("l1", "l2", "taylor"))
    schedule: str | None = option(None, optional=True, help="None (one-shot), 'iterative:N' or 'cubic:N'")
    ignore: tuple = option((), names=True, excludes=True, help="layers left alone")
    per_layer: str = option("uniform", choices=("uniform", "sensitivity"),
                            help="sensitivity: prune less where the metric is fragile")
    semi_structured: bool = option(False, choices=(True, False),
                                   help="2:4: keep the 2 largest of every 4 consecutive weights in each Linear row "
                                        "(GPU sparse tensor cores run it with quant=fp16/bf16)")

    def check(self):
        if self.semi_structured:
            clash = [why for why, bad in (("structured=true", self.structured),
                                          (f"sparsity={self.sparsity}", self.sparsity != 0.5),
                                          (f"schedule={self.schedule}", self.schedule not in (None, "oneshot")),
                                          ("per_layer=sensitivity", self.per_layer == "sensitivity")) if bad]
            if clash:
                raise RecipeError(f"Prune(semi_structured=True) keeps 2 of every 4 weights in every layer, in one "
                                  f"shot (sparsity 0.5); drop {', '.join(clash)}")
        if isinstance(self.schedule, str):  # 'iterative-3' is how the short form writes it (':' splits options)
            self.schedule = self.schedule.replace("-", ":", 1)
        if self.schedule is not None:
            kind, _, n = str(self.schedule).partition(":")
            if kind not in ("oneshot", "iterative", "cubic") or (kind != "oneshot" and not n.isdigit()) or \
                    (n.isdigit() and int(n) < 1):
                raise RecipeError(
                    f"Prune.schedule: {self.schedule!r} is not allowed; use None, 'oneshot', 'iterative:N' or "
                    "'cubic:N'")

    @property
    def needs_train(self) -> bool:
        return self.criterion == "taylor" or self.schedule not in (None, "oneshot")

    def describe(self) -> str:
        text = Step.describe(self)
        return text.replace(f"schedule={self.schedule}", f"schedule={self.schedule.replace(':', '-')}") \
            if self.schedule else text

    @property
    def steps(self) -> int:
        """How many pruning rounds the schedule has (1 for one-shot)."""
        return 1 if self.schedule in (None, "oneshot") else int(str(self.schedule).split(":")[1])

    def ratios(self) -> list[float]:
        """Target sparsity after each round: linear for 'iterative:N', cubic (as in GMP) for 'cubic:N'."""
        n, s = self.steps, self.sparsity
        if str(self.schedule).startswith("cubic"):
            return [s * (1 - (1 - t / n) ** 3) for t in range(1, n + 1)]
        return [s * t / n for t in range(1, n + 1)]


def _resolve_ignored(model, step: Prune) -> tuple[dict, list[str]]:
    """Modules to leave alone, by name: the user's `ignore` list plus the output head."""
    names = dict(model.named_modules())
    missing = [n for n in step.ignore if n not in names]
    if missing:
        raise RecipeError(f"Prune.ignore: no layer named {', '.join(map(repr, missing))}; layers are e.g. "
                          f"{', '.join(list(prunable_layers(model))[:6])}")
    ignored = {n: names[n] for n in step.ignore}
    head = head_layer(model)
    if head and head not in ignored:
        ignored[head] = names[head]
    return ignored, [head] if head else []


def _taylor_grads(model, ctx) -> None:
    """Accumulate first-order gradients on a few train batches (Taylor importance = |w * dL/dw|)."""
    from ..tensors import drop_cached_tensors
    from ..train import task_loss

    loss = task_loss(ctx.data, reference=ctx.original)
    model.zero_grad()
    model.train()
    drop_cached_tensors(model)  # (what evaluations under inference_mode cached cannot be differentiated through)
    for inputs, targets in ctx.data.train_batches(limit=TAYLOR_BATCHES):
        loss(model, ctx.target.move(inputs), ctx.target.move(targets) if targets is not None else None).backward()
    model.eval()


def _recover_between_rounds(model, ctx, round_index: int, rounds: int) -> None:
    if round_index < rounds - 1:
        from ..train import fit

        fit(model, ctx.data, epochs=1, lr=1e-3, progress=ctx.progress, reference=ctx.original, target=ctx.target,
            label=f"recovery after pruning round {round_index + 1}/{rounds}")


def _fold_parametrizations(layers: dict, ctx) -> None:
    """Make each layer's weight a plain parameter where a parametrization computes it (weight norm: wav2vec2's
    positional convolution), so that its entries can be zeroed and stay zero: the same function, folded on the
    copy that is optimized."""
    from torch.nn.utils import parametrize

    folded = [n for n, m in layers.items() if parametrize.is_parametrized(m, "weight")]
    for n in folded:
        m = layers[n]  # a deep copy shares the user's module's generated class, from which removing a
        cls = type(m)  # parametrization deletes the property: the copy gets a class of its own first
        m.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    if folded:
        ctx.note(f"the weight parametrization (e.g. weight norm) of {', '.join(folded[:3])}"
                 f"{' ...' if len(folded) > 3 else ''} folded into a plain weight before pruning (same outputs)")


# -- unstructured ----------------------------------------------------------------------------------------------
def unstructured(model, step: Prune, ctx, layer_ratios: dict | None = None):
    """Zero the smallest weights (by |w| or |w * grad|), globally or per layer; masks are made permanent."""
    import torch
    from torch import nn
    from torch.nn.utils import prune

    ignored, heads = _resolve_ignored(model, step)
    layers = {n: m for n, m in prunable_layers(model).items() if n not in ignored}
    _fold_parametrizations(layers, ctx)
    targets = [(m, "weight") for m in layers.values()]
    recurrent = {n: m for n, m in model.named_modules() if isinstance(m, nn.RNNBase) and n not in ignored}
    targets += [(m, w) for m in recurrent.values() for w in m._flat_weights_names if w.startswith("weight")]
    if not targets:
        left = f"the only one is the output head ({heads[0]}), left alone" if heads and not step.ignore else \
            "none is left after the ignored ones"
        raise RecipeError(f"Prune: the model has no Linear, Conv or recurrent layer to prune ({left})")
    previous = 0.0
    ratios = step.ratios()
    for i, target in enumerate(ratios):
        ctx.progress(f"pruning round {i + 1}/{len(ratios)}: {target:.0%} of weights", None)

        def amount(final: float) -> float:  # torch prunes a share of what is still unpruned
            now, before = final * target / step.sparsity, final * previous / step.sparsity
            return min(max(1 - (1 - now) / (1 - before), 0.0), 1.0)

        scores = None
        if step.criterion == "taylor":
            _taylor_grads(model, ctx)
            scores = {(m, w): (getattr(m, w) * getattr(m, w).grad).abs().detach() for m, w in targets}
        if step.scope == "global" and layer_ratios is None:
            prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount(step.sparsity),
                                      importance_scores=scores)
        else:
            names = {id(m): n for n, m in model.named_modules()}
            for m, w in targets:
                prune.l1_unstructured(m, w, amount=amount((layer_ratios or {}).get(names[id(m)], step.sparsity)),
                                      importance_scores=None if scores is None else scores[(m, w)])
        previous = target
        _recover_between_rounds(model, ctx, i, len(ratios))
    for m, w in targets:
        prune.remove(m, w)  # permanent: no weight_orig / weight_mask left behind
    with torch.no_grad():
        model.zero_grad(set_to_none=True)
    if step.criterion == "l2":
        ctx.note("for single weights L2 and L1 magnitude rank the same; L2 differs only for structured pruning")
    ctx.note(f"unstructured: {step.sparsity:.0%} of the weights in {len(layers) + len(recurrent)} layers are now zero; "
             "dense runtimes (torch eager, ONNX Runtime on CPU) skip no work for zeros, so expect no speedup, only a "
             "smaller compressed size (see sparse_size_bytes); structured=True removes whole channels and is "
             "the kind that runs faster")
    return model


# -- 2:4 semi-structured ---------------------------------------------------------------------------------------
def semi_structured(model, step: Prune, ctx):
    """In every Linear row, of each 4 consecutive weights zero the 2 least important (NVIDIA's 2:4 pattern):
    50% sparsity that sparse tensor cores (compute capability 8.0+) run about twice as fast in fp16/bf16 where
    the products are large. The pattern is kept through fine-tuning (zeros stay zero) and made fast at lowering."""
    import torch
    from torch import nn

    ignored, _ = _resolve_ignored(model, step)
    linear = {n: m for n, m in prunable_layers(model).items() if n not in ignored and isinstance(m, nn.Linear)}
    layers = {n: m for n, m in linear.items() if m.in_features % 4 == 0}
    if not layers:
        raise RecipeError("Prune(semi_structured=True): the model has no Linear layer (other than its output head) "
                          "whose input width is a multiple of 4; 2:4 sparsity applies to those only")
    _fold_parametrizations(layers, ctx)
    scores = None
    if step.criterion == "taylor":
        _taylor_grads(model, ctx)
        scores = {n: (m.weight * m.weight.grad).abs().detach() for n, m in layers.items()}
    with torch.no_grad():
        for name, m in layers.items():
            w = m.weight
            importance = (scores[name] if scores else w.detach().abs()).reshape(w.shape[0], -1, 4)
            keep = torch.zeros_like(importance, dtype=torch.bool).scatter_(-1, importance.topk(2, dim=-1).indices,
                                                                           True)
            w.mul_(keep.reshape(w.shape))
        model.zero_grad(set_to_none=True)
    skipped = [n for n in linear if n not in layers]
    ctx.details["semi_structured"] = sorted(layers)
    ctx.note(f"2:4 semi-structured: {len(layers)} Linear layers keep 2 of every 4 weights (50%)"
             + (f"; left dense (input width not a multiple of 4): {', '.join(skipped[:3])}" if skipped else "")
             + "; sparse tensor cores run them on a GPU with quant=fp16/bf16, elsewhere (a CPU, ONNX Runtime, "
             "OpenVINO) they run like unstructured sparsity: smaller compressed, no faster")
    return model


def is_two_four(weight) -> bool:
    """Whether a 2-D weight holds the 2:4 pattern: at most 2 non-zeros in every 4 consecutive weights of a row."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    nonzero = (weight.detach() != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return bool((nonzero <= 2).all())


# -- structured ------------------------------------------------------------------------------------------------
def _supported() -> tuple:
    """Layer types with weights that Torch-Pruning keeps consistent (subclasses too: ConvNeXt's LayerNorm,
    EfficientNet's depthwise Conv2d)."""
    from torch import nn

    return (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.BatchNorm1d,
            nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
            nn.Embedding, nn.PReLU, nn.MultiheadAttention)


def _channel_axis(p):
    """The axis of a per-channel parameter (its one axis longer than 1: ConvNeXt's layer scale [C], ConvNeXt-V2's
    GRN [1, 1, 1, C]), which Torch-Pruning cuts with its channels; None for other shapes. A one-element gate is not
    per-channel: coupled to the channels it scales, it would keep them all (Torch-Pruning passes over it)."""
    axes = [i for i, n in enumerate(p.shape) if n != 1]
    return axes[0] if len(axes) == 1 else None


def _check_supported(model, ignored: dict) -> None:
    from torch import nn

    supported = _supported()
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        left_out = any(name == i or name.startswith(i + ".") for i in ignored)
        if isinstance(m, nn.RNNBase) and not left_out:
            raise RecipeError(f"Prune(structured=True): {name!r} is a {type(m).__name__}, whose gates Torch-Pruning "
                              "cannot shrink consistently; use Prune(structured=False) or quant=int8-dynamic "
                              "(torch.ao quantizes LSTM and GRU layers)")
        if own and not isinstance(m, supported) and type(m).__name__ != "CastInputs" and not left_out \
                and not all(p.numel() == 1 or _channel_axis(p) is not None for p in own):  # (per-channel: cut too)
            raise RecipeError(
                f"Prune(structured=True): layer {name!r} ({type(m).__name__}) has its own weights and is a type "
                f"Torch-Pruning cannot prune consistently; leave it out with Prune(..., ignore=({name!r},)) "
                "or use structured=False")


def structured(model, step: Prune, ctx, layer_ratios: dict | None = None):
    """Remove whole output channels / neurons / attention heads; the model becomes a smaller dense model."""
    from torch import nn

    # a Hugging Face transformer (perhaps inside the user's wrapper, whose attention may be unknown), or one built
    # from torch's own layers: FFN neurons are cut and the width kept, which a positional table, a class token or
    # nn.Transformer's own checks read (Torch-Pruning narrowed it, and those failed)
    transformer = any(getattr(getattr(m, "config", None), "num_attention_heads", None)
                      or isinstance(m, nn.MultiheadAttention) for m in model.modules())
    if attention_blocks(model) or (transformer and feed_forward_blocks(model)):
        return _structured_transformer(model, step, ctx, layer_ratios)
    return _structured_graph(model, step, ctx, layer_ratios)


def _structured_transformer(model, step: Prune, ctx, layer_ratios: dict | None):
    """Transformers: heads (whole key/value groups) and FFN neurons, per block (see `heads`)."""
    from torch import nn

    from . import heads

    ignored, _ = _resolve_ignored(model, step)
    ratios = step.ratios()
    example = ctx.target.move(ctx.data.example_inputs)
    expected = _output_shapes(model, example)
    kinds = sorted({type(b.module).__name__ for b in attention_blocks(model)})
    before = previous = whole = None  # whole: why the attention's heads stopped being cut

    def cut(share: float, attention: bool) -> dict:
        """One round; where removing heads changes what the model computes, put the round back and cut the FFN
        neurons alone (for this round and the rest: BLOOM's ALiBi slopes, an attention rebuilt at its own width)."""
        nonlocal whole
        silenced, undo = [], []
        try:
            counts = heads.prune_transformer(model, share, step.criterion, set(ignored), layer_ratios,
                                             before_cut=lambda: silenced.extend(_outputs(model, example)),
                                             undo=undo, attention=attention)
        except BaseException:  # the model as it was, not half cut
            for put_back in reversed(undo):
                put_back()
            raise
        cut_heads = counts["heads"][0] != counts["heads"][1]
        try:
            _check_outputs(model, example, expected,
                           f"removing attention heads from {', '.join(kinds)} and FFN neurons" if cut_heads else
                           "removing FFN neurons", "leave its layers out with Prune(ignore=...), or use "
                           "structured=False", silenced=silenced)
        except ModelError as e:
            if not cut_heads:
                raise
            for put_back in reversed(undo):
                put_back()
            whole = first_line(e).removeprefix("Prune(structured=True): after ").split("; leave its layers")[0]
            return cut(share, attention=False)
        return counts

    for i, target in enumerate(ratios):
        ctx.progress(f"pruning round {i + 1}/{len(ratios)}: {target:.0%} of heads and FFN neurons", None)
        if step.criterion == "taylor":
            _taylor_grads(model, ctx)
        share = target if previous is None else 1 - (1 - target) / (1 - previous)  # of what is left
        counts = cut(share, attention=whole is None)
        before = before or counts
        previous = target
        model.zero_grad(set_to_none=True)
        _recover_between_rounds(model, ctx, i, len(ratios))
    kept = (f"; left alone: {', '.join(list(ignored)[:3])}" + (" ..." if len(ignored) > 3 else "")) if ignored else ""
    if counts["blocks"]:
        said = f"attention heads {before['heads'][0]} -> {counts['heads'][1]} (whole key/value groups)"
    elif any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        said = "attention left whole (torch's nn.MultiheadAttention works at the model's width, which stays)"
    else:
        said = "attention left whole (its layout is not one whose heads the pruner knows how to remove)"
    why = (f"; {'no more' if counts['heads'][1] < before['heads'][0] else 'no'} heads were removed, because "
           f"after {whole}; FFN neurons were cut alone from then on") if whole else ""
    ctx.note(f"structured: {said} and FFN neurons {before['neurons'][0]} -> {counts['neurons'][1]} in "
             f"{counts['ffn'] or counts['blocks']} blocks, by {step.criterion} importance per block; hidden size "
             f"and outputs kept{kept}{why}")
    ctx.details["structured"] = {"heads": (before["heads"][0], counts["heads"][1]),
                                 "neurons": (before["neurons"][0], counts["neurons"][1]),
                                 **({"attention_left_whole": whole} if whole else {})}
    return model


def _structured_graph(model, step: Prune, ctx, layer_ratios: dict | None):
    """Other models (conv nets, MLPs, torch's attention outside its encoder and decoder layers): Torch-Pruning's
    dependency graph keeps coupled layers (residual additions, norms, concatenations) consistent; the output layer
    keeps its width."""
    import warnings

    import torch_pruning as tp

    ignored, _ = _resolve_ignored(model, step)
    _check_supported(model, ignored)
    ignored_modules = list(ignored.values())
    supported = _supported()
    unwrapped = [(p, axis) for m in model.modules() if not isinstance(m, supported)  # e.g. ConvNeXt's layer scale
                 for p in m.parameters(recurse=False) if (axis := _channel_axis(p)) is not None]
    importance = {"l1": tp.importance.MagnitudeImportance(p=1), "l2": tp.importance.MagnitudeImportance(p=2),
                  "taylor": tp.importance.TaylorImportance()}[step.criterion]
    ratios = step.ratios()
    names = {id(m): n for n, m in model.named_modules()}
    ratio_dict = None
    if layer_ratios:
        modules = dict(model.named_modules())
        ratio_dict = {modules[n]: r for n, r in layer_ratios.items() if n in modules}
    example = ctx.target.move(ctx.data.example_inputs)
    expected = _output_shapes(model, example)
    looping = (f"Prune(structured=True): Torch-Pruning's dependency graph of this model was still being built "
               f"after {TP_GRAPH_SECONDS:g} s (its grouping can loop on some layouts, FocalNet's among them); leave "
               "the blocks it loops on out with Prune(ignore=...), or use structured=False")
    try:
        with warnings.catch_warnings(), deadline(TP_GRAPH_SECONDS):  # warnings: what it says of one-element
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")  # gates, rightly passed over
            pruner = tp.pruner.MetaPruner(
                model, example, importance=importance, pruning_ratio=step.sparsity, pruning_ratio_dict=ratio_dict,
                global_pruning=step.scope == "global" and not layer_ratios, ignored_layers=ignored_modules,
                iterative_steps=len(ratios), iterative_pruning_ratio_scheduler=lambda ratio, steps: [0.0] + [
                    r / step.sparsity * ratio if step.sparsity else 0.0 for r in ratios],
                max_pruning_ratio=MAX_LAYER_RATIO, unwrapped_parameters=unwrapped or None)
    except DeadlineExceeded as e:
        raise ModelError(looping) from e
    except Exception as e:
        raise ModelError(f"Prune(structured=True): Torch-Pruning could not trace the model's dependency graph "
                         f"({type(e).__name__}: {e}); ignore the layer it names with Prune(ignore=...)") from e
    for i, target in enumerate(ratios):
        ctx.progress(f"pruning round {i + 1}/{len(ratios)}: {target:.0%} of channels", None)
        if step.criterion == "taylor":
            _taylor_grads(model, ctx)
        try:
            with deadline(TP_GRAPH_SECONDS):  # each step groups the graph again
                pruner.step()
        except DeadlineExceeded as e:
            raise ModelError(looping) from e
        model.zero_grad(set_to_none=True)
        _check_outputs(model, example, expected, "Torch-Pruning",
                       "leave the layer it names out with Prune(ignore=...)",
                       "it cut the width that the last layers write; leave them out with Prune(ignore=...) (in an "
                       "encoder, its last norm), or use structured=False")
        _recover_between_rounds(model, ctx, i, len(ratios))
    heads = _resolve_ignored(model, step)[1]
    kept = [f"{n} (output head)" if n in heads else n for n in (names.get(id(m), "?") for m in ignored_modules[:3])]
    ctx.note(f"structured: removed {step.sparsity:.0%} of channels/neurons by {step.criterion} importance "
             f"({'global' if step.scope == 'global' and not layer_ratios else 'per layer'}); left alone: "
             f"{', '.join(kept) + (' ...' if len(ignored_modules) > 3 else '') or 'nothing'}")
    return model


def _check_outputs(model, example, expected: list, what: str, broken: str, reshaped: str | None = None,
                   silenced: list | None = None) -> None:
    """Refuse in one line a pruned model whose forward fails (`broken`: the way out), whose outputs changed shape
    (`reshaped`: the way out; default `broken`) or, given `silenced` (the outputs of the model before the cut with
    what it removes zeroed), that does not compute what that model computed."""
    import torch

    try:
        outputs = _outputs(model, example)
    except Exception as e:
        raise ModelError(f"Prune(structured=True): after {what}, the forward fails ({first_line(e, named=True)}); "
                         f"{broken}") from e
    shapes = [t.shape for t in outputs]
    if shapes != expected:
        i = next((i for i, (a, b) in enumerate(zip(shapes, expected)) if a != b), min(len(shapes), len(expected)))
        was, now = (tuple(s[i]) if i < len(s) else "nothing" for s in (expected, shapes))
        raise ModelError(f"Prune(structured=True): after {what}, the model's output shape would change from {was} "
                         f"to {now}; {reshaped or broken}")
    for got, want in zip(outputs, silenced or []):
        if got.is_floating_point():
            half = got.dtype.itemsize < 4  # rounding differs between the cut and the silenced model's products
            got, want = got.float(), want.float()
            finite = want[torch.isfinite(want)]
            scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
            if not torch.allclose(got, want, rtol=5e-2 if half else 1e-3, atol=(5e-2 if half else 1e-4) * scale,
                                  equal_nan=True):
                raise ModelError(f"Prune(structured=True): after {what}, the model no longer computes what it "
                                 "did with the removed heads and neurons silenced (outputs differ by up to "
                                 f"{float((got - want).abs().max()):.3g}); {broken}")


PER_HEAD = ("attentions", "cross_attentions", "encoder_attentions", "decoder_attentions", "past_key_values")


def _output_shapes(model, example) -> list:
    return [t.shape for t in _outputs(model, example)]


def _outputs(model, example) -> list:
    """The tensors in the model's output, in order (what structured pruning must keep): not those whose shape
    follows the head count (attention maps, a key/value cache returned as tensors)."""
    import torch

    found: list = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            found.append(value.detach().clone())
        elif isinstance(value, dict):  # Hugging Face's ModelOutput is one
            for k, v in value.items():
                if not (k in PER_HEAD or str(k).startswith("present")):
                    walk(v)
        elif isinstance(value, (tuple, list)):
            for v in value:
                walk(v)

    with torch.no_grad():
        walk(call_model(model.eval(), example))
    return found


def preflight(steps: list, facts) -> list[str]:
    if any(step.semi_structured for step in steps):
        if facts.target.is_cuda:
            return ["2:4 sparsity: sparse tensor cores pay on large products (layers of 1024 and up, many tokens); "
                    "small layers or batch 1 may gain nothing, and it needs quant=fp16/bf16 after it"]
        return ["2:4 sparsity runs no faster on a CPU (no sparse kernels); it pays on GPUs of compute 8.0+"]
    if any(not step.structured for step in steps):
        return ["unstructured sparsity: dense runtimes (torch eager, ONNX Runtime) skip no work for zeros, so expect "
                "a smaller compressed size and no speedup; structured=True removes whole channels"]
    return []


def search(trial, facts) -> list[str]:
    """Structured pruning with a recovery (fine-tuning or distillation from the original), where the data has a
    train split to recover on (without one, structured pruning only loses accuracy)."""
    if not facts.has_train:
        return []
    prune = trial.suggest_categorical("prune", [0.0, 0.25, 0.4, 0.5])
    if not prune:
        return []
    recovery = trial.suggest_categorical("recovery", ["finetune", "distill"])
    epochs = trial.suggest_int("recovery_epochs", 1, 3)
    return [f"prune={prune}:structured=true:scope=layer", f"{recovery}={epochs}"]


def seeds(facts) -> list[dict]:
    """Unpruned, then (on a CPU) half the channels with fine-tuning. On a GPU the seeds go to what wins there (fp16,
    compile, unpad: `compile.seeds`) unpruned: narrower layers do not shorten a launch-bound forward, and the
    search still explores pruning after the seeds."""
    if facts.target.is_cuda:
        return [{"prune": 0.0}]
    return [{"prune": 0.0}, {"prune": 0.5, "recovery": "finetune", "recovery_epochs": 2}]


@technique(Prune, preflight=preflight, search=search, seeds=seeds)
def prune_step(model, step: Prune, ctx):
    if step.sparsity == 0:
        ctx.note("Prune(sparsity=0): nothing to prune")
        return model
    layer_ratios = None
    if step.per_layer == "sensitivity":
        from ..measure.sensitivity import allocate_ratios

        ctx.progress("sensitivity analysis for per-layer ratios", None)
        layer_ratios = allocate_ratios(model, ctx.data, step, ctx.target, reference=ctx.original,
                                       ignored=_resolve_ignored(model, step)[0])
        ctx.note("per-layer ratios from sensitivity: " + ", ".join(f"{n} {r:.0%}" for n, r in layer_ratios.items()))
    model = model.to(ctx.target.device)
    if step.semi_structured:
        return semi_structured(model, step, ctx)
    return (structured if step.structured else unstructured)(model, step, ctx, layer_ratios)
