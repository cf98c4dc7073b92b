"""Batch Renormalization, a micro-batch baseline for Batch Kalman Normalization.

Follows Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models" (NeurIPS 2017, arXiv 1702.03275), Algorithm 1, with statistics per
group of contiguous rows as in ``docs/method.md`` section 2, so that it can be compared with BKN
at micro-batch size 2 inside an SGD batch of 128.

The pure functions (:func:`renorm_limits`, :func:`renorm_correction`, :func:`batch_renorm`) hold
the math; the modules :class:`BatchRenorm1d`, :class:`BatchRenorm2d`, :class:`BatchRenorm3d` own
the parameters and buffers of :class:`torch.nn.BatchNorm2d` and choose the mode.

Two departures from Algorithm 1, both to keep BatchNorm's buffers and checkpoints: the running
standard deviation is ``sqrt(running_var + eps)`` with ``running_var`` an exponential moving
average of the unbiased variance (the paper averages ``sigma_B`` itself), and the moving
averages use the mean of the per-group statistics.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import group_affine, group_moments, triton_ops, update_running_stats
from .functional.composite import _check_groups
from .functional.dispatch import resolve_backend
from .modules import _GroupedNorm

__all__ = [
    "renorm_limits",
    "renorm_correction",
    "batch_renorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
]


def renorm_limits(
    step: Tensor,
    r_max: float,
    d_max: float,
    warmup_steps: int,
    ramp_steps: int,
) -> Tuple[Tensor, Tensor]:
    """Clipping limits ``(r_max_t, d_max_t)`` at training step ``t`` (paper, section 3).

    With ``a = clamp((t - warmup_steps) / ramp_steps, 0, 1)``::

        r_max_t = 1 + a * (r_max - 1)        d_max_t = a * d_max

    so the layer is plain BatchNorm (``r = 1``, ``d = 0``) for the first ``warmup_steps`` steps,
    then the allowed correction grows linearly to its full size over ``ramp_steps`` steps
    (``ramp_steps = 0``: at once). Computed as tensors on ``step``'s device: no host sync.

    Args:
        step: ``t``, 0-dim integer tensor (steps completed before this one).
        r_max, d_max: final limits, ``r_max >= 1``, ``d_max >= 0``.
        warmup_steps: steps of pure BatchNorm.
        ramp_steps: steps of the linear ramp after the warm-up.

    Returns:
        Two 0-dim float32 tensors.

    >>> renorm_limits(torch.tensor(150), 3.0, 5.0, warmup_steps=100, ramp_steps=100)
    (tensor(2.), tensor(2.5000))
    """
    t = step.to(torch.float32)
    if ramp_steps > 0:
        a = ((t - warmup_steps) / ramp_steps).clamp(0.0, 1.0)
    else:
        a = (t >= warmup_steps).to(torch.float32)
    return 1.0 + a * (r_max - 1.0), a * d_max


def renorm_correction(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    r_max: Union[float, Tensor],
    d_max: Union[float, Tensor],
    eps: float,
) -> Tuple[Tensor, Tensor]:
    """The correction ``(r, d)`` of Batch Renormalization, without gradient.

    With ``sigma_B = sqrt(var + eps)`` and ``sigma = sqrt(running_var + eps)``::

        r = clip(sigma_B / sigma, 1 / r_max, r_max)
        d = clip((mean - running_mean) / sigma, -d_max, d_max)

    Both are computed under ``no_grad``: the paper treats them as constants (stop_gradient).

    Args:
        mean, var: batch statistics ``[S, C]`` (``var`` biased).
        running_mean, running_var: running statistics ``[C]``.
        r_max, d_max: limits, floats or 0-dim tensors (see :func:`renorm_limits`).
        eps: added to both variances.

    Returns:
        ``(r, d)``, each ``[S, C]`` in ``mean``'s dtype.
    """
    with torch.no_grad():
        sigma = (running_var.to(mean.dtype) + eps).sqrt()  # [C]
        r = (var + eps).sqrt() / sigma
        d = (mean - running_mean.to(mean.dtype)) / sigma
        r = torch.clamp(r, min=1.0 / r_max, max=r_max)
        d = torch.clamp(d, min=-d_max, max=d_max)
    return r, d


def _on_kernels(x: Tensor, backend: Optional[str] = None) -> bool:
    """Whether the Triton kernels compute the step (eager mode; the compiler traces the
    composite form)."""
    return resolve_backend(x, backend) == "triton" and not torch.compiler.is_compiling()


def batch_renorm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    *,
    groups: int = 1,
    r_max: Union[float, Tensor] = 3.0,
    d_max: Union[float, Tensor] = 5.0,
    eps: float = 1e-5,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Batch Renormalization of ``x`` in training mode, per group of contiguous rows.

    For group ``s`` with batch statistics ``mu_B[s]``, ``var_B[s]`` (biased) and ``(r, d)`` from
    :func:`renorm_correction`::

        y = ((x - mu_B[s]) / sqrt(var_B[s] + eps) * r[s] + d[s]) * weight + bias

    Gradients flow through ``mu_B`` and ``var_B`` but not through ``r`` and ``d``. Without running
    statistics (``None``), ``r = 1`` and ``d = 0``: per-group BatchNorm.

    Args:
        x: ``[N, C, *spatial]``.
        running_mean, running_var: ``[C]`` or both ``None``.
        weight, bias: ``[C]`` or ``None``.
        groups: ``S``, the number of statistics groups; must divide ``N``. Default: 1.
        r_max, d_max: clipping limits (floats or 0-dim tensors). Default: 3, 5.
        eps: added to the variances. Default: 1e-5.
        backend: as for :func:`kalmannorm.functional.batch_kalman_norm`. The ``triton``
            backend (CUDA, eager mode) computes it with the BKN kernels; every other backend,
            and ``torch.compile``, with the composite form.

    Returns:
        ``(y, mean, var)``: the output in ``x``'s dtype and the float32 batch statistics
        ``[S, C]`` (biased variance), for the running averages.

    >>> y, mean, var = batch_renorm(torch.randn(8, 3, 4, 4), torch.zeros(3), torch.ones(3),
    ...                             None, None, groups=4)
    >>> y.shape, mean.shape
    (torch.Size([8, 3, 4, 4]), torch.Size([4, 3]))
    """
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    _check_groups(x, groups)
    if running_mean is not None and _on_kernels(x, backend):
        return triton_ops.batch_renorm(x, running_mean, running_var, weight, bias, groups,
                                       r_max, d_max, eps)
    mean, var = group_moments(x, groups)
    inv_std = torch.rsqrt(var + eps)  # [S, C]
    scale = inv_std
    shift = -mean * inv_std
    if running_mean is not None:
        r, d = renorm_correction(mean, var, running_mean, running_var, r_max, d_max, eps)
        scale = scale * r
        shift = shift * r + d
    if weight is not None:
        w = weight.to(mean.dtype)
        scale = scale * w
        shift = shift * w
    if bias is not None:
        shift = shift + bias.to(mean.dtype)
    return group_affine(x, scale, shift), mean, var


class _BatchRenorm(_GroupedNorm):
    """Shared implementation; see :class:`BatchRenorm2d`."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        micro_batch: Optional[int] = None,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 400,
        ramp_steps: int = 800,
        running_stats: str = "group0",
    ) -> None:
        if r_max < 1.0:
            raise ValueError(f"r_max must be >= 1 (got {r_max})")
        if d_max < 0.0:
            raise ValueError(f"d_max must be >= 0 (got {d_max})")
        if warmup_steps < 0 or ramp_steps < 0:
            raise ValueError(
                f"warmup_steps and ramp_steps must be >= 0 (got {warmup_steps} and {ramp_steps})"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         micro_batch, running_stats)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = int(warmup_steps)
        self.ramp_steps = int(ramp_steps)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", micro_batch={self.micro_batch}, r_max={self.r_max}, d_max={self.d_max}"
            + f", warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}"
            + f", running_stats={self.running_stats!r}"
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training and self.track_running_stats:
            # Inference is plain BatchNorm with the running statistics (paper, section 3).
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias,
                False, 0.0, self.eps,
            )
        groups = self._groups(input.shape[0])
        count = self._values_per_group(input, groups)
        if not self.track_running_stats:
            y, _, _ = batch_renorm(
                input, None, None, self.weight, self.bias, groups=groups, eps=self.eps
            )
            return y
        step = self.num_batches_tracked
        r_max, d_max = renorm_limits(
            step, self.r_max, self.d_max, self.warmup_steps, self.ramp_steps
        )
        # One choice of kernels for the step and for the buffers after it.
        on_kernels = _on_kernels(input)
        if on_kernels:
            y, mean, var = triton_ops.batch_renorm(
                input, self.running_mean, self.running_var, self.weight, self.bias, groups,
                r_max, d_max, self.eps)
        else:
            y, mean, var = batch_renorm(
                input, self.running_mean, self.running_var, self.weight, self.bias,
                groups=groups, r_max=r_max, d_max=d_max, eps=self.eps, backend="composite",
            )
        # The running statistics are updated after they were used (Algorithm 1).
        if on_kernels:
            triton_ops.update_running_stats(self.running_mean, self.running_var, step, mean, var,
                                            self.momentum, count,
                                            group0_only=self.running_stats == "group0")
            return y
        with torch.no_grad():
            step.add_(1)
            momentum = self.momentum
            if momentum is None:  # cumulative moving average, as BatchNorm
                momentum = step.to(torch.float32).reciprocal()
            update_running_stats(
                self.running_mean, self.running_var, mean.detach(), var.detach(), momentum,
                count=count, group0_only=self.running_stats == "group0",
            )
        return y


_DOC = r"""Batch Renormalization over a {nd} input, statistics per group of ``micro_batch`` rows.

    Ioffe 2017, Algorithm 1. In training, for every group ``s`` of ``micro_batch`` contiguous rows
    and channel ``c``, with batch statistics ``mu_B``, ``var_B`` (biased) over the group's rows
    {over} and running statistics ``mu``, ``var``:

    .. math::
        \sigma_B = \sqrt{{\mathrm{{var}}_B + \epsilon}}, \quad
        \sigma = \sqrt{{\mathrm{{var}} + \epsilon}}, \\
        r = \mathrm{{clip}}\big(\sigma_B / \sigma,\ 1 / r_{{\max,t}},\ r_{{\max,t}}\big), \quad
        d = \mathrm{{clip}}\big((\mu_B - \mu) / \sigma,\ -d_{{\max,t}},\ d_{{\max,t}}\big), \\
        y = \Big(\frac{{x - \mu_B}}{{\sigma_B}}\, r + d\Big)\, \gamma + \beta,

    with ``r`` and ``d`` treated as constants in the backward pass. Then
    ``mu <- (1 - momentum) mu + momentum mu_B[0]`` (group 0's statistics, as under DDP, which
    gives every device rank 0's buffers; ``running_stats="all"`` averages the groups) and the
    same for ``var`` with the *unbiased* group variance (``n / (n - 1)``, ``n`` the values per
    group), as BatchNorm does; the paper averages ``sigma_B`` instead.

    Schedule (:func:`renorm_limits`), driven by ``num_batches_tracked`` (``t``, the training steps
    before this one): ``r_max_t = 1``, ``d_max_t = 0`` (exactly per-group BatchNorm) while
    ``t < warmup_steps``, then linear to ``r_max``, ``d_max`` over ``ramp_steps`` steps. The
    paper (Inception-v3 on ImageNet) kept BatchNorm for 5000 steps and reached ``r_max = 3`` at
    40k and ``d_max = 5`` at 25k steps; the defaults here (400 and 800 steps, about one and two
    epochs of CIFAR at batch 128) are scaled for short CIFAR runs and let the running averages
    (time constant ``1 / momentum`` = 100 steps) settle before the correction opens.

    In eval mode the layer is ``F.batch_norm`` with the running statistics. With
    ``track_running_stats=False`` there is no running estimate to correct towards: the layer is
    per-group BatchNorm (``r = 1``, ``d = 0``) in training *and* eval mode.

    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variances. Default: 1e-5.
        momentum: weight of the new value in the running averages; ``None`` for a cumulative
            average. Default: 0.01.
        affine: learnable ``weight`` (gamma) and ``bias`` (beta). Default: ``True``.
        track_running_stats: keep running statistics (needed for ``r``, ``d``). Default: ``True``.
        micro_batch: rows per statistics group; ``None`` for the whole batch. Default: ``None``.
        r_max: final limit on ``r``, at least 1. Default: 3.
        d_max: final limit on ``|d|``. Default: 5.
        warmup_steps: training steps of pure BatchNorm. Default: 400.
        ramp_steps: steps of the linear ramp after the warm-up. Default: 800.
        running_stats: ``"group0"`` updates the running statistics from group 0 only, what a
            DDP run does (every device starts a step with rank 0's buffers), so every group is
            corrected towards the same running statistics and none reads another group's rows;
            ``"all"`` averages the groups' statistics, smoother than any real device gets.
            Default: ``"group0"``.

    Shape:
        - Input: {shape}; ``N`` a multiple of ``micro_batch``.
        - Output: same shape and dtype as the input (statistics are float32).

    >>> m = {name}(3, micro_batch=2)
    >>> m(torch.randn({example})).shape
    torch.Size([{example}])
    """


class BatchRenorm1d(_BatchRenorm):
    __doc__ = _DOC.format(
        nd="2D or 3D", over="(and positions ``L``)", shape="``[N, C]`` or ``[N, C, L]``",
        name="BatchRenorm1d", example="4, 3, 5",
    )
    _input_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    __doc__ = _DOC.format(
        nd="4D", over="and positions ``H, W``", shape="``[N, C, H, W]``",
        name="BatchRenorm2d", example="4, 3, 5, 5",
    )
    _input_dims = (4,)


class BatchRenorm3d(_BatchRenorm):
    __doc__ = _DOC.format(
        nd="5D", over="and positions ``D, H, W``", shape="``[N, C, D, H, W]``",
        name="BatchRenorm3d", example="4, 3, 2, 5, 5",
    )
    _input_dims = (5,)
