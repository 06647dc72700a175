"""Quantization side by side with the peers, in one process, threads fixed and equal for all.

    python benchmarks/quantization.py [--models digits-cnn,minilm] [--threads 2]

For each model: torch fp32 eager (the reference), torch.ao dynamic int8 and ONNX Runtime's own
quantize_dynamic with its defaults (the peers, called through their own APIs), and every workbench
quantization mode through wb.optimize. Latency p50 at batch 1 and at a larger batch, size and
accuracy/fidelity, with ratios against torch fp32. Every number is measured in this run.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import pandas as pd

import workbench as wb
from common import available, header, show
from workbench.backends.onnxruntime.session import OrtModel

LARGE_BATCH = {"digits-cnn": 64, "digits-mlp": 64, "minilm": 32}
WORKBENCH_MODES = ["quant=int8", "quant=int8-dynamic", "quant=int8-static", "quant=fp16", "quant=bf16"]


def peer_torch_ao_dynamic(model):
    """What a torch user writes: torch.ao.quantization.quantize_dynamic on Linear layers."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def peer_ort_dynamic(model, data, threads, per_channel=False):
    """What an ONNX Runtime user writes: the plain export, then quantize_dynamic(src, dst), defaults or with
    per-channel weights."""
    from onnxruntime.quantization import quantize_dynamic

    fp32 = OrtModel.from_torch(model, data.example_inputs, threads=threads, fuse=False)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "fp32.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(fp32.onnx_bytes)
        quantize_dynamic(str(src), str(dst), per_channel=per_channel)
        return fp32.replace(dst.read_bytes(), "ort-per-channel" if per_channel else "ort-defaults")


def run(name: str, threads: int) -> pd.DataFrame:
    model, data = wb.zoo.load(name)
    batches = (1, LARGE_BATCH[name])
    candidates = {
        "torch fp32": model,
        "torch.ao dynamic int8 (peer)": peer_torch_ao_dynamic(model),
        "onnxruntime quantize_dynamic defaults (peer)": peer_ort_dynamic(model, data, threads),
    }
    notes = {}
    for recipe in WORKBENCH_MODES:
        r = wb.optimize(model, recipe, data=data, threads=threads, batch_sizes=(1,), study=False)
        candidates[f"workbench {recipe} [{r.backend}]"] = r
        notes[recipe] = r.notes
    # one measurement pass over all candidates, side by side, same threads and inputs
    table = wb.compare(candidates, data=data, batch_sizes=batches, threads=threads, study=False)
    return table, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits-cnn,minilm")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    header("quantization benchmark", args.threads)
    for name in args.models.split(","):
        if not available(name):
            continue
        table, notes = run(name, args.threads)
        show(table, f"{name} (speedup, with its 95% interval, and size × against torch fp32)",
             [f"{recipe}: {line}" for recipe, lines in notes.items() for line in lines])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
