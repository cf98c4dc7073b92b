"""A registry of the normalization layers compared in this project.

Every entry is a drop-in ``norm_layer(num_channels, **kw)`` (timm's convention: the channel count
comes first, GroupNorm included), so that models take ``norm_layer=`` and never hard-code a norm.
The names are the keys of the literal dict ``_NORM_MAP`` below; :func:`register_norm` adds more.

The per-sample baselines are GroupNorm with the channel count first, as compared in the
GroupNorm paper (Wu and He, "Group Normalization", ECCV 2018, section 3): :class:`GroupNorm1`
(one group; that paper's "LN" of conv maps) and :class:`InstanceGroupNorm` (one channel per
group; its "IN"). Their names say what they are, not the names of torch's differently built
``nn.LayerNorm`` and ``nn.InstanceNorm2d``.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Dict, Union

from torch import nn

from .baselines import EvoNormS0, FilterResponseNorm2d, MovingAverageBatchNorm2d, capped_groups
from .batchrenorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .modules import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d

__all__ = ["GroupNorm", "GroupNorm1", "InstanceGroupNorm", "get_norm_layer", "register_norm",
           "norm_names"]


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with the channel count first: ``GroupNorm(num_channels, num_groups=32)``.

    Normalizes each sample over groups of ``num_channels / num_groups`` channels and all
    positions; independent of the batch. The released CIFAR baseline uses 4 groups, the GroupNorm
    paper 32. ``cap_groups=True`` uses the largest divisor of ``num_channels`` that is at most
    ``num_groups`` (:func:`fit_groups`), so that 32 groups can be asked of a narrow network
    (layers of 8 channels get one channel per group, 48 get 24 groups).

    >>> GroupNorm(16, num_groups=4)(torch.randn(2, 16, 4, 4)).shape
    torch.Size([2, 16, 4, 4])
    >>> GroupNorm(8, cap_groups=True).num_groups
    8
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None, *,
                 cap_groups: bool = False) -> None:
        num_groups = capped_groups(num_channels, num_groups, cap_groups)
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        self.cap_groups = cap_groups


class GroupNorm1(GroupNorm):
    """GroupNorm with one group: each sample over all its channels and positions.

    Per sample ``n`` and channel ``c``, with ``mean`` and biased ``var`` over all channels and
    positions of sample ``n``::

        y[n, c] = weight[c] * (x[n, c] - mean[n]) / sqrt(var[n] + eps) + bias[c]

    This is the "LN" of conv maps in the GroupNorm paper (timm's ``GroupNorm1``). Unlike
    ``nn.LayerNorm`` it needs no ``normalized_shape`` and its affine is per channel, not per
    element. Registry name: ``"layernorm"``.

    Args:
        num_channels: ``C``.
        eps: added to the variance. Default: ``1e-5``.
        affine: learn ``weight`` and ``bias`` per channel. Default: ``True``.

    Shape:
        ``[N, C, *]`` in and out, any number of trailing dimensions.

    >>> GroupNorm1(16)(torch.randn(2, 16, 4, 4)).shape
    torch.Size([2, 16, 4, 4])
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(num_channels, 1, eps, affine, device, dtype)


class InstanceGroupNorm(GroupNorm):
    """GroupNorm with one channel per group: each sample and channel over its positions.

    Per sample ``n`` and channel ``c``, with ``mean`` and biased ``var`` over the positions of
    ``x[n, c]``::

        y[n, c] = weight[c] * (x[n, c] - mean[n, c]) / sqrt(var[n, c] + eps) + bias[c]

    This is the "IN" of the GroupNorm paper. It computes what ``nn.InstanceNorm2d(C,
    affine=True)`` computes, but keeps no running statistics, has the affine by default and takes
    inputs of any rank with positions. Registry name: ``"instancenorm"``.

    Args:
        num_channels: ``C``.
        eps: added to the variance. Default: ``1e-5``.
        affine: learn ``weight`` and ``bias`` per channel. Default: ``True``.

    Shape:
        ``[N, C, *]`` in and out, with at least one position per channel.

    >>> InstanceGroupNorm(16)(torch.randn(2, 16, 4, 4)).shape
    torch.Size([2, 16, 4, 4])
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(num_channels, num_channels, eps, affine, device, dtype)


def _ghost_batchnorm(bkn: type) -> Callable[..., nn.Module]:
    # BatchNorm over groups of micro_batch rows: BKN with no weight on the prediction.
    return functools.partial(bkn, gain=0.0)


def _with_conv_weights(factory: Callable[..., nn.Module], mode: str) -> Callable[..., nn.Module]:
    # A norm that needs standardized or centred convolution weights says so on its factory;
    # build_model applies kalmannorm.standardize_conv_weights(model, mode).
    declared = functools.partial(factory)
    declared.conv_weights = mode
    return declared


def _bind(factory: Callable[..., nn.Module], kw: dict) -> Callable[..., nn.Module]:
    """``factory`` with ``kw`` bound, keeping what the factory declares about itself.

    ``functools.partial`` drops the attributes of what it wraps (a partial's own, or a
    function's); they are copied over, and so is ``conv_weights`` of a class.
    """
    if not kw:
        return factory
    bound = functools.partial(factory, **kw)
    if not isinstance(factory, type):
        bound.__dict__.update(getattr(factory, "__dict__", {}))
    if getattr(factory, "conv_weights", None) is not None:
        bound.conv_weights = factory.conv_weights
    return bound


# Names are case-insensitive; an unsuffixed name is the 2d layer.
_NORM_MAP: Dict[str, Callable[..., nn.Module]] = {
    "batchnorm": nn.BatchNorm2d,
    "batchnorm1d": nn.BatchNorm1d,
    "batchnorm2d": nn.BatchNorm2d,
    "batchnorm3d": nn.BatchNorm3d,
    "ghost_batchnorm": _ghost_batchnorm(BatchKalmanNorm2d),
    "ghost_batchnorm1d": _ghost_batchnorm(BatchKalmanNorm1d),
    "ghost_batchnorm2d": _ghost_batchnorm(BatchKalmanNorm2d),
    "ghost_batchnorm3d": _ghost_batchnorm(BatchKalmanNorm3d),
    "batchrenorm": BatchRenorm2d,
    "batchrenorm1d": BatchRenorm1d,
    "batchrenorm2d": BatchRenorm2d,
    "batchrenorm3d": BatchRenorm3d,
    "bkn": BatchKalmanNorm2d,
    "bkn1d": BatchKalmanNorm1d,
    "bkn2d": BatchKalmanNorm2d,
    "bkn3d": BatchKalmanNorm3d,
    "batchkalmannorm": BatchKalmanNorm2d,
    "batchkalmannorm1d": BatchKalmanNorm1d,
    "batchkalmannorm2d": BatchKalmanNorm2d,
    "batchkalmannorm3d": BatchKalmanNorm3d,
    "groupnorm": GroupNorm,
    "layernorm": GroupNorm1,
    "instancenorm": InstanceGroupNorm,
    "groupnorm_ws": _with_conv_weights(GroupNorm, "standardize"),
    "frn": FilterResponseNorm2d,
    "evonorm_s0": EvoNormS0,
    "mabn": MovingAverageBatchNorm2d,
}


def register_norm(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register ``factory(num_channels, **kw)`` under ``name`` (case-insensitive).

    Raises:
        ValueError: if the name is taken.
    """
    key = name.lower()
    if key in _NORM_MAP:
        raise ValueError(f"a norm named {name!r} is already registered")
    _NORM_MAP[key] = factory


def norm_names() -> list:
    """The registered names, sorted.

    >>> "bkn" in norm_names()
    True
    """
    return sorted(_NORM_MAP)


def get_norm_layer(name_or_class: Union[str, Callable[..., nn.Module]], **kw) -> Callable:
    """Resolve a norm by name, class or ``functools.partial`` into ``norm_layer(num_channels)``.

    Names (case-insensitive; ``2d`` is the default rank, ``1d``/``3d`` suffixes pick others):
    ``batchnorm`` (full-batch statistics), ``ghost_batchnorm`` (BatchNorm over groups of
    ``micro_batch`` rows), ``groupnorm``, ``layernorm`` (:class:`GroupNorm1`), ``instancenorm``
    (:class:`InstanceGroupNorm`), ``batchrenorm``, ``bkn``; and, from :mod:`kalmannorm.baselines`,
    ``frn``, ``evonorm_s0``, ``mabn`` and ``groupnorm_ws`` (GroupNorm with standardized
    convolution weights). Keyword arguments are bound to the layer's constructor.

    A factory may declare ``conv_weights`` (``"standardize"`` for ``groupnorm_ws``, ``"center"``
    for ``mabn``): the convolution weights the norm needs, which
    ``kalmannorm.harness.models.build_model`` applies with
    :func:`~kalmannorm.baselines.standardize_conv_weights`. Binding keyword arguments keeps it.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
        TypeError: for something that is neither a name nor a callable.

    >>> norm_layer = get_norm_layer("bkn", gain=0.9, micro_batch=2)
    >>> norm_layer(16).gain
    0.9
    >>> get_norm_layer("groupnorm_ws", num_groups=4).conv_weights
    'standardize'
    """
    if isinstance(name_or_class, str):
        factory = _NORM_MAP.get(name_or_class.lower())
        if factory is None:
            raise ValueError(
                f"unknown norm {name_or_class!r}; valid names: {', '.join(norm_names())}"
            )
    elif callable(name_or_class):
        factory = name_or_class
    else:
        raise TypeError(
            f"norm must be a name, a class or a callable (got {type(name_or_class).__name__})"
        )
    return _bind(factory, kw)


# Old names, importable for one more release (0.1 shadowed torch's different classes).
_RENAMED = {"LayerNorm": GroupNorm1, "InstanceNorm": InstanceGroupNorm}


def _renamed(name: str, stacklevel: int) -> type:
    new = _RENAMED[name]
    warnings.warn(
        f"kalmannorm.{name} is deprecated and will be removed in the next release; use "
        f"kalmannorm.{new.__name__}, the same class (a GroupNorm, not torch.nn.{name})",
        DeprecationWarning, stacklevel=stacklevel,
    )
    return new


def __getattr__(name: str):
    if name in _RENAMED:
        return _renamed(name, stacklevel=3)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
