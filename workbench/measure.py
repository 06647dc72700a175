"""Measurements: metric, latency (p50/p95 with warm-up, threads fixed), throughput, size, params, MACs, memory.

Every number here is measured on this machine in this process; nothing is estimated from a table.

    >>> row = measure(model, data, batch_sizes=(1, 64))
    >>> row["latency_p50_ms_b1"], row["size_bytes"], row["macs"]
"""
from __future__ import annotations

import io
import os
import platform
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from .data import Data, batch_size_of, call_model, map_tensors


def _torch():
    import torch

    return torch


def is_torch_module(model: Any) -> bool:
    return isinstance(model, _torch().nn.Module)


# -- static properties ------------------------------------------------------------------------------------------
def count_params(model: Any) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a torch module, or of an ONNX model's weight initializers."""
    if hasattr(model, "count_params"):
        return model.count_params()
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(p.count_nonzero())
    for mod in model.modules():  # packed weights of dynamically quantized layers are not parameters
        if hasattr(mod, "weight") and callable(mod.weight) and hasattr(mod, "_packed_params"):
            w = mod.weight()
            total += w.numel()
            nonzero += int(w.int_repr().count_nonzero()) if w.is_quantized else int(w.count_nonzero())
    return total, nonzero


def serialized_size(model: Any) -> int:
    """Bytes of the model as saved: `torch.save(state_dict)` for torch, the .onnx file for ONNX Runtime."""
    if hasattr(model, "serialized_size"):
        return model.serialized_size()
    buf = io.BytesIO()
    _torch().save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def sparse_size(model: Any) -> int | None:
    """Bytes of the weights stored compressed: a tensor that is mostly zeros as a bitmask (1 bit per entry) plus
    its non-zero values, every other tensor dense. None where it does not apply (not a plain torch state)."""
    torch = _torch()
    if not is_torch_module(model):
        return None
    total = 0
    for t in model.state_dict().values():
        if not isinstance(t, torch.Tensor) or t.is_quantized:
            return None  # packed int8 layers: already compressed another way
        dense = t.numel() * t.element_size()
        packed = (t.numel() + 7) // 8 + int(t.count_nonzero()) * t.element_size() if t.is_floating_point() else dense
        total += min(dense, packed)
    return total


def layer_table(model: Any):
    """Per layer with weights: type, parameters, non-zeros and sparsity (real zeros, as stored)."""
    import pandas as pd

    rows = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if name and isinstance(w, _torch().Tensor) and w.dim() > 1:
            nz = int(w.count_nonzero())
            rows.append({"layer": name, "type": type(m).__name__, "shape": tuple(w.shape), "params": w.numel(),
                         "nonzero": nz, "sparsity": 1 - nz / w.numel()})
    return pd.DataFrame(rows, columns=["layer", "type", "shape", "params", "nonzero", "sparsity"]).set_index("layer")


def count_macs(model: Any, inputs: Any) -> int | None:
    """Multiply-accumulates of one forward pass (torch.utils.flop_counter FLOPs / 2); None where not countable."""
    torch = _torch()
    if not is_torch_module(model):
        return None
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.inference_mode():
            call_model(model, inputs)
    except Exception:
        return None
    return int(counter.get_total_flops() // 2)


def macs_by_op(model: Any, inputs: Any) -> dict[str, int]:
    """MACs of one forward pass per aten operator (e.g. {'convolution': ..., 'addmm': ...})."""
    torch = _torch()
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        call_model(model, inputs)
    totals = counter.get_flop_counts().get("Global", {})
    return {getattr(op, "__name__", str(op).split(".")[-1]): int(n // 2) for op, n in totals.items()}


def macs_by_layer(model: Any, inputs: Any) -> dict[str, int]:
    """MACs of one forward pass per named submodule (leaf and parent names, as named_modules gives them)."""
    torch = _torch()
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        call_model(model, inputs)
    prefix = type(model).__name__ + "."
    return {k[len(prefix):]: int(sum(v.values()) // 2) for k, v in counter.get_flop_counts().items()
            if k.startswith(prefix)}


def conv_share(model: Any, inputs: Any) -> float:
    """Share of the MACs spent in convolutions (0..1)."""
    try:
        by_op = macs_by_op(model, inputs)
    except Exception:
        return 0.0
    total = sum(by_op.values())
    return sum(v for k, v in by_op.items() if "conv" in k) / total if total else 0.0


# -- environment ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "f16c")
    return {"cpu": model, "cpu_flags": " ".join(f for f in wanted if f in flags), "cores": os.cpu_count()}


def environment(threads: int | None = None, device: str = "cpu") -> dict:
    """What a result depends on: CPU, threads, GPU and library versions."""
    torch = _torch()
    env = dict(cpu_info())
    env["threads"] = threads or torch.get_num_threads()
    env["device"] = device
    env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    env["python"] = platform.python_version()
    env["torch"] = torch.__version__
    for name in ("onnxruntime", "onnx", "numpy", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except Exception:
            env[name] = None
    return env


@contextmanager
def fixed_threads(threads: int | None):
    """Run torch with exactly `threads` intra-op threads, restoring the previous setting after."""
    torch = _torch()
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


# -- timing -----------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        _torch().cuda.synchronize()


def time_model(model: Any, inputs: Any, device: str = "cpu", warmup: int = 3, min_repeats: int = 10,
               min_seconds: float = 0.3, max_repeats: int = 200) -> dict:
    """Latency of `model(inputs)`: warm-up runs, then at least `min_repeats` and `min_seconds` of timed runs.

    Returns p50/p95/mean in milliseconds and throughput in samples per second. CUDA work is synchronized.
    """
    import numpy as np

    torch = _torch()
    batch = batch_size_of(inputs)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            call_model(model, inputs)
        _sync(device)
        start = time.perf_counter()
        while len(times) < min_repeats or (time.perf_counter() - start < min_seconds and len(times) < max_repeats):
            t0 = time.perf_counter()
            call_model(model, inputs)
            _sync(device)
            times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {"p50_ms": p50, "p95_ms": float(np.percentile(ms, 95)), "mean_ms": float(ms.mean()),
            "throughput": batch / (p50 / 1e3), "repeats": len(times)}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_memory(model: Any, inputs: Any, device: str = "cpu") -> int | None:
    """Peak memory one forward pass adds: CUDA allocator peak on GPU; on CPU the sampled growth of the
    process's resident memory (what the OS really had to provide, allocator caches included)."""
    torch = _torch()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            call_model(model, inputs)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    base = _rss_bytes()
    if not base:
        return None
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with torch.inference_mode():
            call_model(model, inputs)
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    return int(peak[0] - base)


def profile_layers(model: Any, inputs: Any, repeats: int = 10):
    """Per-layer breakdown of one forward pass: params, MACs, measured time and their shares, as a DataFrame.

    Time is measured with hooks around each leaf module over `repeats` passes (after one warm-up), so the
    shares show where the cost really is on this machine, not only where the arithmetic is.
    """
    import pandas as pd

    torch = _torch()
    leaves = {name: m for name, m in model.named_modules() if name and not list(m.children())}
    macs_of = macs_by_layer(model, inputs)
    spent = {name: 0.0 for name in leaves}
    started: dict[str, float] = {}
    hooks = []
    for name, m in leaves.items():
        hooks.append(m.register_forward_pre_hook(lambda mod, args, n=name: started.__setitem__(n, time.perf_counter())))
        hooks.append(m.register_forward_hook(
            lambda mod, args, out, n=name: spent.__setitem__(n, spent[n] + time.perf_counter() - started[n])))
    try:
        with torch.inference_mode():
            call_model(model, inputs)
            for n in spent:
                spent[n] = 0.0
            total_start = time.perf_counter()
            for _ in range(repeats):
                call_model(model, inputs)
            total = (time.perf_counter() - total_start) / repeats
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, m in leaves.items():
        macs = macs_of.get(name, 0)
        rows.append({"layer": name, "type": type(m).__name__,
                     "params": sum(p.numel() for p in m.parameters(recurse=False)),
                     "macs": macs, "time_ms": spent[name] / repeats * 1e3})
    df = pd.DataFrame(rows).set_index("layer")
    df["macs_share"] = df["macs"] / max(df["macs"].sum(), 1)
    df["time_share"] = df["time_ms"] / (total * 1e3)
    return df


# -- everything at once -----------------------------------------------------------------------------------------
def measure(model: Any, data: Data, batch_sizes=(1,), device: str = "cpu", threads: int | None = None,
            reference: Any = None, macs_model: Any = None, progress=None) -> dict:
    """One row of measurements for `model`.

    macs_model: the float torch module to count MACs and parameters on when `model` itself cannot be counted
    (an ONNX Runtime session or a quantized module has the same arithmetic shape as the graph it came from).
    """
    row: dict[str, Any] = {}
    with fixed_threads(threads) as n_threads:
        if progress:
            progress(f"evaluating {data.metric_name}", None)
        row["metric"] = data.evaluate(model, device=device, reference=reference)
        row["metric_name"] = data.metric_name
        for b in batch_sizes:
            if progress:
                progress(f"timing at batch {b}", None)
            inputs = map_tensors(data.inputs(b), lambda t: t.to(device))
            timing = time_model(model, inputs, device=device)
            row[f"latency_p50_ms_b{b}"] = timing["p50_ms"]
            row[f"latency_p95_ms_b{b}"] = timing["p95_ms"]
            row[f"throughput_b{b}"] = timing["throughput"]
        row["peak_mem_bytes"] = peak_memory(model, inputs, device)
        row["size_bytes"] = serialized_size(model)
        row["sparse_size_bytes"] = sparse_size(model)
        counted = macs_model if macs_model is not None else model
        row["params"], row["nonzero_params"] = count_params(counted)
        one = data.inputs(1)  # MACs per sample
        row["macs"] = count_macs(counted, map_tensors(one, lambda t: t.to(_param_device(counted))))
        row["threads"] = n_threads
    row["device"] = device
    row["batch_sizes"] = ",".join(map(str, batch_sizes))
    return row


def _param_device(model: Any) -> str:
    try:
        return str(next(model.parameters()).device)
    except (StopIteration, AttributeError):
        return "cpu"
