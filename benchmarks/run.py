"""One benchmark run: its configuration, the fused-kernel self-check, and its JSON record.

A record (``"schema": "kalmannorm.bench/1"``) holds the resolved :class:`BenchConfig`, the git
commit, package versions, the machine, the self-check of :func:`verify_fused` and every result of
the suites (:mod:`benchmarks.layer`, :mod:`benchmarks.model`), each with its raw per-round times.
:mod:`benchmarks.doc` turns a folder of records into the tables of ``docs/performance.md``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

import kalmannorm as kn
from kalmannorm.harness.records import git_info, now, versions, write_json

from .layer import layer_suite
from .measure import Budget, autocast, composite_backend, machine
from .model import compile_suite, model_suite

__all__ = ["SCHEMA", "LAYER_SHAPES", "BenchConfig", "resolve", "verify_fused", "run_bench",
           "write_record", "load_records"]

log = logging.getLogger("benchmarks")

SCHEMA = "kalmannorm.bench/1"

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
    bandwidth_bytes: Optional[int] = None  # clone size for the copy bandwidth (default per device)
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


def verify_fused(device: torch.device) -> Dict[str, Any]:
    """The default kernels (backend ``auto``: Triton on CUDA, the fused kernel on the CPU) against
    the composite form on ``device``: largest relative differences.

    A converted two-layer conv net (shadow rows, prior, samples) and the functional step with a
    supplied prior, float32 and bfloat16 autocast, output and every gradient. Returns
    ``{"ok": bool, "max_rel_diff": {case: float}, "error": str | None}``.
    """
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
        with autocast(device, dtype), (composite_backend() if composite
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
        with composite_backend() if composite else contextlib.nullcontext():
            y, mean, var, _ = kn.functional.batch_kalman_norm(x, (mp, vp), w, b, groups=4,
                                                              gain=0.7)
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
        return dict(ok=False, max_rel_diff=diffs, error=f"{type(exc).__name__}: {exc}",
                    backend=default_backend(device))
    limits = dict(functional=1e-4, model_float32=1e-3, model_bfloat16=5e-2)
    return dict(ok=all(diffs[k] <= limits[k] for k in diffs), max_rel_diff=diffs,
                limits=limits, error=None, backend=default_backend(device))


def default_backend(device: torch.device) -> str:
    """The backend the library picks for a float32 BKN step on ``device`` (``cpu_fused``,
    ``triton``, ``composite``), as the record names it."""
    from kalmannorm.functional.dispatch import resolve_backend

    return resolve_backend(torch.empty(8, 4, 5, 5, device=device))


def run_bench(config: BenchConfig, out_dir: Optional[str] = None) -> Dict[str, Any]:
    """Run the suites of ``config`` and return (and, with ``out_dir``, write) the record."""
    config = resolve(config)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but torch.cuda.is_available() is False")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    budget = Budget(config.budget_s)
    started = time.perf_counter()
    commit, dirty = git_info()
    record: Dict[str, Any] = dict(
        schema=SCHEMA, label=config.label, config=dataclasses.asdict(config),
        git_commit=commit, git_dirty=dirty, versions=versions(), machine=machine(device),
        device=device.type, started_at=now(), results=[],
    )
    record["verify"] = verify_fused(device)
    log.info("fused kernel vs composite on %s: %s", device, record["verify"])
    # Should the fused kernel fail on this device, the numbers are still worth having: they are
    # then those of the composite form, and the record says so.
    kernels = contextlib.nullcontext() if record["verify"]["ok"] else composite_backend()
    suites = {"layer": layer_suite, "model": model_suite, "compile": compile_suite}
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
                    write_record(record, out_dir)
    record["wall_s"] = time.perf_counter() - started
    record["finished_at"] = now()
    if out_dir:
        record["path"] = write_record(record, out_dir)
    return record


def write_record(record: Dict[str, Any], out_dir: str) -> str:
    """Write ``record`` to ``out_dir/bench-<device>-<mode>-<start>[-<label>].json`` (atomically);
    its ``path`` field is not stored."""
    stamp = record["started_at"].replace(":", "").replace("-", "")[:15]
    mode = "quick" if record["config"]["quick"] else "full"
    name = f"bench-{record['device']}-{mode}-{stamp}"
    if record["label"]:
        name += f"-{record['label']}"
    path = os.path.join(out_dir, name + ".json")
    write_json(path, {k: v for k, v in record.items() if k != "path"}, indent=1)
    return path


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


