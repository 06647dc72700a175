"""Prune: unstructured magnitude/Taylor pruning (torch.nn.utils.prune, made permanent) and structured pruning that
physically removes channels, neurons and attention heads (Torch-Pruning's DepGraph keeps coupled layers consistent).

Only structured pruning makes a model faster on dense runtimes; unstructured pruning makes it compressible. The
result's notes say which one happened and what to expect.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..architectures import attention_modules, head_layer, prunable_layers
from ..errors import ModelError, RecipeError
from ..recipe import Step, option
from ..registry import technique
from ..tensors import call_model

TAYLOR_BATCHES = 4
MAX_LAYER_RATIO = 0.9  # never remove a whole layer


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

    def check(self):
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
    from ..train import task_loss

    loss = task_loss(ctx.data, reference=ctx.original)
    model.zero_grad()
    model.train()
    for inputs, targets in ctx.data.train_batches(limit=TAYLOR_BATCHES):
        loss(model, ctx.target.move(inputs), ctx.target.move(targets) if targets is not None else None).backward()
    model.eval()


def _recover_between_rounds(model, ctx, round_index: int, rounds: int) -> None:
    if round_index < rounds - 1:
        from ..train import fit

        fit(model, ctx.data, epochs=1, lr=1e-3, progress=ctx.progress, reference=ctx.original, target=ctx.target,
            label=f"recovery after pruning round {round_index + 1}/{rounds}")


# -- unstructured ----------------------------------------------------------------------------------------------
def unstructured(model, step: Prune, ctx, layer_ratios: dict | None = None):
    """Zero the smallest weights (by |w| or |w * grad|), globally or per layer; masks are made permanent."""
    import torch
    from torch.nn.utils import prune

    ignored, _ = _resolve_ignored(model, step)
    layers = {n: m for n, m in prunable_layers(model).items() if n not in ignored}
    if not layers:
        raise RecipeError("Prune: the model has no Linear or Conv layer left to prune after the ignored ones")
    targets = [(m, "weight") for m in layers.values()]
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
            scores = {(m, "weight"): (m.weight * m.weight.grad).abs().detach() for m in layers.values()}
        if step.scope == "global" and layer_ratios is None:
            prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount(step.sparsity),
                                      importance_scores=scores)
        else:
            for name, m in layers.items():
                prune.l1_unstructured(m, "weight", amount=amount((layer_ratios or {}).get(name, step.sparsity)),
                                      importance_scores=None if scores is None else scores[(m, "weight")])
        previous = target
        _recover_between_rounds(model, ctx, i, len(ratios))
    for m in layers.values():
        prune.remove(m, "weight")  # permanent: no weight_orig / weight_mask left behind
    with torch.no_grad():
        model.zero_grad(set_to_none=True)
    if step.criterion == "l2":
        ctx.note("for single weights L2 and L1 magnitude rank the same; L2 differs only for structured pruning")
    ctx.note(f"unstructured: {step.sparsity:.0%} of the weights in {len(layers)} layers are now zero; dense "
             "runtimes (torch eager, ONNX Runtime on CPU) skip no work for zeros, so expect no speedup, only a "
             "smaller compressed size (see sparse_size_bytes); structured=True removes whole channels and is "
             "the kind that runs faster")
    return model


# -- structured ------------------------------------------------------------------------------------------------
SUPPORTED = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "BatchNorm1d",
             "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "Embedding",
             "PReLU", "CastInputs")


def _check_supported(model, ignored: dict) -> None:
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        left_out = any(name == i or name.startswith(i + ".") for i in ignored)
        if own and type(m).__name__ not in SUPPORTED and not left_out:
            raise RecipeError(
                f"Prune(structured=True): layer {name!r} ({type(m).__name__}) has its own weights and is a type "
                f"Torch-Pruning cannot prune consistently; leave it out with Prune(..., ignore=({name!r},)) "
                "or use structured=False")


def structured(model, step: Prune, ctx, layer_ratios: dict | None = None):
    """Remove whole output channels / neurons / attention heads; the model becomes a smaller dense model."""
    import torch_pruning as tp

    ignored, _ = _resolve_ignored(model, step)
    _check_supported(model, ignored)
    attention = attention_modules(model)
    ignored_modules = list(ignored.values())
    num_heads = {}
    if attention:  # keep the hidden size: prune heads and FFN neurons only
        hidden = {m.query.in_features for m in attention}
        from torch import nn

        for m in attention:
            for lin in (m.query, m.key, m.value):
                num_heads[lin] = m.num_attention_heads
        qkv = {id(lin) for lin in num_heads}
        ignored_modules += [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in qkv
                            and m.out_features in hidden]
        ignored_modules += [m for m in model.modules() if isinstance(m, nn.Embedding)]
    importance = {"l1": tp.importance.MagnitudeImportance(p=1), "l2": tp.importance.MagnitudeImportance(p=2),
                  "taylor": tp.importance.TaylorImportance()}[step.criterion]
    ratios = step.ratios()
    names = {id(m): n for n, m in model.named_modules()}
    ratio_dict = None
    if layer_ratios:
        modules = dict(model.named_modules())
        ratio_dict = {modules[n]: r for n, r in layer_ratios.items() if n in modules}
    example = ctx.target.move(ctx.data.example_inputs)
    try:
        pruner = tp.pruner.MetaPruner(
            model, example, importance=importance, pruning_ratio=step.sparsity, pruning_ratio_dict=ratio_dict,
            global_pruning=step.scope == "global" and not layer_ratios, ignored_layers=ignored_modules,
            iterative_steps=len(ratios), iterative_pruning_ratio_scheduler=lambda ratio, steps: [0.0] + [
                r / step.sparsity * ratio if step.sparsity else 0.0 for r in ratios],
            max_pruning_ratio=MAX_LAYER_RATIO, num_heads=num_heads, prune_num_heads=bool(num_heads),
            head_pruning_ratio=step.sparsity if num_heads else 0.0, prune_head_dims=False)
    except Exception as e:
        raise ModelError(f"Prune(structured=True): Torch-Pruning could not trace the model's dependency graph "
                         f"({type(e).__name__}: {e}); ignore the layer it names with Prune(ignore=...)") from e
    for i, target in enumerate(ratios):
        ctx.progress(f"pruning round {i + 1}/{len(ratios)}: {target:.0%} of channels", None)
        if step.criterion == "taylor":
            _taylor_grads(model, ctx)
        pruner.step()
        for m in attention:  # tell Hugging Face attention how many heads it has now
            m.num_attention_heads = pruner.num_heads.get(m.query, m.num_attention_heads)
            m.all_head_size = m.num_attention_heads * m.attention_head_size
        model.zero_grad(set_to_none=True)
        try:
            call_model(model.eval(), example)
        except Exception as e:
            raise ModelError(f"Prune(structured=True) left a model whose forward fails ({type(e).__name__}: {e}); "
                             "leave the layer it names out with Prune(ignore=...)") from e
        _recover_between_rounds(model, ctx, i, len(ratios))
    kept = [f"{n} (output head)" if n == head_layer(model) else n for n in
            (names.get(id(m), "?") for m in ignored_modules[:3])]
    what = "attention heads and FFN neurons (hidden size kept)" if attention else "channels/neurons"
    ctx.note(f"structured: removed {step.sparsity:.0%} of {what} by {step.criterion} importance "
             f"({'global' if step.scope == 'global' and not layer_ratios else 'per layer'}); left alone: "
             f"{', '.join(kept) + (' ...' if len(ignored_modules) > 3 else '') or 'nothing'}")
    return model


def preflight(steps: list, facts) -> list[str]:
    if any(not step.structured for step in steps):
        return ["unstructured sparsity: dense runtimes (torch eager, ONNX Runtime) skip no work for zeros, so expect "
                "a smaller compressed size and no speedup; structured=True removes whole channels"]
    return []


def search(trial, facts) -> list[str]:
    """Structured pruning with a recovery (fine-tuning or distillation from the original)."""
    prune = trial.suggest_categorical("prune", [0.0, 0.25, 0.4, 0.5])
    if not prune:
        return []
    recovery = trial.suggest_categorical("recovery", ["finetune", "distill"])
    epochs = trial.suggest_int("recovery_epochs", 1, 3)
    return [f"prune={prune}:structured=true:scope=layer", f"{recovery}={epochs}"]


def seeds(facts) -> list[dict]:
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
    return (structured if step.structured else unstructured)(model, step, ctx, layer_ratios)
