"""Runtime twins of the nonlinear ops: activations, max pooling, products of random tensors.

Part of :mod:`kalmannorm.analytic`; the twins of the linear and structural ops, and the
calling convention, are in :mod:`.twins`. The math is in :mod:`.activations`.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import activations as act

_RELU = ((0.0, math.inf, (0.0, 1.0)),)
_STEP = ((0.0, math.inf, (1.0,)),)
_SIGN = ((-math.inf, 0.0, (-1.0,)), (0.0, math.inf, (1.0,)))


def _elu_asymptote(alpha: float) -> tuple:
    return ((-math.inf, 0.0, (-alpha,)), (0.0, math.inf, (0.0, 1.0)))


def _number(value, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"the analytic prediction supports {name} as a number only (got a tensor of "
                f"shape {tuple(value.shape)})"
            )
        value = value.item()
    return float(value)


# ------------------------------------------------------------ piecewise polynomial, exact

def _m_hardtanh(mv, x, y, min_val=-1.0, max_val=1.0, inplace=False):
    return None if mv is None else act.clamp_moments(*mv, min_val, max_val)


def _m_relu6(mv, x, y, inplace=False):
    return None if mv is None else act.clamp_moments(*mv, 0.0, 6.0)


def _m_clamp(mv, x, y, min=None, max=None):  # noqa: A002 (torch's names)
    if mv is None:
        return None
    low = -math.inf if min is None else _number(min, "a clamp bound")
    high = math.inf if max is None else _number(max, "a clamp bound")
    return act.clamp_moments(*mv, low, high)


def _m_clamp_min(mv, x, y, min):  # noqa: A002
    return _m_clamp(mv, x, y, min=min)


def _m_clamp_max(mv, x, y, max):  # noqa: A002
    return _m_clamp(mv, x, y, max=max)


def _m_leaky_relu(mv, x, y, negative_slope=0.01, inplace=False):
    return None if mv is None else act.leaky_relu_moments(*mv, negative_slope)


def _m_hardsigmoid(mv, x, y, inplace=False):
    return None if mv is None else act.piecewise_moments(*mv, act.HARDSIGMOID)


def _m_hardswish(mv, x, y, inplace=False):
    return None if mv is None else act.piecewise_moments(*mv, act.HARDSWISH)


# --------------------------------------------------------------------- smooth, quadrature

def _m_sigmoid(mv, x, y, *args, **kwargs):
    return None if mv is None else act.smooth_moments(*mv, torch.sigmoid, _STEP)


def _m_tanh(mv, x, y, *args, **kwargs):
    return None if mv is None else act.smooth_moments(*mv, torch.tanh, _SIGN)


def _m_silu(mv, x, y, inplace=False):
    return None if mv is None else act.smooth_moments(*mv, F.silu, _RELU)


def _m_mish(mv, x, y, inplace=False):
    return None if mv is None else act.smooth_moments(*mv, F.mish, _RELU)


def _m_gelu(mv, x, y, approximate="none"):
    if mv is None:
        return None
    return act.smooth_moments(*mv, lambda z: F.gelu(z, approximate=approximate), _RELU)


def _m_softplus(mv, x, y, beta=1.0, threshold=20.0):
    if mv is None:
        return None
    return act.smooth_moments(*mv, lambda z: F.softplus(z, beta, threshold), _RELU)


def _m_elu(mv, x, y, alpha=1.0, inplace=False):
    if mv is None:
        return None
    return act.smooth_moments(*mv, lambda z: F.elu(z, alpha), _elu_asymptote(alpha))


# Module -> the function twin it equals, with the module's options.
_MODULE_TWINS: Dict[type, Callable] = {
    nn.ReLU6: lambda m, mv: _m_relu6(mv, None, None),
    nn.Hardtanh: lambda m, mv: _m_hardtanh(mv, None, None, m.min_val, m.max_val),
    nn.LeakyReLU: lambda m, mv: _m_leaky_relu(mv, None, None, m.negative_slope),
    nn.Hardsigmoid: lambda m, mv: _m_hardsigmoid(mv, None, None),
    nn.Hardswish: lambda m, mv: _m_hardswish(mv, None, None),
    nn.Sigmoid: lambda m, mv: _m_sigmoid(mv, None, None),
    nn.Tanh: lambda m, mv: _m_tanh(mv, None, None),
    nn.SiLU: lambda m, mv: _m_silu(mv, None, None),
    nn.Mish: lambda m, mv: _m_mish(mv, None, None),
    nn.GELU: lambda m, mv: _m_gelu(mv, None, None, m.approximate),
    nn.Softplus: lambda m, mv: _m_softplus(mv, None, None, m.beta, m.threshold),
    nn.ELU: lambda m, mv: _m_elu(mv, None, None, m.alpha),
}
ACTIVATION_MODULES: Tuple[type, ...] = tuple(_MODULE_TWINS)


def _m_activation_module(module, mv, x, y):
    if mv is None:
        return None
    for cls in type(module).__mro__:  # ReLU6 before its base Hardtanh
        if cls in _MODULE_TWINS:
            return _MODULE_TWINS[cls](module, mv)
    raise TypeError(f"no moment rule for {type(module).__name__}")


# -------------------------------------------------------------------------- max pooling

def _pool_positions(kernel_size, spatial_dims: int) -> int:
    if isinstance(kernel_size, int):
        return kernel_size ** spatial_dims
    return math.prod(kernel_size)


def _m_max_pool(mv, x, y, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                return_indices=False):
    if mv is None:
        return None
    return act.max_moments(*mv, _pool_positions(kernel_size, x.dim() - 2))


def _m_max_pool_module(module, mv, x, y):
    if mv is None:
        return None
    return act.max_moments(*mv, _pool_positions(module.kernel_size, x.dim() - 2))


def _m_adaptive_max_pool(mv, x, y, *args, **kwargs):
    if mv is None:
        return None
    out = y[0] if isinstance(y, tuple) else y  # (values, indices) with return_indices
    return act.max_moments(*mv, act.adaptive_windows(x.shape[2:], out.shape[2:]))


def _m_adaptive_max_pool_module(module, mv, x, y):
    return _m_adaptive_max_pool(mv, x, y)


# ------------------------------------------------------------------------------ products

def _m_product(mva, mvb):
    """Both factors random: independent (see :func:`~.activations.product_moments`)."""
    return act.product_moments(mva[0], mva[1], mvb[0], mvb[1])
