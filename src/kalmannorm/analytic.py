"""The analytic layer-to-layer prediction of Batch Kalman Normalization.

``docs/method.md`` section 4, last paragraph ("a cheaper deterministic alternative", beyond the
paper of Wang et al., "Batch Kalman Normalization", arXiv 1802.03133): instead of pushing sampled
pseudo-images ("shadow rows", :class:`~kalmannorm.KalmanPredictor`) through the layers between
two BKN layers, propagate their per-(group, channel) mean and variance in closed form. Under the
assumptions of the sampled prediction (a Gaussian sample, independent at every position and
channel, spatially constant moments, borders ignored) the moments are those of the pseudo-image
the sampled prediction would draw, i.e. the expected value of its prior, with no extra rows: a
tensor carries ``(mean, var)``, each ``[S, C]``, and every rule below is an elementwise op or an
``[S, C] x [C, C']`` matmul.

The model is traced with :mod:`torch.fx` (BKN and ``torch.nn`` layers are leaves) and the graph
is rewritten: each BKN layer takes the real input and the prior moments and returns its output
and its outgoing moments (:meth:`~kalmannorm.modules._BatchKalmanNorm.forward_with_prior`), and
every node between BKN layers gets a twin node that computes the moments of its output. The
generated ``forward`` runs both, with no interpreter in between.

The rules (``S`` groups, ``C`` channels, ``k`` positions averaged), all float32:

- conv (any dim, groups, stride, dilation; padding ignored), per group of channels:
  ``mean' = mean @ (sum_space W)^T + b``, ``var' = var @ (sum_space W^2)^T``;
- linear on ``[N, C]``: ``mean' = mean @ W^T + b``, ``var' = var @ (W^2)^T``;
- ReLU of ``N(mu, s^2)``, with ``a = mu / s``, ``Phi``/``phi`` the normal cdf/pdf:
  ``mean' = mu Phi(a) + s phi(a)``,
  ``var' = s^2 (a^2 Phi(a) Phi(-a) + Phi(a) + a phi(a) (1 - 2 Phi(a)) - phi(a)^2)``;
- average pooling over ``k`` positions (``AvgPool``, ``F.avg_pool``, adaptive average pooling
  with ``k = input positions / output positions``, ``mean`` over spatial dims):
  ``mean' = mean``, ``var' = var / k``;
- sum / difference of two tensors (independent): means add (subtract), variances add; a tensor
  computed from the model's inputs without a BKN layer on its path counts as zero (its shadow
  rows in the sampled prediction are the image of zeros: zero for bias-free layers);
- product with a constant ``c``, a scalar or per channel (a parameter ``[C, 1, 1]``, say):
  ``mean' = c mean``, ``var' = c^2 var``; adding one: ``mean' = mean + c``;
- concatenation along channels: concatenate; zero channel padding (``F.pad`` of dim 1):
  ``(value, 0)`` for the new channels; spatial padding is a border and is ignored;
- flatten / view / reshape keeping the channel dim, or flattening ``[N, C, *L]`` to
  ``[N, C * L]``: each channel's moments repeated ``L`` times;
- train-mode dropout with probability ``p`` (values scaled by ``1 / (1 - p)``): the exact
  moments of the masked sample, ``mean' = mean``, ``var' = (var + mean^2) / (1 - p) - mean^2``,
  as the sampled prediction's shadow rows are masked too (identity in eval mode);
- identity, ``clone``, ``contiguous``, ``detach``, negation; an eval-mode BatchNorm or BKN
  layer is the affine map with its running statistics;
- a BKN layer's outgoing moments: its combined ``(mean, var)`` with ``propagate="raw"`` (the
  released code), ``(bias, weight^2 var / (var + eps))`` with ``"normalized"``.

Any other op that receives moments on the way to a BKN layer (max pooling, sigmoid, attention,
unknown modules) is refused when the wrapper is built, naming the op; ops after the last BKN
layer (a classifier head) need no rule. The sampled prediction handles any layer.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .functional import safe_std
from .modules import _BatchKalmanNorm
from .prediction import BatchInput, KalmanPredictor

__all__ = [
    "AnalyticKalmanPredictor",
    "check_analytic",
    "conv_moments",
    "linear_moments",
    "relu_moments",
    "pool_moments",
    "dropout_moments",
    "normalized_moments",
    "supported_ops",
]

Moments = Tuple[Tensor, Tensor]
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# --------------------------------------------------------------------------------------------
# The rules, as pure functions of the moments.
# --------------------------------------------------------------------------------------------

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


def _eval_norm_moments(layer: nn.Module, moments: Moments) -> Moments:
    """Moments after an eval-mode BatchNorm: the affine map of its running statistics."""
    mean, var = moments
    scale = torch.rsqrt(layer.running_var.float() + layer.eps)
    if layer.weight is not None:
        scale = scale * layer.weight.float()
    shift = -layer.running_mean.float() * scale
    if layer.bias is not None:
        shift = shift + layer.bias.float()
    return mean * scale + shift, var * scale.square()


# --------------------------------------------------------------------------------------------
# Runtime twins of the graph's nodes: ``(moments, input, output, *op args) -> moments``.
# ``None`` moments (no BKN layer upstream in this pass) stay ``None``.
# --------------------------------------------------------------------------------------------

class _PassState(nn.Module):
    """Per-pass state of an :class:`AnalyticKalmanPredictor`: the number of groups ``S``.

    A module without parameters only so that the traced graph can reach it as an attribute.
    """

    def __init__(self) -> None:
        super().__init__()
        self.groups = 1


def _kalman_step(
    layer: _BatchKalmanNorm, state: _PassState, x: Tensor, prior: Optional[Moments]
) -> Tuple[Tensor, Optional[Moments]]:
    """One BKN layer: normalize ``x`` with ``prior``, return the output and outgoing moments."""
    if not (layer.training or not layer.track_running_stats):
        # Eval mode: BatchNorm with the running statistics, an affine map of the moments (the
        # sampled prediction passes its shadow rows through it the same way).
        y = layer(x)
        return y, None if prior is None else _eval_norm_moments(layer, prior)
    layer._check_input_dim(x)
    valid = None
    if prior is None or layer.gain == 0:
        prior = None
    else:
        # As prior_from_rows: non-finite moments (an overflow) are zeroed so that neither pass
        # meets them, and the flag rejects the prior.
        mean, var = prior
        valid = torch.isfinite(mean.sum() + var.sum())
        prior = (torch.nan_to_num(mean, 0.0, 0.0, 0.0), torch.nan_to_num(var, 0.0, 0.0, 0.0))
    y, mean, var = layer.forward_with_prior(x, prior, state.groups, valid)
    if layer.propagate == "normalized":
        return y, normalized_moments(mean, var, layer.weight, layer.bias, layer.eps)
    return y, (mean, var)


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
    if not dims or 0 in dims or 1 in dims:
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


def _m_reshape(mv, x, y, *args, **kwargs):
    if mv is None:
        return None
    if y.dim() >= 1 and x.dim() >= 2 and y.shape[0] == x.shape[0]:
        channels, positions = x.shape[1], math.prod(x.shape[2:])
        out_channels = y.shape[1] if y.dim() >= 2 else 1
        if out_channels == channels:  # positions rearranged, channels kept
            return mv
        if y.dim() >= 2 and out_channels == channels * positions:  # [N, C, *L] -> [N, C * L]
            return mv[0].repeat_interleave(positions, 1), mv[1].repeat_interleave(positions, 1)
    raise ValueError(
        f"the analytic prediction cannot follow a reshape of {tuple(x.shape)} into "
        f"{tuple(y.shape)}: it must keep the batch and channel dims or flatten [N, C, *L] to "
        "[N, C * L]"
    )


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


# --------------------------------------------------------------------------------------------
# Graph rewriting.
# --------------------------------------------------------------------------------------------

class _Unsupported(Exception):
    """Raised by an emitter for an op whose form has no rule (e.g. ``c / x``)."""


def _unary(helper: Callable) -> Callable:
    """Emitter of a rule whose moments come from the op's first argument."""

    def emit(graph: fx.Graph, node: fx.Node, moments: Dict[fx.Node, fx.Node]) -> fx.Node:
        if node.args:
            x, rest, kwargs = node.args[0], node.args[1:], dict(node.kwargs)
        elif "input" in node.kwargs:
            kwargs = dict(node.kwargs)
            x, rest = kwargs.pop("input"), ()
        else:
            raise _Unsupported
        others = [n for n in node.all_input_nodes if n is not x]
        if not isinstance(x, fx.Node) or x not in moments or any(n in moments for n in others):
            raise _Unsupported
        if node.op == "call_module":
            module = graph.get_attr(node.target)
            return graph.call_function(helper, (module, moments[x], x, node))
        return graph.call_function(helper, (moments[x], x, node) + tuple(rest), kwargs)

    return emit


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _binary_add(sign: float) -> Callable:
    def emit(graph, node, moments):
        a = _arg(node, 0, "input")
        b = _arg(node, 1, "other")
        alpha = node.kwargs.get("alpha", 1)
        mva = moments.get(a) if isinstance(a, fx.Node) else None
        mvb = moments.get(b) if isinstance(b, fx.Node) else None
        return graph.call_function(_m_add, (a, b, mva, mvb, sign, alpha))

    return emit


def _binary_mul(divide: bool) -> Callable:
    def emit(graph, node, moments):
        a = _arg(node, 0, "input")
        b = _arg(node, 1, "other")
        mva = moments.get(a) if isinstance(a, fx.Node) else None
        mvb = moments.get(b) if isinstance(b, fx.Node) else None
        if (mva is not None and mvb is not None) or (divide and mvb is not None):
            raise _Unsupported  # a product of two random tensors, or a division by one
        if set(node.kwargs) - {"input", "other"}:
            raise _Unsupported
        return graph.call_function(_m_mul, (a, b, mva, mvb, divide))

    return emit


def _emit_cat(graph, node, moments):
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)):
        raise _Unsupported
    mvs = [moments.get(t) if isinstance(t, fx.Node) else None for t in tensors]
    return graph.call_function(_m_cat, (list(tensors), mvs, dim))


def _m_eval_norm(module, mv, x, y):
    if mv is None:
        return None
    if module.training or module.running_mean is None:
        raise ValueError(
            f"{type(module).__name__} normalizes with batch statistics; the analytic prediction "
            "follows a BatchNorm only in eval mode with running statistics (convert it to BKN)"
        )
    return _eval_norm_moments(module, mv)


def _m_identity_module(module, mv, x, y):
    return mv


def _no_moments(graph, node, moments):
    return None


_MODULE_RULES: List[Tuple[tuple, Callable]] = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), _unary(_m_conv_module)),
    ((nn.Linear,), _unary(_m_linear_module)),
    ((nn.ReLU,), _unary(_m_relu_module)),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), _unary(_m_avg_pool_module)),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
     _unary(_m_adaptive_pool_module)),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d), _unary(_m_dropout_module)),
    ((nn.Flatten,), _unary(_m_flatten_module)),
    ((nn.Identity,), _unary(_m_identity_module)),
    ((_BatchNorm,), _unary(_m_eval_norm)),
]

_FUNCTION_RULES: Dict[Callable, Callable] = {
    F.relu: _unary(_m_relu), torch.relu: _unary(_m_relu), torch.relu_: _unary(_m_relu),
    F.relu_: _unary(_m_relu),
    F.conv1d: _unary(_m_conv), F.conv2d: _unary(_m_conv), F.conv3d: _unary(_m_conv),
    F.linear: _unary(_m_linear),
    F.avg_pool1d: _unary(_m_avg_pool), F.avg_pool2d: _unary(_m_avg_pool),
    F.avg_pool3d: _unary(_m_avg_pool),
    F.adaptive_avg_pool1d: _unary(_m_adaptive_pool), F.adaptive_avg_pool2d: _unary(_m_adaptive_pool),
    F.adaptive_avg_pool3d: _unary(_m_adaptive_pool),
    torch.mean: _unary(_m_mean),
    F.dropout: _unary(_m_dropout), F.dropout1d: _unary(_m_dropout),
    F.dropout2d: _unary(_m_dropout), F.dropout3d: _unary(_m_dropout),
    torch.flatten: _unary(_m_reshape), torch.reshape: _unary(_m_reshape),
    torch.squeeze: _unary(_m_reshape), torch.unsqueeze: _unary(_m_reshape),
    F.pad: _unary(_m_pad),
    torch.clone: _unary(_m_identity), torch.detach: _unary(_m_detach),
    operator.neg: _unary(_m_neg), torch.neg: _unary(_m_neg),
    operator.add: _binary_add(1.0), operator.iadd: _binary_add(1.0), torch.add: _binary_add(1.0),
    operator.sub: _binary_add(-1.0), operator.isub: _binary_add(-1.0), torch.sub: _binary_add(-1.0),
    operator.mul: _binary_mul(False), operator.imul: _binary_mul(False),
    torch.mul: _binary_mul(False),
    operator.truediv: _binary_mul(True), operator.itruediv: _binary_mul(True),
    torch.div: _binary_mul(True),
    torch.cat: _emit_cat, torch.concat: _emit_cat, torch.concatenate: _emit_cat,
    # Metadata: the result is not a tensor of the batch and carries no moments.
    getattr: _no_moments, len: _no_moments,
}

_METHOD_RULES: Dict[str, Callable] = {
    "relu": _unary(_m_relu), "relu_": _unary(_m_relu),
    "mean": _unary(_m_mean),
    "flatten": _unary(_m_reshape), "view": _unary(_m_reshape), "reshape": _unary(_m_reshape),
    "squeeze": _unary(_m_reshape), "unsqueeze": _unary(_m_reshape),
    "contiguous": _unary(_m_identity), "clone": _unary(_m_identity),
    "detach": _unary(_m_detach), "neg": _unary(_m_neg),
    "add": _binary_add(1.0), "add_": _binary_add(1.0),
    "sub": _binary_add(-1.0), "sub_": _binary_add(-1.0),
    "mul": _binary_mul(False), "mul_": _binary_mul(False),
    "div": _binary_mul(True), "div_": _binary_mul(True),
    "size": _no_moments, "dim": _no_moments, "numel": _no_moments,
}


def _name(fn: Callable) -> str:
    module = getattr(fn, "__module__", None) or ""
    if module.startswith("torch.nn.functional") or module == "torch._C._nn":
        module = "F"
    elif module in ("_operator", "operator"):
        module = "operator"
    elif module.startswith("torch"):
        module = "torch"
    name = getattr(fn, "__name__", repr(fn))
    return f"{module}.{name}" if module and module != "builtins" else name


def supported_ops() -> List[str]:
    """Names of the modules, functions and tensor methods the analytic prediction follows."""
    names = ["BatchKalmanNorm1d/2d/3d"]
    names += [cls.__name__ for classes, _ in _MODULE_RULES for cls in classes]
    names += [_name(fn) for fn, rule in _FUNCTION_RULES.items() if rule is not _no_moments]
    names += [f"Tensor.{m}" for m, rule in _METHOD_RULES.items() if rule is not _no_moments]
    return sorted(set(n.replace("_BatchNorm", "BatchNorm (eval)") for n in names))


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(root.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return f"function {_name(node.target)}"


def _rule(node: fx.Node, root: nn.Module) -> Optional[Callable]:
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        for classes, emit in _MODULE_RULES:
            if isinstance(module, classes):
                return emit
        return None
    if node.op == "call_function":
        try:
            return _FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHOD_RULES.get(node.target)
    return None


class _Tracer(fx.Tracer):
    """Keeps normalization layers (BKN, BatchNorm, ...) and ``torch.nn`` layers as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _NormBase) or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module, concrete_args: Optional[Dict[str, Any]]) -> fx.GraphModule:
    """Trace ``module`` in training mode (the graph only runs in training), restoring its flags."""
    flags = [(m, m.training) for m in module.modules()]
    module.train()
    try:
        tracer = _Tracer()
        graph = tracer.trace(module, concrete_args)
    except Exception as err:  # any failure of symbolic tracing
        raise TypeError(
            f"the analytic prediction needs a model that torch.fx can trace, and tracing "
            f"{type(module).__name__} failed ({type(err).__name__}: {err}); use the sampled "
            "prediction (kalmannorm.KalmanPredictor, or convert_batchnorm(..., "
            "prediction='sampled')), which runs any model"
        ) from err
    finally:
        for m, flag in flags:
            m.training = flag
    return fx.GraphModule(tracer.root, graph, class_name=type(module).__name__ + "Analytic")


def _check_no_hidden_layers(node: fx.Node, gm: fx.GraphModule) -> None:
    """Refuse a norm layer that runs child modules after normalizing (timm's BatchNormAct2d):
    they are inside the traced leaf, where no moment rule can follow them."""
    hidden = [f"{name} ({type(m).__name__})"
              for name, m in gm.get_submodule(node.target).named_children()
              if not isinstance(m, nn.Identity)]
    if hidden:
        raise NotImplementedError(
            f"the analytic prediction cannot follow the layers that {node.target!r} runs "
            f"after normalizing: {', '.join(hidden)}; use the sampled prediction "
            "(kalmannorm.KalmanPredictor, or convert_batchnorm(..., prediction='sampled')), "
            "which runs any layer"
        )


def _rewrite(gm: fx.GraphModule, is_kalman: Callable[[nn.Module], bool]) -> int:
    """Insert the moment nodes and replace every BKN call by :func:`_kalman_step`, in place.

    Returns the number of BKN layer calls.
    """
    graph = gm.graph

    def kalman(node: fx.Node) -> bool:
        return node.op == "call_module" and is_kalman(gm.get_submodule(node.target))

    # Nodes with a path to a BKN layer: only their moments are needed. An op after the last BKN
    # layer (a classifier head, say) needs no rule.
    feeds: set = set()
    for node in reversed(graph.nodes):
        if any(kalman(user) or user in feeds for user in node.users):
            feeds.add(node)
    moments: Dict[fx.Node, fx.Node] = {}
    state: Optional[fx.Node] = None
    count = 0
    for node in list(graph.nodes):
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if kalman(node):
            _check_no_hidden_layers(node, gm)
            x = _arg(node, 0, "input")
            if state is None:
                first = next(n for n in graph.nodes if n.op != "placeholder")
                with graph.inserting_before(first):
                    state = graph.get_attr("_kn_state")
            with graph.inserting_before(node):
                layer = graph.get_attr(node.target)
                step = graph.call_function(_kalman_step, (layer, state, x, moments.get(x)))
                y = graph.call_function(operator.getitem, (step, 0))
                if node in feeds:
                    moments[y] = graph.call_function(operator.getitem, (step, 1))
            node.replace_all_uses_with(y)
            graph.erase_node(node)
            count += 1
            continue
        if node not in feeds or not any(n in moments for n in node.all_input_nodes):
            continue  # no BKN layer upstream, or none downstream: no moments needed
        emit = _rule(node, gm)
        mv = None
        if emit is not None:
            try:
                with graph.inserting_before(node.next):
                    mv = emit(graph, node, moments)
            except _Unsupported:
                emit = None
        if emit is None:
            raise NotImplementedError(
                f"the analytic prediction has no moment rule for {_describe(node, gm)} (node "
                f"{node.name!r}), which receives the statistics of a BKN layer; supported: "
                f"{', '.join(supported_ops())}. Use the sampled prediction "
                "(kalmannorm.KalmanPredictor, or convert_batchnorm(..., prediction='sampled')), "
                "which runs any layer"
            )
        if mv is not None:
            moments[node] = mv
    graph.lint()
    return count


def check_analytic(module: nn.Module, *, concrete_args: Optional[Dict[str, Any]] = None) -> None:
    """Raise if the analytic prediction cannot follow ``module``, before any conversion.

    BatchNorm layers count as the BKN layers they would become, so ``convert_batchnorm`` can
    refuse a model before replacing its layers in place.
    """
    gm = _trace(module, concrete_args)
    gm.add_submodule("_kn_state", _PassState())
    _rewrite(gm, lambda m: isinstance(m, (_BatchNorm, _BatchKalmanNorm)))


class AnalyticKalmanPredictor(KalmanPredictor):
    r"""Carries the layer-to-layer prediction of BKN through a model in closed form.

    A drop-in alternative to the sampled :class:`KalmanPredictor` (method.md section 4, last
    paragraph): in training, every BKN layer receives as its prior the moments ``(mean, var)``,
    ``[S, C]``, of the previous BKN layer's combined statistics propagated through the layers in
    between by the rules of :mod:`kalmannorm.analytic`, for example across ``ReLU -> conv``::

        mean_pred = mean_relu @ (sum_space W)^T + b,   var_pred = var_relu @ (sum_space W^2)^T

    the expected value of the sampled prior (ignoring borders), without shadow rows: the cost is
    a few ``[S, C]`` matmuls per layer. Gradients flow through the moments into the previous
    layers, as through the sampled rows; a layer's ``detach_prior`` stops them. The first BKN
    layer of each path has no prior. In evaluation, or when no training BKN layer has a
    positive gain, the wrapper calls the model unchanged.

    The model is traced with :mod:`torch.fx` when the wrapper is built (in training mode;
    keyword arguments and nested outputs are kept); an op without a rule that receives moments,
    or a model fx cannot trace, raises then. Rebuild the wrapper after changing the model's
    structure.

    Args:
        module: the model, containing BKN layers and no other layer whose statistics span the
            batch in training (same rules as :class:`KalmanPredictor`).
        concrete_args: values fixed while tracing, passed to ``torch.fx.Tracer.trace`` (for a
            ``forward`` with control flow on a flag argument). Default: ``None``.

    Shape:
        Inputs and outputs are the wrapped model's; the batch size must be a multiple of the BKN
        layers' ``micro_batch``.

    >>> from kalmannorm import BatchKalmanNorm2d
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), BatchKalmanNorm2d(8, micro_batch=2), nn.ReLU(),
    ...                     nn.Conv2d(8, 8, 3), BatchKalmanNorm2d(8, micro_batch=2))
    >>> AnalyticKalmanPredictor(net)(torch.randn(4, 3, 8, 8)).shape
    torch.Size([4, 8, 4, 4])
    """

    def __init__(self, module: nn.Module, *, concrete_args: Optional[Dict[str, Any]] = None,
                 batch_input: BatchInput = None) -> None:
        super().__init__(module, batch_input=batch_input)
        self.concrete_args = concrete_args
        self._build()

    def _build(self) -> None:
        gm = _trace(self.module, self.concrete_args)
        state = _PassState()
        gm.add_submodule("_kn_state", state)
        _rewrite(gm, lambda m: isinstance(m, _BatchKalmanNorm))
        gm.recompile()
        # Not a registered submodule: it shares the model's layers, and the state dict stays
        # the model's, as KalmanPredictor's.
        object.__setattr__(self, "_traced", gm)
        object.__setattr__(self, "_state", state)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() may replace buffers the traced graph holds: trace again.
        result = super()._apply(fn, *args, **kwargs)
        self._build()
        return result

    def extra_repr(self) -> str:
        return f"micro_batch={self.micro_batch}, prediction='analytic'"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._predicting():
            return self.module(*args, **kwargs)
        rows, self._state.groups = self._start_pass(args, kwargs)  # reset at every pass
        if rows == 0:  # an empty batch: nothing to predict
            return self.module(*args, **kwargs)
        return self._traced(*args, **kwargs)
