"""The layer suite: forward + backward of one norm layer, against BatchNorm and the bytes floor.

At CIFAR and ImageNet shapes for BatchNorm, micro-batch ("ghost") BatchNorm, GroupNorm, Batch
Renormalization and Batch Kalman Normalization (Wang et al., arXiv 1802.03133) at several
micro-batches, plus ``copy``, a clone forward and backward. BKN appears three times: ``bkn`` is
the layer with a prior supplied (``forward_with_prior``), ``bkn_shadow`` the layer as it runs
inside a ``KalmanPredictor`` (``N + S`` rows in, prior read from the shadow rows, fresh samples
written to them), ``bkn_composite`` is ``bkn`` through the composite torch-op form (the reference
backend, and what ``torch.compile`` traces).

Every method's median time is also given as a multiple of its bytes floor (:func:`floor_bytes`,
``docs/performance.md``, "The bytes floor"), the least memory traffic the method needs divided by
the copy bandwidth measured in the same run, and, on CUDA, with the kernels one step launches.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

import kalmannorm as kn
from kalmannorm.prediction import ShadowBatch

from .measure import (Budget, CopyFloor, autocast, brief, composite_backend, copy_bandwidth,
                      kernel_launches, round_robin, summarize, torch_memory_format)

if TYPE_CHECKING:
    from .run import BenchConfig

__all__ = ["FLOOR_E", "floor_bytes", "layer_suite"]

log = logging.getLogger("benchmarks.layer")

# Least bytes each method moves per forward + backward, in units of E, the bytes of the real rows
# (docs/performance.md, "The bytes floor"): a copy reads and writes each way (4E); BatchNorm-like
# layers stream x twice forward and g, x twice backward (8E); BKN with a prior, as designed, 6E;
# inside a KalmanPredictor it also reads and writes its K shadow rows per group of m (+5 E_s,
# E_s = E K / m).
FLOOR_E = {"copy": 4, "batchnorm": 8, "groupnorm": 8, "ghost_batchnorm": 8, "batchrenorm": 8,
           "bkn": 6, "bkn_composite": 6, "bkn_shadow": 6}
SHADOW_E_S = {"bkn_shadow": 5}


def floor_bytes(method: str, shape: Sequence[int], element_size: int, shadow_rows: int = 1) -> int:
    """Bytes floor of one forward + backward of ``method`` (``"bkn_shadow@2"``, ...) on real rows
    of ``shape`` with ``element_size``-byte elements and ``shadow_rows`` shadow rows per group.

    >>> floor_bytes("bkn_shadow@2", (2, 1, 1, 1), 4)  # 6E + 5E*1/2 with E = 8 bytes
    68
    """
    name, _, micro = method.partition("@")
    e = math.prod(shape) * element_size
    total = FLOOR_E[name] * e
    if name in SHADOW_E_S:
        total += SHADOW_E_S[name] * e * shadow_rows // int(micro)
    return total


def _gn_groups(channels: int) -> int:
    return math.gcd(32, channels)


def _layer_methods(shape: Tuple[int, ...], micro_batches: Sequence[int], gain: float,
                   composite: bool) -> List[Tuple[str, Dict[str, Any]]]:
    channels = shape[1]
    methods: List[Tuple[str, Dict[str, Any]]] = [
        ("copy", dict(kind="copy")),
        ("batchnorm", dict(kind="norm", norm="batchnorm")),
        ("groupnorm", dict(kind="norm", norm="groupnorm", num_groups=_gn_groups(channels))),
    ]
    for m in micro_batches:
        if m > shape[0] or shape[0] % m:
            continue
        methods += [
            (f"ghost_batchnorm@{m}", dict(kind="norm", norm="ghost_batchnorm", micro_batch=m)),
            (f"batchrenorm@{m}", dict(kind="norm", norm="batchrenorm", micro_batch=m)),
            (f"bkn@{m}", dict(kind="bkn", micro_batch=m, gain=gain)),
            (f"bkn_shadow@{m}", dict(kind="bkn_shadow", micro_batch=m, gain=gain)),
        ]
    if composite and 2 in micro_batches and shape[0] % 2 == 0:
        methods.append(("bkn_composite@2", dict(kind="bkn", micro_batch=2, gain=gain,
                                                composite=True)))
    return methods


def _layer_fn(spec: Dict[str, Any], shape: Tuple[int, ...], device: torch.device, dtype: str,
              memory_format: str, compiled: bool) -> Callable[[], Any]:
    fmt = torch_memory_format(memory_format, len(shape))
    in_dtype = torch.float32 if dtype == "float32" else getattr(torch, dtype)
    kind = spec["kind"]
    n, channels = shape[0], shape[1]
    rows = n
    if kind == "bkn_shadow":
        rows = n + n // spec["micro_batch"]  # one shadow row per group
    x = torch.randn((rows,) + tuple(shape[1:]), device=device).to(in_dtype)
    x = x.contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn_like(x)
    params: List[Tensor] = []
    if kind == "copy":
        def forward():
            return CopyFloor.apply(x)
    elif kind == "norm":
        options = {k: v for k, v in spec.items() if k not in ("kind", "norm")}
        layer = kn.get_norm_layer(spec["norm"], **options)(channels).to(device).train()
        params = list(layer.parameters())
        forward = functools.partial(layer, x)
    else:
        layer = kn.BatchKalmanNorm2d(channels, gain=spec["gain"], micro_batch=spec["micro_batch"])
        layer = layer.to(device).train()
        params = list(layer.parameters())
        groups = n // spec["micro_batch"]
        if kind == "bkn":
            gen = torch.Generator(device=device).manual_seed(0)
            mean_prior = torch.randn(groups, channels, device=device, generator=gen) * 0.1
            var_prior = 1.0 + 0.1 * torch.rand(groups, channels, device=device, generator=gen)
            mean_prior.requires_grad_()
            var_prior.requires_grad_()
            params += [mean_prior, var_prior]

            def forward():
                return layer.forward_with_prior(x, (mean_prior, var_prior), groups)[0]
        else:
            shadow = ShadowBatch()
            layer._shadow_batch = shadow

            def forward():
                shadow.begin(n, groups, 1)
                shadow.has_predecessor = True  # read the prior from the shadow rows
                try:
                    return layer(x)
                finally:
                    shadow.end()
    if compiled:
        forward = torch.compile(forward)
    inputs = [x] + params
    composite = spec.get("composite", False)

    def step():
        with autocast(device, dtype), (composite_backend() if composite
                                        else contextlib.nullcontext()):
            y = forward()
        return torch.autograd.grad(y, inputs, g.to(y.dtype), allow_unused=True)

    return step


def layer_suite(config: "BenchConfig", device: torch.device, budget: Budget) -> List[dict]:
    results = []
    bandwidth = copy_bandwidth(device, config.bandwidth_bytes)
    log.info("copy bandwidth on %s: %.1f GB/s (clone of %d MiB)", device,
             bandwidth["bytes_per_s"] / 1e9, bandwidth["bytes"] // 2**20)
    modes = ["eager"] + (["compile"] if config.compile_layer and "compile" in config.suites
                         else [])
    for mode in modes:
        shapes = config.layer_shapes if mode == "eager" else config.layer_shapes[:1]
        dtypes = config.dtypes if mode == "eager" else config.dtypes[:1]
        formats = config.memory_formats if mode == "eager" else config.memory_formats[:1]
        for shape in shapes:
            for dtype in dtypes:
                for fmt in formats:
                    if budget.exhausted():
                        results.append(dict(suite="layer", shape=list(shape), dtype=dtype,
                                            memory_format=fmt, mode=mode, skipped="budget"))
                        continue
                    micro = config.layer_micro_batches if mode == "eager" else (2,)
                    methods = _layer_methods(shape, micro, config.gain,
                                             composite=mode == "eager")
                    if mode == "compile":
                        methods = [(k, s) for k, s in methods
                                   if k in ("copy", "batchnorm", "bkn@2", "bkn_shadow@2")]
                    torch.manual_seed(config.seed)
                    fns, errors = {}, {}
                    for name, spec in methods:
                        try:  # one failing method must not cost the others' numbers
                            fn = _layer_fn(spec, shape, device, dtype, fmt, mode == "compile")
                            fn()
                            fns[name] = fn
                        except Exception as exc:
                            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                            log.warning("layer %s %s failed: %s", name, shape, errors[name])
                    if "batchnorm" not in fns or "copy" not in fns:
                        results.append(dict(suite="layer", shape=list(shape), dtype=dtype,
                                            memory_format=fmt, mode=mode, errors=errors,
                                            skipped="baseline failed"))
                        continue
                    start = time.perf_counter()
                    times = round_robin(fns, device, config.warmup, config.repeats,
                                         config.inner)
                    summary = summarize(times, "batchnorm")
                    copy = summary["copy"]["median_ms"]
                    element = torch.finfo(getattr(torch, dtype)).bits // 8
                    for name, entry in summary.items():
                        entry["vs_copy"] = entry["median_ms"] / copy
                        entry["floor_bytes"] = floor_bytes(name, shape, element)
                        entry["floor_ms"] = entry["floor_bytes"] / bandwidth["bytes_per_s"] * 1e3
                        entry["x_floor"] = entry["median_ms"] / entry["floor_ms"]
                        entry["launches"] = kernel_launches(fns[name], device)
                    results.append(dict(suite="layer", shape=list(shape), dtype=dtype,
                                        memory_format=fmt, mode=mode, methods=summary,
                                        errors=errors, copy_bandwidth=bandwidth,
                                        wall_s=time.perf_counter() - start))
                    log.info("layer %s %s %s %s: %s", mode, shape, dtype, fmt, brief(summary))
    return results
