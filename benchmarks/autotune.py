"""Does autotune lead? Peers and workbench's chosen candidate, in one run, threads fixed and equal for all.

    python benchmarks/autotune.py [--threads 2] [--budget-minilm 4min] [--budget-cnn 2min] [--gpu]

Rows per model: torch fp32 eager (the reference), torch.ao dynamic int8, ONNX Runtime quantize_dynamic with its
defaults and with per-channel weights, ONNX Runtime's transformer optimizer + int8 (minilm), and the candidate
wb.autotune chose within the metric budget. Columns: latency p50 at two batch sizes, ratio to torch fp32, size,
metric. For minilm a second table measures the same models on inputs padded only to each batch's longest sentence,
so the share of the lead that comes from skipping padding (unpad) is visible. --gpu does the same on CUDA (torch
fp16/bf16 rows; autotune on the GPU) when one is present.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


import workbench as wb
from workbench.backends.onnxruntime.session import OrtModel
from workbench.tensors import copy_model

# benchmarks/ is on sys.path when this runs as a script
from common import available, header, show
from quantization import peer_ort_dynamic, peer_torch_ao_dynamic

BATCHES = {"minilm": (1, 32), "digits-cnn": (1, 64)}
MAX_DROP = {"minilm": 0.01, "digits-cnn": 0.01}


def ort_transformer_int8(model, data, threads):
    """ONNX Runtime's transformer optimizer (fusions) and then its quantize_dynamic, as its docs suggest.

    Exported with eager attention: that is the graph its Attention fusion recognises (with SDPA it fuses none)."""
    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    eager = copy_model(model)
    eager.encoder.set_attn_implementation("eager")
    fp32 = OrtModel.from_torch(eager, data.example_inputs, threads=threads, fuse=False)  # its own fusions below
    with tempfile.TemporaryDirectory() as tmp:
        src, fused, dst = Path(tmp, "a.onnx"), Path(tmp, "f.onnx"), Path(tmp, "q.onnx")
        src.write_bytes(fp32.onnx_bytes)
        optimize_model(str(src), model_type="bert", num_heads=12, hidden_size=384).save_model_to_file(str(fused))
        import onnx

        quantize_dynamic(str(fused), str(dst), per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fused ops lack types
        return fp32.replace(dst.read_bytes(), "ort-transformers")


class LongestPadding(wb.Data):
    """The same validation sentences, each batch padded only to its longest sentence (sentence-transformers'
    default), and batch-1 timing on the first sentence alone: no padding at batch 1."""

    @staticmethod
    def trim(inputs):
        length = int(inputs["attention_mask"].sum(1).max())
        return {k: v[:, :length] for k, v in inputs.items()}

    def __init__(self, data):
        super().__init__(val=[(self.trim(x), y) for x, y in data.val_batches()], metric=data.metric,
                         example_inputs=self.trim(data.example_inputs), name=data.name)

    def inputs(self, batch_size):
        return self.trim(super().inputs(batch_size))


def run(name, threads, budget, gpu):
    model, data = wb.zoo.load(name)
    batches = BATCHES[name]
    device = "cuda" if gpu else "cpu"
    rows = {"torch fp32": model}
    if gpu:
        import torch

        rows["torch fp16 (cuda)"] = wb.optimize(model, "quant=fp16", data=data, device=device, study=False,
                                                batch_sizes=(1,)).model
        if torch.cuda.is_bf16_supported():
            rows["torch bf16 (cuda)"] = wb.optimize(model, "quant=bf16", data=data, device=device, study=False,
                                                    batch_sizes=(1,)).model
    else:
        rows["torch.ao dynamic int8"] = peer_torch_ao_dynamic(model)
        rows["onnxruntime quantize_dynamic (defaults)"] = peer_ort_dynamic(model, data, threads)
        rows["onnxruntime quantize_dynamic (per-channel)"] = peer_ort_dynamic(model, data, threads, per_channel=True)
        if name == "minilm":
            rows["onnxruntime transformer optimizer + int8"] = ort_transformer_int8(model, data, threads)
    tuned = wb.autotune(model, data, max_drop=MAX_DROP[name], budget=budget, device=device, study=False,
                        batch=batches[0] if name == "minilm" else batches[1],
                        storage=f"sqlite:///{tempfile.mkdtemp()}/autotune.sqlite",
                        progress=lambda m, f: print(f"  [{f or 0:4.0%}] {m}", flush=True))
    rows[f"workbench autotune: {tuned.best.recipe}"] = tuned.best
    table = wb.compare(rows, data=data, batch_sizes=batches, threads=threads, device=device, study=False)
    show(table, f"{name}: {len(tuned.results)} candidates searched in {tuned.seconds:.0f} s, metric budget "
         f"{MAX_DROP[name]} (speedup, with its 95% interval, and size × against torch fp32)",
         [tuned.headline] + tuned.best.preflight + tuned.best.notes)
    if name == "minilm":  # how much of the lead is skipped padding: the same models, with little padding to skip
        from workbench.facts import padding_share

        short = LongestPadding(data)
        show(wb.compare(rows, data=short, batch_sizes=batches, threads=threads, device=device, study=False),
             f"{name}, inputs padded only to each batch's longest sentence ({padding_share(short):.0%} padding "
             f"instead of {padding_share(data):.0%}; batch 1 has none)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--budget-minilm", default="4min")
    parser.add_argument("--budget-cnn", default="2min")
    parser.add_argument("--models", default="digits-cnn,minilm")
    parser.add_argument("--gpu", action="store_true", help="run on CUDA (fp16/bf16 rows, autotune on the GPU)")
    args = parser.parse_args(argv)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("--gpu: no CUDA device here")
            return 1
    header("autotune vs peers", args.threads, "cuda" if args.gpu else "cpu")
    for name in args.models.split(","):
        if not available(name):
            continue
        run(name, args.threads, args.budget_minilm if name == "minilm" else args.budget_cnn, args.gpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
