"""The normalizers a user would pick instead of BKN for micro-batches, as registry entries.

- :class:`FilterResponseNorm2d`: Filter Response Normalization with its Thresholded Linear Unit
  (Singh and Krishnan, "Filter Response Normalization Layer", CVPR 2020, arXiv 1911.09737);
- :class:`EvoNormS0`: EvoNorm-S0 (Liu et al., "Evolving Normalization-Activation Layers",
  NeurIPS 2020, arXiv 2004.02967);
- :func:`standardize_conv_weights`: Weight Standardization (Qiao et al., "Micro-Batch Training
  with Batch-Channel Normalization and Weight Standardization", arXiv 1903.10520) of every
  convolution of any model, or the weight centring that MABN needs;
- :class:`MovingAverageBatchNorm2d`: MABN (Yan et al., "Towards Stabilizing Batch Statistics in
  Backward Propagation of Batch Normalization", ICLR 2020; code ``megvii-model/MABN``).

FRN and EvoNorm-S0 are per sample: their output for a row depends on that row only. MABN keeps
statistics per group of ``micro_batch`` rows, faithful to separate devices (see its docstring).
A norm declares the convolution weights it needs by a ``conv_weights`` attribute on its factory
(``"standardize"`` or ``"center"``); ``kalmannorm.harness.models.build_model`` applies it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .functional import group_affine, stat_dtype
from .modules import _GroupedNorm

__all__ = ["fit_groups", "capped_groups", "FilterResponseNorm2d", "EvoNormS0",
           "MovingAverageBatchNorm2d", "standardize_conv_weights", "fold_conv_weights",
           "CONV_WEIGHT_MODES"]

CONV_WEIGHT_MODES = ("standardize", "center")


def fit_groups(num_channels: int, num_groups: int) -> int:
    """The largest number of groups, at most ``num_groups``, that divides ``num_channels``.

    >>> fit_groups(48, 32), fit_groups(64, 32), fit_groups(8, 32)
    (24, 32, 8)
    """
    return max(g for g in range(1, min(num_groups, num_channels) + 1) if num_channels % g == 0)


def capped_groups(num_channels: int, num_groups: int, cap_groups: bool) -> int:
    """``num_groups``, or with ``cap_groups`` the :func:`fit_groups` of it; ``cap_groups`` must
    be a bool (a string such as ``"False"`` would read as true)."""
    if not isinstance(cap_groups, bool):
        raise ValueError(f"cap_groups must be a bool (got {cap_groups!r}); on the command line "
                         "write it as JSON: cap_groups=true")
    return fit_groups(num_channels, num_groups) if cap_groups else num_groups


def _check_channels(num_channels) -> int:
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(f"num_channels must be a positive int (got {num_channels!r})")
    return num_channels


def _check_input_4d(layer: nn.Module, x: Tensor, channels: int) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{type(layer).__name__} expected a floating-point tensor (got {got}); "
                        "convert it first, e.g. x.float()")
    if x.dim() != 4:
        raise ValueError(f"{type(layer).__name__} expected 4D input [N, C, H, W] (got "
                         f"{x.dim()}D input); reshape it, e.g. x[:, :, None, None] for [N, C]")
    if x.shape[1] != channels:
        raise ValueError(f"expected input with {channels} channels (got {x.shape[1]})")


def _channel(p: Tensor, dtype: torch.dtype) -> Tensor:
    return p.to(dtype).view(1, -1, 1, 1)


class FilterResponseNorm2d(nn.Module):
    r"""Filter Response Normalization followed by its Thresholded Linear Unit (FRN + TLU).

    Per sample ``n`` and channel ``c``, with ``nu2`` the mean of ``x^2`` over the positions of
    ``x[n, c]`` (no mean is subtracted)::

        y = max(weight * x / sqrt(nu2 + |eps|) + bias, tau)

    Singh and Krishnan 2020, equations 1 to 3 and their listing (``tf.abs(eps)``). The layer
    replaces a norm *and* the activation after it; it depends on no other sample. Statistics are
    float32 for lower-precision inputs; the output has the input's dtype. timm's
    ``FilterResponseNormTlu2d`` computes the same (its default ``eps`` is ``1e-5``).

    Args:
        num_channels: ``C``.
        eps: added to ``nu2``; the paper's 1e-6. Default: ``1e-6``.
        learnable_eps: add a learned per-channel ``|eps_learned|`` (initialised at 1e-4) to
            ``eps``, which stays a lower bound; the paper's remedy for maps with few positions
            (1x1), where a fixed ``eps`` makes the layer close to ``sign(x)``. Default: ``False``.

    Shape:
        ``[N, C, H, W]`` in and out.

    >>> FilterResponseNorm2d(8)(torch.randn(2, 8, 4, 4)).shape
    torch.Size([2, 8, 4, 4])
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, learnable_eps: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_channels = _check_channels(num_channels)
        if not float(eps) >= 0:
            raise ValueError(f"eps must be >= 0 (got {eps})")
        self.eps = float(eps)
        dd = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_channels, **dd))
        self.bias = nn.Parameter(torch.zeros(num_channels, **dd))
        self.tau = nn.Parameter(torch.zeros(num_channels, **dd))
        self.eps_learned = (nn.Parameter(torch.full((num_channels,), 1e-4, **dd))
                            if learnable_eps else None)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, eps={self.eps}, "
                f"learnable_eps={self.eps_learned is not None}")

    def forward(self, x: Tensor) -> Tensor:
        _check_input_4d(self, x, self.num_channels)
        dtype = stat_dtype(x.dtype)
        xs = x.to(dtype)
        eps = abs(self.eps)
        if self.eps_learned is not None:
            eps = eps + _channel(self.eps_learned, dtype).abs()
        nu2 = xs.square().mean(dim=(2, 3), keepdim=True)
        y = xs * torch.rsqrt(nu2 + eps) * _channel(self.weight, dtype) + _channel(self.bias, dtype)
        return torch.maximum(y, _channel(self.tau, dtype)).to(x.dtype)


class EvoNormS0(nn.Module):
    r"""EvoNorm-S0: a sample-based normalization-activation layer found by search.

    Per sample ``n``, with ``std`` the standard deviation (biased, ``eps`` inside the square
    root) over the channels of ``c``'s group and all positions of ``x[n]``::

        y = x * sigmoid(v * x) / sqrt(var_group + eps) * weight + bias

    Liu et al. 2020, table 1 (S0). Replaces a norm and the activation after it; depends on no
    other sample. Statistics are float32 for lower-precision inputs. timm's ``EvoNorm2dS0``
    computes the same.

    Args:
        num_channels: ``C``; must be a multiple of ``num_groups``.
        num_groups: groups of channels sharing a standard deviation. Default: 32.
        eps: added to the group variance. Default: ``1e-5``.
        cap_groups: use the largest divisor of ``C`` that is at most ``num_groups``, as
            :class:`~kalmannorm.GroupNorm` does, for narrow networks. Default: ``False``.

    Shape:
        ``[N, C, H, W]`` in and out.

    >>> EvoNormS0(16, num_groups=4)(torch.randn(2, 16, 4, 4)).shape
    torch.Size([2, 16, 4, 4])
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5,
                 device=None, dtype=None, *, cap_groups: bool = False) -> None:
        super().__init__()
        self.num_channels = _check_channels(num_channels)
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int (got {num_groups!r})")
        num_groups = capped_groups(num_channels, num_groups, cap_groups)
        self.cap_groups = cap_groups
        if num_channels % num_groups:
            raise ValueError(f"{num_channels} channels do not split into num_groups={num_groups}"
                             "; pass a num_groups that divides the channel count")
        if not float(eps) > 0:
            raise ValueError(f"eps must be > 0 (got {eps})")
        self.num_groups, self.eps = num_groups, float(eps)
        dd = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_channels, **dd))
        self.bias = nn.Parameter(torch.zeros(num_channels, **dd))
        self.v = nn.Parameter(torch.ones(num_channels, **dd))

    def extra_repr(self) -> str:
        return f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        _check_input_4d(self, x, self.num_channels)
        dtype = stat_dtype(x.dtype)
        xs = x.to(dtype)
        # [N, G, C / G, H, W]: splitting the channel dimension is a view in either memory
        # layout, so the output keeps the input's
        grouped = xs.unflatten(1, (self.num_groups, -1))
        within = tuple(range(2, grouped.dim()))
        var = grouped.var(dim=within, unbiased=False, keepdim=True)
        act = xs * torch.sigmoid(xs * _channel(self.v, dtype))
        y = (act.unflatten(1, (self.num_groups, -1)) * torch.rsqrt(var + self.eps)).flatten(1, 2)
        return (y * _channel(self.weight, dtype) + _channel(self.bias, dtype)).to(x.dtype)


class _ConvWeight(nn.Module):
    """The parametrization of :func:`standardize_conv_weights`: a convolution weight centred (and
    divided by its standard deviation) per output channel, over input channels and kernel."""

    def __init__(self, mode: str, eps: float) -> None:
        super().__init__()
        self.mode, self.eps = mode, eps

    def forward(self, weight: Tensor) -> Tensor:
        # reduced over every dimension but the first, with no reshape: the result keeps the
        # weight's memory layout (a channels-last weight makes a channels-last convolution)
        fan_in = tuple(range(1, weight.dim()))
        w = weight.to(stat_dtype(weight.dtype))
        w = w - w.mean(dim=fan_in, keepdim=True)
        if self.mode == "standardize":
            w = w * torch.rsqrt(w.square().mean(dim=fan_in, keepdim=True) + self.eps)
        return w.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, eps={self.eps}"


def standardize_conv_weights(model: nn.Module, mode: str = "standardize",
                             eps: float = 1e-6) -> nn.Module:
    r"""Reparametrize the weight of every ``nn.Conv1d/2d/3d`` of ``model``, in place.

    Per output channel ``o``, over the input channels and kernel positions of ``W[o]``, with
    ``mean`` and biased ``var`` of them:

    - ``"standardize"`` (Weight Standardization, Qiao et al. 2019):
      ``W[o] = (W[o] - mean) / sqrt(var + eps)``, timm's ``StdConv2d`` convention (the paper's
      code divides by the unbiased standard deviation plus ``eps``);
    - ``"center"`` (MABN's weight centring): ``W[o] = W[o] - mean``.

    Done by ``torch.nn.utils.parametrize``, so it works on any model: the parameter is
    ``conv.parametrizations.weight.original`` (in the state dict too), and ``conv.weight`` is the
    standardized weight, recomputed at each use. Convolutions that already have a weight
    parametrization are left alone, so a second call changes nothing. Such a model saves and
    loads by ``state_dict``; :func:`fold_conv_weights` turns it back into plain convolutions.

    Args:
        model: any module; its convolutions are found by ``named_modules``.
        mode: ``"standardize"`` or ``"center"``. Default: ``"standardize"``.
        eps: added to the variance (``"standardize"`` only). Default: ``1e-6``.

    Returns:
        ``model``.

    Raises:
        ValueError: for an unknown mode, or a convolution with one weight per output channel
            (a 1x1 depthwise one), which standardization or centring would set to zero.

    >>> net = standardize_conv_weights(nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8)))
    >>> w = net[0].weight.flatten(1)
    >>> bool(w.mean(1).abs().max() < 1e-6), bool((w.var(1, unbiased=False) - 1).abs().max() < 1e-3)
    (True, True)
    """
    if mode not in CONV_WEIGHT_MODES:
        raise ValueError(f"mode must be one of {CONV_WEIGHT_MODES} (got {mode!r})")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (got {type(model).__name__})")
    convs = [(name, m) for name, m in model.named_modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
             and not parametrize.is_parametrized(m, "weight")]
    for name, conv in convs:
        if conv.weight[0].numel() == 1:
            raise ValueError(
                f"convolution {name!r} has one weight per output channel; {mode} would zero it. "
                "Parametrize the other convolutions by hand with this function on submodules")
    for _, conv in convs:
        parametrize.register_parametrization(conv, "weight", _ConvWeight(mode, float(eps)))
    return model


def fold_conv_weights(model: nn.Module) -> nn.Module:
    """Undo :func:`standardize_conv_weights` in place, keeping the standardized weights.

    Every convolution it parametrized becomes a plain one whose ``weight`` is the standardized
    (or centred) weight of now: outputs are unchanged and the model pickles, exports and loads
    into a model without the parametrization. For deployment, after training.

    Returns:
        ``model``.

    >>> net = standardize_conv_weights(nn.Sequential(nn.Conv2d(3, 8, 3)))
    >>> sorted(fold_conv_weights(net).state_dict())
    ['0.bias', '0.weight']
    """
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight") and any(
                isinstance(p, _ConvWeight) for p in m.parametrizations.weight):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


GROUP_LAYOUTS = ("devices", "sequential")


def _window_means(history: Tensor, current: Tensor, layout: str) -> Tuple[Tensor, Tensor]:
    """MABN's simple moving averages: each group's mean over its window of ``k`` values
    (``history``: the ``k - 1`` values before this step, oldest first; ``current``: ``[S, C]``),
    and the history the next step starts with.

    ``"devices"``: group ``s``'s window is group 0's past values and its own current one; the
    next history appends group 0's. ``"sequential"``: the groups are successive micro-batches
    of one device; group ``s``'s window is the ``k`` values ending with it in the sequence
    ``history, current[0], ..., current[S - 1]``, and the next history is that sequence's last
    ``k - 1``."""
    k = history.shape[0] + 1
    if layout == "devices":
        return (history.sum(dim=0) + current) / k, torch.cat([history[1:], current[:1]])
    sequence = torch.cat([history, current])  # [k - 1 + S, C]
    windows = sequence.unfold(0, k, 1)  # [S, C, k]: window s is sequence[s : s + k]
    return windows.sum(dim=-1) / k, sequence[sequence.shape[0] - (k - 1):]


class _MovingAverageNormFunction(torch.autograd.Function):
    """``y = x * scale[s] + bias`` forward; MABN's smoothed backward (see the module)."""

    @staticmethod
    def forward(ctx, x, weight, bias, inv_std, r, psi_history, use_average, groups, layout):
        scale = inv_std * r  # [S, C]
        shift = torch.zeros_like(scale)
        if weight is not None:
            scale = scale * weight.to(scale.dtype)
        if bias is not None:
            shift = shift + bias.to(scale.dtype)
        ctx.save_for_backward(x, weight, inv_std, r, use_average)
        ctx.psi_history, ctx.groups, ctx.layout = psi_history, groups, layout
        ctx.has_bias = bias is not None
        return group_affine(x, scale, shift)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, inv_std, r, use_average = ctx.saved_tensors
        groups, channels = inv_std.shape
        dtype = inv_std.dtype
        rows = (groups, -1, channels, x[0, 0].numel())
        xs = x.to(dtype).reshape(rows)
        dys = dy.to(dtype).reshape(rows)
        z = xs * inv_std[:, None, :, None]  # [S, m, C, L]
        gain = r if weight is None else r * weight.to(dtype)
        g = dys * gain[:, None, :, None]
        psi = (g * z).mean(dim=(1, 3))  # [S, C]
        history = ctx.psi_history
        average, following = _window_means(history.to(dtype), psi, ctx.layout)
        psi_used = torch.where(use_average, average, psi)
        dx = (g - z * psi_used[:, None, :, None]) * inv_std[:, None, :, None]
        if history.shape[0]:
            history.copy_(following)
        dweight = dbias = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (dys * z * r[:, None, :, None]).sum(dim=(0, 1, 3)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dys.sum(dim=(0, 1, 3)).to(dy.dtype)
        return dx.reshape(x.shape).to(x.dtype), dweight, dbias, None, None, None, None, None, None


class MovingAverageBatchNorm2d(_GroupedNorm):
    r"""Moving Average Batch Normalization (MABN, Yan et al., ICLR 2020) over ``[N, C, H, W]``.

    Training, per statistics group ``s`` (``micro_batch`` contiguous rows) and channel, at step
    ``t`` (``num_batches_tracked``), with ``k = window``. Forward::

        chi_s = mean over the group's rows and positions of x^2      (no mean is subtracted)
        xi_s  = (chi_0[t-k+1] + ... + chi_0[t-1] + chi_s) / k       (simple moving average)
        z     = x / sqrt(xi_s + eps)
        r     = sg(clamp(sqrt(xi_s + eps) / sqrt(running_var + eps), 1 / r_max, r_max))
        y     = weight * r * z + bias

    and a backward that smooths the gradient's batch statistic the same way, in place of the
    true gradient (which would flow through ``xi_s``)::

        g     = weight * r * dL/dy
        psi_s = mean over the group's rows and positions of g * z
        Psi_s = (psi_0[t-k+1] + ... + psi_0[t-1] + psi_s) / k
        dL/dx = (g - z * Psi_s) / sqrt(xi_s + eps)

    then ``running_var <- (1 - momentum) * running_var + momentum * xi_0``. Until
    ``t >= max(warmup_iters, window - 1)`` (the history is full) the averages are the current
    ``chi_s``, ``psi_s`` alone; until ``t >= r_warmup_iters``, ``r = 1``. With ``window=1`` the
    backward is the true gradient of ``weight * r * x / sqrt(chi_s + eps) + bias`` with ``r``
    held constant.

    **Faithful to separate devices.** Group ``s`` stands for a device holding those rows alone.
    Under DDP (``broadcast_buffers=True``) every rank starts each forward with rank 0's buffers,
    so the buffers (the past ``chi``, past ``psi``, ``running_var``) are updated from group 0
    only, and group ``s`` uses that history with its own current ``chi_s``, ``psi_s``. Group 0's
    outputs and input gradients do not depend on the other groups' rows, to the bit.

    **One device's successive micro-batches** (``group_layout="sequential"``). The released
    ImageNet code (``cls/networks/MABN.py`` of ``megvii-model/MABN``, which produced the
    published normalization-batch-2 results) instead treats the groups of a device's batch as a
    sequence, as if one device ran them one after another under gradient accumulation: group
    ``s``'s window holds the ``k`` statistics ending with its own in the sequence (the last
    groups of the previous step, then groups ``0 .. s`` of this one), so it reads the earlier
    groups of the same step; the next step's history is the sequence's last ``k - 1`` values,
    in the forward (``chi``) and the backward (``psi``) alike; the history is full after
    ``ceil((k - 1) / S)`` steps; and ``running_var`` follows the mean of the groups' ``xi``, as
    the released code's does. Group ``s`` never reads a later group. Its window therefore holds
    mostly statistics of the current weights, where the devices' layout holds ``k - 1`` past
    steps' statistics; with ``k`` equal to the number of groups (the released setting) it is
    the released code's ``sta_matrix`` average. To train with real gradient accumulation (one
    forward and backward per micro-batch) use the default layout with ``micro_batch=None``: its
    windows over the previous forwards are the same (tested); ``warmup_iters`` and
    ``r_warmup_iters`` then count forwards, and ``running_var`` moves at each forward.

    Evaluation: ``y = weight * x / sqrt(running_var + eps) + bias``, i.e. ``F.batch_norm`` with
    ``running_mean`` zero. ``running_var`` is thus a running average of ``E[x^2]`` (of ``xi``),
    not of a variance: no mean is subtracted anywhere. ``running_mean`` stays zero so that the
    state dict loads into ``nn.BatchNorm2d`` (``strict=False``: the layer has the two history
    buffers more) for deployment.

    MABN replaces mean subtraction by centred convolution weights: the registry entry ``"mabn"``
    (and this class) declare ``conv_weights = "center"``, which ``build_model`` applies with
    :func:`standardize_conv_weights`; apply it yourself to other models.

    Defaults are the released code's (``megvii-model/MABN``, ``MABN2d``): its ``momentum=0.98``
    weighs the *old* value, here 0.02 weighs the new one as in BatchNorm; ``window`` is its
    ``real_B / B``, 16 for its ImageNet setting (normalization batch 2, SGD batch 32 per GPU);
    ``warmup_iters=100``; ``r`` fixed to 1 for the first 1000 iterations, then clipped to
    ``[1/5, 5]``. The released code also waits for a full window; its step count starts at 1.

    Args:
        num_features: ``C``.
        eps: added to ``xi`` and ``running_var``. Default: ``1e-5``.
        momentum: weight of ``xi_0`` in ``running_var``, in ``(0, 1]``. Default: ``0.02``.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        window: ``k``, the iterations in the moving averages, the current one included.
            Default: 16.
        warmup_iters: steps that use the current statistics alone. Default: 100.
        r_warmup_iters: steps with ``r = 1``. Default: 1000.
        r_max: the clip of ``r`` after them, at least 1. Default: 5.
        micro_batch: rows per statistics group; ``None`` for the whole batch. Default: ``None``.
        group_layout: ``"devices"`` (each group a separate device) or ``"sequential"`` (one
            device's successive micro-batches, as the released ImageNet code). Default:
            ``"devices"``.

    Shape:
        ``[N, C, H, W]`` in and out, ``N`` a multiple of ``micro_batch``; statistics float32.

    >>> m = MovingAverageBatchNorm2d(8, window=4, micro_batch=2)
    >>> m(torch.randn(6, 8, 4, 4)).shape, m.chi_history.shape
    (torch.Size([6, 8, 4, 4]), torch.Size([3, 8]))
    """

    _input_dims = (4,)
    conv_weights = "center"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.02,
                 affine: bool = True, device=None, dtype=None, *, window: int = 16,
                 warmup_iters: int = 100, r_warmup_iters: int = 1000, r_max: float = 5.0,
                 micro_batch: Optional[int] = None, group_layout: str = "devices") -> None:
        for name, value, low in (("window", window, 1), ("warmup_iters", warmup_iters, 0),
                                 ("r_warmup_iters", r_warmup_iters, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low} (got {value!r})")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (
                0 < momentum <= 1):
            raise ValueError(f"momentum must be a number in (0, 1] (got {momentum!r}); "
                             "MABN keeps no cumulative average")
        if not float(r_max) >= 1:
            raise ValueError(f"r_max must be >= 1 (got {r_max})")
        if group_layout not in GROUP_LAYOUTS:
            raise ValueError(f"group_layout must be one of {GROUP_LAYOUTS} (got {group_layout!r})"
                             ": 'devices' for groups on separate devices, 'sequential' for one "
                             "device's successive micro-batches (gradient accumulation)")
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, micro_batch)
        self.window, self.warmup_iters = window, warmup_iters
        self.r_warmup_iters, self.r_max = r_warmup_iters, float(r_max)
        self.group_layout = group_layout
        stat = stat_dtype(dtype or torch.get_default_dtype())
        # the k - 1 values before this step: group 0's (devices), the sequence's (sequential)
        for name in ("chi_history", "psi_history"):
            self.register_buffer(name, torch.zeros(window - 1, num_features, device=device,
                                                   dtype=stat))

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        for name in ("chi_history", "psi_history"):
            if hasattr(self, name):
                getattr(self, name).zero_()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, window={self.window}, warmup_iters={self.warmup_iters}"
                f", r_warmup_iters={self.r_warmup_iters}, r_max={self.r_max}, "
                f"micro_batch={self.micro_batch}, group_layout={self.group_layout!r}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        if x.shape[0] == 0:
            return self._empty_output(x)
        groups = self._groups(x.shape[0])
        step = self.num_batches_tracked
        with torch.no_grad():
            rows = x.detach().to(stat_dtype(x.dtype)).reshape(groups, -1, self.num_features,
                                                              x[0, 0].numel())
            chi = rows.square().mean(dim=(1, 3))  # [S, C]
            average, following = _window_means(self.chi_history.to(chi.dtype), chi,
                                               self.group_layout)
            # the history is full after k - 1 steps (devices: one value a step) or after
            # ceil((k - 1) / S) steps (sequential: S values a step)
            fill = -(-(self.window - 1) // groups) if self.group_layout == "sequential" else \
                self.window - 1
            use_average = step >= max(self.warmup_iters, fill)
            xi = torch.where(use_average, average, chi)
            running_std = (self.running_var.to(chi.dtype) + self.eps).sqrt()
            r = ((xi + self.eps).sqrt() / running_std).clamp(1 / self.r_max, self.r_max)
            r = torch.where(step >= self.r_warmup_iters, r, torch.ones_like(r))
            inv_std = torch.rsqrt(xi + self.eps)
        y = _MovingAverageNormFunction.apply(x, self.weight, self.bias, inv_std, r,
                                             self.psi_history, use_average, groups,
                                             self.group_layout)
        with torch.no_grad():  # the buffers after their use
            if self.window > 1:
                self.chi_history.copy_(following)
            seen = xi[0] if self.group_layout == "devices" else xi.mean(dim=0)
            self.running_var.lerp_(seen.to(self.running_var.dtype), self.momentum)
            step.add_(1)
        return y
