"""The one place that picks the kernel for a BKN training step (the backends).

A BKN training step (:func:`training_step`) and the update of a layer's running buffers
(:func:`update_buffers`) are computed by one of these backends, all tested against the first:

- ``"composite"``: :mod:`.composite`, torch ops; the reference, any device and dtype, any order of
  gradients, what ``torch.compile`` traces on the CPU;
- ``"cpu_fused"``: :mod:`.cpu_fused`, one eager autograd node per layer on the CPU;
- ``"triton"``: :mod:`.triton_ops`, Triton kernels as ``torch.library`` custom ops on CUDA
  (eager, ``torch.compile`` and CUDA graphs run the same kernels).

``"auto"`` (the default) takes, per call, the first of ``triton``, ``cpu_fused``, ``composite``
that supports the input. :func:`set_backend` / :func:`use_backend` choose one for every call, as
does the environment variable ``KALMANNORM_BACKEND``; ``KALMANNORM_FUSED=0`` keeps ``auto`` off
the CPU fused kernel. A backend chosen by name that cannot handle an input raises an error naming
the reason. The choice is process-wide (like ``torch.backends`` flags), not per thread.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from . import composite, cpu_fused, triton_ops
from .composite import StepOptions, StepResult

__all__ = ["BACKENDS", "set_backend", "get_backend", "use_backend", "resolve_backend",
           "training_step", "update_buffers"]

BACKENDS = ("auto", "composite", "cpu_fused", "triton")

_SUPPORTS = {
    "composite": lambda x: True,
    "cpu_fused": cpu_fused.supports,
    "triton": triton_ops.supports,
}
_STEP = {
    "composite": composite.training_step,
    "cpu_fused": cpu_fused.training_step,
    "triton": triton_ops.training_step,
}
_SUPPORTS_OPTIONS = {
    "composite": lambda options: True,
    "cpu_fused": cpu_fused.supports_options,
    "triton": triton_ops.supports_options,
}

_chosen: dict = {"name": None}  # set_backend's choice; None: the environment's, else "auto"


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown kalmannorm backend {name!r}; expected one of {BACKENDS}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Choose the kernels of every BKN training step: one of :data:`BACKENDS`.

    ``None`` returns to the environment's choice (``KALMANNORM_BACKEND``, default ``"auto"``).

    >>> import kalmannorm as kn
    >>> kn.set_backend("composite"); kn.get_backend()
    'composite'
    >>> kn.set_backend(None)
    """
    _chosen["name"] = None if name is None else _check_name(name)


def get_backend() -> str:
    """The backend name in force (``"auto"`` unless one was chosen)."""
    if _chosen["name"] is not None:
        return _chosen["name"]
    if torch.compiler.is_compiling():
        return "auto"
    return _check_name(os.environ.get("KALMANNORM_BACKEND", "auto") or "auto")


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous choice on exit.

    >>> import torch, kalmannorm as kn
    >>> with kn.use_backend("composite"):   # e.g. for double backward
    ...     y = kn.functional.batch_kalman_norm(torch.randn(4, 3, 2, 2), None, None, None)[0]
    """
    previous = _chosen["name"]
    set_backend(name)
    try:
        yield
    finally:
        _chosen["name"] = previous


def resolve_backend(x: Tensor, name: Optional[str] = None) -> str:
    """The backend that computes a step on ``x``: ``name`` (default: :func:`get_backend`), or
    for ``"auto"`` the first of ``triton``, ``cpu_fused``, ``composite`` that supports ``x``."""
    name = get_backend() if name is None else _check_name(name)
    if name == "auto":
        if x.is_cuda and triton_ops.supports(x):
            return "triton"
        if (torch.compiler.is_compiling() or os.environ.get("KALMANNORM_FUSED", "1") != "0") \
                and cpu_fused.preferred(x):
            return "cpu_fused"
        return "composite"
    if not _SUPPORTS[name](x):
        raise ValueError(
            f"the {name!r} backend does not handle a {x.dim()}D {x.dtype} input on "
            f"{x.device.type} (layout {'dense' if x.is_contiguous() else 'strided'}); use "
            "kalmannorm.set_backend('auto') to let kalmannorm pick a backend per input"
        )
    return name


def training_step(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    options: StepOptions,
    prior: Optional[Tuple[Tensor, Tensor]] = None,
    prior_valid: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    backend: Optional[str] = None,
    running: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
    grad_history: Optional[Tuple[Tensor, Tensor]] = None,
) -> StepResult:
    """One BKN training step by the backend :func:`resolve_backend` picks.

    Args:
        x: ``[real_rows + S * K_in, C, *spatial]``: the batch, then the incoming shadow rows
            (used only with ``options.shadow_prior``; ``options.shadow_rows`` rows per group are
            written to the output).
        weight, bias: ``[C]`` or ``None``.
        options: a :class:`~.composite.StepOptions`.
        prior: ``(mean_prior, var_prior)``, each ``[S, C]``, supplied by the caller, or ``None``.
        prior_valid: optional 0-dim bool tensor; false rejects the prior.
        generator: random generator of the samples.
        backend: a name from :data:`BACKENDS`; ``None`` for :func:`get_backend`.
        running: ``(running_mean, running_var, valid)``, the layer's running statistics
            ``[C]`` and a 0-dim bool flag (false: none yet), fused with
            ``options.time_prior`` (see :func:`~.composite.kalman_update`).
        grad_history: ``(history, filled)`` of
            :func:`~.composite.smooth_statistics_gradient`, with ``options.backward_window > 1``
            (the composite backend only).

    Returns:
        a :class:`~.composite.StepResult`.
    """
    if prior is not None:
        shape = (options.groups, x.shape[1])
        if tuple(prior[0].shape) != shape or tuple(prior[1].shape) != shape:
            raise ValueError(
                f"prior statistics must have shape {shape} [groups, channels] "
                f"(got {tuple(prior[0].shape)} and {tuple(prior[1].shape)})"
            )
    name = resolve_backend(x, backend)
    if not _SUPPORTS_OPTIONS[name](options):
        # Options that only the composite core implements (e.g. a warm-up's tensor gain).
        if (backend or get_backend()) != "auto":
            raise ValueError(
                f"the {name!r} backend does not implement these options (guard="
                f"{options.guard!r}, gain_rule={options.gain_rule!r}, decisions="
                f"{options.decisions!r}, time_prior={options.time_prior}, backward_window="
                f"{options.backward_window}, gain {type(options.gain).__name__}); use the "
                "'composite' or 'auto' backend"
            )
        name = "composite"
    extra = {}  # the inputs only some options use, passed only to the backends that take them
    if options.time_prior and running is not None:
        extra["running"] = running
    if options.backward_window > 1:  # the composite backend (supports_options)
        extra["grad_history"] = grad_history
    return _STEP[name](x, weight, bias, options, prior, prior_valid, generator, **extra)


def update_buffers(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    guard_counters: Tensor,
    step: StepResult,
    momentum: Optional[float],
    count: int,
    group0_only: bool = False,
) -> None:
    """After a training step: ``num_batches_tracked += 1``, running averages
    (:func:`~.composite.update_running_stats`, ``momentum=None`` a cumulative average) and the
    guard counters ``[fallbacks, priors offered]``, all in place and without host sync on CUDA.
    """
    name = get_backend()
    # the kernel where the step's backend may be Triton: on CUDA under "auto", or named
    if triton_ops.supports_buffers(step.mean) and (
            name == "triton" or (name == "auto" and step.mean.is_cuda)):
        triton_ops.update_buffers(running_mean, running_var, num_batches_tracked,
                                  guard_counters, step, momentum, count, group0_only)
        return
    with torch.no_grad():
        if running_mean is not None:
            num_batches_tracked.add_(1)
            if momentum is None:  # cumulative average, as BatchNorm
                momentum = 1.0 / float(num_batches_tracked)
            composite.update_running_stats(running_mean, running_var, step.mean, step.var,
                                           momentum, count, group0_only)
        # one decision per group (or per layer): counted as such
        guard_counters.add_(torch.stack([(step.available & ~step.used).sum(),
                                         step.available.sum()]))
