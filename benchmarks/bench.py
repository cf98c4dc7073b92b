"""``kalmannorm bench``: speed and memory of the normalization layers, as ratios to BatchNorm.

Batch Kalman Normalization (Wang et al., arXiv 1802.03133) adds one pseudo-image per statistics
group through every layer (``docs/method.md`` section 4), so its cost is compared with BatchNorm's
in the same process and the same round. Three suites, each timed round-robin (every method once
per round, the order rotating between rounds) after warm-up rounds, with the median and the
interquartile range of the per-round times and of the per-round ratios to BatchNorm:

- ``layer``: forward + backward of one norm layer at CIFAR and ImageNet shapes for BatchNorm,
  micro-batch ("ghost") BatchNorm, GroupNorm, Batch Renormalization and BKN at several
  micro-batches, plus a copy forward and backward (the bandwidth floor: one read and one write
  of the tensor each way). BKN appears twice: ``bkn`` is the layer with a prior supplied
  (``forward_with_prior``), ``bkn_shadow`` the layer as it runs inside a ``KalmanPredictor``
  (``N + S`` rows in, prior read from the shadow rows, fresh samples written to them);
  ``bkn_composite`` is ``bkn`` computed by the composite torch-op form (the code before the
  fused kernel of :mod:`kalmannorm._fused`, and what ``torch.compile`` traces).
- ``model``: one SGD step (forward, cross-entropy, backward, optimizer step) of the CIFAR
  pre-activation ResNet and a ResNet-50, with the same norms, BKN converted by
  :func:`kalmannorm.convert_batchnorm`. Memory: the bytes of the distinct storages autograd saves
  for backward during one step (``saved_tensors_hooks``; device independent), and on CUDA also
  the peak allocated memory of the step above what was allocated before it.
- ``compile``: ``torch._dynamo.explain`` of a converted ResNet (graph breaks), and the model step
  compiled with ``torch.compile`` next to eager.

Every suite runs for float32 and bfloat16 autocast, contiguous and channels-last, eager (and
compiled where the suite says so). Results go to a JSON record (config, git commit, versions,
machine, every timing) in ``--out``; :func:`write_doc` turns all records of a folder into the
tables of ``docs/performance.md``.

Usage::

    python -m kalmannorm bench --quick                       # < 2 minutes on a CPU
    python -m kalmannorm bench --out docs/perf               # the full CPU suite
    python -m kalmannorm bench --device cuda --out DIR       # the full GPU suite (~3 minutes)
    python -m kalmannorm bench --doc docs/performance.md --records docs/perf   # tables only
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import functools
import glob
import inspect
import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kalmannorm.harness.records import git_info, versions

__all__ = ["BenchConfig", "run_bench", "write_doc", "add_arguments", "main", "SCHEMA"]

log = logging.getLogger("kalmannorm.bench")

SCHEMA = "kalmannorm.bench/1"
DOC_BEGIN = "<!-- BEGIN GENERATED TABLES (kalmannorm.bench.write_doc; do not edit by hand) -->"
DOC_END = "<!-- END GENERATED TABLES -->"

LAYER_SHAPES = ((128, 16, 32, 32), (128, 64, 8, 8), (32, 256, 56, 56))


@dataclass
class BenchConfig:
    """What one ``kalmannorm bench`` run measures. ``None`` fields take the defaults of
    :func:`resolve` (which depend on ``device`` and ``quick``)."""

    device: str = "cpu"
    quick: bool = False
    suites: Tuple[str, ...] = ("layer", "model", "compile")
    repeats: Optional[int] = None
    warmup: Optional[int] = None
    inner: Optional[int] = None
    threads: Optional[int] = None
    dtypes: Optional[Tuple[str, ...]] = None
    memory_formats: Optional[Tuple[str, ...]] = None
    layer_shapes: Optional[Tuple[Tuple[int, ...], ...]] = None
    layer_micro_batches: Optional[Tuple[int, ...]] = None
    models: Optional[Tuple[Tuple[str, int, int], ...]] = None  # (arch, batch, image size)
    model_micro_batches: Optional[Tuple[int, ...]] = None
    model_repeats: Optional[int] = None
    compile_models: Optional[Tuple[Tuple[str, int, int], ...]] = None
    compile_layer: Optional[bool] = None
    prediction: Tuple[str, ...] = ("sampled",)
    gain: float = 0.9
    seed: int = 0
    budget_s: Optional[float] = None
    label: str = ""


def resolve(config: BenchConfig) -> BenchConfig:
    """Fill the ``None`` fields for the device and mode."""
    cuda = config.device.startswith("cuda")
    quick = config.quick
    defaults: Dict[str, Any] = dict(
        repeats=5 if quick else (10 if cuda else 7),
        warmup=2,
        inner=10 if cuda else 1,
        threads=None if cuda else 1,
        dtypes=("float32",) if quick else ("float32", "bfloat16"),
        memory_formats=("contiguous",) if quick else ("contiguous", "channels_last"),
        layer_shapes=LAYER_SHAPES[:2] if quick else LAYER_SHAPES,
        layer_micro_batches=(2, 8) if quick else (2, 4, 8, 32),
        models=(("preact_resnet20", 32, 32),) if quick else (
            (("preact_resnet20", 128, 32), ("resnet50", 32, 224)) if cuda
            else (("preact_resnet20", 128, 32), ("resnet50", 16, 64))
        ),
        model_micro_batches=(2,) if quick else (2, 4, 8),
        model_repeats=3 if quick else (6 if cuda else 5),
        compile_models=() if quick else (
            (("preact_resnet20", 128, 32),) if cuda else (("preact_resnet20", 32, 32),)
        ),
        compile_layer=not quick and not cuda,  # each compiled layer costs ~15 s on a GPU
        budget_s=(150.0 if cuda else None),
    )
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for key, value in defaults.items():
        if values[key] is None:
            values[key] = value
    unknown = set(values["suites"]) - {"layer", "model", "compile"}
    if unknown:
        raise ValueError(f"unknown suites {sorted(unknown)}; valid: layer, model, compile")
    return BenchConfig(**values)


# ------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _round_robin(fns: Dict[str, Callable[[], Any]], device: torch.device, warmup: int,
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
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            elapsed = (time.perf_counter() - start) * 1e3 / inner
            if r >= warmup:
                times[name].append(elapsed)
    return times


def _quartiles(values: Sequence[float]) -> Tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def _summary(times: Dict[str, List[float]], baseline: str) -> Dict[str, Dict[str, Any]]:
    """Median and IQR of the times and of the per-round ratios to ``baseline``."""
    out = {}
    base = times.get(baseline)
    for name, values in times.items():
        q1, med, q3 = _quartiles(values)
        entry = dict(times_ms=values, median_ms=med, iqr_ms=q3 - q1)
        if base is not None:
            ratios = [v / b for v, b in zip(values, base)]
            r1, rmed, r3 = _quartiles(ratios)
            entry.update(ratio=rmed, ratio_iqr=r3 - r1, ratio_q1=r1, ratio_q3=r3)
        out[name] = entry
    return out


class _CopyFloor(torch.autograd.Function):
    """A copy forward and a copy backward: the least traffic any norm layer can have."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g.clone()


class _Budget:
    def __init__(self, seconds: Optional[float]):
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def exhausted(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def _autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def _memory_format(name: str, dim: int) -> torch.memory_format:
    if name == "contiguous":
        return torch.contiguous_format
    if name == "channels_last":
        return torch.channels_last if dim == 4 else torch.channels_last_3d
    raise ValueError(f"unknown memory format {name!r}; valid: contiguous, channels_last")


# ------------------------------------------------------------------------------ layer suite
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


@contextlib.contextmanager
def _composite_kernels():
    """Run BKN with the composite torch-op form instead of the fused kernel."""
    try:
        from kalmannorm import _fused
    except ImportError:  # older checkouts have only the composite form
        yield
        return
    original = _fused.fused_available
    _fused.fused_available = lambda x: False
    try:
        yield
    finally:
        _fused.fused_available = original


def _layer_fn(spec: Dict[str, Any], shape: Tuple[int, ...], device: torch.device, dtype: str,
              memory_format: str, compiled: bool) -> Callable[[], Any]:
    import kalmannorm as kn

    fmt = _memory_format(memory_format, len(shape))
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
            return _CopyFloor.apply(x)
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
            shadow = kn.ShadowBatch()
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
        with _autocast(device, dtype), (_composite_kernels() if composite
                                        else contextlib.nullcontext()):
            y = forward()
        return torch.autograd.grad(y, inputs, g.to(y.dtype), allow_unused=True)

    return step


def _layer_suite(config: BenchConfig, device: torch.device, budget: _Budget) -> List[dict]:
    results = []
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
                    times = _round_robin(fns, device, config.warmup, config.repeats,
                                         config.inner)
                    summary = _summary(times, "batchnorm")
                    copy = summary["copy"]["median_ms"]
                    for name, entry in summary.items():
                        entry["vs_copy"] = entry["median_ms"] / copy
                    results.append(dict(suite="layer", shape=list(shape), dtype=dtype,
                                        memory_format=fmt, mode=mode, methods=summary,
                                        errors=errors, wall_s=time.perf_counter() - start))
                    log.info("layer %s %s %s %s: %s", mode, shape, dtype, fmt, _brief(summary))
    return results


def _brief(summary: Dict[str, Dict[str, Any]]) -> str:
    return ", ".join(f"{k} {v['median_ms']:.2f}ms" + (f" x{v['ratio']:.2f}" if "ratio" in v
                                                    else "")
                     for k, v in summary.items())


# ------------------------------------------------------------------------------ model suite
def _model_methods(arch: str, micro_batches: Sequence[int], gain: float,
                   predictions: Sequence[str]) -> List[Tuple[str, Dict[str, Any]]]:
    gn_groups = 4 if arch.startswith("preact") else 32  # the released CIFAR baseline; GN paper
    methods = [("batchnorm", dict(norm="batchnorm")),
               ("groupnorm", dict(norm="groupnorm", num_groups=gn_groups))]
    for m in micro_batches:
        methods += [(f"ghost_batchnorm@{m}", dict(norm="ghost_batchnorm", micro_batch=m)),
                    (f"batchrenorm@{m}", dict(norm="batchrenorm", micro_batch=m))]
        for prediction in predictions:
            suffix = "" if prediction == "sampled" else f"[{prediction}]"
            methods.append((f"bkn{suffix}@{m}", dict(norm="bkn", micro_batch=m, gain=gain,
                                                      prediction=prediction)))
    return methods


def _build_model(arch: str, spec: Dict[str, Any], device: torch.device,
                 memory_format: str) -> nn.Module:
    import kalmannorm as kn
    from kalmannorm.harness.models import build_model

    num_classes = 10 if arch.startswith("preact") else 1000
    if spec["norm"] == "bkn":
        model = build_model(arch, num_classes, kn.get_norm_layer("batchnorm"))
        options = dict(gain=spec["gain"], micro_batch=spec["micro_batch"])
        if spec.get("prediction", "sampled") != "sampled":
            if "prediction" not in inspect.signature(kn.convert_batchnorm).parameters:
                raise ValueError("convert_batchnorm has no prediction option in this version")
            options["prediction"] = spec["prediction"]
        model = kn.convert_batchnorm(model, **options)
    else:
        options = {k: v for k, v in spec.items() if k != "norm"}
        model = build_model(arch, num_classes, kn.get_norm_layer(spec["norm"], **options))
    return model.to(device).to(memory_format=_memory_format(memory_format, 4)).train()


def _train_step(model: nn.Module, batch: int, size: int, device: torch.device, dtype: str,
                memory_format: str, compiled: bool = False) -> Callable[[], Any]:
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=_memory_format(memory_format, 4))
    target = torch.randint(0, _num_classes(model), (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if compiled else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = F.cross_entropy(forward(x), target)
        loss.backward()
        optimizer.step()
        return loss

    return step


def _num_classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else 10


def _saved_bytes(step: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for backward during one step."""
    storages: Dict[Tuple[Any, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
            storages[(t.device, storage.data_ptr())] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def _peak_bytes(step: Callable[[], Any], device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _model_suite(config: BenchConfig, device: torch.device, budget: _Budget) -> List[dict]:
    results = []
    # Most telling variants first, so that a time budget drops the least telling ones.
    order = [("float32", "contiguous"), ("bfloat16", "channels_last"),
             ("bfloat16", "contiguous"), ("float32", "channels_last")]
    variants = [v for v in order if v[0] in config.dtypes and v[1] in config.memory_formats]
    variants += [(d, f) for d in config.dtypes for f in config.memory_formats
                 if (d, f) not in variants]
    for dtype, fmt in variants:
        for arch, batch, size in config.models:
            if True:
                if budget.exhausted():
                    results.append(dict(suite="model", arch=arch, batch=batch, image_size=size,
                                        dtype=dtype, memory_format=fmt, mode="eager",
                                        skipped="budget"))
                    continue
                methods = _model_methods(arch, config.model_micro_batches, config.gain,
                                         config.prediction)
                steps, memory, errors = {}, {}, {}
                for name, spec in methods:
                    torch.manual_seed(config.seed)
                    try:
                        model = _build_model(arch, spec, device, fmt)
                        step = _train_step(model, batch, size, device, dtype, fmt)
                        step()  # first call outside the measurement (allocations, lazy init)
                        memory[name] = dict(saved_bytes=_saved_bytes(step),
                                            peak_bytes=_peak_bytes(step, device))
                    except Exception as exc:  # recorded; the other methods still run
                        errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                        log.warning("model %s %s failed: %s", arch, name, errors[name])
                        continue
                    steps[name] = step
                if "batchnorm" not in steps:
                    results.append(dict(suite="model", arch=arch, batch=batch, image_size=size,
                                        dtype=dtype, memory_format=fmt, mode="eager",
                                        errors=errors, skipped="baseline failed"))
                    continue
                start = time.perf_counter()
                times = _round_robin(steps, device, 1, config.model_repeats)
                summary = _summary(times, "batchnorm")
                base = memory["batchnorm"]
                for name, entry in summary.items():
                    entry.update(memory[name])
                    entry["saved_ratio"] = memory[name]["saved_bytes"] / base["saved_bytes"]
                    if base["peak_bytes"]:
                        entry["peak_ratio"] = memory[name]["peak_bytes"] / base["peak_bytes"]
                results.append(dict(suite="model", arch=arch, batch=batch, image_size=size,
                                    dtype=dtype, memory_format=fmt, mode="eager",
                                    methods=summary, errors=errors,
                                    wall_s=time.perf_counter() - start))
                log.info("model %s %s %s: %s", arch, dtype, fmt, _brief(summary))
                del steps
    return results


# ---------------------------------------------------------------------------- compile suite
def graph_breaks(arch: str = "preact_resnet20", micro_batch: int = 2, batch: int = 8,
                 size: int = 32) -> Dict[str, Any]:
    """``torch._dynamo.explain`` of a converted ResNet's training forward.

    Returns ``{"graphs", "graph_breaks", "reasons": [str]}``.
    """
    import kalmannorm as kn
    from kalmannorm.harness.models import build_model

    torch.manual_seed(0)
    model = kn.convert_batchnorm(build_model(arch, 10, kn.get_norm_layer("batchnorm")),
                                 micro_batch=micro_batch).train()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(batch, 3, size, size))
    reasons = [str(getattr(r, "reason", r)) for r in explanation.break_reasons]
    return dict(graphs=explanation.graph_count, graph_breaks=explanation.graph_break_count,
                reasons=reasons)


def _compile_suite(config: BenchConfig, device: torch.device, budget: _Budget) -> List[dict]:
    try:
        explained = graph_breaks()
    except Exception as exc:
        explained = dict(graphs=None, graph_breaks=None, reasons=[],
                         error=f"{type(exc).__name__}: {exc}"[:300])
    results = [dict(suite="compile", kind="explain", arch="preact_resnet20", **explained)]
    log.info("compile explain: %s", results[0])
    for arch, batch, size in config.compile_models:
        if budget.exhausted():
            results.append(dict(suite="compile", kind="step", arch=arch, skipped="budget"))
            continue
        steps, compile_s, errors = {}, {}, {}
        for name, spec in (("batchnorm", dict(norm="batchnorm")),
                           ("bkn@2", dict(norm="bkn", micro_batch=2, gain=config.gain))):
            for mode in ("eager", "compile"):
                key = f"{name}" if mode == "eager" else f"{name}+compile"
                if budget.exhausted():
                    errors[key] = "skipped: time budget"
                    continue
                torch.manual_seed(config.seed)
                try:
                    model = _build_model(arch, spec, device, "contiguous")
                    step = _train_step(model, batch, size, device, "float32", "contiguous",
                                       compiled=mode == "compile")
                    _sync(device)
                    start = time.perf_counter()
                    step()
                    step()
                    _sync(device)
                except Exception as exc:
                    errors[key] = f"{type(exc).__name__}: {exc}"[:300]
                    log.warning("compile %s failed: %s", key, errors[key])
                    continue
                compile_s[key] = time.perf_counter() - start
                steps[key] = step
        if "batchnorm" not in steps:
            results.append(dict(suite="compile", kind="step", arch=arch, errors=errors,
                                skipped="baseline failed"))
            continue
        times = _round_robin(steps, device, 1, config.model_repeats)
        summary = _summary(times, "batchnorm")
        for key, entry in summary.items():
            entry["first_two_steps_s"] = compile_s[key]
        results.append(dict(suite="compile", kind="step", arch=arch, batch=batch,
                            image_size=size, dtype="float32", memory_format="contiguous",
                            methods=summary, errors=errors))
        log.info("compile step %s: %s", arch, _brief(summary))
    return results


# ------------------------------------------------------------------------------ self-check
def verify_fused(device: torch.device) -> Dict[str, Any]:
    """Fused kernel against the composite form on ``device``: largest relative differences.

    A converted two-layer conv net (shadow rows, prior, samples) and the functional step with a
    supplied prior, float32 and bfloat16 autocast, output and every gradient. Returns
    ``{"ok": bool, "max_rel_diff": {case: float}, "error": str | None}``.
    """
    import kalmannorm as kn

    diffs: Dict[str, float] = {}

    def rel(a: Tensor, b: Tensor) -> float:
        a, b = a.detach().double(), b.detach().double()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    def net_step(dtype: str, composite: bool) -> List[Tensor]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                            nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                            nn.BatchNorm2d(8))
        model = kn.convert_batchnorm(net, micro_batch=2).to(device)
        x = torch.randn(8, 3, 8, 8, device=device)
        torch.manual_seed(1)
        with _autocast(device, dtype), (_composite_kernels() if composite
                                        else contextlib.nullcontext()):
            out = model(x)
        out.float().square().sum().backward()
        return [out.float()] + [p.grad for p in model.parameters()]

    def functional_step(composite: bool) -> List[Tensor]:
        torch.manual_seed(0)
        x = (torch.randn(8, 4, 5, 5, device=device) * 2 + 1).requires_grad_()
        w = (torch.rand(4, device=device) + 0.5).requires_grad_()
        b = torch.randn(4, device=device, requires_grad=True)
        mp = torch.randn(4, 4, device=device, requires_grad=True)
        vp = (torch.rand(4, 4, device=device) + 0.5).requires_grad_()
        y, mean, var, _ = kn.functional.batch_kalman_norm(x, (mp, vp), w, b, groups=4, gain=0.7,
                                                          fused=not composite)
        loss = (y * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum() \
            + mean.sum() + var.square().sum()
        return [y] + list(torch.autograd.grad(loss, (x, w, b, mp, vp)))

    try:
        for case, fn in (("functional", functional_step),
                         ("model_float32", functools.partial(net_step, "float32")),
                         ("model_bfloat16", functools.partial(net_step, "bfloat16"))):
            fused, composite = fn(composite=False), fn(composite=True)
            diffs[case] = max(rel(a, b) for a, b in zip(fused, composite))
    except Exception as exc:  # reported in the record; the run goes on with the composite form
        return dict(ok=False, max_rel_diff=diffs, error=f"{type(exc).__name__}: {exc}")
    limits = dict(functional=1e-4, model_float32=1e-3, model_bfloat16=5e-2)
    return dict(ok=all(diffs[k] <= limits[k] for k in diffs), max_rel_diff=diffs,
                limits=limits, error=None)


# ------------------------------------------------------------------------------ the record
def _machine(device: torch.device) -> Dict[str, Any]:
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


def run_bench(config: BenchConfig, out_dir: Optional[str] = None) -> Dict[str, Any]:
    """Run the suites of ``config`` and return (and, with ``out_dir``, write) the record."""
    config = resolve(config)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but torch.cuda.is_available() is False")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    budget = _Budget(config.budget_s)
    started = time.perf_counter()
    commit, dirty = git_info()
    record: Dict[str, Any] = dict(
        schema=SCHEMA, label=config.label, config=dataclasses.asdict(config),
        git_commit=commit, git_dirty=dirty, versions=versions(), machine=_machine(device),
        device=device.type, started_at=_now(), results=[],
    )
    record["verify"] = verify_fused(device)
    log.info("fused kernel vs composite on %s: %s", device, record["verify"])
    # Should the fused kernel fail on this device, the numbers are still worth having: they are
    # then those of the composite form, and the record says so.
    kernels = contextlib.nullcontext() if record["verify"]["ok"] else _composite_kernels()
    suites = {"layer": _layer_suite, "model": _model_suite, "compile": _compile_suite}
    # On a GPU the compile suite goes before the model suite: under the time budget it is the
    # model suite's last variants that are dropped.
    order = ("layer", "compile", "model") if device.type == "cuda" else ("layer", "model",
                                                                          "compile")
    with kernels:
        for name in order:
            if name in config.suites:
                record["results"] += suites[name](config, device, budget)
                record["wall_s"] = time.perf_counter() - started
                if out_dir:
                    _write_record(record, out_dir)
    record["wall_s"] = time.perf_counter() - started
    record["finished_at"] = _now()
    if out_dir:
        record["path"] = _write_record(record, out_dir)
    return record


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_record(record: Dict[str, Any], out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stamp = record["started_at"].replace(":", "").replace("-", "")[:15]
    mode = "quick" if record["config"]["quick"] else "full"
    name = f"bench-{record['device']}-{mode}-{stamp}"
    if record["label"]:
        name += f"-{record['label']}"
    path = os.path.join(out_dir, name + ".json")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({k: v for k, v in record.items() if k != "path"}, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------- the tables (doc)
def load_records(folder: str) -> List[Dict[str, Any]]:
    """All bench records (``kalmannorm.bench/1``) in ``folder``, oldest first."""
    records = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            try:
                record = json.load(f)
            except json.JSONDecodeError:
                continue
        if isinstance(record, dict) and record.get("schema") == SCHEMA:
            record["path"] = path
            records.append(record)
    return sorted(records, key=lambda r: r.get("started_at", ""))


def _fmt_ratio(entry: Dict[str, Any], key: str = "ratio") -> str:
    if key not in entry:
        return ""
    iqr = entry.get(f"{key}_iqr")
    return f"{entry[key]:.2f}" + (f" ±{iqr / 2:.2f}" if iqr is not None else "")


def _target_mark(value: float, limit: float) -> str:
    if value <= limit:
        return "ok"
    if limit == 0:
        return f"**missed ({value})**"
    return f"**missed by {100 * (value / limit - 1):.0f}%**"


def _micro(name: str) -> Optional[int]:
    return int(name.split("@")[1]) if "@" in name else None


def _record_header(record: Dict[str, Any]) -> List[str]:
    machine, versions, cfg = record["machine"], record["versions"], record["config"]
    where = machine.get("gpu") or machine.get("cpu")
    commit = (record.get("git_commit") or "unknown")[:10] + (
        " (dirty)" if record.get("git_dirty") else "")
    return [
        f"Record `{os.path.basename(record.get('path', ''))}`: {where}, "
        f"{machine.get('torch_threads')} torch thread(s), torch {versions['torch']}, "
        f"Python {versions['python']}, kalmannorm {versions['kalmannorm']} at commit {commit}, "
        f"{'quick' if cfg['quick'] else 'full'} mode, {cfg['repeats']} rounds after "
        f"{cfg['warmup']} warm-up (models: {cfg['model_repeats']} rounds), "
        f"{record.get('wall_s', 0):.0f} s in all, started {record['started_at']}.",
        "",
    ] + _verify_line(record)


def _verify_line(record: Dict[str, Any]) -> List[str]:
    check = record.get("verify")
    if not check:
        return []
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in check.get("max_rel_diff", {}).items())
    if check.get("ok"):
        return [f"Fused kernel checked against the composite form on this device (largest "
                f"relative differences: {diffs}).", ""]
    return [f"**The fused kernel failed its check on this device ({check.get('error') or diffs});"
            f" every BKN number below is the composite form's.**", ""]


def _layer_tables(record: Dict[str, Any]) -> List[str]:
    lines = []
    rows = [r for r in record["results"] if r["suite"] == "layer" and "methods" in r]
    if not rows:
        return lines
    lines += ["Layer forward + backward: median ms, ratio to BatchNorm in the same round "
              "(median ± half the IQR), and the BKN targets (`bkn` <= 1.3x BN; `bkn_shadow`, "
              "which also carries the S shadow rows, <= (1 + 1/m) x 1.3x BN; at the largest "
              "shape `bkn` <= 2x the copy floor).", ""]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"**[{shape}] {r['dtype']}, {r['memory_format']}, {r['mode']}**")
        lines.append("")
        lines.append("| method | ms | x BN | x copy | target |")
        lines.append("|---|---:|---:|---:|---|")
        largest = r["shape"] == max((x["shape"] for x in rows),
                                    key=lambda s: math.prod(s))
        for name, entry in r["methods"].items():
            m = _micro(name)
            target = ""
            if name.startswith("bkn@"):
                target = "x BN " + _target_mark(entry["ratio"], 1.3)
                if largest:
                    target += "; x copy " + _target_mark(entry["vs_copy"], 2.0)
            elif name.startswith("bkn_shadow@") and m:
                target = "x BN " + _target_mark(entry["ratio"], (1 + 1 / m) * 1.3)
            lines.append(f"| {name} | {entry['median_ms']:.2f} ±{entry['iqr_ms'] / 2:.2f} | "
                         f"{_fmt_ratio(entry)} | {entry['vs_copy']:.2f} | {target} |")
        for name, error in r.get("errors", {}).items():
            lines.append(f"| {name} | not run: {error} | | | |")
        lines.append("")
    return lines


def _model_tables(record: Dict[str, Any]) -> List[str]:
    lines = []
    rows = [r for r in record["results"] if r["suite"] == "model" and "methods" in r]
    if not rows:
        return lines
    lines += ["Model: one SGD step (ms, ratio to BatchNorm in the same round) and memory "
              "(autograd-saved bytes; on CUDA also the step's peak allocation above its start), "
              "with the BKN targets: time <= (1 + 1/m) x 1.05 BN, memory <= (1 + 1/m) x 1.1 BN.",
              ""]
    for r in rows:
        lines.append(f"**{r['arch']}, batch {r['batch']}, {r['image_size']}px, {r['dtype']}, "
                     f"{r['memory_format']}**")
        lines.append("")
        lines.append("| method | ms/step | x BN | saved MiB | x BN | peak MiB | x BN | "
                     "target (time; memory) |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for name, e in r["methods"].items():
            m = _micro(name)
            target = ""
            if name.startswith("bkn") and m:
                mem = e.get("peak_ratio", e["saved_ratio"])
                target = (_target_mark(e["ratio"], (1 + 1 / m) * 1.05) + "; "
                          + _target_mark(mem, (1 + 1 / m) * 1.1))
            peak = "" if e.get("peak_bytes") is None else f"{e['peak_bytes'] / 2**20:.1f}"
            peak_ratio = f"{e['peak_ratio']:.2f}" if "peak_ratio" in e else ""
            lines.append(
                f"| {name} | {e['median_ms']:.1f} ±{e['iqr_ms'] / 2:.1f} | {_fmt_ratio(e)} | "
                f"{e['saved_bytes'] / 2**20:.1f} | {e['saved_ratio']:.2f} | {peak} | "
                f"{peak_ratio} | {target} |")
        for name, error in r.get("errors", {}).items():
            lines.append(f"| {name} | not run: {error} | | | | | | |")
        lines.append("")
    return lines


def _compile_tables(record: Dict[str, Any]) -> List[str]:
    lines = []
    for r in record["results"]:
        if r["suite"] != "compile":
            continue
        if r.get("kind") == "explain" and r.get("graph_breaks") is None:
            lines += [f"`torch._dynamo.explain` failed: {r.get('error')}", ""]
        elif r.get("kind") == "explain":
            reasons = "; ".join(r["reasons"]) or "none"
            lines += [f"`torch._dynamo.explain` of a converted {r['arch']} (BKN, micro-batch 2, "
                      f"training forward): {r['graphs']} graph(s), {r['graph_breaks']} graph "
                      f"break(s) (target 0: {_target_mark(r['graph_breaks'], 0)}); reasons: "
                      f"{reasons}.", ""]
        elif "methods" in r:
            lines += [f"**Compiled training step, {r['arch']}, batch {r['batch']}, "
                      f"{r['image_size']}px, float32**", "",
                      "| method | ms/step | x eager BN | first two steps (s) |",
                      "|---|---:|---:|---:|"]
            for name, e in r["methods"].items():
                lines.append(f"| {name} | {e['median_ms']:.1f} ±{e['iqr_ms'] / 2:.1f} | "
                             f"{_fmt_ratio(e)} | {e['first_two_steps_s']:.1f} |")
            for name, error in r.get("errors", {}).items():
                lines.append(f"| {name} | not run: {error} | | |")
            lines.append("")
    return lines


def _targets_table(record: Dict[str, Any]) -> List[str]:
    """One line per target of the issue: the measured worst case over the configurations."""
    rows: List[Tuple[str, str, str, str]] = []
    for r in record["results"]:
        if "methods" not in r:
            continue
        where = (f"{r['dtype']}, {r['memory_format']}, {r.get('mode', 'eager')}")
        if r["suite"] == "layer":
            shape = "x".join(map(str, r["shape"]))
            largest = r["shape"] == list(LAYER_SHAPES[-1])
            for name, e in r["methods"].items():
                m = _micro(name)
                if name.startswith("bkn@"):
                    rows.append((f"layer fwd+bwd [{shape}] m={m}", "<= 1.30x BN",
                                 f"{e['ratio']:.2f}x ({where})", _target_mark(e["ratio"], 1.3)))
                    if largest:
                        rows.append((f"layer vs copy [{shape}] m={m}", "<= 2.00x copy",
                                     f"{e['vs_copy']:.2f}x ({where})",
                                     _target_mark(e["vs_copy"], 2.0)))
        elif r["suite"] == "model":
            for name, e in r["methods"].items():
                m = _micro(name)
                if name.startswith("bkn") and m:
                    limit = (1 + 1 / m) * 1.05
                    rows.append((f"{r['arch']} step, {name}", f"<= {limit:.2f}x BN",
                                 f"{e['ratio']:.2f}x ({where})", _target_mark(e["ratio"], limit)))
                    mem = e.get("peak_ratio", e["saved_ratio"])
                    kind = "peak" if "peak_ratio" in e else "saved"
                    limit = (1 + 1 / m) * 1.1
                    rows.append((f"{r['arch']} memory ({kind}), {name}", f"<= {limit:.2f}x BN",
                                 f"{mem:.2f}x ({where})", _target_mark(mem, limit)))
    for r in record["results"]:
        if r["suite"] == "compile" and r.get("kind") == "explain" \
                and r.get("graph_breaks") is not None:
            rows.append(("graph breaks, converted " + r["arch"], "0", str(r["graph_breaks"]),
                         _target_mark(r["graph_breaks"], 0)))
    if not rows:
        return []
    lines = ["Targets of the issue, one row per measured configuration:", "",
             "| target | limit | measured | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return lines + [""]


def _result_key(result: Dict[str, Any]) -> Tuple:
    return (result["suite"], result.get("kind"), str(result.get("shape")), result.get("arch"),
            result.get("dtype"), result.get("memory_format"), result.get("mode"))


def _merge(records: Sequence[Dict[str, Any]]) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """One record made of the newest measured result of each configuration, and the records
    that contributed (a partial rerun replaces only what it measured)."""
    merged: Dict[Tuple, Dict[str, Any]] = {}
    source: Dict[Tuple, int] = {}
    for i, record in enumerate(records):
        for result in record["results"]:
            if "methods" in result or result.get("kind") == "explain" or \
                    _result_key(result) not in merged:
                merged[_result_key(result)] = result
                source[_result_key(result)] = i
    used = sorted(set(source.values()))
    return dict(records[-1], results=list(merged.values())), [records[i] for i in used]


def render_tables(records: Sequence[Dict[str, Any]]) -> str:
    """Markdown tables per device kind (CPU, then GPU) from its full records (else its quick
    ones), each configuration from the newest record that measured it."""
    lines: List[str] = []
    for device, title in (("cpu", "CPU"), ("cuda", "GPU")):
        mine = [r for r in records if r.get("device") == device]
        if not mine:
            lines += [f"### {title}", "", f"No {title} record yet.", ""]
            continue
        full = [r for r in mine if not r["config"]["quick"]]
        record, used = _merge(full or mine)
        lines += [f"### {title}", ""]
        for source in used:
            lines += _record_header(source)
        lines += _targets_table(record)
        lines += _layer_tables(record) + _model_tables(record) + _compile_tables(record)
    return "\n".join(lines).rstrip() + "\n"


def render_comparison(records: Sequence[Dict[str, Any]]) -> str:
    """Layer ratios to BatchNorm of several labelled records side by side (before/after)."""
    records = [r for r in records if any(x["suite"] == "layer" and "methods" in x
                                         for x in r["results"])]
    if not records:
        return ""
    lines = ["| shape | method | " + " | ".join(
        f"{r['label'] or 'unlabelled'} (commit {(r.get('git_commit') or '?')[:7]})"
        for r in records) + " |", "|---|---|" + "---:|" * len(records)]
    keys: List[Tuple[str, str]] = []
    tables: List[Dict[Tuple[str, str], Dict[str, Any]]] = []
    for r in records:
        table = {}
        for x in r["results"]:
            if x["suite"] != "layer" or "methods" not in x or x["mode"] != "eager" \
                    or x["dtype"] != "float32" or x["memory_format"] != "contiguous":
                continue
            shape = "x".join(map(str, x["shape"]))
            for name, e in x["methods"].items():
                if name in ("copy", "batchnorm"):
                    continue
                table[(shape, name)] = e
                if (shape, name) not in keys:
                    keys.append((shape, name))
        tables.append(table)
    for key in keys:
        cells = []
        for table in tables:
            e = table.get(key)
            cells.append("" if e is None else f"{_fmt_ratio(e)}x")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    header = ["Ratio to BatchNorm in the same round (float32, contiguous, eager, one CPU thread);"
              " each column is one record of `docs/perf/before-after/`:", ""]
    for r in records:
        header += _record_header(r)
    return "\n".join(header + lines) + "\n"


def write_doc(doc_path: str, records_dir: str) -> str:
    """Regenerate the tables of ``doc_path`` from the records in ``records_dir``.

    Only the text between the generated-table markers changes; the prose around them stays. A
    document without the markers gets them appended. Returns the new text.
    """
    tables = render_tables(load_records(records_dir))
    comparison_dir = os.path.join(records_dir, "before-after")
    if os.path.isdir(comparison_dir):
        comparison = render_comparison(load_records(comparison_dir))
        if comparison:
            tables += "\n### Before and after the fused kernel (CPU)\n\n" + comparison
    block = f"{DOC_BEGIN}\n\n{tables}\n{DOC_END}"
    text = ""
    if os.path.exists(doc_path):
        with open(doc_path) as f:
            text = f.read()
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        tail = rest.split(DOC_END, 1)[1]
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text else "# Performance\n\n") + block + "\n"
    with open(doc_path, "w") as f:
        f.write(text)
    return text


# ------------------------------------------------------------------------------------- CLI
def _ints(text: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _strs(text: str) -> Tuple[str, ...]:
    return tuple(v for v in text.split(",") if v)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``kalmannorm bench``; each maps to a :class:`BenchConfig` field."""
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--quick", action="store_true", help="small shapes, few rounds (< 2 min CPU)")
    p.add_argument("--suites", type=_strs, default=("layer", "model", "compile"),
                   help="comma list of layer, model, compile (default all)")
    p.add_argument("--repeats", type=int, help="measured rounds (layer suite)")
    p.add_argument("--model-repeats", type=int, help="measured rounds (model and compile suites)")
    p.add_argument("--warmup", type=int, help="warm-up rounds")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1 on CPU)")
    p.add_argument("--dtypes", type=_strs, help="comma list: float32,bfloat16")
    p.add_argument("--memory-formats", type=_strs, help="comma list: contiguous,channels_last")
    p.add_argument("--layer-micro-batches", type=_ints, help="e.g. 2,4,8,32")
    p.add_argument("--model-micro-batches", type=_ints, help="e.g. 2,4,8")
    p.add_argument("--prediction", type=_strs, default=("sampled",),
                   help="BKN prediction(s) for the model suite, if convert_batchnorm has the "
                        "option: sampled (default), analytic")
    p.add_argument("--budget-s", type=float,
                   help="skip the remaining measurements after this many seconds "
                        "(default 150 on CUDA, none on CPU)")
    p.add_argument("--label", default="", help="added to the record's file name")
    p.add_argument("--out", default=None,
                   help="folder for the JSON record (default docs/perf when run from the repo)")
    p.add_argument("--doc", default=None,
                   help="regenerate this markdown file's tables from the records in --records")
    p.add_argument("--records", default=None, help="records folder for --doc (default --out)")
    p.add_argument("--doc-only", action="store_true", help="only regenerate --doc")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or "docs/perf"
    if not args.doc_only:
        fields = {f.name for f in dataclasses.fields(BenchConfig)}
        values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
        record = run_bench(BenchConfig(**values), out)
        log.info("record written to %s (%.0f s)", record.get("path"), record["wall_s"])
    if args.doc:
        write_doc(args.doc, args.records or out)
        log.info("tables of %s regenerated from %s", args.doc, args.records or out)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="kalmannorm bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
