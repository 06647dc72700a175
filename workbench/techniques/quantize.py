"""Quantize: int8 (dynamic, static or weight-only), int4 weight-only, fp16, bf16 or fp8, on whichever registered
backend runs that precision here.

What `auto` picks, and why, is written into the result's notes:
- on CUDA: fp16 (tensor cores; at small batches add `compile`, since launches, not arithmetic, set the time).
- int8 on CUDA: torchao's int8 dynamic quantization when torchao is installed (the `gpu` extra), else fp16, and
  the card says so: a request for int8 on a GPU never ends in an error.
- on CPU, when convolutions carry most MACs and a train split exists: static int8, calibrated (dynamic int8
  convolutions are slow or left in fp32).
- on CPU otherwise: dynamic int8 with per-channel weights (on all-MiniLM-L6-v2 it keeps cosine fidelity ~0.99
  where per-tensor gives ~0.96).
- int4 (and `int8-weight`): weights only, a scale per group of `group_size` inputs, activations in float (ONNX
  Runtime's MatMulNBits): for decoders generating at small batches, whose time goes to reading weights.

int8 on a CPU, where Linear layers carry the MACs and a train split gives calibration batches, first smooths the
Linear layers' inputs (SmoothQuant) and keeps in float the few layers where int8 measurably costs most
(`smoothing.py`): all-MiniLM-L6-v2 on sentences padded to each batch's longest goes from cosine 0.9928 to 0.9971.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..architectures import is_causal_lm, packs_tokens
from ..errors import RecipeError, WorkbenchError, first_line
from ..recipe import Step, option
from ..registry import backend_named, technique

QUANT_DTYPES = ("int8", "int8-dynamic", "int8-static", "int8-weight", "int4", "fp16", "bf16", "fp8", "auto")
WEIGHT_ONLY = ("int8-weight", "int4-weight")


@dataclass
class Quantize(Step):
    """Lower precision: int8 (dynamic, static or weight-only), int4 weight-only, fp16, bf16 or fp8 (GPUs with fp8
    units, through torchao); `auto` picks per model and device.

    `dtype="int8-static"` is shorthand for `dtype="int8", method="static"` (and `int8-weight` for weight-only).
    """

    kind = "quantize"
    short = "quant"
    main_field = "dtype"
    aliases = ("q",)
    stage = 2
    stage_note = "lowers the model to its runtime form (quantize last, once)"
    colour = "#1f77b4"

    dtype: str = option("int8", choices=QUANT_DTYPES, help="int8 picks static for conv nets, dynamic otherwise")
    method: str = option("auto", choices=("auto", "dynamic", "static", "weight"), help="int8 only")
    group_size: int = option(32, choices=(16, 32, 64, 128), help="int4 and int8-weight: inputs per weight scale")
    per_channel: bool = option(True, choices=(True, False), help="a weight scale per output channel")
    calibration: str = option("minmax", choices=("minmax", "entropy", "percentile"), help="static int8 only")
    format: str = option("qdq", choices=("qdq", "qoperator"), help="static int8 graph format")
    calibration_batches: int = option(8, low=1, high=10_000, integer=True, ui=(1, 64, 1))
    reduce_range: bool | None = option(None, choices=(None, True, False),
                                       help="7-bit weights; None: where the CPU lacks VNNI (avoids u8*s8 saturation)")
    exclude: tuple = option((), names=True, excludes=True, help="layers kept in full precision")
    smooth: float | None = option(0.85, optional=True, low=0, high=1, low_open=True, ui=(0.05, 1, 0.05),
                                  help="int8 on a CPU: SmoothQuant strength for Linear inputs (None: off)")
    keep: int | None = option(None, optional=True, low=0, high=10_000, integer=True, ui=(0, 12, 1),
                              help="int8 on a CPU: Linear layers kept in float where int8 costs most "
                                   "(None: those that stand out; 0: none)")
    bias_correction: bool = option(False, choices=(True, False), help="int8 on a CPU: correct int8 weights' "
                                   "mean shift in the biases")

    def check(self):
        if self.dtype in ("int8-dynamic", "int8-static", "int8-weight"):
            if self.method not in ("auto", self.dtype[5:]):
                raise RecipeError(f"Quantize: dtype={self.dtype!r} conflicts with method={self.method!r}")
            self.dtype, self.method = "int8", self.dtype[5:]
        if self.method != "auto" and self.dtype not in ("int8", "auto"):
            raise RecipeError(f"Quantize.method: {self.method!r} applies to int8 only, not dtype={self.dtype!r}")

    @property
    def needs_train(self) -> bool:
        return self.method == "static"

    @property
    def reads_train(self) -> bool:  # int8's smoothing and mixed precision calibrate on train batches where they are
        return self.needs_train or (self.dtype in ("int8", "auto") and self.method != "weight"
                                    and bool(self.smooth or self.bias_correction or self.keep != 0))

    def precisions(self) -> tuple:
        if self.dtype == "int8":
            return ("int8-dynamic", "int8-static") if self.method == "auto" else (f"int8-{self.method}",)
        if self.dtype == "int4":
            return ("int4-weight",)
        if self.dtype == "fp8":  # where fp8 does not run, fp16 does (with the reason on the card)
            return ("fp8", "fp16")
        return () if self.dtype == "auto" else (self.dtype,)

    def describe(self) -> str:
        head = f"quant={self.dtype}" + (f"-{self.method}" if self.method != "auto" else "")
        rest = Step.describe(self).split(":")[1:]
        return ":".join([head] + [p for p in rest if not p.startswith("method=")])


def plan(step: Quantize, facts, ctx) -> tuple[str, list[str]]:
    """(precision, reasons) after resolving `auto` for the model as the earlier steps left it (`facts`), the data
    and the target."""
    from ..target import runs_somewhere

    target, why = ctx.target, []
    dtype, method = step.dtype, step.method
    if dtype == "auto":
        dtype = "fp16" if target.is_cuda else "int8"
        why.append("auto: fp16 on CUDA (tensor cores; at small batches kernel launches, not arithmetic, set the "
                   "time, which compile with CUDA graphs removes)" if dtype == "fp16" else "auto: int8 on CPU")
    if dtype == "fp8" and not runs_somewhere("fp8", target):
        why.append("fp8 needs a GPU with fp8 units (compute capability 8.9+) and torchao (pip install "
                   "'workbench[gpu]'), which this machine lacks; fp16 instead" if target.is_cuda else
                   "fp8 runs on GPUs only; use quant=int8 on a CPU")
        if not target.is_cuda:
            raise RecipeError(f"{step.describe()}: {why[-1]}")
        return "fp16", why
    if dtype == "int4" or (dtype == "int8" and method == "weight"):
        why.append(f"{dtype} weight-only: weights in {dtype[3:]} bits with a scale per {step.group_size} inputs, "
                   "activations in float (ONNX Runtime's MatMulNBits, computing in int8 on the CPU)")
        return f"{dtype}-weight", why
    if dtype != "int8":
        return dtype, why
    if target.is_cuda:
        steps = ctx.recipe.steps if ctx.recipe is not None else ()
        return _int8_on_gpu(step, target, why, compiled=any(s.kind == "compile" for s in steps))
    share = facts.conv_share
    named = backend_named(target.backend) if target.backend != "auto" else None
    static_only = named is not None and "int8-static" in named.precisions(target) \
        and "int8-dynamic" not in named.precisions(target)  # OpenVINO: NNCF calibrates
    if method == "auto" and static_only and not facts.has_train:
        raise RecipeError(f"{step.describe()}: {named.title} runs int8 with static ranges only, calibrated on train "
                          "batches, and the data has no train split; give wb.Data(train=...), or use "
                          "backend='onnxruntime' or 'auto' for dynamic int8")
    if method == "auto":
        if (facts.conv_heavy or static_only) and facts.has_train and runs_somewhere("int8-static", target):
            method = "static"
            why.append(f"static int8: convolutions carry {share:.0%} of the MACs and static int8 runs them as "
                       f"integer convolutions end to end, calibrated on {step.calibration_batches} train batches"
                       if facts.conv_heavy else f"static int8: {named.title} runs int8 with static ranges only, "
                       f"calibrated on {step.calibration_batches} train batches")
        else:
            method = "dynamic"
            if not facts.conv_heavy:
                why.append("dynamic int8: Linear/MatMul layers carry the MACs; weights int8 per-channel, "
                           "activations quantized per batch")
            elif not facts.has_train:
                why.append("dynamic int8, not static: there is no train split to calibrate static int8 on")
    if method == "dynamic" and facts.conv_heavy:
        why.append(f"dynamic int8 on a conv net: convolutions carry {share:.0%} of the MACs, and dynamic int8 "
                   "convolutions run slowly (ONNX Runtime's ConvInteger) or stay in fp32 (torch.ao); static int8 "
                   "(with a train split to calibrate on) is the one that pays")
    if method == "static" and not facts.conv_heavy and not ctx.backend_for("int8-static", step).calibrates_int8:
        why.append("static int8 on a model whose MACs are in Linear/MatMul layers: transformers' activations have "
                   "outliers that ONNX Runtime's static ranges clip (all-MiniLM-L6-v2 measured here: fidelity 0.81 "
                   "static vs 0.99 dynamic); check the metric, use dtype='int8-dynamic', or backend='openvino' "
                   "(NNCF smooths them)")
    return f"int8-{method}", why


def _int8_on_gpu(step: Quantize, target, why: list, compiled: bool = False) -> tuple[str, list]:
    """int8 on a GPU: torchao's dynamic int8 where it is installed (static int8 has no GPU path here), else fp16;
    the reason goes on the card either way (and, unless the recipe compiles it, that compile should follow)."""
    from ..target import runs_somewhere

    if runs_somewhere("int8-dynamic", target):
        if step.method == "static":
            why.append("static int8 has no GPU path here; torchao's dynamic int8 (int8 weights per channel, "
                       "activations per token) runs instead")
        else:
            why.append("int8 on the GPU: torchao's dynamic int8 (int8 tensor-core matmuls on Linear layers)")
        if not compiled:
            why.append("torchao's int8 quantizes activations in kernels of their own unless compiled, so put compile "
                       "after it (quant=int8,compile): eager it can be slower than fp32 at small batches")
        return "int8-dynamic", why
    why.append("int8 on this GPU needs torchao (pip install 'workbench[gpu]'), which is not installed: fp16 "
               "instead, which runs on the tensor cores and halves the size")
    return "fp16", why


def _check_exclude(model, step: Quantize) -> None:
    modules = dict(model.named_modules())
    unknown = [name for name in step.exclude if name not in modules]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], modules, n=1)
        raise RecipeError(f"Quantize.exclude: the model has no layer named {unknown[0]!r}"
                          + (f"; did you mean {close[0]!r}?" if close else "; names are as in model.named_modules()"))


def preflight(steps: list, facts) -> list[str]:
    target, lines = facts.target, []
    for step in steps:
        int8 = step.dtype in ("int8", "auto") and not target.is_cuda
        if int8 and not target.cpu.vnni:
            lines.append(f"int8 on a CPU without VNNI ({target.cpu.describe()}): int8 matrix products take AVX2's "
                         "u8 x s8 path with 7-bit weights, short of the 4x int8 ceiling; how much is left depends on "
                         "the model, so measure it")
        if int8 and step.method == "auto" and facts.bert_encoders and target.backend == "auto" \
                and not backend_named("openvino").available(target):
            lines.append("int8 of a BERT encoder: OpenVINO + NNCF (pip install 'workbench[openvino]') kept more of "
                         "all-MiniLM-L6-v2 than ONNX Runtime's int8 (nearest neighbours 96% vs 94%) and was faster "
                         "at batch 32 (3.5x (3.2-3.6) torch fp32 against 1.8x (1.7-1.9), one run, Xeon with VNNI, "
                         "2 threads); without it ONNX Runtime runs it")
        if int8 and step.method == "dynamic" and facts.conv_heavy:
            lines.append(f"dynamic int8 of convolutions ({facts.conv_share:.0%} of the MACs): ONNX Runtime runs "
                         "them as ConvInteger, often slower than fp32; static int8 is the one that pays")
        if step.dtype in ("fp16", "bf16") and not target.native(step.dtype):
            lines.append(f"{step.dtype} on this CPU has no native matrix units: expect it slower than fp32 "
                         "(it halves the size)")
        if target.is_cuda and step.dtype in ("fp16", "bf16", "fp8", "auto"):
            lines += _tensor_core_shapes(facts.model)
    return lines


def _tensor_core_shapes(model) -> list[str]:
    """On a GPU, Linear layers whose sizes are not multiples of 8: their half-precision matrix products cannot run
    on the tensor cores at full rate (fp8 needs multiples of 16)."""
    from torch import nn

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)] \
        if hasattr(model, "named_modules") else []
    off = [(n, m) for n, m in linears if m.in_features % 8 or m.out_features % 8]
    if not off:
        return []
    name, m = max(off, key=lambda nm: nm[1].in_features * nm[1].out_features)
    return [f"tensor cores: {len(off)} of {len(linears)} Linear layers have sizes that are not multiples of 8 (the "
            f"largest: {name!r}, {m.in_features} x {m.out_features}), so their fp16/bf16 products run below the "
            "tensor cores' rate; it matters where they carry many of the MACs"]


def _options(facts) -> list[str]:
    """The precisions worth searching here: those some backend runs, that have what they need, that can pay."""
    from ..target import runs_somewhere

    target = facts.target
    wanted = [p for p in ("int8-static", "int8-dynamic") if runs_somewhere(p, target)
              and (p != "int8-static" or facts.has_train)]
    wanted += [p for p in ("fp16", "bf16", "fp8") if (p == "fp8" or target.native(p)) and runs_somewhere(p, target)]
    if is_causal_lm(facts.model):  # decoders generating token by token: reading weights sets the time
        wanted += [p for p in WEIGHT_ONLY if runs_somewhere(p, target)]
    return wanted + ["none"]


def search(trial, facts) -> list[str]:
    quant = trial.suggest_categorical("quant", _options(facts))
    if quant == "none":
        return []
    if quant in WEIGHT_ONLY:
        return ["quant=int4" if quant == "int4-weight" else "quant=int8-weight"]
    if not quant.startswith("int8") or facts.target.is_cuda:  # on a GPU int8 has one form (torchao's dynamic)
        return [f"quant={quant}"]
    per_channel = trial.suggest_categorical("per_channel", [True, False])
    part = f"quant={quant}:per_channel={'true' if per_channel else 'false'}"
    if not facts.conv_heavy and facts.has_train:  # smoothing and mixed precision calibrate on train batches
        part += f":smooth={trial.suggest_categorical('smooth', ['0.85', '0.5', 'none'])}"
        part += f":keep={trial.suggest_categorical('keep', ['none', '0', '3'])}"  # none: where int8 stands out
    if quant == "int8-static":  # after unpad, ONNX Runtime's histogram calibrators fail on varying token counts
        part += ":calibration=" + ("minmax" if trial.params.get("unpad") else
                                   trial.suggest_categorical("calibration", ["minmax", "entropy", "percentile"]))
    return [part]


def seeds(facts) -> list[dict]:
    """What `quant=int8` would run first (OpenVINO's int8 where it leads), then ONNX Runtime's dynamic int8."""
    options = _options(facts)
    first = "fp16" if facts.target.is_cuda else "int8-static" if facts.conv_heavy and "int8-static" in options \
        else "int8-dynamic" if "int8-dynamic" in options else options[0]
    seed = {"quant": first, "per_channel": True, "calibration": "minmax", "smooth": "0.85", "keep": "none"}
    if openvino_leads(facts):
        return [{**seed, "quant": "int8-static", "backend int8-static": "openvino"}, seed]
    return [seed]


@technique(Quantize, preflight=preflight, search=search, seeds=seeds, suggested=lambda facts: True, graphs=True)
def quantize(model, step: Quantize, ctx):
    from ..facts import ModelFacts

    if hasattr(model, "named_modules"):
        _check_exclude(model, step)
    facts = ModelFacts(model, ctx.data, ctx.target)  # of the model as the earlier steps left it
    precision, why = plan(step, facts, ctx)
    if precision == "int8-dynamic" and _openvino_pays(step, facts):
        try:
            lowered = backend_named("openvino").lower(model, "int8-static", ctx,
                                                      calibration_batches=step.calibration_batches)
        except WorkbenchError:
            raise
        except Exception as e:  # OpenVINO or NNCF could not take this model: the other int8 path, with the reason
            why.append(f"OpenVINO + NNCF could not take this model ({first_line(e, 160)}); ONNX Runtime's dynamic "
                       "int8 instead")
        else:
            for reason in [r for r in why if not r.startswith("dynamic int8")] + [OPENVINO_WHY]:
                ctx.note(reason)
            return lowered
    for reason in why:
        ctx.note(reason)
    if precision == "int8-dynamic" and step.method == "auto" and packs_tokens(model) and _openvino_runs_int8(facts):
        ctx.note(UNPAD_ON_OPENVINO)
    model, keep = _int8_fidelity(model, facts, precision, step, ctx)
    return _lower(model, precision, step, ctx, exclude=tuple(dict.fromkeys(step.exclude + keep)))


OPENVINO_WHY = ("int8 through OpenVINO + NNCF (its transformer preset: SmoothQuant, fast bias correction; static "
                "int8 calibrated on train batches): on all-MiniLM-L6-v2 (Xeon with VNNI, 2 threads, sentences padded "
                "to each batch's longest) it kept cosine 0.998 and 96% of nearest neighbours where ONNX Runtime's "
                "dynamic int8 kept 0.997 and 94%; against torch fp32 in the same run 3.9x (3.0-4.4) vs 3.5x "
                "(3.1-3.8) at batch 1 and 3.5x (3.2-3.6) vs 1.8x (1.7-1.9) at batch 32; "
                "quant=int8-dynamic or backend='onnxruntime' takes ONNX Runtime's")


UNPAD_ON_OPENVINO = ("after unpad, int8 runs on ONNX Runtime (OpenVINO ran unpad's packed graph 2x slower at batch 1); "
                     "without unpad, quant=int8 runs OpenVINO's int8, which was ahead at batch 32 on "
                     "all-MiniLM-L6-v2 here even with 59% padding (Xeon with VNNI and AMX, 2 threads: 3.2x (2.6-4.1) "
                     "torch fp32 against unpad's 2.3x (2.1-2.9), one benchmarks/autotune.py run): time both on your "
                     "data with wb.compare")


def _openvino_pays(step: Quantize, facts) -> bool:
    """Whether the default int8 goes to OpenVINO + NNCF: a Hugging Face BERT encoder (where it was measured to
    lead; not after unpad, whose varying token counts it ran 2x slower at batch 1), a train split to calibrate on,
    backend='auto', nothing excluded, and OpenVINO with NNCF installed."""
    return step.method == "auto" and not step.exclude and hasattr(facts.model, "named_modules") \
        and openvino_leads(facts)


def openvino_leads(facts) -> bool:
    """A Hugging Face BERT encoder with a train split, on a CPU where OpenVINO + NNCF run int8 and the backend is
    auto: where OpenVINO's int8 was measured ahead (see OPENVINO_WHY)."""
    return bool(facts.bert_encoders) and _openvino_runs_int8(facts)


def _openvino_runs_int8(facts) -> bool:
    target = facts.target
    return facts.has_train and target.backend == "auto" and not target.is_cuda \
        and "int8-static" in backend_named("openvino").precisions(target)


def _int8_fidelity(model, facts, precision: str, step: Quantize, ctx) -> tuple:
    """(model, layers to keep in float): smoothing, bias correction and mixed precision before int8 on a CPU, where
    Linear layers carry the MACs and there are train batches to calibrate on (see smoothing.py)."""
    from . import smoothing

    wanted = step.smooth or step.bias_correction or step.keep != 0
    if not wanted or precision not in ("int8-dynamic", "int8-static") or ctx.target.is_cuda \
            or not hasattr(model, "named_modules") or not smoothing.linears(model):
        return model, ()
    if facts.conv_heavy or ctx.backend_for(precision, step).calibrates_int8:
        return model, ()
    if not facts.has_train:
        ctx.note("int8 without smoothing or mixed precision: they calibrate on train batches and the data has "
                 "no train split")
        return model, ()
    ctx.progress(f"int8 fidelity: calibrating on {step.calibration_batches} train batches", None)
    batches = [ctx.target.move(inputs) for inputs, _ in ctx.data.train_batches(limit=step.calibration_batches)]
    bits = 7 if (step.reduce_range if step.reduce_range is not None else not ctx.target.cpu.vnni) else 8
    model, done = smoothing.prepare(model, batches, step.smooth, step.bias_correction, step.keep, bits)
    if done.smoothed or done.folded:
        ctx.note(f"int8 smoothing (SmoothQuant, strength {step.smooth}): {len(done.smoothed) + len(done.folded)} "
                 f"Linear inputs' outlier channels moved into the weights ({len(done.folded)} folded into the "
                 "layer before, the rest by a multiply in front)")
    if done.skipped:
        ctx.note(f"int8 without smoothing: {done.skipped}, so it was left out")
    if done.corrected:
        ctx.note(f"bias correction: {done.corrected} biases take back their int8 weights' mean shift")
    if done.keep:
        count = "1 Linear layer stays" if len(done.keep) == 1 else f"{len(done.keep)} Linear layers stay"
        ctx.note(f"mixed precision: {count} in float, where int8 alone cost the "
                 f"output most of the {len(done.errors)} measured ({', '.join(done.keep[:3])}"
                 f"{' ...' if len(done.keep) > 3 else ''})")
    return model, tuple(done.keep)


def _lower(model, precision: str, step: Quantize, ctx, exclude: tuple = ()):
    """Lower with the first backend that runs `precision` here; with backend='auto', when one cannot export this
    model (an ONNX graph traced to one sequence length), with the next one, and the card says why. A runtime
    graph the user brought is quantized by its own backend, or refused."""
    from ..errors import ExportError
    from ..registry import backend_of, backends_for

    if not hasattr(model, "named_modules"):
        options = [backend_of(model)]
        if precision not in options[0].precisions(ctx.target):
            raise RecipeError(f"{step.describe()}: {precision} of a {options[0].title} graph is not supported here; "
                              f"it takes {', '.join(p for p in options[0].precisions(ctx.target) if p != 'fp32')}")
    else:
        first = ctx.backend_for(precision, step)  # one clear error when none runs it
        options = [first, *[b for b in backends_for(precision, ctx.target) if b is not first]]
    first_error = None
    for i, backend in enumerate(options):
        try:
            return backend.lower(model, precision, ctx, per_channel=step.per_channel, reduce_range=step.reduce_range,
                                 calibration=step.calibration, format=step.format, exclude=exclude,
                                 calibration_batches=step.calibration_batches, group_size=step.group_size)
        except ExportError as e:
            first_error = first_error or e
            if ctx.target.backend == "auto" and precision in ("int8-static", *WEIGHT_ONLY) and i == len(options) - 1:
                reason = first_line(first_error).split("; use backend=")[0]
                raise RecipeError(f"{step.describe()}: {reason}; no backend runs {precision} on this model here, "
                                  "so use quant=int8-dynamic (torch.ao runs it on this model)") from e
            if i == len(options) - 1 or ctx.target.backend != "auto":
                raise
            ctx.note(f"{backend.title} could not take this model ({first_line(e, 160)}); "
                     f"{options[i + 1].title} runs {precision} instead")
    raise AssertionError("unreachable")
