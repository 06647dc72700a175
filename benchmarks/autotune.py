"""Does autotune lead? Peers and workbench's chosen candidate, in one run, threads fixed and equal for all.

    python benchmarks/autotune.py [--threads 2] [--budget-minilm 4min] [--budget-cnn 2min]
    python benchmarks/autotune.py --gpu [--budget-minilm 3min] [--budget-cnn 1min]

Rows per model: torch fp32 eager (the reference), torch.ao dynamic int8, ONNX Runtime quantize_dynamic with its
defaults and with per-channel weights, ONNX Runtime's transformer optimizer + int8 (minilm), and the candidate
wb.autotune chose within the metric budget. Columns: latency p50 at two batch sizes, ratio to torch fp32, size,
metric. For minilm a second table measures the same models on inputs padded only to each batch's longest sentence,
so the share of the lead that comes from skipping padding (unpad) is visible.

--gpu, on CUDA: a BERT of all-MiniLM-L6-v2's shape (6 layers, 384 wide, random weights: no download) on 64-token
batches about half padding, and digits-cnn; peer rows are plain torch as a user writes it by hand (fp32, fp16 and
bf16 eager, fp16 + torch.compile, fp16 + torch.compile with CUDA graphs), beside autotune's candidate, at batch 1,
32 and 256 (and 1024 for the CNN). Targets (issue 17): the BERT's candidate at fidelity >= 0.999 ahead of fp16 +
compile with CUDA graphs at every batch; digits-cnn within 1 point at least 3x at batch 1024.
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
GPU_BATCHES = {"minilm-shaped": (1, 32, 256), "digits-cnn": (1, 256, 1024)}
GPU_MAX_DROP = {"minilm-shaped": 0.001, "digits-cnn": 0.01}  # fidelity >= 0.999; accuracy within 1 point


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


def minilm_shaped():
    """A BERT of all-MiniLM-L6-v2's shape with random weights (nothing downloaded), and 4 validation batches of
    32 x 64 tokens whose real lengths run from 8 to 56 (about half the slots padding); metric: fidelity."""
    import torch
    import transformers

    from workbench.tensors import seeded

    config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536)
    with seeded(0):
        model = transformers.BertModel(config).eval()
    g = torch.Generator().manual_seed(0)
    val = []
    for _ in range(4):
        lengths = torch.randint(8, 57, (32,), generator=g)
        mask = (torch.arange(64)[None] < lengths[:, None]).long()
        ids = torch.randint(1000, 30000, (32, 64), generator=g) * mask
        val.append(({"input_ids": ids, "attention_mask": mask}, None))
    return model, wb.Data(val=val, metric="fidelity", name="minilm-shaped")


def by_hand(model, dtype=None, mode=None):
    """A peer on a GPU, as a user writes it with plain torch: a copy cast to `dtype` on the GPU, float inputs cast
    to it, optionally `torch.compile(mode=...)` (reduce-overhead: CUDA graphs), outputs back in float32."""
    import copy

    import torch

    from workbench.tensors import map_tensors

    class ByHand(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = copy.deepcopy(model).to(device="cuda", dtype=dtype or torch.float32).eval()
            self.fn = None

        def __deepcopy__(self, memo):  # compare copies what it measures; this is already a copy of its own
            return self

        def forward(self, *args, **kwargs):
            if self.fn is None:
                self.fn = torch.compile(self.model, mode=mode) if mode else self.model
            cast = (lambda t: t.to(dtype) if t.is_floating_point() else t) if dtype else (lambda t: t)
            if mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            out = self.fn(*map_tensors(args, cast), **map_tensors(kwargs, cast))
            return map_tensors(out, lambda t: t.float().clone() if t.is_floating_point() else t.clone())

    return ByHand()


def gpu_peers(model) -> dict:
    import torch

    # dynamo keeps 8 graphs per code object, and the peers share BertModel.forward's: past 8 a peer would run
    # uncompiled without a word (workbench's compiled models each have an entry of their own), so raise it here
    torch._dynamo.config.recompile_limit = 64

    rows = {"torch fp32 eager": model, "torch fp16 eager": by_hand(model, torch.float16)}
    if torch.cuda.is_bf16_supported():
        rows["torch bf16 eager"] = by_hand(model, torch.bfloat16)
    rows["torch fp16 + torch.compile"] = by_hand(model, torch.float16, "default")
    rows["torch fp16 + torch.compile, CUDA graphs"] = by_hand(model, torch.float16, "reduce-overhead")
    return rows


def run(name, threads, budget, gpu):
    model, data = minilm_shaped() if name == "minilm-shaped" else wb.zoo.load(name)
    batches, max_drop = (GPU_BATCHES, GPU_MAX_DROP) if gpu else (BATCHES, MAX_DROP)
    batches, max_drop = batches[name], max_drop[name]
    device = "cuda" if gpu else "cpu"
    if gpu:
        rows = gpu_peers(model)
    else:
        rows = {"torch fp32": model}
        rows["torch.ao dynamic int8"] = peer_torch_ao_dynamic(model)
        rows["onnxruntime quantize_dynamic (defaults)"] = peer_ort_dynamic(model, data, threads)
        rows["onnxruntime quantize_dynamic (per-channel)"] = peer_ort_dynamic(model, data, threads, per_channel=True)
        if name == "minilm":
            rows["onnxruntime transformer optimizer + int8"] = ort_transformer_int8(model, data, threads)
    tuned = wb.autotune(model, data, max_drop=max_drop, budget=budget, device=device, study=False,
                        batch=batches[0] if "minilm" in name else batches[1],
                        storage=f"sqlite:///{tempfile.mkdtemp()}/autotune.sqlite",
                        progress=lambda m, f: print(f"  [{f or 0:4.0%}] {m}", flush=True))
    rows[f"workbench autotune: {tuned.best.recipe}"] = tuned.best
    table = wb.compare(rows, data=data, batch_sizes=batches, threads=threads, device=device, study=False)
    first = next(iter(rows))
    show(table, f"{name}: {len(tuned.results)} candidates searched in {tuned.seconds:.0f} s, metric budget "
         f"{max_drop} (speedup, with its 95% interval, and size × against {first})",
         [tuned.headline] + tuned.best.preflight + tuned.best.notes
         + [f"failed: {recipe} ({error})" for recipe, _, error, _ in tuned.failed])
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
    parser.add_argument("--models", default=None, help="default: digits-cnn,minilm (with --gpu: minilm-shaped,"
                        "digits-cnn)")
    parser.add_argument("--gpu", action="store_true", help="run on CUDA (fp16/bf16 rows, autotune on the GPU)")
    args = parser.parse_args(argv)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("--gpu: no CUDA device here")
            return 1
    header("autotune vs peers", args.threads, "cuda" if args.gpu else "cpu")
    models = args.models or ("minilm-shaped,digits-cnn" if args.gpu else "digits-cnn,minilm")
    for name in models.split(","):
        if name != "minilm-shaped" and not available(name):
            continue
        run(name, args.threads, args.budget_minilm if "minilm" in name else args.budget_cnn, args.gpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
