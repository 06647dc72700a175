"""Distill: train a student to imitate a teacher.

- classification (logits + labels): Hinton et al.'s loss, alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) plus
  (1 - alpha) * the task loss on the labels;
- embedding models (fidelity metric, e.g. minilm): 1 - cosine between the student's and the teacher's embeddings,
  on unlabeled text;
- optional hidden-feature matching (MSE), through a learned projection when widths differ.

The best validation checkpoint is kept and training stops early when the metric stops improving, so a run
never leaves a student worse than the one it started from.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ..errors import ModelError, RecipeError
from ..recipe import Step, option
from ..registry import technique
from ..tensors import call_model, first_tensor, seeded

STUDENT_SPEC = r"(width|depth)=(\d*\.)?\d+"


@dataclass
class Distill(Step):
    """Train the model (student) to match a teacher's softened outputs (Hinton et al.), or its embeddings.

    teacher: None (the original model), a built-in name, or a torch module.
    student: None (the model coming out of the previous steps), a spec like 'width=0.5' (built-in families) or
        'depth=0.5' (keep every other transformer layer), or a torch module.
    features: hidden states to match too, as 'layer' or 'student_layer:teacher_layer' names (MSE, with a learned
        projection when widths differ).
    """

    kind = "distill"
    short = "distill"
    main_field = "epochs"
    colour = "#2ca02c"

    epochs: int = option(3, low=1, high=10_000, integer=True, flag="--epochs", ui=(1, 20, 1))
    teacher: Any = option(None, module="", flag="--teacher", help="the original (None), a built-in or a module")
    student: Any = option(None, module=STUDENT_SPEC, help="None, 'width=W', 'depth=D' or a module")
    temperature: float = option(4.0, low=0, high=1e6, low_open=True)
    alpha: float = option(0.9, low=0, high=1)
    lr: float = option(1e-3, low=0, high=10, low_open=True)
    features: tuple = option((), names=True)
    patience: int | None = option(2, low=1, high=10_000, integer=True, optional=True)

    @property
    def needs_train(self) -> bool:
        return True


def _resolve_teacher(step: Distill, ctx):
    if step.teacher is None or step.teacher == "original":
        return ctx.original
    if isinstance(step.teacher, str):
        from .. import zoo

        if step.teacher.startswith("<"):
            raise RecipeError(f"Distill.teacher: {step.teacher} was a module given in Python and cannot be rebuilt "
                              "from a recipe file; pass the module again: Distill(teacher=model)")
        if step.teacher not in zoo.list():
            raise RecipeError(f"Distill.teacher: {step.teacher!r} is not a built-in ({', '.join(zoo.list())}); pass "
                              "a torch module, or None for the original model")
        return zoo.load(step.teacher)[0]
    return step.teacher


def build_student(spec: str, teacher):
    """A smaller model from a spec: 'width=W' rebuilds a built-in family narrower (fresh weights, seeded);
    'depth=D' keeps every 1/D-th block of a transformer's layer list (weights copied from the teacher)."""
    import torch

    kind, value = spec.split("=")
    factor = float(value)
    if not 0 < factor <= 1:
        raise RecipeError(f"Distill.student: {spec!r}: the multiplier must be in (0, 1]")
    if kind == "width":
        family = getattr(teacher, "workbench_family", None)
        if family is None:
            raise RecipeError("Distill.student: 'width=...' builds students for the built-in families only "
                              "(digits-mlp, digits-cnn); pass your own smaller module as student=")
        from .. import modules

        with seeded(0):
            student = getattr(modules, family)(width=factor)
        student.workbench_family = family
        return student
    layers = _layer_list(teacher)
    if layers is None:
        raise RecipeError("Distill.student: 'depth=...' needs a model with a list of repeated blocks "
                          "(e.g. a transformer's encoder.layer); pass your own smaller module as student=")
    parent, name, blocks = layers
    step = max(1, round(1 / factor))
    student = copy.deepcopy(teacher)
    chosen = list(range(0, len(blocks), step))
    kept = torch.nn.ModuleList(copy.deepcopy(blocks[i]) for i in chosen)
    _set_module(student, parent, name, kept)
    _renumber(student, kept, chosen)
    return student


def _renumber(student, kept, chosen: list) -> None:
    """A Hugging Face model's blocks index their key/value cache by `layer_idx`, and its config counts them: both
    follow the kept blocks, so that the shallower student generates with a cache of its own depth."""
    for i, block in enumerate(kept):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = i
    config = getattr(student, "config", None)
    if config is not None and isinstance(getattr(config, "num_hidden_layers", None), int):
        config.num_hidden_layers = len(kept)
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) > max(chosen):
            config.layer_types = [types[i] for i in chosen]


def _layer_list(model):
    """(parent path, attribute, ModuleList) of the longest list of same-type blocks."""
    from torch import nn

    best = None
    for path, m in model.named_modules():
        for name, child in m.named_children():
            if isinstance(child, nn.ModuleList) and len(child) >= 2 and len({type(c) for c in child}) == 1:
                if best is None or len(child) > len(best[2]):
                    best = (path, name, child)
    return best


def _set_module(model, parent_path: str, name: str, value) -> None:
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, value)


def _feature_pairs(step: Distill, student, teacher) -> list[tuple[str, str]]:
    pairs = []
    for item in step.features:
        s_name, _, t_name = item.partition(":")
        t_name = t_name or s_name
        for who, model, n in (("student", student, s_name), ("teacher", teacher, t_name)):
            if n not in dict(model.named_modules()):
                raise RecipeError(f"Distill.features: the {who} has no layer {n!r}")
        pairs.append((s_name, t_name))
    return pairs


class _Capture:
    """Keeps the latest output of named layers."""

    def __init__(self, model, names):
        self.out, modules = {}, dict(model.named_modules())
        self.hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: self.out.__setitem__(n, first_tensor(o)))
                      for n in names]

    def remove(self):
        for h in self.hooks:
            h.remove()


def _projection(s_feat, t_feat):
    """A learned map from the student's feature width to the teacher's (channels: 1x1 conv; else Linear)."""
    from torch import nn

    if s_feat.shape == t_feat.shape:
        return None
    if s_feat.dim() == 4 and s_feat.shape[2:] == t_feat.shape[2:]:
        return nn.Conv2d(s_feat.shape[1], t_feat.shape[1], 1, bias=False)
    if s_feat.shape[:-1] == t_feat.shape[:-1]:
        return nn.Linear(s_feat.shape[-1], t_feat.shape[-1], bias=False)
    raise RecipeError(f"Distill.features: student feature {tuple(s_feat.shape)} and teacher feature "
                      f"{tuple(t_feat.shape)} differ in more than width; pick layers with matching spatial size")


@technique(Distill)
def distill(model, step: Distill, ctx):
    import torch
    import torch.nn.functional as F

    from ..train import fit, task_loss

    teacher = copy.deepcopy(_resolve_teacher(step, ctx)).eval().to(ctx.target.device)
    if isinstance(step.student, str) and step.student != "original":
        student = build_student(step.student, teacher)
    elif step.student is not None and hasattr(step.student, "parameters"):
        student = copy.deepcopy(step.student)
    else:
        student = model
    student = student.to(ctx.target.device)
    for p in teacher.parameters():
        p.requires_grad_(False)

    example = ctx.target.move(ctx.data.example_inputs)
    with torch.no_grad():
        t_out = first_tensor(call_model(teacher, example))
        try:
            s_out = first_tensor(call_model(student.eval(), example))
        except Exception as e:
            raise ModelError(f"Distill: the student's forward fails on the data ({type(e).__name__}: {e})") from e
    if t_out.shape != s_out.shape:
        raise RecipeError(f"Distill: the teacher's outputs have shape {tuple(t_out.shape)} but the student's have "
                          f"{tuple(s_out.shape)}; logits/embeddings can only be distilled between models with the "
                          "same outputs. Give the student the teacher's output size, or match hidden states with "
                          "Distill(features=('student_layer:teacher_layer',)), which learns a projection")

    pairs = _feature_pairs(step, student, teacher)
    s_cap, t_cap = _Capture(student, [s for s, _ in pairs]), _Capture(teacher, [t for _, t in pairs])
    projections = {}
    if pairs:
        with torch.no_grad():
            call_model(student, example), call_model(teacher, example)
        for s_name, t_name in pairs:
            proj = _projection(s_cap.out[s_name], t_cap.out[t_name])
            if proj is not None:
                projections[s_name] = proj.to(ctx.target.device)

    embedding = ctx.data.metric == "fidelity"
    task = None if embedding else task_loss(ctx.data, reference=teacher)
    T, alpha = step.temperature, step.alpha

    def loss(student_model, inputs, targets):
        with torch.no_grad():
            t_logits = first_tensor(call_model(teacher, inputs)).float()
        s_logits = first_tensor(call_model(student_model, inputs)).float()
        if embedding:  # the teacher's embeddings are the targets
            value = (1 - F.cosine_similarity(s_logits.flatten(1), t_logits.flatten(1), dim=1)).mean()
        else:
            kd = F.kl_div(F.log_softmax(s_logits / T, dim=-1), F.softmax(t_logits / T, dim=-1),
                          reduction="batchmean") * T * T
            value = alpha * kd
            if targets is not None and alpha < 1:
                value = value + (1 - alpha) * task(student_model, inputs, targets)
        for s_name, t_name in pairs:
            s_feat = s_cap.out[s_name].float()
            s_feat = projections[s_name](s_feat) if s_name in projections else s_feat
            value = value + F.mse_loss(s_feat, t_cap.out[t_name].float())
        return value

    extra = [p for proj in projections.values() for p in proj.parameters()]
    fresh = isinstance(step.student, str) and step.student.startswith("width")
    try:
        student, history = fit(student, ctx.data, epochs=step.epochs, lr=step.lr, loss=loss, progress=ctx.progress,
                               reference=teacher, target=ctx.target, label="distilling", patience=step.patience,
                               extra_params=extra,
                               start_from_scratch=fresh)
    finally:
        s_cap.remove()
        t_cap.remove()
    best = max(history[1:] if fresh else history, key=lambda row: row["metric"])
    what = "embeddings (cosine)" if embedding else f"softened logits (T={T}, alpha={alpha})"
    ctx.note(f"distilled {what} from the {'original' if step.teacher is None else 'given'} teacher into "
             f"{'a new student ' + step.student if isinstance(step.student, str) else 'the model'} for "
             f"{len(history) - 1} epoch(s): {ctx.data.metric_name} {history[0]['metric']:.4f} -> "
             f"{best['metric']:.4f} (best epoch {best['epoch']} kept)")
    return student.eval()

