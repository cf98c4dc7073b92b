"""The model and compile suites: one SGD step of a whole network with each norm.

``model``: one SGD step (forward, cross-entropy, backward, optimizer step) of the CIFAR
pre-activation ResNet and a ResNet-50, BKN converted by :func:`kalmannorm.convert_batchnorm`,
the other norms (GroupNorm, GN + weight standardization, FRN, EvoNorm-S0, per-group BatchNorm,
Batch Renorm, MABN) built in by the harness, timed against BatchNorm in the same rounds. Memory: the bytes of the distinct storages autograd
saves for backward during one step (``saved_tensors_hooks``; device independent), and on CUDA
also the peak allocated memory of the step above what was allocated before it.

``compile``: ``torch._dynamo.explain`` of a converted ResNet (graph breaks), and the model step
compiled with ``torch.compile`` next to eager.
"""
from __future__ import annotations

import inspect
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kalmannorm as kn
from kalmannorm.harness.models import build_model

from .measure import Budget, autocast, brief, round_robin, summarize, sync, torch_memory_format

if TYPE_CHECKING:
    from .run import BenchConfig

__all__ = ["model_suite", "compile_suite", "graph_breaks", "build_bench_model", "train_step"]

log = logging.getLogger("benchmarks.model")


def _model_methods(arch: str, micro_batches: Sequence[int], gain: float,
                   predictions: Sequence[str]) -> List[Tuple[str, Dict[str, Any]]]:
    gn_groups = 4 if arch.startswith("preact") else 32  # the released CIFAR baseline; GN paper
    # and the other normalizers a micro-batch user would pick instead (the study's rows), at 32
    # groups where they group channels, fewer where a layer has under 32 channels
    methods = [("batchnorm", dict(norm="batchnorm")),
               ("groupnorm", dict(norm="groupnorm", num_groups=gn_groups)),
               ("groupnorm_ws", dict(norm="groupnorm_ws", num_groups=32, cap_groups=True)),
               ("frn", dict(norm="frn")),
               ("evonorm_s0", dict(norm="evonorm_s0", cap_groups=True))]
    for m in micro_batches:
        methods += [(f"ghost_batchnorm@{m}", dict(norm="ghost_batchnorm", micro_batch=m)),
                    (f"batchrenorm@{m}", dict(norm="batchrenorm", micro_batch=m)),
                    (f"mabn@{m}", dict(norm="mabn", micro_batch=m))]
        for prediction in predictions:
            suffix = "" if prediction == "sampled" else f"[{prediction}]"
            methods.append((f"bkn{suffix}@{m}", dict(norm="bkn", micro_batch=m, gain=gain,
                                                      prediction=prediction)))
    return methods


def build_bench_model(arch: str, spec: Dict[str, Any], device: torch.device,
                 memory_format: str) -> nn.Module:
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
    return model.to(device).to(memory_format=torch_memory_format(memory_format, 4)).train()


def train_step(model: nn.Module, batch: int, size: int, device: torch.device, dtype: str,
                memory_format: str, compiled: bool = False) -> Callable[[], Any]:
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=torch_memory_format(memory_format, 4))
    target = torch.randint(0, _num_classes(model), (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if compiled else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
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


def model_suite(config: "BenchConfig", device: torch.device, budget: Budget) -> List[dict]:
    results = []
    # Most telling variants first, so that a time budget drops the least telling ones.
    order = [("float32", "contiguous"), ("bfloat16", "channels_last"),
             ("bfloat16", "contiguous"), ("float32", "channels_last")]
    variants = [v for v in order if v[0] in config.dtypes and v[1] in config.memory_formats]
    variants += [(d, f) for d in config.dtypes for f in config.memory_formats
                 if (d, f) not in variants]
    for dtype, fmt in variants:
        for arch, batch, size in config.models:
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
                    model = build_bench_model(arch, spec, device, fmt)
                    step = train_step(model, batch, size, device, dtype, fmt)
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
            times = round_robin(steps, device, 1, config.model_repeats)
            summary = summarize(times, "batchnorm")
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
            log.info("model %s %s %s: %s", arch, dtype, fmt, brief(summary))
            del steps
    return results


# ---------------------------------------------------------------------------- compile suite
def graph_breaks(arch: str = "preact_resnet20", micro_batch: int = 2, batch: int = 8,
                 size: int = 32) -> Dict[str, Any]:
    """``torch._dynamo.explain`` of a converted ResNet's training forward.

    Returns ``{"graphs", "graph_breaks", "reasons": [str]}``.
    """
    torch.manual_seed(0)
    model = kn.convert_batchnorm(build_model(arch, 10, kn.get_norm_layer("batchnorm")),
                                 micro_batch=micro_batch).train()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(torch.randn(batch, 3, size, size))
    reasons = [str(getattr(r, "reason", r)) for r in explanation.break_reasons]
    return dict(graphs=explanation.graph_count, graph_breaks=explanation.graph_break_count,
                reasons=reasons)


def compile_suite(config: "BenchConfig", device: torch.device, budget: Budget) -> List[dict]:
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
                    model = build_bench_model(arch, spec, device, "contiguous")
                    step = train_step(model, batch, size, device, "float32", "contiguous",
                                       compiled=mode == "compile")
                    sync(device)
                    start = time.perf_counter()
                    step()
                    step()
                    sync(device)
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
        times = round_robin(steps, device, 1, config.model_repeats)
        summary = summarize(times, "batchnorm")
        for key, entry in summary.items():
            entry["first_two_steps_s"] = compile_s[key]
        results.append(dict(suite="compile", kind="step", arch=arch, batch=batch,
                            image_size=size, dtype="float32", memory_format="contiguous",
                            methods=summary, errors=errors))
        log.info("compile step %s: %s", arch, brief(summary))
    return results

