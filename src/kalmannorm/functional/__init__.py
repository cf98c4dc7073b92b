"""Functional core of Batch Kalman Normalization (BKN): the math, and the one kernel switch.

Follows Wang et al., "Batch Kalman Normalization: Towards Training Deep Neural Networks with
Micro-Batches" (arXiv 1802.03133), as restated in ``docs/method.md``. The pure functions below
come from :mod:`.composite` (the reference form); :func:`batch_kalman_norm` and
:func:`training_step` run a whole training step through the backend that
:mod:`.dispatch` picks (``composite``, ``cpu_fused`` or ``triton``). The modules in
:mod:`kalmannorm.modules` own parameters and buffers and call these functions; they never choose
a kernel themselves.

Shapes: ``x`` is ``[N, C, *spatial]``; its ``N`` rows split into ``S`` contiguous groups of
``m = N / S`` rows (row ``i`` belongs to group ``i // m``); statistics are ``[S, C]``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch  # noqa: F401  (the docstring examples use it)
from torch import Tensor

from .composite import (
    DECISION_SCOPES,
    GAIN_RULES,
    GUARD_MODES,
    StepOptions,
    StepResult,
    group_affine,
    group_moments,
    kalman_update,
    fusion_weights,
    measured_gain,
    row_spread,
    normalize,
    prior_from_rows,
    released_update,
    safe_std,
    sample_rows,
    smooth_statistics_gradient,
    stat_dtype,
    update_running_stats,
)
from .composite import _check_groups
from .dispatch import (
    BACKENDS,
    get_backend,
    resolve_backend,
    set_backend,
    training_step,
    update_buffers,
    use_backend,
)

__all__ = [
    "group_moments",
    "kalman_update",
    "measured_gain",
    "fusion_weights",
    "GUARD_MODES",
    "GAIN_RULES",
    "DECISION_SCOPES",
    "row_spread",
    "released_update",
    "group_affine",
    "normalize",
    "batch_kalman_norm",
    "prior_from_rows",
    "sample_rows",
    "smooth_statistics_gradient",
    "safe_std",
    "stat_dtype",
    "update_running_stats",
    "training_step",
    "update_buffers",
    "StepOptions",
    "StepResult",
    "BACKENDS",
    "set_backend",
    "get_backend",
    "use_backend",
    "resolve_backend",
]


def batch_kalman_norm(
    x: Tensor,
    prior: Optional[Tuple[Tensor, Tensor]],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    *,
    groups: int = 1,
    gain: Union[float, Tensor] = 0.9,
    eps: float = 1e-5,
    guard_threshold: float = 100.0,
    detach_prior: bool = False,
    prior_valid: Optional[Tensor] = None,
    backend: Optional[str] = None,
    fused: Optional[bool] = None,
    guard: str = "upper",
    gain_rule: str = "fixed",
    decisions: str = "layer",
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch Kalman Normalization of one layer in training mode.

    Observes per-group statistics of ``x``, combines them with ``prior`` by
    :func:`kalman_update` and normalizes with the combined statistics. Without a prior (the first
    layer of a path) or with ``gain = 0`` it is exactly per-group BatchNorm.

    Args:
        x: ``[N, C, *spatial]``.
        prior: ``(mean_prior, var_prior)``, each ``[S, C]``, or ``None``.
        weight, bias: ``[C]`` or ``None``.
        groups: ``S``, number of statistics groups (contiguous rows). Default: 1.
        gain: weight ``p`` on the prior (a float, or a 0-dim tensor such as a warm-up ramp,
            composite backend). Default: 0.9.
        eps: added to the variance. Default: 1e-5.
        guard_threshold, guard, gain_rule, decisions: see :func:`kalman_update`. Defaults:
            100, ``"upper"``, ``"fixed"``, ``"layer"`` (the released update; the layers default
            to per-group decisions).
        detach_prior: stop gradients through the prior (an ablation; the released code
            back-propagates through it). Default: ``False``.
        prior_valid: optional 0-dim bool tensor; false rejects the prior.
        backend: the kernels (see :mod:`.dispatch`); ``None`` for the one in force.
        fused: the older switch: ``True`` is ``backend="cpu_fused"``, ``False`` is
            ``backend="composite"``. Default: ``None``.

    Returns:
        ``(y, mean, var, used_prior)``: the normalized ``x``, the combined float32 statistics
        ``[S, C]`` that the next layer's prediction starts from, and whether the prior was used.

    >>> y, mean, var, used = batch_kalman_norm(torch.randn(8, 3, 4, 4), None, None, None, groups=4)
    >>> bool(used)
    False
    """
    if fused is not None and backend is None:
        backend = "cpu_fused" if fused else "composite"
    _check_groups(x, groups)
    if not isinstance(gain, Tensor):
        if not 0.0 <= gain <= 1.0:
            raise ValueError(f"gain must be in [0, 1] (got {gain})")
        gain = float(gain)
    if guard not in GUARD_MODES:
        raise ValueError(f"guard must be one of {GUARD_MODES} (got {guard!r})")
    if gain_rule not in GAIN_RULES:
        raise ValueError(f"gain_rule must be one of {GAIN_RULES} (got {gain_rule!r})")
    if decisions not in DECISION_SCOPES:
        raise ValueError(f"decisions must be one of {DECISION_SCOPES} (got {decisions!r})")
    options = StepOptions(real_rows=x.shape[0], groups=groups, gain=gain, eps=float(eps),
                          guard_threshold=float(guard_threshold), detach_prior=detach_prior,
                          guard=guard, gain_rule=gain_rule, decisions=decisions)
    y, mean, var, used, _ = training_step(x, weight, bias, options, prior, prior_valid,
                                          backend=backend)
    return y, mean, var, used
