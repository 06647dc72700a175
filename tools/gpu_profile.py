"""Where a GPU forward's time goes: the MiniLM-shaped BERT of `benchmarks/autotune.py --gpu` as the CUDA-graphs peer
writes it by hand, as workbench's `quant=fp16,compile` and as `unpad,quant=fp16,compile` builds it, on one GPU.

    python tools/gpu_profile.py [--batches 1,256] [--rounds 7] [--calls 30]

For each batch: the wall time per call (median and fastest of `rounds` rounds of `calls` calls, the models taking
turns so that a load on the machine falls on all alike), then, from torch.profiler over 5 calls, the GPU's kernel
time per call and the top kernels. Wall time well above kernel time means the GPU waits on the host (launches, a
sync, work between graphs). A diagnosis, not a benchmark: no intervals, nothing here is quoted as a speedup
(benchmarks/autotune.py --gpu is). Written for issue 17, where it showed that unpad's packed forward kept an H100
busy 40% less at 256 x 64 while its per-call host round trip gave that back.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def models(model):
    import torch

    from autotune import by_hand
    from workbench.backends.torch_eager.lowering import to_dtype
    from workbench.techniques.packed_bert import DENSE_BELOW, PackedBert
    from workbench.wrappers import Compiled

    gpu = copy.deepcopy(model).cuda().eval()
    packed = PackedBert(copy.deepcopy(gpu)).eval()
    packed.rounded, packed.dense_below = True, DENSE_BELOW  # as compile sets them under CUDA graphs
    return {"peer: fp16 + torch.compile, CUDA graphs": by_hand(model, torch.float16, "reduce-overhead"),
            "workbench quant=fp16,compile": Compiled(to_dtype(gpu, "fp16"), "reduce-overhead", graphs=True),
            "workbench unpad,quant=fp16,compile": Compiled(to_dtype(packed, "fp16"), "reduce-overhead",
                                                           graphs=True)}


def kernel_ms(prof, calls: int) -> float:
    """GPU time per call: the kernels' and copies' own time, not the host-side ops and ranges that launched them
    (`aten::copy_`, `## Call CompiledFxGraph ...`), which the profiler credits with the same time again."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in prof.key_averages()
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / calls / 1e3


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from autotune import minilm_shaped

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_profile: needs a CUDA GPU")
    torch._dynamo.config.recompile_limit = 64  # the peer shares BertModel.forward's 8 slots with nothing else here
    model, data = minilm_shaped()
    first = next(iter(data.val_batches()))[0]  # 32 x 64, about half padding
    batches = [int(b) for b in args.batches.split(",")]
    inputs = {b: {k: (v.repeat(-(-b // 32), 1)[:b]).cuda() for k, v in first.items()} for b in batches}
    rows = models(model)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; real tokens per batch: "
          f"{ {b: int(x['attention_mask'].sum()) for b, x in inputs.items()} }", flush=True)
    with torch.inference_mode():
        for b, x in inputs.items():  # compile each shape before any timing
            start = time.perf_counter()
            for m in rows.values():
                for _ in range(3):
                    m(**x)
            torch.cuda.synchronize()
            print(f"batch {b}: warm-up and compiles {time.perf_counter() - start:.0f} s", flush=True)
        for b, x in inputs.items():
            times = {name: [] for name in rows}
            for _ in range(args.rounds):
                for name, m in rows.items():
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        m(**x)
                    torch.cuda.synchronize()
                    times[name].append((time.perf_counter() - start) / args.calls * 1e3)
            for name, m in rows.items():
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        m(**x)
                    torch.cuda.synchronize()
                print(f"\n## batch {b}, {name}: wall {statistics.median(times[name]):.3f} ms a call (median; fastest "
                      f"round {min(times[name]):.3f}), GPU kernels {kernel_ms(prof, 5):.3f} ms", flush=True)
                print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=10,
                                                max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
