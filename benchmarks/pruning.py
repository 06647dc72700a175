"""Pruning side by side, in one process, threads fixed: does the pruned model get smaller and faster?

    python benchmarks/pruning.py [--threads 2] [--skip-minilm]

- digits-cnn: structured 50% channels (per layer) + 2 fine-tune epochs, timed on torch and ONNX Runtime against
  the dense model on the same runtime.
- digits-mlp: unstructured 80% global + 2 fine-tune epochs: compressed size, and the honest "no speedup".
  Peer: torch.nn.utils.prune as a torch user applies it (masks left in the module), measured the same way.
- minilm: heads + FFN neurons structured 30% (hidden size kept), before recovery: fidelity, MACs, size, latency.
"""
from __future__ import annotations

import argparse
import copy
import os

import pandas as pd

import workbench as wb
from workbench.backends.onnxruntime.session import OrtModel

from common import available, header, show


def cnn(threads):
    model, data = wb.zoo.load("digits-cnn")
    r = wb.optimize(model, [wb.Prune(0.5, structured=True, scope="layer"), wb.FineTune(2)], data=data,
                    threads=threads, batch_sizes=(1,), study=False)
    dense_ort = OrtModel.from_torch(model, data.example_inputs, threads=threads)
    pruned_ort = OrtModel.from_torch(r.model, data.example_inputs, threads=threads)
    table = wb.compare({"dense torch": model, "pruned torch": r.model}, data=data, batch_sizes=(1, 64),
                       threads=threads, study=False)
    ort = wb.compare({"dense onnxruntime": dense_ort, "pruned onnxruntime": pruned_ort}, data=data,
                     batch_sizes=(1, 64), threads=threads, study=False)
    show(pd.concat([table, ort]), "digits-cnn: structured 50% channels + fine-tune 2 (ratios against the dense model, "
         "same runtime)", r.notes)
    return table, ort


def mlp(threads):
    from torch.nn.utils import prune

    model, data = wb.zoo.load("digits-mlp")
    r = wb.optimize(model, "prune=0.8,finetune=2", data=data, threads=threads, batch_sizes=(1,), study=False)
    peer = copy.deepcopy(model)
    params = [(m, "weight") for m in (peer[1], peer[3])]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.8)  # masks stay in place
    table = wb.compare({"dense": model, "torch.nn.utils.prune 80% (peer, masks kept)": peer,
                        "workbench prune=0.8,finetune=2": r.model}, data=data, batch_sizes=(1, 64),
                       threads=threads, study=False)
    show(table, "digits-mlp: unstructured 80% global", r.notes)


def minilm(threads):
    model, data = wb.zoo.load("minilm")
    r = wb.optimize(model, wb.Prune(0.3, structured=True), data=data, threads=threads, batch_sizes=(1,),
                    study=False)
    table = wb.compare({"dense": model, "heads+FFN 30% (no recovery yet)": r.model}, data=data,
                       batch_sizes=(1, 32), threads=threads, study=False)
    layer = r.model.encoder.encoder.layer[0]
    show(table, "minilm: structured heads + FFN neurons 30%, hidden size kept", r.notes + [
        f"layer 0 now has {layer.attention.self.num_attention_heads} heads and "
        f"{layer.intermediate.dense.out_features} FFN neurons (was 12 and 1536)"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args(argv)
    header("pruning benchmark", args.threads)
    cnn(args.threads)
    mlp(args.threads)
    if not args.skip_minilm and available("minilm"):
        minilm(args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
