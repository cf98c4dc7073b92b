"""Learning-rate recipes (dataclasses) and the optimizer's parameter groups.

The released BKN CIFAR schedule (``docs/method.md`` section 6) is :class:`PaperRecipe`;
:class:`ShortRecipe` fits a CPU. Every recipe checks its fields when built, so a bad rate or
epoch count fails before any training.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Tuple

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["PaperRecipe", "ShortRecipe", "RECIPES", "weight_decay_groups"]


def dataclass_from_dict(cls, values: Dict[str, Any], what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; valid keys: {', '.join(sorted(names))}")
    return cls(**values)


def check_field(condition: bool, name: str, value: Any, allowed: str) -> None:
    """``ValueError("lr must be > 0 (got -0.1)")`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{name} must be {allowed} (got {value!r})")


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_optimizer_fields(recipe: Any) -> None:
    """Fields every recipe shares: a positive number of epochs, a positive rate, momentum in
    [0, 1) and a non-negative weight decay."""
    check_field(isinstance(recipe.epochs, int) and recipe.epochs >= 1, "epochs", recipe.epochs, "an integer >= 1")
    check_field(is_finite_number(recipe.lr) and recipe.lr > 0, "lr", recipe.lr, "a finite number > 0")
    check_field(is_finite_number(recipe.momentum) and 0 <= recipe.momentum < 1, "momentum", recipe.momentum, "in [0, 1)")
    check_field(is_finite_number(recipe.weight_decay) and recipe.weight_decay >= 0, "weight_decay",
           recipe.weight_decay, "a finite number >= 0")


@dataclass
class PaperRecipe:
    """The released code's full CIFAR schedule (``docs/method.md`` section 6).

    SGD with momentum 0.9 (no Nesterov), weight decay 2e-4 on convolution and linear weights
    only; learning rate (constant within an epoch, epochs counted from 0)::

        0.01 for epoch 0, 0.1 until epoch 82, 0.01 until 123, 0.001 until 300, 0.0002 until 400

    Args:
        epochs: 400.
        lr: the main rate, 0.1; ``warmup_lr`` 0.01 for the first ``warmup_epochs`` (1).
        milestones / milestone_lrs: the rate from each milestone epoch on.
    """

    name: ClassVar[str] = "paper"
    epochs: int = 400
    lr: float = 0.1
    warmup_lr: float = 0.01
    warmup_epochs: int = 1
    milestones: Tuple[int, ...] = (82, 123, 300)
    milestone_lrs: Tuple[float, ...] = (0.01, 0.001, 0.0002)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4

    def __post_init__(self) -> None:
        self.milestones, self.milestone_lrs = tuple(self.milestones), tuple(self.milestone_lrs)
        if len(self.milestones) != len(self.milestone_lrs) or list(self.milestones) != sorted(self.milestones):
            raise ValueError("milestones must be increasing and match milestone_lrs one to one")
        _check_optimizer_fields(self)
        for name in ("warmup_lr", "milestone_lrs"):
            values = getattr(self, name)
            check_field(all(is_finite_number(v) and v >= 0 for v in (values if isinstance(values, tuple) else (values,))),
                   name, values, "finite and >= 0")
        check_field(isinstance(self.warmup_epochs, int) and self.warmup_epochs >= 0, "warmup_epochs",
               self.warmup_epochs, "an integer >= 0")

    def lr_at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        lr = self.lr
        for milestone, value in zip(self.milestones, self.milestone_lrs):
            if epoch >= milestone:
                lr = value
        return lr


@dataclass
class ShortRecipe:
    """A schedule that fits a CPU: SGD Nesterov 0.9, linear warm-up then cosine, per step.

    The rate rises linearly from ``lr * start_factor`` to the peak ``lr`` over the first
    ``warmup_fraction`` of all steps, then follows a half cosine down to ``final_lr`` (a
    one-cycle shape, as the prototype of ``docs/method.md`` section 7). Weight decay 5e-4 on
    convolution and linear weights only.

    Args:
        epochs: 10 (set with ``--epochs``).
        lr: peak rate, 0.2.
        warmup_fraction: 0.15. start_factor: 0.04. final_lr: 0.
        momentum: 0.9. nesterov: True. weight_decay: 5e-4.
    """

    name: ClassVar[str] = "short"
    epochs: int = 10
    lr: float = 0.2
    warmup_fraction: float = 0.15
    start_factor: float = 0.04
    final_lr: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1) (got {self.warmup_fraction})")
        _check_optimizer_fields(self)
        check_field(is_finite_number(self.start_factor) and self.start_factor >= 0, "start_factor",
               self.start_factor, "a finite number >= 0")
        check_field(is_finite_number(self.final_lr) and 0 <= self.final_lr <= self.lr, "final_lr", self.final_lr,
               f"in [0, lr={self.lr}]")

    def lr_at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        t = (epoch * steps_per_epoch + step) / max(1, self.epochs * steps_per_epoch)
        w = self.warmup_fraction
        if t < w:
            start = self.lr * self.start_factor
            return start + (self.lr - start) * t / w
        progress = (t - w) / (1.0 - w)
        return self.final_lr + (self.lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


RECIPES = {"paper": PaperRecipe, "short": ShortRecipe}


def weight_decay_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Optimizer parameter groups: decay on convolution and linear weights, none elsewhere.

    Selected by module type (``nn.modules.conv._ConvNd``, ``nn.Linear``), never by name; norm
    weights and all biases get no decay. A reparametrized weight (weight standardization, see
    ``kalmannorm.standardize_conv_weights``) decays through the parameter it is computed from.
    """
    decay, seen = [], set()
    for module in model.modules():
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        if parametrize.is_parametrized(module, "weight"):
            weight = module.parametrizations.weight.original
        else:
            weight = module.weight
        if weight is not None and id(weight) not in seen and weight.requires_grad:
            decay.append(weight)
            seen.add(id(weight))
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]
