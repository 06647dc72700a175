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


def plan(step: Quantize, model, ctx) -> tuple[str, str, str]:
    """(dtype, method, reason) after resolving `auto` for this model, backend and device."""
    dtype, method, why = step.dtype, step.method, []
    on_cuda = ctx.device.startswith("cuda")
    if dtype == "auto":
        if on_cuda:
            dtype = "fp16"
            why.append("auto: fp16 on CUDA (tensor cores run it at several times fp32's rate)")
        else:
            dtype = "int8"
            why.append("auto: int8 on CPU")
    if dtype == "int8" and method == "auto":
        share = conv_share(model, ctx.data.inputs(1))
        if share > CONV_HEAVY and ctx.data.train is not None and ctx.backend != "torch":
            method = "static"
            why.append(f"static int8: convolutions carry {share:.0%} of the MACs and static QDQ runs them as "
                       f"int8 QLinearConv, calibrated on {step.calibration_batches} train batches")
        else:
            method = "dynamic"
            if share > CONV_HEAVY:
                why.append(f"dynamic int8: convolutions carry {share:.0%} of the MACs but "
                           + ("the torch backend has no static int8 here" if ctx.backend == "torch"
                              else "there is no train split to calibrate static int8 on")
                           + "; expect little speedup")
            else:
                why.append("dynamic int8: Linear/MatMul layers carry the MACs; weights int8 per-channel, "
                           "activations quantized per batch, no calibration data needed")
    return dtype, method, "; ".join(why)


@technique(Quantize)
def quantize(model, step: Quantize, ctx):
    if isinstance(model, OrtModel):
        raise RecipeError("Quantize: the model is already an ONNX Runtime graph; put Quantize after the steps "
                          "that train or change the torch model, and only once")
    dtype, method, why = plan(step, model, ctx)
    if why:
        ctx.note(why)
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

    reduce_range = step.reduce_range
    if reduce_range is None:
        flags = cpu_info()["cpu_flags"].split()
        reduce_range = not ({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))
        if reduce_range and ctx.backend != "torch":
            ctx.note("weights use 7 bits (reduce_range): this CPU has no VNNI, and AVX2's u8 x s8 multiply-add "
                     "saturates with full 8-bit weights (measured on digits-cnn: -1.9 points without it)")
    if ctx.device.startswith("cuda"):
        raise DeviceError("int8 quantization here runs on CPU kernels (ONNX Runtime, torch.ao); on CUDA use "
                          "Quantize('fp16') or Quantize('bf16'), or device='cpu'")
    if method == "static":
        if ctx.backend == "torch":
            raise RecipeError("Quantize: static int8 runs through ONNX Runtime; use backend='onnxruntime' or 'auto'")
        if ctx.data.train is None:
            raise RecipeError("Quantize: static int8 needs calibration batches, and the data has no train split; "
                              "pass wb.Data(train=...) or use dtype='int8-dynamic'")
        ctx.progress(f"calibrating static int8 on {step.calibration_batches} batches", None)
        ort_model = OrtModel.from_torch(model, ctx.data.example_inputs, device=ctx.device, threads=ctx.threads)
        ctx.lowered = f"onnxruntime-int8-static-{step.format}"
        return quantize_static(ort_model, ctx.data.train_batches(limit=step.calibration_batches),
                               per_channel=step.per_channel, reduce_range=reduce_range,
                               calibration=step.calibration, fmt=step.format,
                               exclude=step.exclude)
    if ctx.backend == "torch":
        ctx.lowered = "torch-int8-dynamic"
        return dynamic_int8(model, exclude=step.exclude, per_channel=step.per_channel)
    ort_model = OrtModel.from_torch(model, ctx.data.example_inputs, device=ctx.device, threads=ctx.threads)
    ctx.lowered = "onnxruntime-int8-dynamic"
    return quantize_dynamic(ort_model, per_channel=step.per_channel, reduce_range=reduce_range, exclude=step.exclude)
