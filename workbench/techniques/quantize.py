"""Quantize: int8 (dynamic or static) through ONNX Runtime or torch.ao, fp16/bf16 through torch.

What `auto` picks, and why, is written into the result's notes:
- on CUDA: fp16 (tensor cores; int8 kernels here are CPU-only).
- on CPU, convolutions carry most MACs and a train split exists: static int8, QDQ, per-channel, calibrated
  (dynamic int8 convolutions run as ConvInteger, which is slow in ONNX Runtime).
- on CPU otherwise: dynamic int8, per-channel weights (no calibration data needed; on all-MiniLM-L6-v2 it keeps
  cosine fidelity ~0.99 where per-tensor gives ~0.96).
"""
from __future__ import annotations

from ..backends.ort import OrtModel, quantize_dynamic, quantize_static
from ..backends.torch_eager import dynamic_int8, to_dtype
from ..errors import DeviceError, RecipeError
from ..measure import conv_share, cpu_info
from ..recipe import Quantize
from ..registry import technique

CONV_HEAVY = 0.5


def plan(step: Quantize, model, ctx) -> tuple[str, str, list[str]]:
    """(dtype, method, reasons) after resolving `auto` for this model, backend and device."""
    dtype, method, why = step.dtype, step.method, []
    if dtype == "auto":
        dtype = "fp16" if ctx.device.startswith("cuda") else "int8"
        why.append("auto: fp16 on CUDA (tensor cores run it at several times fp32's rate)" if dtype == "fp16"
                   else "auto: int8 on CPU")
    if dtype != "int8":
        return dtype, method, why
    share = conv_share(model, ctx.data.inputs(1))
    conv_heavy = share > CONV_HEAVY
    if method == "auto":
        if conv_heavy and ctx.data.train is not None and ctx.backend != "torch":
            method = "static"
            why.append(f"static int8: convolutions carry {share:.0%} of the MACs and static QDQ runs them as "
                       f"int8 QLinearConv, calibrated on {step.calibration_batches} train batches")
        else:
            method = "dynamic"
            if not conv_heavy:
                why.append("dynamic int8: Linear/MatMul layers carry the MACs; weights int8 per-channel, "
                           "activations quantized per batch, no calibration data needed")
            elif ctx.data.train is None:
                why.append("dynamic int8, not static: there is no train split to calibrate static int8 on")
    if method == "dynamic" and conv_heavy:
        where = ("torch.ao dynamic int8 leaves convolutions in fp32" if ctx.backend == "torch"
                 else "ONNX Runtime runs dynamic int8 convolutions as ConvInteger, often slower than fp32")
        why.append(f"dynamic int8 on a conv net: convolutions carry {share:.0%} of the MACs and {where}; "
                   "static int8 (with a train split to calibrate on, backend onnxruntime) is the one that pays")
    if method == "static" and not conv_heavy:
        why.append("static int8 on a model whose MACs are in Linear/MatMul layers: transformers' activations have "
                   "outliers that static ranges clip (all-MiniLM-L6-v2 measured here: fidelity 0.81 static vs "
                   "0.99 dynamic); check the metric, or use dtype='int8-dynamic'")
    return dtype, method, why


@technique(Quantize)
def quantize(model, step: Quantize, ctx):
    if isinstance(model, OrtModel):
        raise RecipeError("Quantize: the model is already an ONNX Runtime graph; put Quantize after the steps "
                          "that train or change the torch model, and only once")
    modules = dict(model.named_modules())
    unknown = [name for name in step.exclude if name not in modules]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], modules, n=1)
        raise RecipeError(f"Quantize.exclude: the model has no layer named {unknown[0]!r}"
                          + (f"; did you mean {close[0]!r}?" if close else "; names are as in model.named_modules()"))
    dtype, method, why = plan(step, model, ctx)
    for reason in why:
        ctx.note(reason)
    if dtype in ("fp16", "bf16"):
        if ctx.backend == "onnxruntime":
            raise RecipeError(f"Quantize: {dtype} runs on the torch backend here; use backend='torch' or 'auto'")
        if not ctx.device.startswith("cuda"):
            flags = cpu_info()["cpu_flags"].split()
            fast = "avx512_bf16" in flags or "amx_tile" in flags
            if dtype == "fp16" or not fast:
                ctx.note(f"{dtype} on this CPU ({cpu_info()['cpu']}): no native {dtype} matrix units "
                         f"(flags: {' '.join(flags) or 'none'}), so expect it to be slower than fp32; "
                         "it halves the size")
        ctx.lowered = f"torch-{dtype}"
        return to_dtype(model, dtype).to(ctx.device)

    if ctx.device.startswith("cuda"):
        raise DeviceError("int8 quantization here runs on CPU kernels (ONNX Runtime, torch.ao); on CUDA use "
                          "Quantize('fp16') or Quantize('bf16'), or device='cpu'")
    reduce_range = step.reduce_range
    if reduce_range is None:
        flags = cpu_info()["cpu_flags"].split()
        reduce_range = not ({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))
        if reduce_range and ctx.backend != "torch":
            ctx.note("weights use 7 bits (reduce_range): this CPU has no VNNI, and AVX2's u8 x s8 multiply-add "
                     "saturates with full 8-bit weights (measured on digits-cnn: -1.9 points without it)")
    if method == "static":
        if ctx.backend == "torch":
            raise RecipeError("Quantize: static int8 runs through ONNX Runtime; use backend='onnxruntime' or 'auto'")
        from .unpad import PackedBert

        if step.calibration != "minmax" and any(isinstance(m, PackedBert) for m in model.modules()):
            raise RecipeError(f"Quantize: calibration={step.calibration!r} collects histograms that ONNX Runtime "
                              "needs equally shaped across batches, and after unpad the token count varies per "
                              "batch; use calibration='minmax' (or quantize dynamically)")
        ctx.progress(f"calibrating static int8 on {step.calibration_batches} batches", None)
        ort_model = OrtModel.from_torch(model, ctx.data.example_inputs, device=ctx.device, threads=ctx.threads,
                                    fuse=not step.exclude)
        ctx.lowered = f"onnxruntime-int8-static-{step.format}"
        return quantize_static(ort_model, ctx.data.train_batches(limit=step.calibration_batches),
                               per_channel=step.per_channel, reduce_range=reduce_range,
                               calibration=step.calibration, fmt=step.format,
                               exclude=step.exclude)
    if ctx.backend == "torch":
        ctx.lowered = "torch-int8-dynamic"
        return dynamic_int8(model, exclude=step.exclude, per_channel=step.per_channel)
    ort_model = OrtModel.from_torch(model, ctx.data.example_inputs, device=ctx.device, threads=ctx.threads,
                                    fuse=not step.exclude)
    ctx.lowered = "onnxruntime-int8-dynamic"
    return quantize_dynamic(ort_model, per_channel=step.per_channel, reduce_range=reduce_range, exclude=step.exclude)
