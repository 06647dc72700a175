"""Measuring models, on this machine, in this process: nothing is estimated from a table.

    >>> m = measure(model, data, target, reference=model)               # metric, size, params, MACs
    >>> time_side_by_side({"baseline": (model, m), "int8": (q, mq)}, data, (1, 64), target, baseline="baseline")
    >>> mq.speedups[64]                                                 # Speedup: 4.3x (4.1-4.5)

`measure` gives the numbers that do not depend on time; `time_side_by_side` times several models interleaved in
rounds (see `timing`) and fills in their latencies, speedups against the baseline, stability and peak memory.
"""
from __future__ import annotations

from typing import Any, Callable

from .counts import conv_share, count_macs, count_params, layer_table, macs_by_layer, macs_by_op  # noqa: F401
from .load import LoadWatch
from .measurement import Latency, Measurement, Speedup, Stability, column, significant  # noqa: F401
from .memory import peak_memory
from .profile import profile_layers  # noqa: F401
from .timing import TimingPlan, fresh, speedups, spread, time_interleaved


def _is_torch(model: Any) -> bool:
    import torch

    return isinstance(model, torch.nn.Module)


def measure(model: Any, data, target, reference: Any = None, macs_model: Any = None) -> Measurement:
    """The metric on the validation split and what the model is (size, parameters, MACs per sample).

    macs_model: the float torch module to count MACs and parameters on when `model` itself cannot be counted
    (an ONNX Runtime session or a quantized module has the arithmetic shape of the graph it came from).
    """
    from ..architectures import is_causal_lm
    from ..registry import backend_of

    backend = backend_of(model)
    with target.threads_fixed() as threads:
        scores = data.scores(model, target, reference=reference,
                             perplexity=is_causal_lm(reference if reference is not None else model))
        counted = macs_model if macs_model is not None else model
        params, nonzero = backend_of(counted).count_params(counted)
        macs = count_macs(counted, target.move(data.inputs(1))) if _is_torch(counted) else None
        return Measurement(metric=scores["metric"], metric_name=data.metric_name, perplexity=scores.get("perplexity"),
                           size_bytes=backend.size_bytes(model),
                           sparse_size_bytes=backend.sparse_size_bytes(model), params=params, nonzero_params=nonzero,
                           macs=macs, threads=threads, device=target.device, backend=backend.label_of(model))


def time_side_by_side(entries: dict[str, tuple[Any, Measurement]], data, batch_sizes, target, baseline: str,
                      plan: TimingPlan | None = None, progress: Callable | None = None) -> None:
    """Time the models interleaved at each batch size, the same inputs for all; fill in each Measurement's
    `latency`, `speedups` (against `baseline`), `stability` and `peak_mem_bytes`."""
    import torch

    from ..registry import backend_of

    plan = plan or TimingPlan.default(target.is_cuda)
    inputs = None

    def instance(model):  # a fresh copy or session of the model per timing session (see `timing`)
        backend = backend_of(model)
        return fresh(lambda: (lambda m=backend.place(model, target): _call(m, inputs)))

    with target.threads_fixed() as threads, torch.inference_mode():
        for b in batch_sizes:
            if progress:
                progress(f"timing {len(entries)} model(s) interleaved at batch {b}", None)
            inputs = target.move(data.inputs(b))
            calls = {label: instance(model) for label, (model, _) in entries.items()}
            # on a GPU one host thread launches the kernels: other processes contend only past the cores left
            # beside it (counted against torch's 16 intra-op threads, 0.4 of a core of anything made it "unstable")
            with LoadWatch(threads, needs=1 if target.is_cuda else None) as watch:
                latencies = time_interleaved(calls, plan, sync=target.sync)
            latencies = {label: Latency(b, lat.samples_ms, lat.iterations, lat.sessions)
                         for label, lat in latencies.items()}
            for label, s in speedups(latencies, baseline, watch.stability).items():
                entries[label][1].speedups[b] = s
            for label, (_, m) in entries.items():
                m.latency[b] = latencies[label]
                m.stability = m.stability.merge(watch.stability).merge(spread(latencies[label]))
    inputs = target.move(data.inputs(max(batch_sizes)))
    for label, (model, m) in entries.items():  # at the largest batch
        m.peak_mem_bytes = peak_memory(model, inputs, target)


def _call(model, inputs):
    from ..tensors import call_model

    return call_model(model, inputs)


__all__ = ["measure", "time_side_by_side", "Measurement", "Latency", "Speedup", "Stability", "TimingPlan",
           "LoadWatch", "profile_layers", "layer_table", "count_macs", "macs_by_op", "macs_by_layer", "column"]
