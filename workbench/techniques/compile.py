"""Compile: run the (float, fp16/bf16 or torchao-quantized) torch model through `torch.compile`, last.

On a GPU a small batch waits on kernel launches, not on arithmetic: a MiniLM-shaped BERT at batch 1 spends ~3 ms
launching ~100 small kernels whatever their dtype, so fp16 alone gains nothing there. `torch.compile` fuses
elementwise work into fewer kernels (inductor), and `mode="reduce-overhead"` records the whole forward as CUDA
graphs and replays it with one launch. Measured on an H100 (issue 17), fp16 + compile with CUDA graphs ran a
MiniLM-shaped BERT 6.2x / 9.2x / 6.1x faster than fp32 eager at batch 1 / 32 / 256, where fp16 eager gave
0.9x / 0.8x / 2.3x.

The price is compile time (tens of seconds per input shape, paid on the first call at each shape; the timing
warm-up pays it before any timed round) and, with CUDA graphs, outputs that live in a buffer the next call
overwrites: `Compiled` returns copies, so a caller may keep them. Saving writes the model without its compiled
form (a compiled function is not a file); load it and compile again where it runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..architectures import packs_tokens
from ..errors import RecipeError
from ..recipe import Step, option
from ..registry import technique

MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # inductor records CUDA graphs in these (on a GPU)


@dataclass
class Compile(Step):
    """`torch.compile` the model, last: fused kernels, and on a GPU CUDA graphs (`auto` = reduce-overhead there)."""

    kind = "compile"
    short = "compile"
    main_field = "mode"
    stage = 3
    stage_note = "compiles the model as it is (compile last)"
    colour = "#17becf"

    mode: str = option("auto", choices=MODES, help="auto: reduce-overhead (CUDA graphs) on a GPU, default on a CPU")
    dynamic: bool | None = option(None, choices=(None, True, False),
                                  help="None: torch's default (one graph per shape, then one for all when shapes "
                                       "keep changing); True: one for all from the start; False: one per shape")


def resolved_mode(step: Compile, target) -> str:
    if step.mode != "auto":
        return step.mode
    return "reduce-overhead" if target.is_cuda else "default"


def preflight(steps: list, facts) -> list[str]:
    """When compiling will and will not pay: launch-bound shapes, compile time, CUDA graphs on a CPU."""
    target, lines = facts.target, []
    if not steps:
        if target.is_cuda and facts.launch_bound:
            lines.append("launch-bound on this GPU: at the smallest batch the forward is many small kernels, so its "
                         "time is kernel launches, which fp16 alone does not shorten; add compile (CUDA graphs "
                         "replay the whole forward as one launch)")
        return lines
    for step in steps:
        mode = resolved_mode(step, target)
        if mode in CUDA_GRAPH_MODES and not target.is_cuda:
            lines.append(f"compile:mode={mode} records CUDA graphs, which need a GPU: on this CPU it is plain "
                         "inductor compilation")
        lines.append("compile: the first call at each input shape compiles (tens of seconds, more on few cores); "
                     "timing warms up past it, and the speed is what a long-running server sees")
    return lines


def search(trial, facts) -> list[str]:
    """On a GPU only (on a CPU compile time dwarfs a search's budget); after unpad too, whose packed encoder then
    rounds its token counts to a few sizes (CUDA graphs replay fixed shapes)."""
    if not facts.target.is_cuda:
        return []
    return ["compile"] if trial.suggest_categorical("compile", [True, False]) else []


def seeds(facts) -> list[dict]:
    """On a GPU: compiled first (launch-bound batches); where unpad has seeds, compiled with unpad second, then
    unpad alone (`unpad.seeds`)."""
    if not facts.target.is_cuda:
        return []
    return [{"compile": True}] * (2 if facts.padded else 1) + [{"compile": False}]


@technique(Compile, preflight=preflight, search=search, seeds=seeds, suggested=lambda facts: facts.target.is_cuda)
def apply_compile(model, step: Compile, ctx):
    from torch import nn

    from ..wrappers import Compiled

    if not isinstance(model, nn.Module):
        raise RecipeError(f"{step.describe()}: torch.compile runs torch models, and this one is a runtime graph "
                          f"({type(model).__name__}); use it with backend='torch', or leave compile out")
    if isinstance(model, Compiled):
        raise RecipeError(f"{step.describe()}: the model is compiled already; give compile once")
    mode = resolved_mode(step, ctx.target)
    if step.mode == "auto":
        ctx.note(f"compile: mode={mode}" + (" (CUDA graphs: the forward replays as one launch)"
                                            if mode in CUDA_GRAPH_MODES and ctx.target.is_cuda else ""))
    graphs = ctx.target.is_cuda and mode in CUDA_GRAPH_MODES
    if graphs and packs_tokens(model):
        from .packed_bert import DENSE_BELOW

        for packed in model.modules():
            if getattr(packed, "packs_tokens", False):
                packed.rounded, packed.dense_below = True, DENSE_BELOW
        ctx.note(f"compile after unpad: batches of fewer than {DENSE_BELOW} token slots (batch x length) run every "
                 "position in one graph (launch-bound: skipping padding saves nothing there, and finding it costs a "
                 "sync with the GPU); larger ones skip padding, and the packed encoder rounds its token count up to "
                 "one of 8 sizes per doubling (at most 1/8 more tokens from 64 on, up to 7 more below), so CUDA "
                 "graphs record one graph per size, not one per batch")
    return Compiled(model, mode, step.dynamic, graphs=graphs)
