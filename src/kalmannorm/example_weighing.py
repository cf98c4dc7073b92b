"""Inference example weighing: at evaluation, each example's own statistics mixed into the
population statistics of every BatchNorm-shaped layer (Summers & Dinneen, ICLR 2020, "Four
things everyone should know to improve batch normalization"; EvalNorm is a learned variant).

A network trained with statistics over tiny groups has learned to see features normalized by
noisy, example-dependent statistics; the running averages that evaluation uses remove that
dependence, a train/test mismatch. Weighing the example back in, per channel::

    mu  = alpha * mean_x(x)   + (1 - alpha) * running_mean
    m2  = alpha * mean_x(x^2) + (1 - alpha) * (running_var + running_mean^2)
    var = m2 - mu^2

(``mean_x`` over the example's own positions) narrows the mismatch without retraining.
``alpha`` is chosen on held-out data; ``alpha = 0`` is ordinary evaluation.

The mechanism is one forward pre-hook per layer that maps the input to the one on which the
layer's own evaluation (BatchNorm with its running statistics) gives the weighed
normalization, so layers that do more after normalizing (timm's ``BatchNormAct2d``, this
library's ``BatchKalmanNormAct2d``) keep doing it. Training is unaffected.
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor, nn

from .baselines import MovingAverageBatchNorm2d

__all__ = ["weigh_examples", "ExampleWeighing"]


def _weighable(module: nn.Module) -> bool:
    """A layer whose evaluation is BatchNorm with its running statistics over dimension 1."""
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.modules.instancenorm import _InstanceNorm

    return (isinstance(module, _NormBase)
            and not isinstance(module, (MovingAverageBatchNorm2d, _InstanceNorm))
            and getattr(module, "track_running_stats", False)
            and isinstance(getattr(module, "running_mean", None), Tensor)
            and isinstance(getattr(module, "running_var", None), Tensor))


class ExampleWeighing:
    """The hooks :func:`weigh_examples` installed: ``remove()`` them, or use as a context
    manager. ``layers`` names the weighed layers."""

    def __init__(self, model: nn.Module, alpha: float) -> None:
        self.alpha = alpha
        self.layers: List[str] = []
        self._handles = []
        for name, module in model.named_modules():
            if _weighable(module):
                self.layers.append(name)
                self._handles.append(module.register_forward_pre_hook(self._pre_hook))

    def _pre_hook(self, module: nn.Module, args):
        if module.training or self.alpha == 0 or not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        if x.dim() < 2 or x.shape[1] != module.running_mean.numel() or x.shape[0] == 0:
            return None  # the layer's own checks speak
        alpha = self.alpha
        dims = tuple(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xf = x.float()
        mean_p = module.running_mean.float().reshape(shape)
        var_p = module.running_var.float().reshape(shape)
        mean_x = xf.mean(dims, keepdim=True) if dims else xf
        m2_x = (xf * xf).mean(dims, keepdim=True) if dims else xf * xf
        mean = alpha * mean_x + (1 - alpha) * mean_p
        var = (alpha * m2_x + (1 - alpha) * (var_p + mean_p * mean_p) - mean * mean).clamp_min(0)
        eps = module.eps
        # the input whose normalization by (mean_p, var_p) is x's normalization by (mean, var)
        mapped = mean_p + (xf - mean) * torch.sqrt((var_p + eps) / (var + eps))
        return (mapped.to(x.dtype),) + tuple(args[1:])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "ExampleWeighing":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def weigh_examples(model: nn.Module, alpha: float) -> ExampleWeighing:
    """Mix each example's own statistics into the population statistics of every
    BatchNorm-shaped layer of ``model`` at evaluation (see the module docstring).

    Acts on every layer that normalizes by its running statistics in evaluation:
    ``nn.BatchNorm*``, ``SyncBatchNorm`` and their subclasses (timm's ``BatchNormAct2d``), this
    library's BKN, ghost BatchNorm and Batch Renorm layers. Not MABN (its evaluation does not
    centre) nor layers without running statistics (GroupNorm and the like need no weighing).
    Training passes are unchanged; so is the model's state (the hooks hold no tensors).

    >>> handle = weigh_examples(model, 0.2)   # doctest: +SKIP
    >>> with weigh_examples(model, 0.2):      # doctest: +SKIP
    ...     logits = model.eval()(images)

    Args:
        model: any module.
        alpha: weight of the example's own statistics, in ``[0, 1]``.

    Returns:
        :class:`ExampleWeighing`; ``remove()`` restores ordinary evaluation.

    Raises:
        ValueError: ``alpha`` outside ``[0, 1]``, or no layer with running statistics.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or \
            not math.isfinite(alpha) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1] (got {alpha!r}); 0 is ordinary "
                         "evaluation")
    weighing = ExampleWeighing(model, float(alpha))
    if not weighing.layers:
        raise ValueError(f"{type(model).__name__} has no layer that normalizes by running "
                         "statistics in evaluation (BatchNorm, BKN, Batch Renorm), so there is "
                         "nothing to weigh")
    return weighing
