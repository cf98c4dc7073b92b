"""Model surgery: BatchNorm to Batch Kalman Normalization and back.

Shaped like ``nn.SyncBatchNorm.convert_sync_batchnorm``: a recursive walk that replaces layers,
sharing their parameters and buffers and keeping their training flag.
"""
from __future__ import annotations

import copy
from typing import Optional, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d, _BatchKalmanNorm
from .analytic import AnalyticKalmanPredictor, check_analytic
from .prediction import KalmanPredictor, check_rows_options

__all__ = ["convert_batchnorm", "to_batchnorm"]

_BKN_FOR = {
    nn.BatchNorm1d: BatchKalmanNorm1d,
    nn.BatchNorm2d: BatchKalmanNorm2d,
    nn.BatchNorm3d: BatchKalmanNorm3d,
    nn.SyncBatchNorm: BatchKalmanNorm2d,
}


def _transplant(old: nn.Module, new: nn.Module) -> nn.Module:
    """Share ``old``'s parameters and running buffers with ``new``, keep its training flag."""
    if old.affine:
        new.weight, new.bias = old.weight, old.bias
    if old.track_running_stats:
        new.running_mean = old.running_mean
        new.running_var = old.running_var
        new.num_batches_tracked = old.num_batches_tracked
    new.train(old.training)
    return new


def _device_of(module: nn.Module) -> dict:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return {} if tensor is None else {"device": tensor.device}


def _replace(module: nn.Module, make) -> tuple:
    """Return ``(module', count)`` with every layer that ``make`` maps replaced, recursively."""
    new = make(module)
    if new is not None:
        return new, 1
    count = 0
    for name, child in module.named_children():
        new_child, n = _replace(child, make)
        if new_child is not child:
            module.add_module(name, new_child)
        count += n
    return module, count


def convert_batchnorm(
    module: nn.Module,
    *,
    gain: float = 0.9,
    micro_batch: Optional[int] = None,
    guard_threshold: float = 100.0,
    detach_prior: bool = False,
    propagate: str = "normalized",
    running_stats: str = "all",
    guard: str = "upper",
    gain_rule: str = "kalman",
    gain_warmup: int = 0,
    rows_per_group: Union[int, str, None] = None,
    min_prior_values: int = 16,
    generator: Optional[torch.Generator] = None,
    prediction: str = "sampled",
) -> KalmanPredictor:
    """Replace every BatchNorm of ``module`` with Batch Kalman Normalization, in place.

    ``nn.BatchNorm1d/2d/3d`` become :class:`BatchKalmanNorm1d/2d/3d` (``nn.SyncBatchNorm``
    becomes :class:`BatchKalmanNorm2d`: BKN keeps each device's micro-batch statistics),
    sharing the parameters and running buffers and keeping the training flag, so an optimizer
    built before the conversion still holds the right parameters. The result is wrapped in a
    :class:`KalmanPredictor`, which carries the prediction from layer to layer.

    Args:
        module: a model holding at least one BatchNorm layer.
        gain, micro_batch, guard_threshold, detach_prior, propagate, running_stats, guard,
            gain_rule, gain_warmup: options of every new layer, see :class:`BatchKalmanNorm2d`.
        rows_per_group, min_prior_values, generator: options of the :class:`KalmanPredictor`
            (``rows_per_group="auto"`` picks the shadow rows from the smallest map).
        prediction: ``"sampled"`` (shadow rows, :class:`KalmanPredictor`) or ``"analytic"``
            (moments in closed form, :class:`~kalmannorm.analytic.AnalyticKalmanPredictor`;
            a model it cannot follow is refused before any layer is replaced). Default:
            ``"sampled"``.

    Returns:
        The :class:`KalmanPredictor` (or its analytic subclass) around the converted model.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> type(convert_batchnorm(net, gain=0.9, micro_batch=2).module[1]).__name__
    'BatchKalmanNorm2d'
    """
    if isinstance(module, KalmanPredictor):
        raise TypeError("the module is already a KalmanPredictor; convert its .module instead")
    if prediction not in ("sampled", "analytic"):
        raise ValueError(f"prediction must be 'sampled' or 'analytic' (got {prediction!r})")
    if prediction == "analytic":
        if rows_per_group is not None or generator is not None:
            raise ValueError("rows_per_group and generator apply to prediction='sampled' only")
        check_analytic(module)
    else:
        check_rows_options(rows_per_group, min_prior_values)
    options = dict(
        gain=gain, micro_batch=micro_batch, guard_threshold=guard_threshold,
        detach_prior=detach_prior, propagate=propagate, running_stats=running_stats,
        guard=guard, gain_rule=gain_rule, gain_warmup=gain_warmup,
    )

    def make(layer: nn.Module) -> Optional[nn.Module]:
        if not isinstance(layer, _BatchNorm) or isinstance(layer, _BatchKalmanNorm):
            return None
        cls = _BKN_FOR.get(type(layer))
        if cls is None:
            raise TypeError(
                f"cannot convert {type(layer).__name__}; supported: "
                f"{[c.__name__ for c in _BKN_FOR]}"
            )
        new = cls(
            layer.num_features, layer.eps, layer.momentum, layer.affine,
            layer.track_running_stats, **_device_of(layer), **options,
        )
        return _transplant(layer, new)

    converted, count = _replace(module, make)
    if count == 0:
        raise ValueError(
            f"found no BatchNorm layer to convert in {type(module).__name__}; "
            "build the model with a BatchNorm norm_layer or use BatchKalmanNorm layers directly"
        )
    if prediction == "analytic":
        return AnalyticKalmanPredictor(converted)
    return KalmanPredictor(converted, rows_per_group=rows_per_group, generator=generator,
                           min_prior_values=min_prior_values)


def to_batchnorm(module: nn.Module) -> nn.Module:
    """A deployable copy of ``module`` with plain BatchNorm in place of every BKN layer.

    Every :class:`KalmanPredictor` is unwrapped and every BKN layer becomes the matching
    ``nn.BatchNorm1d/2d/3d`` with a copy of its parameters and running statistics. Since an
    evaluation-mode BKN layer *is* BatchNorm with its running statistics, the eval outputs of the
    copy are bit-for-bit those of ``module``; it exports (``torch.export``, ONNX) and folds into
    convolutions like any BatchNorm model. ``module`` itself is left untouched.

    >>> bkn = convert_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    >>> type(to_batchnorm(bkn)[1]).__name__
    'BatchNorm2d'
    """
    module = copy.deepcopy(module)

    def make(layer: nn.Module) -> Optional[nn.Module]:
        if isinstance(layer, KalmanPredictor):
            return _replace(layer.module, make)[0]
        if isinstance(layer, _BatchKalmanNorm):
            new = layer._bn_class(
                layer.num_features, layer.eps, layer.momentum, layer.affine,
                layer.track_running_stats, **_device_of(layer),
            )
            return _transplant(layer, new)
        return None

    return _replace(module, make)[0]
