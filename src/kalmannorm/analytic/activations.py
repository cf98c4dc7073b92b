"""Moments through elementwise nonlinearities, max pooling and products, as pure functions.

Part of :mod:`kalmannorm.analytic`. For ``z ~ N(mean, var)`` per (group, channel), ``[S, C]``:

- **piecewise polynomial** functions (ReLU, leaky ReLU, ReLU6 / hardtanh / clamp,
  hardsigmoid, hardswish) in closed form, from the truncated moments of the standard normal
  ``M_k = int_a^b t^k phi(t) dt``, ``M_k = (k - 1) M_{k-2} + a^{k-1} phi(a) - b^{k-1} phi(b)``:
  exact;
- **smooth** functions (SiLU, GELU, sigmoid, tanh, Mish, softplus, ELU) by Gauss-Hermite
  quadrature, ``E f(z) = sum_i w_i f(mean + sqrt(2 var) x_i) / sqrt(pi)``, and for wide
  Gaussians as a piecewise polynomial asymptote (exact) plus a remainder integrated on a grid
  (:func:`smooth_moments`);
- **max pooling** over ``k`` positions: the max of ``k`` independent ``N(mean, var)`` values is
  ``mean + std e_k`` with variance ``var v_k``, ``e_k`` and ``v_k`` the moments of the max of
  ``k`` standard normals (density ``k phi(t) Phi(t)^(k-1)``, integrated numerically once per
  ``k``): exact for independent inputs. Overlapping windows make neighbouring outputs
  correlated, which the next layer's rule (independence) ignores: the documented approximation;
- **products** ``x * y`` of two independent random tensors (a squeeze-excitation gate, say):
  ``mean = mx my``, ``var = vx vy + vx my^2 + vy mx^2``. The gate is computed from the spatial
  mean of ``x``, whose correlation with one position of ``x`` is ``1 / positions``: ignored.

Moments are computed in float64 (cheap on ``[S, C]``) and returned in the input dtype.
"""
from __future__ import annotations

import collections
import functools
import math
from typing import Callable, Dict, Iterable, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..functional import safe_std

Moments = Tuple[Tensor, Tensor]
# A piece ``(low, high, coefficients)``: the polynomial ``sum_k c_k z^k`` on ``[low, high)``.
Piece = Tuple[float, float, Sequence[float]]
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_BOUND = 40.0  # beyond, phi is 0 and Phi is 0 or 1 in float64


def _truncated(bound: Tensor, order: int) -> Tuple[Tensor, Tensor, list]:
    """``Phi(bound)`` and ``bound^k phi(bound)`` for ``k < order`` (``bound`` clamped finite)."""
    b = bound.clamp(-_BOUND, _BOUND)
    pdf = torch.exp(-0.5 * b.square()) * _INV_SQRT_2PI
    powers = [pdf]
    for _ in range(order - 1):
        powers.append(powers[-1] * b)
    return torch.special.ndtr(b), pdf, powers


def _standardized(bound: float, mean: Tensor, std: Tensor) -> Tensor:
    # An infinite bound is a constant: (inf - mean) / std would have NaN gradients.
    if math.isinf(bound):
        return torch.full_like(mean, math.copysign(_BOUND, bound))
    return (bound - mean) / std


def _truncated_moments(a: Tensor, b: Tensor, order: int) -> list:
    """``M_k = int_a^b t^k phi(t) dt`` for ``k = 0 .. order`` (``a <= b``)."""
    cdf_a, _, pa = _truncated(a, order + 1)
    cdf_b, _, pb = _truncated(b, order + 1)
    moments = [cdf_b - cdf_a, pa[0] - pb[0]]
    for k in range(2, order + 1):
        moments.append((k - 1) * moments[k - 2] + pa[k - 1] - pb[k - 1])
    return moments[: order + 1]


def _shifted(coefficients: Sequence[float], mean: Tensor, std: Tensor) -> list:
    """Coefficients ``d_j`` of ``p(mean + std t) = sum_j d_j t^j`` for ``p = sum_k c_k z^k``."""
    out = []
    for j in range(len(coefficients)):
        d = sum(c * math.comb(k, j) * mean ** (k - j) for k, c in enumerate(coefficients)
                if k >= j and c != 0)
        out.append(d * std ** j if isinstance(d, Tensor) else torch.zeros_like(mean))
    return out


def _square(coefficients: Sequence[float]) -> list:
    out = [0.0] * (2 * len(coefficients) - 1)
    for i, a in enumerate(coefficients):
        for j, b in enumerate(coefficients):
            out[i + j] += a * b
    return out


def piecewise_moments(mean: Tensor, var: Tensor, pieces: Iterable[Piece]) -> Moments:
    """Mean and variance of ``f(z)``, ``z ~ N(mean, var)``, for a piecewise polynomial ``f``.

    ``f(z) = sum_k c_k z^k`` on each piece ``[low, high)`` (``+-inf`` allowed) and 0 outside the
    pieces. With ``a, b`` the standardized bounds and ``M_k`` the truncated moments of the
    standard normal (module docstring), ``E f = sum_j d_j M_j`` where ``d_j`` are the
    coefficients of ``f(mean + std t)`` in ``t``; ``E f^2`` likewise: exact.

    Args:
        mean, var: ``[S, C]`` (any shape).
        pieces: ``(low, high, coefficients)`` with ascending powers, e.g. ReLU
            ``[(0, inf, [0, 1])]``.

    >>> m, v = piecewise_moments(torch.zeros(1), torch.ones(1), [(0.0, math.inf, [0.0, 1.0])])
    >>> round(m.item(), 4), round(v.item(), 4)
    (0.3989, 0.3408)
    """
    dtype = mean.dtype
    mu, var64 = mean.double(), var.double()
    std = safe_std(var64)
    first = second = torch.zeros_like(mu)
    for low, high, coefficients in pieces:
        a, b = _standardized(low, mu, std), _standardized(high, mu, std)
        squared = _square(coefficients)
        m = _truncated_moments(a, b, len(squared) - 1)
        first = first + sum(d * m[j] for j, d in enumerate(_shifted(coefficients, mu, std)))
        second = second + sum(d * m[j] for j, d in enumerate(_shifted(squared, mu, std)))
    return first.to(dtype), (second - first.square()).clamp_min(0.0).to(dtype)


def clamp_moments(mean: Tensor, var: Tensor, low: float = -math.inf,
                  high: float = math.inf) -> Moments:
    """Moments of ``clamp(z, low, high)`` (ReLU6 = ``clamp(z, 0, 6)``, hardtanh), exactly.

    >>> clamp_moments(torch.zeros(1), torch.ones(1), 0.0, 6.0)[0]
    tensor([0.3989])
    """
    if low > high:
        raise ValueError(f"clamp needs low <= high (got low={low}, high={high})")
    pieces = [(low, high, [0.0, 1.0])]
    if low > -math.inf:
        pieces.append((-math.inf, low, [low]))
    if high < math.inf:
        pieces.append((high, math.inf, [high]))
    return piecewise_moments(mean, var, pieces)


def leaky_relu_moments(mean: Tensor, var: Tensor, slope: float = 0.01) -> Moments:
    """Moments of ``max(z, 0) + slope min(z, 0)``, exactly."""
    return piecewise_moments(mean, var, [(-math.inf, 0.0, [0.0, slope]), (0.0, math.inf, [0.0, 1.0])])


HARDSIGMOID: Tuple[Piece, ...] = ((-3.0, 3.0, (0.5, 1.0 / 6.0)), (3.0, math.inf, (1.0,)))
HARDSWISH: Tuple[Piece, ...] = ((-3.0, 3.0, (0.0, 0.5, 1.0 / 6.0)), (3.0, math.inf, (0.0, 1.0)))


@functools.lru_cache(maxsize=None)
def _hermite(nodes: int) -> Tuple[Tensor, Tensor]:
    """Gauss-Hermite nodes and weights for ``int f(x) exp(-x^2) dx`` (Golub-Welsch), float64."""
    k = torch.arange(1, nodes, dtype=torch.float64)
    jacobi = torch.diag((k / 2).sqrt(), 1) + torch.diag((k / 2).sqrt(), -1)
    x, vectors = torch.linalg.eigh(jacobi)
    return x, math.sqrt(math.pi) * vectors[0].square()


_HYBRID_STD = 1.0  # above this std, the asymptote + remainder form replaces Gauss-Hermite
_GRID = 20.0, 400  # the remainder f - asymptote is negligible beyond |z| = 20


def _half_grids(device) -> list:
    """Simpson nodes and weights on ``[-20, 0]`` and ``[0, 20]`` (``right`` flags the second).

    Split at 0, where the asymptotes bend or jump, so that each half's integrand is smooth.
    """
    z = torch.linspace(0.0, _GRID[0], _GRID[1] + 1, dtype=torch.float64, device=device)
    w = torch.full_like(z, 2.0)
    w[1::2] = 4.0
    w[0] = w[-1] = 1.0
    w = w * (_GRID[0] / _GRID[1]) / 3.0
    return [(-z, w, False), (z, w, True)]


def smooth_moments(mean: Tensor, var: Tensor, fn: Callable[[Tensor], Tensor],
                   asymptote: Sequence[Piece] = (), nodes: int = 64) -> Moments:
    """Moments of ``fn(z)`` for a smooth elementwise ``fn``, by quadrature.

    For ``std <= 1``, Gauss-Hermite quadrature with ``nodes`` nodes:
    ``E fn(z) = sum_i w_i fn(mean + sqrt(2 var) x_i) / sqrt(pi)`` and the variance as the
    centred sum. A wide Gaussian sees the bend of ``fn`` (near 0) as a kink, where
    Gauss-Hermite converges slowly; there ``fn = a + r`` with ``a`` the piecewise polynomial
    ``asymptote`` (ReLU for SiLU, a step for sigmoid), whose moments are exact
    (:func:`piecewise_moments`), and ``r`` a remainder that vanishes beyond ``|z| = 20``:
    ``E r`` and ``E (2 a r + r^2)`` by the trapezoid rule on a fixed grid of ``z``. Both in
    float64 (Simpson's rule on each side of 0, where the asymptotes bend); error below 1e-6 of
    the output scale.

    Args:
        fn: an elementwise function (``torch.sigmoid``, ``F.silu``, ...).
        asymptote: pieces of ``a`` (see :func:`piecewise_moments`); empty: Gauss-Hermite only.
            Default: ``()``.
        nodes: Gauss-Hermite nodes. Default: 64.

    >>> m, v = smooth_moments(torch.zeros(1), torch.ones(1), torch.sigmoid)
    >>> round(m.item(), 4)
    0.5
    """
    x, w = _hermite(nodes)
    x, w = x.to(mean.device), w.to(mean.device) / math.sqrt(math.pi)
    mu, std = mean.double().unsqueeze(-1), safe_std(var.double()).unsqueeze(-1)
    values = fn(mu + math.sqrt(2.0) * std * x)  # [S, C, nodes]
    first = (values * w).sum(-1)
    second = ((values - first.unsqueeze(-1)).square() * w).sum(-1)
    if asymptote:
        # The wide branch, with std at least _HYBRID_STD so that it stays finite where unused.
        wide = std.clamp_min(_HYBRID_STD)
        a_first, a_var = piecewise_moments(mu.squeeze(-1), wide.square().squeeze(-1), asymptote)
        r_first = r_second = 0.0
        for z, w_z, right in _half_grids(mean.device):
            a = torch.zeros_like(z)
            for low, high, coefficients in asymptote:
                inside = (z >= low) & (z < high) if right else (z > low) & (z <= high)
                poly = sum(c * z ** k for k, c in enumerate(coefficients))
                a = a + torch.where(inside, poly, 0.0)
            r = fn(z) - a
            density = torch.exp(-0.5 * ((z - mu) / wide).square()) * (w_z / wide)
            r_first = r_first + (r * density).sum(-1) * _INV_SQRT_2PI
            r_second = r_second + ((2 * a * r + r.square()) * density).sum(-1) * _INV_SQRT_2PI
        h_first = a_first + r_first
        h_var = a_var + a_first.square() + r_second - h_first.square()
        use = std.squeeze(-1) > _HYBRID_STD
        first, second = torch.where(use, h_first, first), torch.where(use, h_var, second)
    return first.to(mean.dtype), second.clamp_min(0.0).to(var.dtype)


@functools.lru_cache(maxsize=None)
def _max_of_normals(k: int) -> Tuple[float, float]:
    """Mean and variance of the max of ``k`` independent standard normals."""
    if k == 1:
        return 0.0, 1.0
    t = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)
    log_density = (math.log(k) - 0.5 * t.square() - 0.5 * math.log(2 * math.pi)
                   + (k - 1) * torch.special.log_ndtr(t))
    density = log_density.exp()
    first = torch.trapezoid(t * density, t).item()
    second = torch.trapezoid((t - first).square() * density, t).item()
    return first, second


def max_moments(mean: Tensor, var: Tensor,
                windows: Union[int, Dict[int, float]]) -> Moments:
    """Moments of the max over ``k`` independent ``N(mean, var)`` positions (max pooling).

    ``mean' = mean + std e_k``, ``var' = var v_k`` (module docstring). ``windows`` is ``k`` or,
    for windows of several sizes (adaptive pooling), ``{k: share of output positions}``: the
    moments of the mixture over positions.

    >>> max_moments(torch.zeros(1), torch.ones(1), 2)[0]
    tensor([0.5642])
    """
    if isinstance(windows, int):
        windows = {windows: 1.0}
    total = sum(windows.values())
    e = sum(share * _max_of_normals(k)[0] for k, share in windows.items()) / total
    second = sum(share * (_max_of_normals(k)[1] + _max_of_normals(k)[0] ** 2)
                 for k, share in windows.items()) / total
    return mean + safe_std(var) * e, var * (second - e * e)


def adaptive_windows(sizes_in: Sequence[int], sizes_out: Sequence[int]) -> Dict[int, float]:
    """Window sizes of adaptive pooling from ``sizes_in`` to ``sizes_out``, with their counts."""
    per_dim = []
    for n_in, n_out in zip(sizes_in, sizes_out):
        per_dim.append([-((-(i + 1) * n_in) // n_out) - (i * n_in) // n_out for i in range(n_out)])
    counts: Dict[int, float] = collections.Counter({1: 1})
    for sizes in per_dim:
        nxt: Dict[int, float] = collections.Counter()
        for k, c in counts.items():
            for s in sizes:
                nxt[k * s] += c
        counts = nxt
    return dict(counts)


def product_moments(mean_x: Tensor, var_x: Tensor, mean_y: Tensor, var_y: Tensor) -> Moments:
    """Moments of ``x * y`` for independent ``x`` and ``y``.

    ``mean = mx my``, ``var = vx vy + vx my^2 + vy mx^2`` (exact for independent factors).

    >>> product_moments(torch.ones(1), torch.ones(1), torch.ones(1), torch.ones(1))[1]
    tensor([3.])
    """
    return (mean_x * mean_y,
            var_x * var_y + var_x * mean_y.square() + var_y * mean_x.square())
