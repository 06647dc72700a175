"""Where the time goes, per layer: params, MACs and measured time of each leaf module, with their shares."""
from __future__ import annotations

import time
from typing import Any

from ..tensors import call_model
from .counts import macs_by_layer


def profile_layers(model: Any, inputs: Any, target, repeats: int = 10):
    """Per-layer breakdown of one forward pass as a DataFrame (layer, type, params, macs, time_ms and shares).

    Hooks around each leaf module time it over `repeats` passes after one warm-up, on the model's device with the
    inputs moved there; on CUDA each hook synchronizes, so a layer's time is its kernels' time, not their launch.
    """
    import pandas as pd
    import torch

    inputs = target.move(inputs)
    leaves = {name: m for name, m in model.named_modules() if name and not list(m.children())}
    macs_of = macs_by_layer(model, inputs)
    spent = {name: 0.0 for name in leaves}
    started: dict[str, float] = {}
    hooks = []

    def before(name):
        def hook(module, args):
            target.sync()
            started[name] = time.perf_counter()
        return hook

    def after(name):
        def hook(module, args, out):
            target.sync()
            spent[name] += time.perf_counter() - started[name]
        return hook

    for name, m in leaves.items():
        hooks.append(m.register_forward_pre_hook(before(name)))
        hooks.append(m.register_forward_hook(after(name)))
    try:
        with target.threads_fixed(), torch.inference_mode():
            call_model(model, inputs)
            for n in spent:
                spent[n] = 0.0
            target.sync()
            total_start = time.perf_counter()
            for _ in range(repeats):
                call_model(model, inputs)
            target.sync()
            total = (time.perf_counter() - total_start) / repeats
    finally:
        for h in hooks:
            h.remove()
    rows = [{"layer": name, "type": type(m).__name__, "params": sum(p.numel() for p in m.parameters(recurse=False)),
             "macs": macs_of.get(name, 0), "time_ms": spent[name] / repeats * 1e3} for name, m in leaves.items()]
    df = pd.DataFrame(rows, columns=["layer", "type", "params", "macs", "time_ms"]).set_index("layer")
    df["macs_share"] = df["macs"] / max(df["macs"].sum(), 1)
    df["time_share"] = df["time_ms"] / (total * 1e3)
    return df
