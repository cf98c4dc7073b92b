"""How the benchmarks measure: timing rounds, medians and spreads, bandwidth, kernel launches.

Benchmarks are honest when every method of a comparison runs in the same process and the same
rounds: :func:`round_robin` calls each method once per round (the order rotating between rounds)
after warm-up rounds, with a device synchronisation before each clock read; :func:`summarize`
gives the median and interquartile range of the per-round times and of the per-round ratios to a
baseline, so that load from other processes, which moves whole rounds, cancels out of the ratios.
:func:`copy_bandwidth` measures the device's copy bandwidth for the bytes floors of
``docs/performance.md``, :func:`kernel_launches` counts the CUDA kernels one call launches.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = ["sync", "round_robin", "quartiles", "summarize", "brief", "CopyFloor", "Budget",
           "autocast", "torch_memory_format", "composite_backend", "copy_bandwidth", "kernel_launches",
           "machine"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(fns: Dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                 repeats: int, inner: int = 1) -> Dict[str, List[float]]:
    """Milliseconds per call of each function, ``repeats`` rounds after ``warmup`` rounds.

    Every round calls each function ``inner`` times in a row (clock read after a device
    synchronisation), the order of the functions rotating from round to round so that no method
    always follows the same neighbour.
    """
    names = list(fns)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            elapsed = (time.perf_counter() - start) * 1e3 / inner
            if r >= warmup:
                times[name].append(elapsed)
    return times


def quartiles(values: Sequence[float]) -> Tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def summarize(times: Dict[str, List[float]], baseline: str) -> Dict[str, Dict[str, Any]]:
    """Median and IQR of the times and of the per-round ratios to ``baseline``."""
    out = {}
    base = times.get(baseline)
    for name, values in times.items():
        q1, med, q3 = quartiles(values)
        entry = dict(times_ms=values, median_ms=med, iqr_ms=q3 - q1)
        if base is not None:
            ratios = [v / b for v, b in zip(values, base)]
            r1, rmed, r3 = quartiles(ratios)
            entry.update(ratio=rmed, ratio_iqr=r3 - r1, ratio_q1=r1, ratio_q3=r3)
        out[name] = entry
    return out


class CopyFloor(torch.autograd.Function):
    """A copy forward and a copy backward: the least traffic any norm layer can have."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g.clone()


class Budget:
    def __init__(self, seconds: Optional[float]):
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def exhausted(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def torch_memory_format(name: str, dim: int) -> torch.memory_format:
    if name == "contiguous":
        return torch.contiguous_format
    if name == "channels_last":
        return torch.channels_last if dim == 4 else torch.channels_last_3d
    raise ValueError(f"unknown memory format {name!r}; valid: contiguous, channels_last")



def brief(summary: Dict[str, Dict[str, Any]]) -> str:
    return ", ".join(f"{k} {v['median_ms']:.2f}ms" + (f" x{v['ratio']:.2f}" if "ratio" in v
                                                    else "")
                     for k, v in summary.items())


def composite_backend():
    """Run BKN with the composite torch-op form (the reference backend) instead of the default
    kernels: the library's public switch, ``kalmannorm.use_backend("composite")``."""
    import kalmannorm

    return kalmannorm.use_backend("composite")


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None,
                   repeats: int = 5) -> Dict[str, float]:
    """The device's copy bandwidth: bytes read plus bytes written per second by a device-local
    copy of ``nbytes`` (a clone into memory allocated beforehand, so that the CPU's first-touch
    page faults, which a caching GPU allocator never pays, stay out of it).

    ``nbytes`` defaults to 1 GiB on CUDA (far above any L2) and 256 MiB on the CPU (above its
    caches, small enough for a laptop); the median of ``repeats`` copies after one warm-up.
    Returns ``{"bytes", "median_s", "bytes_per_s"}``.
    """
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**28
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.zeros_like(x)  # pages touched
    times = []
    for r in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        y.copy_(x)
        sync(device)
        if r:
            times.append(time.perf_counter() - start)
    del x, y
    median_s = statistics.median(times)
    return dict(bytes=nbytes, median_s=median_s, bytes_per_s=2 * nbytes / median_s)


# Host-side launch calls of the CUDA runtime and driver, as torch.profiler names them.
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                 "cudaLaunchCooperativeKernel")


def count_launches(events: Iterable[Any]) -> int:
    """Kernel launches among profiler events: the launch calls, or, where the profiler recorded
    none (other runtime names), the kernels seen on the device."""
    events = list(events)
    launches = sum(1 for e in events if e.name in LAUNCH_EVENTS)
    if launches:
        return launches
    return sum(1 for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset")))


def kernel_launches(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """CUDA kernels launched by one call of ``fn`` (already warmed up), from ``torch.profiler``;
    ``None`` on other devices, where there is no launch to count."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return count_launches(prof.events())


def machine(device: torch.device) -> Dict[str, Any]:
    """Platform, CPU model, thread count and, on CUDA, the GPU and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = dict(platform=platform.platform(), cpu=cpu, cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), python=platform.python_version())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info
