"""Does autotune lead? Peers and workbench's chosen candidate, in one run, threads fixed and equal for all.

    python benchmarks/autotune.py [--threads 2] [--budget-minilm 4min] [--budget-cnn 2min]
    python benchmarks/autotune.py --gpu [--budget-minilm 3min] [--budget-cnn 1min]

Rows per model: torch fp32 eager (the reference), torch.ao dynamic int8, ONNX Runtime quantize_dynamic with its
defaults and with per-channel weights, ONNX Runtime's transformer optimizer + int8 (minilm), OpenVINO fp32 and
OpenVINO + NNCF int8 with its transformer preset (minilm; when the `openvino` extra is installed), workbench's
default `quant=int8` and `unpad,quant=int8` (minilm), and the candidate wb.autotune chose within the metric budget.
Columns: latency p50 at two batch sizes, ratio to torch fp32 with its 95% interval, size, metric.

minilm's main table is what sentence-transformers feeds a model: 512 held-out sentences, each batch padded to its
longest sentence, batch 1 the first sentence alone (no padding); cosine to the fp32 embeddings and top-1, the
share of sentences whose nearest neighbour among the 512 is the one fp32 finds. Calibration (NNCF, static int8,
smoothing) reads 512 other sentences. A second table times the same models on the built-in's 64-token padding.

--gpu, on CUDA: a BERT of all-MiniLM-L6-v2's shape (6 layers, 384 wide, random weights: no download) on 64-token
batches about half padding, and digits-cnn; peer rows are plain torch as a user writes it by hand (fp32, fp16 and
bf16 eager, fp16 + torch.compile, fp16 + torch.compile with CUDA graphs), beside autotune's candidate (and, for the
BERT, workbench's `unpad,quant=fp16,compile`, as autotune ranks at batch 1), at batch 1, 32 and 256 (and 1024 for
the CNN). Targets (issue 17): the BERT's candidate at fidelity >= 0.999 ahead of fp16 +
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


class Sentences(wb.Data):
    """Sentences as sentence-transformers batches them: each batch padded to its longest; `inputs(n)` the first
    n sentences padded to their own longest (batch 1: no padding)."""

    def inputs(self, batch_size):
        return LongestPadding.trim(super().inputs(batch_size))


def minilm_sentences(data, batch: int = 32):
    """(calibration, evaluation) sentence data: minilm's 1280 sentences, the first 512 to calibrate on, the last
    512 to measure (none of them seen by calibration), padded to each batch's longest."""
    from workbench.zoo import real_sentences

    sentences = real_sentences(limit=1280)

    def batches(texts):
        out = []
        for i in range(0, len(texts), batch):
            enc = data.tokenizer(texts[i:i + batch], padding="longest", truncation=True, max_length=128,
                                 return_tensors="pt")
            out.append(({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, None))
        return out

    train, val = batches(sentences[:512]), batches(sentences[-512:])
    return Sentences(train=train, val=val, metric="fidelity", example_inputs=val[0][0], name="minilm-sentences")


def neighbour_agreement(rows: dict, data) -> dict:
    """{row: share of sentences whose nearest neighbour (cosine, among all evaluated) is fp32's}."""
    import torch

    def nearest(model):
        e = torch.nn.functional.normalize(torch.cat(data.outputs(model)).float(), dim=1)
        sim = e @ e.T
        sim.fill_diagonal_(-2)
        return sim.argmax(1)

    first = next(iter(rows.values()))
    want = nearest(first)
    return {name: float((nearest(m.model if hasattr(m, "recipe") else m) == want).float().mean())
            for name, m in rows.items()}


def openvino_peers(model, data, threads) -> dict:
    """OpenVINO as its users write it: ov.convert_model on the torch model, compiled for the CPU with the threads
    fixed (fp32 kept fp32: on CPUs with AMX OpenVINO's default would compute in bf16), and NNCF's
    nncf.quantize with model_type=TRANSFORMER (SmoothQuant, fast bias correction) on the calibration batches."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        print("- OpenVINO rows skipped: pip install 'workbench[openvino]'")
        return {}
    from workbench.backends.openvino import OvModel
    from workbench.contract import layout_of

    example = data.example_inputs
    layout = layout_of(model, example)
    fp32 = ov.convert_model(model, example_input=dict(example))
    calibration = [{k: v.numpy() for k, v in x.items()} for x, _ in data.train_batches()]
    int8 = nncf.quantize(ov.convert_model(model, example_input=dict(example)), nncf.Dataset(calibration),
                         model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration))
    return {"openvino fp32": OvModel.from_ov(fp32, layout, threads),
            "openvino + nncf int8 (transformer preset)": OvModel.from_ov(int8, layout, threads, "int8")}


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
    fixed = data
    if name == "minilm" and not gpu:  # the main table: sentences padded to each batch's longest
        data = minilm_sentences(fixed)
    if gpu:
        rows = gpu_peers(model)
        if name == "minilm-shaped":  # autotune ranks at batch 1, where skipping padding saves least: shown as well
            rows["workbench unpad,quant=fp16,compile"] = wb.optimize(
                model, "unpad,quant=fp16,compile", data=data, device=device, study=False, batch_sizes=batches[:1])
    else:
        rows = {"torch fp32": model}
        rows["torch.ao dynamic int8"] = peer_torch_ao_dynamic(model)
        rows["onnxruntime quantize_dynamic (defaults)"] = peer_ort_dynamic(model, data, threads)
        rows["onnxruntime quantize_dynamic (per-channel)"] = peer_ort_dynamic(model, data, threads, per_channel=True)
        if name == "minilm":
            rows["onnxruntime transformer optimizer + int8"] = ort_transformer_int8(model, data, threads)
            rows.update(openvino_peers(model, data, threads))
            for recipe in ("quant=int8", "unpad,quant=int8"):
                rows[f"workbench {recipe}"] = wb.optimize(model, recipe, data=data, study=False, batch_sizes=(1,))
    tuned = wb.autotune(model, data, max_drop=max_drop, budget=budget, device=device, study=False,
                        batch=batches[0] if "minilm" in name else batches[1],
                        storage=f"sqlite:///{tempfile.mkdtemp()}/autotune.sqlite",
                        progress=lambda m, f: print(f"  [{f or 0:4.0%}] {m}", flush=True))
    rows[f"workbench autotune: {tuned.best.recipe}"] = tuned.best
    table = wb.compare(rows, data=data, batch_sizes=batches, threads=threads, device=device, study=False)
    first = next(iter(rows))
    notes = [tuned.headline] + tuned.best.preflight + tuned.best.notes \
        + [f"failed: {recipe} ({error})" for recipe, _, error, _ in tuned.failed]

    if name == "minilm" and not gpu:
        from workbench.facts import padding_share
        from workbench.tables import display_table

        top1 = neighbour_agreement(rows, data)
        shown = display_table(table)
        shown.insert(1, "top-1", [f"{top1[r]:.3f}" for r in shown.index])
        print(f"\n## {name}: 512 held-out sentences padded to each batch's longest ({padding_share(data):.0%} "
              f"padding; batch 1 has none); fidelity = mean cosine to fp32, top-1 = nearest-neighbour agreement; "
              f"{len(tuned.results)} candidates searched in {tuned.seconds:.0f} s, budget {max_drop}\n")
        print(shown.to_string())
        for line in notes:
            print(f"- {line}")
    else:
        show(table, f"{name}: {len(tuned.results)} candidates searched in {tuned.seconds:.0f} s, metric budget "
             f"{max_drop} (speedup, with its 95% interval, and size × against {first})", notes)
    if name == "minilm" and not gpu:  # the built-in's fixed 64-token padding, where skipping padding pays most
        from workbench.facts import padding_share

        show(wb.compare(rows, data=fixed, batch_sizes=batches, threads=threads, device=device, study=False),
             f"{name}, the built-in's validation batches padded to 64 tokens ({padding_share(fixed):.0%} padding)")


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
