"""Peak memory of one forward pass: the CUDA allocator's peak on a GPU, sampled resident memory on a CPU."""
from __future__ import annotations

import os
import threading
import time
from typing import Any

from ..tensors import call_model


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_memory(model: Any, inputs: Any, target) -> int | None:
    """Bytes one forward pass adds at its peak (what the OS or the GPU allocator really had to provide)."""
    import torch

    def run():
        with torch.inference_mode():
            call_model(model, inputs)

    on_device = target.memory_peak(run)
    if on_device is not None:
        return on_device
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
        run()
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    return int(peak[0] - base)
