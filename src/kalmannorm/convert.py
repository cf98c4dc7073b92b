"""Model surgery: BatchNorm to Batch Kalman Normalization and back.

Shaped like ``nn.SyncBatchNorm.convert_sync_batchnorm``: a walk that replaces layers, sharing
their parameters and buffers and keeping their training flag. The walk is atomic: every layer is
converted (and every option checked) before the first one is put into the model, and a failure
while wrapping it puts the original layers back.

Which layer becomes what is a registry of converters keyed by class (:data:`CONVERTERS`,
:func:`register_converter`). A BatchNorm subclass that adds behaviour after the normalization
(timm's ``BatchNormAct2d``: dropout, then activation) converts to a BKN layer that keeps those
child modules and runs them after it (:func:`norm_then`). Layers that only look like BatchNorm
(torchvision's and timm's ``FrozenBatchNorm2d`` are plain modules with fixed statistics) are not
``_BatchNorm`` subclasses and stay as they are.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import (BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d, BatchKalmanNormNd,
                      _BatchKalmanNorm)
from .analytic import AnalyticKalmanPredictor, check_analytic
from .prediction import (ATTRIBUTE, BatchInput, KalmanPredictor, _check_batch_input,
                         check_rows_options, predictor_of)

__all__ = ["convert_batchnorm", "to_batchnorm", "configure", "register_converter", "norm_then",
           "CONVERTERS", "BatchKalmanNormAct2d", "BatchKalmanNormActNd"]

# A converter maps a BatchNorm layer and the BKN options to its replacement (sharing the layer's
# parameters and buffers), or to None to leave the layer as it is.
Converter = Callable[[_BatchNorm, dict], Optional[nn.Module]]


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


def _placement_of(module: nn.Module) -> dict:
    """The device and floating dtype of ``module``'s tensors, for a layer built to replace it
    (so a BKN layer's own buffers, e.g. ``backward_window``'s history, match a float64 model)."""
    tensors = [*module.parameters(), *module.buffers()]
    floating = [t for t in tensors if t.is_floating_point()]
    placement = {"device": tensors[0].device} if tensors else {}
    if floating:
        placement["dtype"] = floating[0].dtype
    return placement


def _build(cls: type, layer: _BatchNorm, options: dict) -> _BatchKalmanNorm:
    new = cls(layer.num_features, layer.eps, layer.momentum, layer.affine,
              layer.track_running_stats, **_placement_of(layer), **options)
    return _transplant(layer, new)


def _to(cls: type) -> Converter:
    """The converter of a plain BatchNorm class to the BKN class ``cls``."""
    def convert(layer: _BatchNorm, options: dict) -> nn.Module:
        return _build(cls, layer, options)
    convert.__qualname__ = f"to {cls.__name__}"
    return convert


class _ThenChildren:
    """Mixin: a BKN layer followed by some of its child modules, in order (timm's norm+act)."""

    _then: Tuple[str, ...] = ()
    # The original layer without its tensors, so that to_batchnorm gives back its class.
    _deploy_skeleton: Optional[nn.Module] = None

    def forward(self, x):
        y = super().forward(x)
        for name in self._then:
            y = self._modules[name](y)
        return y


class BatchKalmanNormAct2d(_ThenChildren, BatchKalmanNorm2d):
    """:class:`BatchKalmanNorm2d` followed by child modules (timm's ``BatchNormAct2d``: ``drop``
    then ``act``); the shadow rows pass through them like the real rows, and the analytic
    prediction follows them by their moment rules. Made by :func:`norm_then`; state dict keys
    are those of the original layer."""


class BatchKalmanNormActNd(_ThenChildren, BatchKalmanNormNd):
    """:class:`BatchKalmanNormNd` followed by child modules (timm's ``SyncBatchNormAct``)."""


_THEN_CLASS = {BatchKalmanNorm2d: BatchKalmanNormAct2d, BatchKalmanNormNd: BatchKalmanNormActNd}


def _skeleton(layer: nn.Module) -> nn.Module:
    """A shallow copy of ``layer`` without parameters, buffers or children (no tensors)."""
    skeleton = copy.copy(layer)
    for slot in ("_parameters", "_buffers", "_modules"):
        object.__setattr__(skeleton, slot, OrderedDict())
    return skeleton


def norm_then(cls: type, *children: str) -> Converter:
    """A converter for a BatchNorm subclass that runs child modules after normalizing.

    The BKN layer (class ``cls``'s rank: a :class:`BatchKalmanNorm2d` subclass for 2d, or
    :class:`BatchKalmanNormNd`) keeps the named children (those the layer has, in the given
    order) and runs them on its output, so activation and dropout stay where they were;
    :func:`to_batchnorm` gives back an instance of the original class.

    >>> register_converter("timm.layers.norm_act.BatchNormAct2d",
    ...                    norm_then(BatchKalmanNorm2d, "drop", "act"))   # doctest: +SKIP
    """
    new_cls = _THEN_CLASS[cls]

    def convert(layer: _BatchNorm, options: dict) -> nn.Module:
        new = _build(new_cls, layer, options)
        new._then = tuple(name for name in children if name in layer._modules)
        for name, child in layer.named_children():
            new.add_module(name, child)
        object.__setattr__(new, "_deploy_skeleton", _skeleton(layer))  # not a submodule
        return new
    convert.__qualname__ = f"norm_then({cls.__name__}, {', '.join(map(repr, children))})"
    return convert


# Keys: a class, or the "module.QualName" of a class of an optional package (no import needed).
CONVERTERS: Dict[Union[type, str], Converter] = {
    nn.BatchNorm1d: _to(BatchKalmanNorm1d),
    nn.BatchNorm2d: _to(BatchKalmanNorm2d),
    nn.BatchNorm3d: _to(BatchKalmanNorm3d),
    # SyncBatchNorm takes any rank; so does its conversion, deploying to the rank it was fed.
    nn.SyncBatchNorm: _to(BatchKalmanNormNd),
    "timm.layers.norm_act.BatchNormAct2d": norm_then(BatchKalmanNorm2d, "drop", "act"),
    "timm.layers.norm_act.SyncBatchNormAct": norm_then(BatchKalmanNormNd, "drop", "act"),
}


def register_converter(cls: Union[type, str], converter: Optional[Converter]) -> None:
    """Tell :func:`convert_batchnorm` how to convert the BatchNorm subclass ``cls``.

    Args:
        cls: the class, or its ``"module.QualName"``.
        converter: ``converter(layer, options) -> module``: the replacement of ``layer``
            sharing its parameters and buffers, built with the BKN ``options`` (a dict of
            keyword arguments for the BKN layer), or ``None`` to leave the layer as it is. Passing
            ``None`` instead of a function leaves every layer of ``cls`` as it is (a frozen
            BatchNorm; the predictor still refuses it while it trains on the batch).

    >>> class MyBN(nn.BatchNorm2d):
    ...     def forward(self, x):
    ...         return super().forward(x).clamp(max=6)
    >>> register_converter(MyBN, lambda layer, options: nn.Sequential())  # doctest: +SKIP
    """
    if not (isinstance(cls, str) or (isinstance(cls, type) and issubclass(cls, _BatchNorm))):
        raise TypeError(f"expected a BatchNorm subclass or its qualified name (got {cls!r})")
    if converter is not None and not callable(converter):
        raise TypeError(f"converter must be callable or None (got {converter!r})")
    CONVERTERS[cls] = converter if converter is not None else (lambda layer, options: None)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _converter_for(layer: _BatchNorm) -> Converter:
    """The registered converter of ``layer``'s class or of the nearest registered base class.

    A base class's converter is used only if the subclass does not override ``forward`` (it adds
    no behaviour the conversion would lose); otherwise the subclass must be registered.
    """
    cls = type(layer)
    for base in cls.__mro__:
        converter = CONVERTERS.get(base) or CONVERTERS.get(_qualname(base))
        if converter is None:
            continue
        if base is cls or cls.forward is base.forward:
            return converter
        break
    raise TypeError(
        f"cannot convert {_qualname(cls)}: it is a BatchNorm subclass with its own forward, "
        "which the conversion would lose; register a converter for it with "
        "kalmannorm.register_converter(cls, converter) (kalmannorm.norm_then(...) handles "
        "layers that run child modules after normalizing)"
    )


Edge = Tuple[nn.Module, str, nn.Module]  # (parent, attribute name, child)


def _swap(module: nn.Module, make: Callable[[nn.Module], Optional[nn.Module]]
          ) -> Tuple[nn.Module, List[Tuple[Edge, nn.Module]]]:
    """Plan replacements for every module that ``make`` maps, then apply them.

    Every attribute under which a module is registered is replaced (a layer shared under two
    names becomes one new layer under both). ``make`` runs for all layers before the model is
    touched, so an exception leaves it as it was. Returns the new root and the applied
    replacements (for :func:`_undo`).
    """
    memo: Dict[int, Optional[nn.Module]] = {}

    def new_for(m: nn.Module) -> Optional[nn.Module]:
        if id(m) not in memo:
            memo[id(m)] = make(m)
        return memo[id(m)]

    root = new_for(module)
    plan: List[Tuple[Edge, nn.Module]] = []
    if root is None:
        for parent in module.modules():
            for name, child in parent._modules.items():
                if child is not None and new_for(child) is not None:
                    plan.append(((parent, name, child), memo[id(child)]))
    for (parent, name, _), new in plan:
        parent._modules[name] = new
    return (module if root is None else root), plan


def _undo(plan: List[Tuple[Edge, nn.Module]]) -> None:
    for (parent, name, old), _ in plan:
        parent._modules[name] = old


def convert_batchnorm(
    module: nn.Module,
    *,
    gain: float = 0.9,
    micro_batch: Optional[int] = None,
    guard_threshold: float = 100.0,
    detach_prior: bool = False,
    propagate: str = "normalized",
    running_stats: str = "group0",
    guard: str = "upper",
    gain_rule: str = "kalman",
    gain_warmup: int = 0,
    decisions: str = "group",
    time_prior: bool = False,
    backward_window: int = 1,
    rows_per_group: Union[int, str, None] = None,
    min_prior_values: int = 16,
    generator: Optional[torch.Generator] = None,
    batch_input: BatchInput = None,
    prediction: str = "sampled",
) -> nn.Module:
    """Replace every BatchNorm of ``module`` with Batch Kalman Normalization, in place.

    ``nn.BatchNorm1d/2d/3d`` become :class:`BatchKalmanNorm1d/2d/3d`, ``nn.SyncBatchNorm`` a
    :class:`BatchKalmanNormNd` of the rank it is fed (BKN keeps each device's micro-batch
    statistics), timm's ``BatchNormAct2d`` a BKN layer that keeps its dropout and activation;
    other classes follow :data:`CONVERTERS` (:func:`register_converter`). The new layers share
    the parameters and running buffers and keep the training flag, so an optimizer built before
    the conversion still holds the right parameters. A :class:`KalmanPredictor`, which carries
    the prediction from layer to layer, is attached to ``module`` by forward hooks
    (:meth:`KalmanPredictor.attach`), so the model keeps its class, attributes, methods and
    state dict keys (a BatchNorm checkpoint loads strictly, and back); :func:`predictor_of`
    returns it and :func:`configure` changes the options afterwards. Only a call of the model
    itself carries the prediction (another method, e.g. timm's ``forward_features``, trains
    the layers as per-group BatchNorm, with a warning).

    The conversion is atomic: an unsupported layer or a bad option raises before the model is
    touched, and a model the predictor refuses (a training-mode layer that computes batch
    statistics and was not converted) gets its original layers back.

    Args:
        module: a model holding at least one BatchNorm layer.
        gain, micro_batch, guard_threshold, detach_prior, propagate, running_stats, guard,
            gain_rule, gain_warmup, decisions, time_prior, backward_window: options of every
            new layer, see
            :class:`BatchKalmanNorm2d`.
        rows_per_group, min_prior_values, generator, batch_input: options of the
            :class:`KalmanPredictor` (``rows_per_group="auto"`` picks the shadow rows from the
            smallest map).
        prediction: ``"sampled"`` (shadow rows, :class:`KalmanPredictor`) or ``"analytic"``
            (moments in closed form, :class:`~kalmannorm.analytic.AnalyticKalmanPredictor`;
            a model it cannot follow is refused before any layer is replaced). Default:
            ``"sampled"``.

    Returns:
        ``module`` itself (as ``nn.SyncBatchNorm.convert_sync_batchnorm``; the new layer if
        ``module`` is a BatchNorm layer). With ``prediction="analytic"``: an
        :class:`~kalmannorm.analytic.AnalyticKalmanPredictor` wrapper (it replaces the forward
        by a traced graph), which reads and sets the model's public attributes through.

    For a torchvision detection model (a list of images in, a loss dict out), convert the
    backbone, which receives the batched image tensor: ``model.backbone =
    convert_batchnorm(model.backbone, micro_batch=2)``.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> type(convert_batchnorm(net, gain=0.9, micro_batch=2)[1]).__name__
    'BatchKalmanNorm2d'
    """
    if predictor_of(module) is not None:
        raise TypeError(
            f"the {type(module).__name__} is already converted; change its options with "
            "kalmannorm.configure(model, gain=..., micro_batch=...), or convert the deployed "
            "BatchNorm copy again: kalmannorm.convert_batchnorm(kalmannorm.to_batchnorm(model))")
    inner = [name for name, m in module.named_modules() if isinstance(m, KalmanPredictor)
             or ATTRIBUTE in m.__dict__]
    if inner:
        raise ValueError(
            f"the module already holds a KalmanPredictor at {inner}; a model takes one "
            "predictor: convert the BatchNorm layers outside it separately or convert the "
            "whole original model once"
        )
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
        guard=guard, gain_rule=gain_rule, gain_warmup=gain_warmup, decisions=decisions,
        time_prior=time_prior, backward_window=backward_window,
    )

    def make(layer: nn.Module) -> Optional[nn.Module]:
        if not isinstance(layer, _BatchNorm) or isinstance(layer, _BatchKalmanNorm):
            return None
        return _converter_for(layer)(layer, options)

    converted, plan = _swap(module, make)
    if not plan and converted is module:
        already = ("; it holds BKN layers already: attach the prediction with "
                   "kalmannorm.KalmanPredictor.attach(model) and change their options with "
                   "kalmannorm.configure(model, ...)") if any(
            isinstance(m, _BatchKalmanNorm) for m in module.modules()) else (
            "; build the model with a BatchNorm norm_layer or use BatchKalmanNorm layers "
            "directly")
        raise ValueError(
            f"found no BatchNorm layer to convert in {type(module).__name__}" + already)
    try:
        if prediction == "analytic":
            return AnalyticKalmanPredictor(converted, batch_input=batch_input)
        return KalmanPredictor.attach(
            converted, rows_per_group=rows_per_group, generator=generator,
            min_prior_values=min_prior_values, batch_input=batch_input)
    except Exception:
        _undo(plan)
        raise


def _deploy(layer: _BatchKalmanNorm) -> nn.Module:
    """The BatchNorm layer an eval-mode ``layer`` equals, sharing its tensors and children."""
    skeleton = getattr(layer, "_deploy_skeleton", None)
    if skeleton is None:
        new = layer._bn_class(layer.num_features, layer.eps, layer.momentum, layer.affine,
                              layer.track_running_stats, **_placement_of(layer))
        return _transplant(layer, new)
    new = copy.copy(skeleton)
    object.__setattr__(new, "_parameters", OrderedDict(layer._parameters))
    object.__setattr__(new, "_buffers", OrderedDict(  # BatchNorm's buffers, not BKN's counters
        (k, v) for k, v in layer._buffers.items() if k not in layer._non_persistent_buffers_set))
    object.__setattr__(new, "_modules", OrderedDict(layer._modules))
    new.training = layer.training
    return new


def to_batchnorm(module: nn.Module) -> nn.Module:
    """A deployable copy of ``module`` with plain BatchNorm in place of every BKN layer.

    Every :class:`KalmanPredictor` is unwrapped or detached and every BKN layer becomes the BatchNorm it
    came from (``nn.BatchNorm1d/2d/3d`` by rank, timm's ``BatchNormAct2d`` with its activation)
    with a copy of its parameters and running statistics. Since an evaluation-mode BKN layer
    *is* BatchNorm with its running statistics, the eval outputs of the copy are bit-for-bit
    those of ``module``; it exports (``torch.export``, ONNX) and folds into convolutions like
    any BatchNorm model. ``module`` itself is left untouched.

    >>> bkn = convert_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    >>> type(to_batchnorm(bkn)[1]).__name__
    'BatchNorm2d'
    """
    module = copy.deepcopy(module)
    for m in module.modules():
        if ATTRIBUTE in m.__dict__:
            m.__dict__[ATTRIBUTE].detach()
    module = _swap(module, lambda m: m.module if isinstance(m, KalmanPredictor) else None)[0]
    return _swap(module, lambda m: _deploy(m) if isinstance(m, _BatchKalmanNorm) else None)[0]


_LAYER_OPTIONS = ("gain", "micro_batch", "guard_threshold", "detach_prior", "propagate",
                  "running_stats", "guard", "gain_rule", "gain_warmup", "decisions", "time_prior",
                  "backward_window")
_PREDICTOR_OPTIONS = ("rows_per_group", "min_prior_values", "generator", "batch_input")


def configure(model: nn.Module, **options) -> nn.Module:
    """Change the options of a converted model's BKN layers and predictor; return ``model``.

    Takes the options of :func:`convert_batchnorm` except ``prediction`` (convert the deployed
    copy again for that: ``convert_batchnorm(to_batchnorm(model), prediction=...)``); the ones
    not given keep their values. Every value is checked before anything changes, so a bad one
    raises and leaves the model as it was. The layers keep their parameters and buffers.

    >>> model = convert_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    >>> configure(model, gain=0.5, micro_batch=2)[1].micro_batch
    2
    """
    unknown = sorted(set(options) - set(_LAYER_OPTIONS) - set(_PREDICTOR_OPTIONS))
    if unknown:
        hint = (" (the prediction kind is chosen at conversion: "
                "convert_batchnorm(to_batchnorm(model), prediction=...))"
                if "prediction" in unknown else "")
        raise TypeError(f"configure() got unknown options {unknown}{hint}; it takes "
                        f"{list(_LAYER_OPTIONS + _PREDICTOR_OPTIONS)}")
    layers = [m for m in model.modules() if isinstance(m, _BatchKalmanNorm)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BKN layer to configure; convert it "
                         "first with kalmannorm.convert_batchnorm(model, ...)")
    predictor = predictor_of(model)
    changes = {k: v for k, v in options.items() if k in _LAYER_OPTIONS}
    wanted = {k: v for k, v in options.items() if k in _PREDICTOR_OPTIONS}
    if wanted and predictor is None:
        raise ValueError(f"{sorted(wanted)} are options of the prediction, and "
                         f"{type(model).__name__} has none attached; attach it with "
                         "kalmannorm.KalmanPredictor.attach(model, ...)")
    if wanted and type(predictor) is not KalmanPredictor and (
            set(wanted) - {"batch_input"}):
        raise ValueError(f"{sorted(set(wanted) - {'batch_input'})} apply to "
                         "prediction='sampled' only")
    # check everything first: each layer's options by building a tensorless twin
    for layer in layers:
        merged = {k: getattr(layer, k) for k in _LAYER_OPTIONS}
        merged.update(changes)
        type(layer)(layer.num_features, layer.eps, layer.momentum, layer.affine,
                    layer.track_running_stats, device="meta", **merged)
    if predictor is not None:
        check_rows_options(wanted.get("rows_per_group", predictor.rows_per_group),
                           wanted.get("min_prior_values", predictor.min_prior_values))
        _check_batch_input(wanted.get("batch_input"))
    for layer in layers:
        for key, value in changes.items():
            setattr(layer, key, float(value) if key in ("gain", "guard_threshold") else value)
    if predictor is not None:
        predictor.micro_batch = layers[0].micro_batch if "micro_batch" in changes else (
            predictor.micro_batch)
        if "batch_input" in wanted:
            predictor.batch_input = wanted["batch_input"]
        if "generator" in wanted:
            predictor.shadow_batch.generator = wanted["generator"]
        if "min_prior_values" in wanted:
            predictor.min_prior_values = wanted["min_prior_values"]
        if "rows_per_group" in wanted:
            rows = wanted["rows_per_group"]
            predictor.auto_rows = rows == "auto"
            if rows is None or rows == "auto":
                rows = 4 if any(isinstance(m, BatchKalmanNorm1d) for m in layers) else 1
            predictor.rows_per_group = rows
            predictor.prior_sizes = None  # measured again in the next training pass
    return model
