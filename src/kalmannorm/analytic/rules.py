"""Moments through the linear and structural ops of a network, as pure functions.

Part of :mod:`kalmannorm.analytic` (``docs/method.md`` section 4, last paragraph): each function
maps the per-(group, channel) moments ``(mean, var)``, ``[S, C]``, of a Gaussian input that is
independent over positions and channels to the moments of the op's output. Statistics stay
float32 (float64 stays).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import safe_std

Moments = Tuple[Tensor, Tensor]
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

def _linear_f32(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    # Statistics stay float32 under autocast (house style 6).
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def conv_moments(
    mean: Tensor, var: Tensor, weight: Tensor, bias: Optional[Tensor] = None, groups: int = 1
) -> Moments:
    """Moments after a convolution of a spatially constant, independent input.

    Per group of channels, with ``W`` the kernel ``[C', C / groups, *kernel]``::

        mean' = mean @ (sum_space W)^T + b
        var'  = var  @ (sum_space W^2)^T

    exact away from the borders (padding is ignored); stride and dilation do not matter.

    Args:
        mean, var: ``[S, C]``.
        weight: ``[C', C / groups, *kernel]``.
        bias: ``[C']`` or ``None``. Default: ``None``.
        groups: channel groups of the convolution. Default: 1.

    Shape:
        - Output: two tensors ``[S, C']``.

    >>> m, v = conv_moments(torch.zeros(2, 3), torch.ones(2, 3), torch.ones(4, 3, 3, 3))
    >>> v[0, 0].item()
    27.0
    """
    space = tuple(range(2, weight.dim()))
    w_sum = weight.sum(space) if space else weight  # [C', C / groups]
    w2_sum = weight.square().sum(space) if space else weight.square()
    if groups == 1:
        return _linear_f32(mean, w_sum, bias), _linear_f32(var, w2_sum)
    # A grouped 1x1 convolution over a length-1 signal: [S, C, 1] -> [S, C', 1].
    mean = F.conv1d(mean.unsqueeze(-1), w_sum.to(mean.dtype).unsqueeze(-1),
                    None if bias is None else bias.to(mean.dtype), groups=groups)
    var = F.conv1d(var.unsqueeze(-1), w2_sum.to(var.dtype).unsqueeze(-1), groups=groups)
    return mean.squeeze(-1), var.squeeze(-1)


def linear_moments(
    mean: Tensor, var: Tensor, weight: Tensor, bias: Optional[Tensor] = None
) -> Moments:
    """Moments after ``y = x W^T + b`` of an input with independent entries.

    ``mean' = mean @ W^T + b``, ``var' = var @ (W^2)^T``.

    Args:
        mean, var: ``[S, C]``.
        weight: ``[C', C]``.
        bias: ``[C']`` or ``None``. Default: ``None``.

    >>> linear_moments(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(3, 2))[1]
    tensor([[2., 2., 2.]])
    """
    return _linear_f32(mean, weight, bias), _linear_f32(var, weight.square())


def relu_moments(mean: Tensor, var: Tensor) -> Moments:
    """Mean and variance of ``relu(z)`` for ``z ~ N(mean, var)``, in closed form.

    With ``s = sqrt(var)``, ``a = mean / s`` and ``Phi``, ``phi`` the standard normal cdf and pdf::

        mean' = mean Phi(a) + s phi(a)
        var'  = s^2 (a^2 Phi(a) Phi(-a) + Phi(a) + a phi(a) (1 - 2 Phi(a)) - phi(a)^2)

    (the variance written without the cancellation of ``E[relu(z)^2] - mean'^2``). A zero
    variance gives ``(relu(mean), 0)``.

    >>> relu_moments(torch.zeros(1), torch.ones(1))[0]
    tensor([0.3989])
    """
    std = safe_std(var)
    # Beyond |a| = 40 the cdf is exactly 0 or 1 in any float dtype; the clamp keeps a^2 finite
    # (a zero variance gives a = +-inf) and changes nothing else.
    a = (mean / std).clamp(-40.0, 40.0)
    cdf = torch.special.ndtr(a)
    cdf_neg = torch.special.ndtr(-a)
    pdf = torch.exp(-0.5 * a.square()) * _INV_SQRT_2PI
    mean_out = mean * cdf + std * pdf
    unit_var = a.square() * cdf * cdf_neg + cdf + a * pdf * (cdf_neg - cdf) - pdf.square()
    return mean_out, (var * unit_var).clamp_min(0.0)


def pool_moments(mean: Tensor, var: Tensor, positions: float) -> Moments:
    """Moments of the average of ``positions`` independent values: ``(mean, var / k)``.

    >>> pool_moments(torch.ones(1), torch.ones(1), 4)[1]
    tensor([0.2500])
    """
    return mean, var / positions


def dropout_moments(mean: Tensor, var: Tensor, p: float) -> Moments:
    """Moments after train-mode dropout, ``y = x * b / (1 - p)`` with ``b ~ Bernoulli(1 - p)``.

    ``mean' = mean``, ``var' = (var + mean^2) / (1 - p) - mean^2``; ``p = 1`` gives ``(0, 0)``.

    >>> dropout_moments(torch.zeros(1), torch.ones(1), 0.5)[1]
    tensor([2.])
    """
    if p >= 1.0:
        return torch.zeros_like(mean), torch.zeros_like(var)
    if p <= 0.0:
        return mean, var
    return mean, (var + mean.square()) / (1.0 - p) - mean.square()


def normalized_moments(
    mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Moments:
    """Moments of ``weight * (z - mean) / sqrt(var + eps) + bias`` for ``z ~ N(mean, var)``.

    ``mean' = bias`` (0 without affine), ``var' = weight^2 var / (var + eps)``: what a BKN layer
    with ``propagate="normalized"`` carries to the next layer.
    """
    var_out = var / (var + eps)
    if weight is not None:
        var_out = var_out * weight.float().square()
    mean_out = torch.zeros_like(mean) if bias is None else bias.float().expand_as(mean)
    return mean_out, var_out


def eval_norm_moments(layer: nn.Module, moments: Moments) -> Moments:
    """Moments after an eval-mode BatchNorm: the affine map of its running statistics."""
    mean, var = moments
    scale = torch.rsqrt(layer.running_var.float() + layer.eps)
    if layer.weight is not None:
        scale = scale * layer.weight.float()
    shift = -layer.running_mean.float() * scale
    if layer.bias is not None:
        shift = shift + layer.bias.float()
    return mean * scale + shift, var * scale.square()

