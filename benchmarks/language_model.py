"""docs-lm (the built-in GPT-2 trained on CPython's docs): weight-only int4/int8 and dynamic int8 beside the peers,
generation timed in one process, threads fixed and equal for all, the models taking turns.

    python benchmarks/language_model.py [--threads 2] [--repeats 10] [--model docs-lm]

Rows: torch fp32 eager (the reference), the peers as their users call them (torch.ao quantize_dynamic on Linear
layers; ONNX Runtime's quantize_dynamic and its int4 MatMulNBitsQuantizer with their defaults, on the same ONNX
graph with its key/value cache, so that they can generate), and the workbench's quant=int8, int8-weight and int4.
Columns: size against fp32, perplexity on the held-out text, the share of prompts whose 64 greedy tokens equal
fp32's, and per setting (batch, prompt length; 64 new tokens, cache on) tokens per second against torch fp32
(median of paired runs, 95% interval) and time to first token.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import pandas as pd

import workbench as wb
from common import header
from workbench.backends.onnxruntime.session import OrtModel

WORKBENCH = ["quant=int8", "quant=int8-weight", "quant=int4"]


def peer_torch_ao_dynamic(model):
    """What a torch user writes: torch.ao.quantization.quantize_dynamic on Linear layers (GPT-2's blocks are
    Conv1D, so only the head is quantized: that is what the peer does to this model)."""
    import copy

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def _ort_peer(fp32: OrtModel, label: str, quantize) -> OrtModel:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "fp32.onnx"), Path(tmp, "q.onnx")
        src.write_bytes(fp32.onnx_bytes)
        quantize(str(src), str(dst))
        return fp32.replace(dst.read_bytes(), label)


def peer_ort_dynamic(fp32: OrtModel) -> OrtModel:
    """ONNX Runtime's quantize_dynamic(src, dst) with its defaults."""
    from onnxruntime.quantization import quantize_dynamic

    return _ort_peer(fp32, "ort-dynamic", lambda src, dst: quantize_dynamic(src, dst))


def peer_ort_int4(fp32: OrtModel) -> OrtModel:
    """ONNX Runtime's int4 weight-only quantizer with its defaults (block 128, asymmetric, MatMul only)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    def run(src, dst):
        q = MatMulNBitsQuantizer(onnx.load(src))
        q.process()
        q.model.save_model_to_file(dst, use_external_data_format=False)

    return _ort_peer(fp32, "ort-int4", run)


def run(name: str, threads: int, repeats: int):
    from workbench import decoding
    from workbench.engine import Baseline
    from workbench.measure import TimingPlan
    from workbench.registry import backend_of
    from workbench.target import resolve

    model, data = wb.zoo.load(name)
    target = resolve(device="cpu", threads=threads)
    fp32_graph = OrtModel.from_torch(model, data.example_inputs, threads=threads)
    assert fp32_graph.layout.get("past"), "the ONNX graph lost its cache"
    base = Baseline(model, data, device="cpu", threads=threads, batch_sizes=(1,), study=False,
                    timing=TimingPlan(sessions=1, min_rounds=1, max_rounds=1, min_seconds=0.0, warmup_s=0.0,
                                      generations=0))
    models = {
        "torch fp32 (reference)": model,
        "torch.ao quantize_dynamic (peer)": peer_torch_ao_dynamic(model),
        "onnxruntime fp32 with cache": fp32_graph,
        "onnxruntime quantize_dynamic defaults (peer)": peer_ort_dynamic(fp32_graph),
        "onnxruntime MatMulNBits int4 defaults (peer)": peer_ort_int4(fp32_graph),
    }
    for recipe in WORKBENCH:
        models[f"workbench {recipe}"] = base.run(recipe).model
    rows = {}
    for label, m in models.items():
        scores = data.scores(m, target, perplexity=True)
        rows[label] = {"size MB": backend_of(m).size_bytes(m) / 1e6, "perplexity": scores["perplexity"],
                       "next-token accuracy": scores["metric"]}
    reference = "torch fp32 (reference)"
    runs = decoding.generation(models, data, target, repeats=repeats, reference=reference,
                               progress=lambda message, _: print(f"  {message}", flush=True))
    fp32 = rows[reference]
    table = []
    for label, row in rows.items():
        g = runs[label]
        out = {"model": label, "size": f"{row['size MB']:.3g} MB ({row['size MB'] / fp32['size MB']:.2f}x)",
               "perplexity": f"{row['perplexity']:.4g} ({row['perplexity'] / fp32['perplexity'] - 1:+.1%})",
               "same tokens": "–" if g.same_tokens is None else f"{g.same_tokens:.0%}, {g.same_prefix:.3g}"}
        for s in g.settings:
            ratio = wb.measure.measurement.interval_text(s.ratio, "x") if s.ratio else "1x"
            out[f"tok/s {s.label()}"] = f"{s.tokens_per_s[0]:.0f}, {ratio}"
            out[f"first token ms {s.label()}"] = wb.measure.measurement.interval_text(s.ttft_ms)
        table.append(out)
    frame = pd.DataFrame(table).set_index("model")
    frame.attrs["perplexity"] = {label: row["perplexity"] for label, row in rows.items()}
    return frame, runs


def lead(table, runs, ours: str = "workbench quant=int4") -> None:
    """Ours against the fastest peer of equal or better perplexity, per setting, from paired runs."""
    from workbench.decoding import paired_ratio
    from workbench.measure.measurement import interval_text

    perplexity = table.attrs["perplexity"]
    peers = [label for label in table.index if "(peer)" in label and perplexity[label] <= perplexity[ours]]
    print(f"\n## {ours} against each peer of equal or better perplexity ({', '.join(peers) or 'none'}): "
          "tokens/s ratio, paired runs, 95% interval\n")
    for mine in runs[ours].settings:
        cells = []
        for peer in peers:
            theirs = runs[peer].setting(mine.batch, mine.prompt)
            cells.append(f"{interval_text(paired_ratio(mine, theirs), 'x')} {peer}" if theirs else f"– {peer}")
        print(f"- {mine.label()}: " + "; ".join(cells))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="docs-lm")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    header("language-model benchmark", args.threads)
    table, runs = run(args.model, args.threads, args.repeats)
    tok = [c for c in table.columns if c.startswith(("model", "size", "perplexity", "same", "tok/s"))]
    print(f"\n## {args.model}: size, perplexity, greedy agreement, tokens/s (ratio to torch fp32, 95% interval)\n")
    print(table[tok].to_string())
    print(f"\n## {args.model}: time to first token (ms, median and 95% interval)\n")
    print(table[[c for c in table.columns if c.startswith("first token")]].to_string())
    lead(table, runs)
    prompts = next((r.prompts_compared for r in runs.values() if r.prompts_compared), 0)
    print(f"\n- same tokens: share of {prompts} prompts (batch-8 settings) whose 64 greedy tokens equal torch "
          "fp32's, then how many leading tokens agree on average; tokens/s: rows x 63 tokens after the first / their "
          "time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
