"""A registry of the normalization layers compared in this project.

Every entry is a drop-in ``norm_layer(num_channels, **kw)`` (timm's convention: the channel count
comes first, GroupNorm included), so that models take ``norm_layer=`` and never hard-code a norm.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Union

from torch import nn

from .batchrenorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .modules import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d

__all__ = ["GroupNorm", "LayerNorm", "InstanceNorm", "get_norm_layer", "register_norm",
           "norm_names"]


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with the channel count first: ``GroupNorm(num_channels, num_groups=32)``.

    Normalizes each sample over groups of ``num_channels / num_groups`` channels and all
    positions; independent of the batch. The released CIFAR baseline uses 4 groups.

    >>> GroupNorm(16, num_groups=4)(torch.randn(2, 16, 4, 4)).shape
    torch.Size([2, 16, 4, 4])
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)


class LayerNorm(GroupNorm):
    """Layer normalization of conv maps: each sample over all channels and positions.

    GroupNorm with one group, with a per-channel affine (Ba et al. 2016 as compared in the
    GroupNorm paper). Works for ``[N, C, *]`` inputs of any rank.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(num_channels, 1, eps, affine, device, dtype)


class InstanceNorm(GroupNorm):
    """Instance normalization: each sample and channel over its positions.

    GroupNorm with one channel per group and a per-channel affine; needs spatial positions.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(num_channels, num_channels, eps, affine, device, dtype)



_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register_norm(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register ``factory(num_channels, **kw)`` under ``name`` (case-insensitive)."""
    key = name.lower()
    if key in _REGISTRY:
        raise ValueError(f"a norm named {name!r} is already registered")
    _REGISTRY[key] = factory


def norm_names() -> list:
    """The registered names."""
    return sorted(_REGISTRY)


def get_norm_layer(name_or_class: Union[str, Callable[..., nn.Module]], **kw) -> Callable:
    """Resolve a norm by name, class or ``functools.partial`` into ``norm_layer(num_channels)``.

    Names (case-insensitive; ``2d`` is the default rank, ``1d``/``3d`` suffixes pick others):
    ``batchnorm`` (full-batch statistics), ``ghost_batchnorm`` (BatchNorm over groups of
    ``micro_batch`` rows), ``groupnorm``, ``layernorm``, ``instancenorm``, ``batchrenorm``,
    ``bkn``. Keyword arguments are bound to the layer's constructor.

    >>> norm_layer = get_norm_layer("bkn", gain=0.9, micro_batch=2)
    >>> norm_layer(16).gain
    0.9
    """
    if isinstance(name_or_class, str):
        factory = _REGISTRY.get(name_or_class.lower())
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
    return functools.partial(factory, **kw) if kw else factory


for _suffix, _bn, _brn, _bkn in (
    ("1d", nn.BatchNorm1d, BatchRenorm1d, BatchKalmanNorm1d),
    ("2d", nn.BatchNorm2d, BatchRenorm2d, BatchKalmanNorm2d),
    ("3d", nn.BatchNorm3d, BatchRenorm3d, BatchKalmanNorm3d),
):
    for _names, _factory in (
        (("batchnorm",), _bn),
        (("ghost_batchnorm",), functools.partial(_bkn, gain=0.0)),
        (("batchrenorm",), _brn),
        (("bkn", "batchkalmannorm"), _bkn),
    ):
        for _name in _names:
            register_norm(_name + _suffix, _factory)
            if _suffix == "2d":
                register_norm(_name, _factory)
for _name, _factory in (("groupnorm", GroupNorm), ("layernorm", LayerNorm),
                        ("instancenorm", InstanceNorm)):
    register_norm(_name, _factory)
