"""Runtime twins of the graph's ops: ``(moments, input, output, *op args) -> moments``.

Part of :mod:`kalmannorm.analytic`. The rewritten graph calls a twin right after its op, with
the moments of the op's input (``None``: no BKN layer upstream in this pass, which stays
``None``), the op's real input and output (for shapes) and the op's own arguments.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import nonlinear
from .rules import (
    conv_moments,
    dropout_moments,
    eval_norm_moments,
    linear_moments,
    pool_moments,
    relu_moments,
)

def _m_identity(mv, x, y, *args, **kwargs):
    return mv


def _m_detach(mv, x, y, *args, **kwargs):
    return None if mv is None else (mv[0].detach(), mv[1].detach())


def _m_neg(mv, x, y, *args, **kwargs):
    return None if mv is None else (-mv[0], mv[1])


def _m_relu(mv, x, y, *args, **kwargs):
    return None if mv is None else relu_moments(*mv)


def _m_relu_module(module, mv, x, y):
    return None if mv is None else relu_moments(*mv)


def _m_conv_module(module, mv, x, y):
    return None if mv is None else conv_moments(*mv, module.weight, module.bias, module.groups)


def _m_conv(mv, x, y, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return None if mv is None else conv_moments(*mv, weight, bias, groups)


def _check_2d_linear(x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(
            f"the analytic prediction supports a linear layer on [N, C] inputs only (got "
            f"{x.dim()}D input of shape {tuple(x.shape)}: moments are per channel, dim 1)"
        )


def _m_linear_module(module, mv, x, y):
    if mv is None:
        return None
    _check_2d_linear(x)
    return linear_moments(*mv, module.weight, module.bias)


def _m_linear(mv, x, y, weight, bias=None):
    if mv is None:
        return None
    _check_2d_linear(x)
    return linear_moments(*mv, weight, bias)


def _kernel_positions(kernel_size, spatial_dims: int) -> int:
    if isinstance(kernel_size, int):
        return kernel_size ** spatial_dims
    return math.prod(kernel_size)


def _avg_pool(mv, x, kernel_size, divisor_override):
    k = _kernel_positions(kernel_size, x.dim() - 2)
    mean, var = mv
    if divisor_override:
        # sum / d instead of sum / k: a constant factor k / d on the average.
        c = k / divisor_override
        mean, var = mean * c, var * c * c
    return pool_moments(mean, var, k)


def _m_avg_pool_module(module, mv, x, y):
    if mv is None:
        return None
    return _avg_pool(mv, x, module.kernel_size, getattr(module, "divisor_override", None))


def _m_avg_pool(mv, x, y, kernel_size, stride=None, padding=0, ceil_mode=False,
                count_include_pad=True, divisor_override=None):
    return None if mv is None else _avg_pool(mv, x, kernel_size, divisor_override)


def _m_adaptive_pool(mv, x, y, *args, **kwargs):
    if mv is None:
        return None
    return pool_moments(*mv, math.prod(x.shape[2:]) / math.prod(y.shape[2:]))


def _m_adaptive_pool_module(module, mv, x, y):
    return _m_adaptive_pool(mv, x, y)


def _m_mean(mv, x, y, dim=None, keepdim=False, *, dtype=None):
    if mv is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim) if dim is not None else []
    dims = [d % x.dim() for d in dims]
    if not dims or min(dims) <= _channel_dims(mv):
        raise ValueError(
            f"the analytic prediction supports a mean over spatial dims only (got dim={dim} "
            f"for input of shape {tuple(x.shape)}; dims 0 and 1 are the batch and channels)"
        )
    return pool_moments(*mv, math.prod(x.shape[d] for d in dims))


def _m_dropout_module(module, mv, x, y):
    if mv is None:
        return None
    return dropout_moments(*mv, module.p) if module.training else mv


def _m_dropout(mv, x, y, p=0.5, training=True, inplace=False):
    if mv is None:
        return None
    return dropout_moments(*mv, p) if training else mv


def _channel_dims(mv) -> int:
    """How many dims after the batch dim the moments span (1 for ``[S, C]``)."""
    return mv[0].dim() - 1


def _m_reshape(mv, x, y, *args, **kwargs):
    """view / reshape / flatten / squeeze / unsqueeze that keep the batch dim.

    ``x`` is ``[N, *D, *P]`` with the moments ``[S, *D]`` (channel dims ``D``, positions ``P``).
    Row-major, the output splits as ``[N, *D', *P']`` with ``prod(D') = prod(D) r`` for some
    ``r`` dividing ``prod(P)``: each new channel holds a block of positions of one old channel,
    whose moments it takes (``r = 1``: channels kept, e.g. a channel shuffle's
    ``[N, g, C / g, H, W]``; ``r = prod(P)``: ``[N, C, *L] -> [N, C * L]``).
    """
    if mv is None:
        return None
    d = _channel_dims(mv)
    n_channels, n_positions = math.prod(x.shape[1:1 + d]), math.prod(x.shape[1 + d:])
    if y.dim() >= 2 and y.shape[0] == x.shape[0]:
        size = 1
        for k in range(1, y.dim()):
            size *= y.shape[k]
            if size % n_channels == 0 and n_positions % (size // n_channels) == 0:
                r = size // n_channels
                shape = (mv[0].shape[0],) + tuple(y.shape[1:k + 1])
                return tuple(
                    m.reshape(m.shape[0], n_channels, 1).expand(-1, -1, r).reshape(shape)
                    for m in mv
                )
    raise ValueError(
        f"the analytic prediction cannot follow a reshape of {tuple(x.shape)} into "
        f"{tuple(y.shape)}: it must keep the batch dim and the channels before the positions "
        "(e.g. flatten [N, C, *L] to [N, C * L], or split C into [N, g, C / g, *L])"
    )


def _widen(mv, x, dims) -> tuple:
    """Moments with the singleton dims of ``x`` up to ``max(dims)`` as channel dims, if those
    are all singletons and some of ``dims`` is a channel dim (``[S, C] -> [S, C, 1]``)."""
    d = _channel_dims(mv)
    upto = max(dims)
    if upto <= d or min(dims) > d or any(x.shape[k] != 1 for k in range(d + 1, upto + 1)):
        return mv
    shape = (mv[0].shape[0],) + tuple(x.shape[1:upto + 1])
    return mv[0].reshape(shape), mv[1].reshape(shape)


def _m_transpose(mv, x, y, dim0, dim1):
    if mv is None:
        return None
    rank = x.dim()
    dim0, dim1 = dim0 % rank, dim1 % rank
    mv = _widen(mv, x, (dim0, dim1))
    d = _channel_dims(mv)
    if dim0 > d and dim1 > d:
        return mv  # positions only
    if 1 <= dim0 <= d and 1 <= dim1 <= d:
        return mv[0].transpose(dim0, dim1), mv[1].transpose(dim0, dim1)
    raise ValueError(
        f"the analytic prediction follows a transpose of channel dims or of spatial dims, not "
        f"of dims {dim0} and {dim1} of a tensor {tuple(x.shape)} with channel dims 1..{d}"
    )


def _m_permute(mv, x, y, *dims):
    if mv is None:
        return None
    dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
    rank = x.dim()
    dims = tuple(k % rank for k in dims)
    moved = [k for position, k in enumerate(dims) if position != k]
    if moved:
        mv = _widen(mv, x, moved)
    d = _channel_dims(mv)
    if dims[0] != 0 or sorted(dims[1:d + 1]) != list(range(1, d + 1)):
        raise ValueError(
            f"the analytic prediction follows a permute that keeps the batch dim first and the "
            f"channel dims 1..{d} before the spatial dims (got dims={dims} for a tensor "
            f"{tuple(x.shape)})"
        )
    order = (0,) + dims[1:d + 1]
    return mv[0].permute(order), mv[1].permute(order)


def _m_getitem(mv, x, y, index):
    """``x[index]`` with the whole batch: channel dims indexed, spatial dims kept as they are."""
    if mv is None:
        return None
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (x.dim() - len(index) + 1) + index[at + 1:]
    d = _channel_dims(mv)
    full = slice(None)
    if not index or not (isinstance(index[0], slice) and index[0] == full) or any(
            i is None or isinstance(i, (int, bool)) for i in index[1:d + 1]):
        raise ValueError(
            f"the analytic prediction follows indexing that keeps the whole batch and the "
            f"channel dims (e.g. x[:, a:b]), not x[{index}] of a tensor {tuple(x.shape)}"
        )
    moment_index = (full,) + tuple(index[1:d + 1])
    return mv[0][moment_index], mv[1][moment_index]


def _m_select(mvs, index):
    """An element of a split's moments (``torch.split(x, ...)[i]``)."""
    return None if mvs is None else mvs[index]


def _m_split(mv, x, ys, split_size_or_sections, dim=0):
    """``split`` / ``chunk``: along the channels, the moments split alike; along positions, every
    part keeps them."""
    if mv is None:
        return None
    d, dim = _channel_dims(mv), dim % x.dim()
    if dim > d:
        return [mv for _ in ys]
    if dim != 1:
        raise ValueError(f"the analytic prediction cannot follow a split along dim {dim} "
                         f"of a tensor {tuple(x.shape)}")
    sizes = [part.shape[1] for part in ys]
    return list(zip(mv[0].split(sizes, 1), mv[1].split(sizes, 1)))


def _m_chunk(mv, x, ys, chunks, dim=0):
    return _m_split(mv, x, ys, chunks, dim)


def _interpolation_factor(n_in: int, n_out: int, mode: str, align_corners, device) -> float:
    """Mean over output positions of the sum of squared interpolation weights, one dim."""
    two_d = {"linear": "bilinear", "bilinear": "bilinear", "trilinear": "bilinear",
             "bicubic": "bicubic"}.get(mode, mode)
    eye = torch.eye(n_in, dtype=torch.float64, device=device).reshape(n_in, 1, n_in, 1)
    kwargs = {} if two_d in ("nearest", "nearest-exact", "area") else {"align_corners": align_corners}
    weights = F.interpolate(eye, size=(n_out, 1), mode=two_d, **kwargs)  # [n_in, 1, n_out, 1]
    return weights.square().sum(0).mean().item()


def _m_interpolate(mv, x, y, size=None, scale_factor=None, mode="nearest", align_corners=None,
                   recompute_scale_factor=None, antialias=False):
    """Interpolation averages input positions with weights summing to 1 (any mode): the mean is
    kept and the variance scales by the mean, over output positions, of the squared weights'
    sum, from the real sizes (borders included)."""
    if mv is None:
        return None
    if antialias:
        raise ValueError("the analytic prediction cannot follow antialiased interpolation")
    factor = 1.0
    for n_in, n_out in zip(x.shape[2:], y.shape[2:]):
        factor *= _interpolation_factor(n_in, n_out, mode, align_corners, x.device)
    return mv[0], mv[1] * factor


def _m_upsample_module(module, mv, x, y):
    return _m_interpolate(mv, x, y, mode=module.mode, align_corners=module.align_corners)


def _m_sum(mv, x, y, dim=None, keepdim=False, *, dtype=None):
    """A sum over ``k`` spatial positions: ``k`` times their average."""
    if mv is None:
        return None
    mean, var = _m_mean(mv, x, y, dim, keepdim)
    dims = [dim] if isinstance(dim, int) else list(dim)
    k = math.prod(x.shape[d] for d in dims)
    return mean * k, var * (k * k)


def _m_row_dropout_module(module, mv, x, y):
    """torchvision's ``StochasticDepth``: rows (or the batch) dropped, survivors scaled by
    ``1 / (1 - p)``; per element, the moments of dropout."""
    if mv is None:
        return None
    return dropout_moments(*mv, module.p) if module.training else mv


def _m_flatten_module(module, mv, x, y):
    return _m_reshape(mv, x, y)


def _m_pad(mv, x, y, pad, mode="constant", value=None):
    if mv is None:
        return None
    pairs, rank = len(pad) // 2, x.dim()
    if pairs > rank - 1:
        raise ValueError(f"the analytic prediction cannot follow padding of the batch dim (pad={pad})")
    if pairs < rank - 1:
        return mv  # spatial padding only: a border, ignored
    before, after = pad[2 * (rank - 2)], pad[2 * (rank - 2) + 1]
    if before == 0 and after == 0:
        return mv
    if mode != "constant":
        raise ValueError(f"the analytic prediction pads channels with a constant only (got mode={mode!r})")
    mean, var = mv
    return F.pad(mean, (before, after), value=float(value or 0.0)), F.pad(var, (before, after))


def _m_cat(tensors, mvs, dim=0):
    if all(mv is None for mv in mvs):
        return None
    rank = tensors[0].dim()
    if dim % rank != 1:
        raise ValueError(
            f"the analytic prediction supports concatenation along the channel dim 1 only (got "
            f"dim={dim} for {rank}D tensors)"
        )
    ref = next(mv for mv in mvs if mv is not None)[0]
    means, variances = [], []
    for t, mv in zip(tensors, mvs):
        if mv is None:  # no BKN upstream: zero, as the sampled shadow rows of zeros
            zero = ref.new_zeros(ref.shape[0], t.shape[1])
            mv = (zero, zero)
        means.append(mv[0])
        variances.append(mv[1])
    return torch.cat(means, 1), torch.cat(variances, 1)


def _is_batch_tensor(t: Any, x: Tensor) -> bool:
    """Whether ``t`` holds rows of the batch (as opposed to a constant broadcast over it)."""
    return (isinstance(t, Tensor) and t.dim() == x.dim() and t.dim() > 0
            and t.shape[0] == x.shape[0] != 1)


def _per_channel(c: Any, x: Tensor) -> Any:
    """A constant broadcast over the batch as a scalar or a ``[C]`` tensor; it must not vary
    over positions (the moments are spatially constant)."""
    if not isinstance(c, Tensor):
        return c
    while c.dim() > x.dim() - 1 and c.shape[0] == 1:
        c = c.squeeze(0)
    shape = (1,) * (x.dim() - 1 - c.dim()) + tuple(c.shape)  # aligned with x.shape[1:]
    if c.dim() > x.dim() - 1 or any(size != 1 for size in shape[1:]):
        raise ValueError(
            f"the analytic prediction supports constants that are scalars or per channel, "
            f"not a tensor of shape {tuple(c.shape)} combined with an input of shape "
            f"{tuple(x.shape)}: it would make the moments vary over positions"
        )
    return c.float().reshape(-1) if shape[0] != 1 else c.float().reshape(())


def _add_term(t, mv, x, scale):
    """``(mean, var)`` contribution of one summand times ``scale``; ``None`` for zero."""
    if mv is not None:
        if scale == 1:
            return mv
        return mv[0] * scale, mv[1] * (scale * scale)
    if _is_batch_tensor(t, x):
        return None  # computed from the inputs without BKN: zero (see the module docstring)
    return _per_channel(t, x) * scale, None


def _m_add(a, b, mva, mvb, sign=1.0, alpha=1):
    if mva is None and mvb is None:
        return None
    x = a if mva is not None else b
    terms = [_add_term(a, mva, x, 1.0), _add_term(b, mvb, x, sign * alpha)]
    mean = var = None
    for term in terms:
        if term is None:
            continue
        mean = term[0] if mean is None else mean + term[0]
        if term[1] is not None:
            var = term[1] if var is None else var + term[1]
    return mean, var


def _m_mul(a, b, mva, mvb, divide=False):
    if mva is not None and mvb is not None and not divide:
        return nonlinear._m_product(mva, mvb)
    if mva is not None:
        mv, x, c = mva, a, b
    elif mvb is not None and not divide:
        mv, x, c = mvb, b, a
    else:
        return None
    if _is_batch_tensor(c, x):
        raise ValueError(
            "the analytic prediction supports a product with a constant only (a scalar or a "
            f"tensor broadcast over the batch), not with a batch tensor of shape {tuple(c.shape)}"
        )
    c = _per_channel(c, x)
    if divide:
        c = c.reciprocal() if isinstance(c, Tensor) else 1.0 / c
    mean, var = mv
    return mean * c, var * (c * c)


def _m_eval_norm(module, mv, x, y):
    if mv is None:
        return None
    if module.training or module.running_mean is None:
        raise ValueError(
            f"{type(module).__name__} normalizes with batch statistics; the analytic prediction "
            "follows a BatchNorm only in eval mode with running statistics (convert it to BKN)"
        )
    return eval_norm_moments(module, mv)


def _m_identity_module(module, mv, x, y):
    return mv
