"""How close BKN's statistics come to the whole batch's: the premise of the method, measured on
a user's own model and data in one forward pass, before any training.

With ``micro_batch=m`` each statistics group sees ``m`` rows. Per-group BatchNorm normalizes
with the group's own statistics (the *observation*); BKN with its combination of the observation
and the prediction from the layer below (the *estimate*). BKN helps a layer only if the estimate
lies closer than the observation to what a large batch would see. :func:`statistics_error`
takes the statistics of the whole batch passed in (all groups' real rows) as that reference and
reports, per BKN layer, both distances:

- mean error: ``mean over groups and channels of (mean - batch mean)^2 / batch var``, the
  squared shift of the mean in units of the batch's standard deviation;
- log-variance error: ``mean of log(var / batch var)^2``, and its bias ``mean of log(var / batch
  var)`` (below 0: the variance is underestimated, so the layer's outputs come out too large).

The same distances of the prediction alone (before it is combined with the observation) say
whether an error comes from the prediction; those of the layer's running statistics (as they
were before the pass) whether the layer's past would estimate the batch better than the group
does, the idea behind Batch Renorm, MABN and this library's ``time_prior``.

Variances are the biased ones that normalization divides by, each with the layer's ``eps``.
"""
from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .functional import prior_from_rows
from .modules import _BatchKalmanNorm
from .prediction import KalmanPredictor, predictor_of

__all__ = ["statistics_error", "LayerStatisticsError"]


@dataclass(frozen=True)
class LayerStatisticsError:
    """One BKN layer's statistics against the whole batch's (see :mod:`kalmannorm.diagnostics`).

    Attributes:
        layer: the layer's name in the model.
        after: the leaf module that ran just before it (its input's producer in a sequential
            stretch), e.g. ``"Conv2d 3x3 depthwise"``; ``""`` if none ran.
        channels, groups, values_per_group: its channels, statistics groups and the values
            behind each group's statistics (rows x positions).
        prior_used: fraction of the groups whose prediction passed the guard.
        observed_mean_error, estimate_mean_error: the mean error of the group's own statistics
            and of BKN's estimate.
        observed_log_var_error, estimate_log_var_error: the log-variance errors.
        observed_log_var_bias, estimate_log_var_bias: the log-variance biases.
        prediction_mean_error, prediction_log_var_error, prediction_log_var_bias: the same
            for the prediction from the layer below, before the update; NaN for a layer
            without one (the first).
        running_mean_error, running_log_var_error, running_log_var_bias: the same for the
            layer's running statistics before the pass; NaN without them.
    """

    layer: str
    after: str
    channels: int
    groups: int
    values_per_group: int
    prior_used: float
    observed_mean_error: float
    estimate_mean_error: float
    observed_log_var_error: float
    estimate_log_var_error: float
    observed_log_var_bias: float
    estimate_log_var_bias: float
    prediction_mean_error: float
    prediction_log_var_error: float
    prediction_log_var_bias: float
    running_mean_error: float
    running_log_var_error: float
    running_log_var_bias: float


def _describe(module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, nn.modules.conv._ConvNd):
        size = "x".join(map(str, module.kernel_size))
        depthwise = module.groups > 1 and module.groups == module.in_channels
        return f"{name} {size}" + (" depthwise" if depthwise else
                                   f" groups={module.groups}" if module.groups > 1 else "")
    return name


def _errors(source: str, stats: Optional[Tuple[Tensor, Tensor]], ref_mean: Tensor,
            ref_var: Tensor, eps: float) -> Dict[str, float]:
    """``{source}_mean_error``, ``_log_var_error``, ``_log_var_bias`` of ``[S, C]`` (or ``[C]``)
    statistics ``(mean, var)``; NaN for ``None``."""
    keys = [f"{source}_mean_error", f"{source}_log_var_error", f"{source}_log_var_bias"]
    if stats is None:
        return dict.fromkeys(keys, math.nan)
    mean, var = (t.detach().to(ref_mean.dtype) for t in stats)
    mean_err = ((mean - ref_mean) ** 2 / (ref_var + eps)).mean()
    log_ratio = torch.log((var + eps) / (ref_var + eps))
    values = (mean_err, (log_ratio ** 2).mean(), log_ratio.mean())
    return {key: value.item() for key, value in zip(keys, values)}


@contextlib.contextmanager
def _state_kept(model: nn.Module):
    """Restore every buffer, training flag and random state the forward pass may change."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    flags = [(m, m.training) for m in model.modules()]
    predictor = predictor_of(model)
    batch = getattr(predictor, "shadow_batch", None)
    generator = getattr(batch, "generator", None)
    generator_state = generator.get_state() if generator is not None else None
    devices = sorted({b.device.index or 0 for b in model.buffers() if b.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, flag in flags:
            m.training = flag
        if generator is not None:
            generator.set_state(generator_state)


def statistics_error(model: nn.Module, *args: Any, **kwargs: Any) -> List[LayerStatisticsError]:
    """How far each BKN layer's statistics fall from the whole batch's, for one batch.

    Runs ``model(*args, **kwargs)`` once in training mode without gradients, as a training step
    would see the batch, and compares per group the group's own statistics and BKN's estimate
    with the statistics of all real rows of the batch at that layer. The model is left as it
    was: running statistics, guard counters, training flags and random states are restored.

    Args:
        model: a model with BKN layers (from :func:`kalmannorm.convert_batchnorm`, or wrapped
            by a predictor); their ``micro_batch`` must split the batch into several groups.
        *args, **kwargs: the model's inputs, one batch of real data (the larger, the better the
            reference).

    Returns:
        one :class:`LayerStatisticsError` per BKN layer, in the order they ran; a layer run
        more than once is averaged over its calls.

    >>> import torch, kalmannorm as kn
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
    ...                     nn.Conv2d(8, 8, 3, groups=8), nn.BatchNorm2d(8))
    >>> net = kn.convert_batchnorm(net, micro_batch=2)
    >>> rows = kn.statistics_error(net, torch.randn(16, 3, 12, 12))
    >>> [(r.layer, r.after, r.prior_used) for r in rows]
    [('1', 'Conv2d 3x3', 0.0), ('4', 'Conv2d 3x3 depthwise', 1.0)]
    """
    # layers named as in the user's model, also when a predictor wraps it
    named = model.module if isinstance(model, KalmanPredictor) else model
    layers = {m: name for name, m in named.named_modules() if isinstance(m, _BatchKalmanNorm)}
    if not layers:
        raise ValueError("statistics_error needs a model with BKN layers; convert it first "
                         "(kalmannorm.convert_batchnorm(model, micro_batch=...))")
    whole = [name for m, name in layers.items() if m.micro_batch is None]
    if whole:
        raise ValueError(
            f"statistics_error compares statistics groups with the whole batch, but "
            f"{whole[0]!r} normalizes the whole batch as one group (micro_batch=None); set "
            "micro_batch first (kalmannorm.configure(model, micro_batch=...))")
    calls: Dict[str, List[Dict[str, Any]]] = {}
    after: Dict[str, str] = {}
    last_leaf: List[Optional[nn.Module]] = [None]

    def observe(layer: _BatchKalmanNorm, x: Tensor, options, prior: Optional[Tuple[Tensor, Tensor]],
                result) -> None:
        real_rows, groups = options.real_rows, options.groups
        after.setdefault(layers[layer], _describe(last_leaf[0]) if last_leaf[0] else "")
        last_leaf[0] = layer
        if groups < 2:
            raise ValueError(
                f"statistics_error needs several statistics groups, but {layers[layer]!r} got "
                f"{real_rows} rows at micro_batch={layer.micro_batch}: pass a larger batch")
        rows = x[:real_rows].detach().to(result.mean.dtype)
        c = rows.shape[1]
        per_channel = rows.transpose(0, 1).reshape(c, real_rows, -1)
        ref_mean = per_channel.mean((1, 2))
        ref_var = per_channel.var((1, 2), unbiased=False)
        grouped = per_channel.reshape(c, groups, -1)
        if options.shadow_prior:  # the shadow rows carry the prediction
            prior = prior_from_rows(x[real_rows:].detach(), groups)[:2]
        running = None
        if layer.running_mean is not None and layer.running_var is not None:
            running = (layer.running_mean, layer.running_var)
        sources = dict(observed=(grouped.mean(2).T, grouped.var(2, unbiased=False).T),
                       estimate=(result.mean, result.var), prediction=prior, running=running)
        call: Dict[str, Any] = dict(channels=c, groups=groups, values_per_group=grouped.shape[2],
                                    prior_used=result.used.float().mean().item())
        for source, stats in sources.items():
            call.update(_errors(source, stats, ref_mean, ref_var, layer.eps))
        calls.setdefault(layers[layer], []).append(call)

    def note_leaf(module: nn.Module, args: tuple) -> None:
        last_leaf[0] = module

    # BKN layers are noted by the observer: the analytic prediction runs their step directly
    leaves = [m for m in model.modules() if not list(m.children()) and m not in layers]
    handles = [m.register_forward_pre_hook(note_leaf) for m in leaves]
    try:
        with _state_kept(model), torch.no_grad():
            model.train()
            for layer in layers:
                layer._step_observer = observe
            model(*args, **kwargs)
    finally:
        for layer in layers:
            layer.__dict__.pop("_step_observer", None)
        for h in handles:
            h.remove()
    return [LayerStatisticsError(layer=name, after=after.get(name, ""), **average_fields(rows))
            for name, rows in calls.items()]


def average_fields(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """``rows``' float fields averaged, every other field taken from the first row."""
    return {key: statistics.fmean(r[key] for r in rows) if isinstance(value, float) else value
            for key, value in rows[0].items()}
