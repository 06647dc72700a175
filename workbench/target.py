"""Target: where and how a model runs (backend, device, threads, the CPU's instruction sets), resolved once where
work enters the engine and passed down. No other module reads device strings.

    >>> target = resolve(backend="auto", device="auto", threads=2)
    >>> target.device, target.is_cuda, target.cpu.vnni
    ('cpu', False, True)

The CPU probe reads /proc/cpuinfo; `WORKBENCH_CPU=vnni` or `WORKBENCH_CPU=avx2` forces one of the two int8 paths
(AVX-512/AVX VNNI, or AVX2 only) so that both branches of code that depends on it can be tested on any machine.
"""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from .errors import DeviceError

DEVICES = ("auto", "cpu", "cuda")
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                  "amx_int8", "amx_bf16", "f16c")
FORCED = {  # WORKBENCH_CPU=...: the flags a forced probe reports
    "vnni": frozenset({"avx2", "f16c", "avx512f", "avx512_vnni"}),
    "avx2": frozenset({"avx2", "f16c"}),
}


@dataclass(frozen=True)
class CPU:
    """The CPU facts optimizations depend on."""

    name: str
    flags: frozenset
    cores: int
    forced: str | None = None

    @property
    def vnni(self) -> bool:
        """int8 dot products in one instruction (AVX-512 VNNI, AVX-VNNI or AMX): int8 runs at full 8 bits."""
        return bool(VNNI_FLAGS & self.flags)

    def native(self, dtype: str) -> bool:
        """Whether this CPU has matrix units for a half-precision dtype ('fp16' or 'bf16')."""
        wanted = {"bf16": {"avx512_bf16", "amx_bf16"}, "fp16": {"avx512_fp16", "amx_fp16"}}[dtype]
        return bool(wanted & self.flags)

    @property
    def flag_text(self) -> str:
        return " ".join(f for f in REPORTED_FLAGS if f in self.flags)

    def describe(self) -> str:
        return f"{self.name}: {self.flag_text or 'no SIMD flags read'}" + (f" (forced: {self.forced})"
                                                                          if self.forced else "")


@lru_cache(maxsize=4)
def _probe(forced: str | None) -> CPU:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if forced:
        return CPU(name, FORCED[forced], os.cpu_count() or 1, forced)
    return CPU(name, frozenset(flags), os.cpu_count() or 1)


def cpu_info() -> CPU:
    """This machine's CPU, or the forced probe when `WORKBENCH_CPU` is 'vnni' or 'avx2'."""
    forced = os.environ.get("WORKBENCH_CPU") or None
    if forced is not None and forced not in FORCED:
        raise DeviceError(f"WORKBENCH_CPU={forced!r} is not known; use one of {', '.join(FORCED)} or leave it unset")
    return _probe(forced)


@dataclass(frozen=True)
class Target:
    """Where a model runs: `backend` ('auto' or a registered backend's name), `device` ('cpu', 'cuda', 'cuda:N'),
    `threads` (intra-op threads while measuring; None keeps torch's setting) and the CPU."""

    device: str = "cpu"
    backend: str = "auto"
    threads: int | None = None
    cpu: CPU = field(default_factory=cpu_info, compare=False)

    # -- facts ---------------------------------------------------------------------------------------------------
    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def kind(self) -> str:
        """'cuda' or 'cpu': what backends declare their precisions for."""
        return "cuda" if self.is_cuda else "cpu"

    def with_backend(self, backend: str) -> "Target":
        return replace(self, backend=backend)

    def native(self, dtype: str) -> bool:
        """Whether fp16/bf16 have matrix units here (tensor cores on CUDA; AVX-512/AMX units on a CPU)."""
        return self.is_cuda or self.cpu.native(dtype)

    def autocast_dtype(self):
        """The dtype mixed-precision training uses here (None: train in fp32)."""
        import torch

        if not self.is_cuda:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    # -- acting on it --------------------------------------------------------------------------------------------
    def move(self, inputs: Any):
        """A batch (tensor, tuple or dict) on this device."""
        from .tensors import map_tensors

        return map_tensors(inputs, lambda t: t.to(self.device))

    def sync(self) -> None:
        """Wait for queued device work, so a timer stops when the work is done."""
        if self.is_cuda:
            import torch

            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def threads_fixed(self):
        """torch runs with exactly `threads` intra-op threads inside the block; the previous setting comes back."""
        import torch

        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            yield torch.get_num_threads()
        finally:
            torch.set_num_threads(before)

    def memory_peak(self, run) -> int | None:
        """Peak device memory `run()` adds (CUDA allocator); None off CUDA, where the caller samples RSS."""
        if not self.is_cuda:
            return None
        import torch

        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        run()
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device) - base)

    def gpu_name(self) -> str | None:
        import torch

        return torch.cuda.get_device_name(self.device) if self.is_cuda else None

    def environment(self) -> dict:
        """What a measurement depends on: CPU and flags, threads, device, GPU and library versions."""
        import torch

        from .backends import installed_versions
        from .registry import backends

        env = {"cpu": self.cpu.name, "cpu_flags": self.cpu.flag_text, "cores": self.cpu.cores,
               "threads": self.threads or torch.get_num_threads(), "device": self.device,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "cuda": torch.version.cuda if torch.cuda.is_available() else None,
               "gpu_driver": gpu_driver() if torch.cuda.is_available() else None,
               "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(0)))
               if torch.cuda.is_available() else None,
               "python": platform.python_version(), "torch": torch.__version__}
        for b in backends():
            env.update(b.versions())
        env.update(installed_versions("numpy", "transformers"))
        if self.cpu.forced:
            env["cpu_forced"] = self.cpu.forced
        return env


@lru_cache(maxsize=1)
def gpu_driver() -> str | None:
    """The NVIDIA driver's version (nvidia-smi, else NVML), or None where neither answers."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def of_model(model: Any, **options) -> Target:
    """The Target of the device a torch model's parameters are on (CPU for a model without parameters)."""
    param = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return Target(device=str(param.device) if param is not None else "cpu", **options)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve(backend: str = "auto", device: str = "auto", threads: int | None = None,
            precisions: list = (), backends: tuple = ()) -> Target:
    """The Target for a request, checked once: the device exists, the backend is known and runs there.

    device="auto" is CUDA when there is a GPU, unless something asked for cannot run on CUDA here: a lowering step
    of the recipe (`precisions`: per step, the precisions any of which would do, e.g. ('int8-dynamic',
    'int8-static')), the backend named, or one of `backends` (those of the models `compare` is given, an ONNX
    Runtime graph say). Then the CPU, so that `quant=int8` or `backend='onnxruntime'` runs instead of failing.
    """
    from .registry import backend_named

    if isinstance(backend, Target):
        return backend
    device = str(device) if type(device).__name__ == "device" else device  # a torch.device is welcome too
    if not isinstance(device, str):
        raise DeviceError(f"device {device!r} is not known; use 'auto', 'cpu' or 'cuda'")
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise DeviceError(f"device {device!r} is not known; use 'auto', 'cpu' or 'cuda'")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise DeviceError(f"threads={threads!r}: give a positive number of threads, or None for torch's default")
    if device != "auto" and device.startswith("cuda") and not cuda_available():
        raise DeviceError("CUDA was asked for but this machine has no usable GPU (torch.cuda.is_available() is "
                          "False); use device='cpu' or device='auto'")
    if device == "auto":
        device = "cpu"
        if cuda_available():
            cuda = Target("cuda", backend, threads)
            named = (backend_named(backend),) if backend != "auto" else ()
            device = "cuda" if all(any(runs_somewhere(p, cuda) for p in alternatives) for alternatives in precisions) \
                and all(b.available(cuda) for b in (*named, *backends)) else "cpu"
    target = Target(device, backend, threads)
    if backend != "auto":
        impl = backend_named(backend)
        if not impl.available(target):
            raise DeviceError(f"backend {backend!r} cannot run on {device!r} here; use backend='auto'")
    return target


def runs_somewhere(precision: str, target: Target) -> bool:
    """Whether some backend (the target's own, when it names one) runs `precision` on the target's device."""
    from .registry import backends_for

    return bool(backends_for(precision, target))
