"""The analytic layer-to-layer prediction of Batch Kalman Normalization.
The graph rewrite of the analytic prediction and :class:`AnalyticKalmanPredictor`.

Part of :mod:`kalmannorm.analytic`: the model is traced with :mod:`torch.fx` (BKN and
``torch.nn`` layers are leaves); each BKN call becomes :func:`_kalman_step` (normalize with the
prior moments, return the output and the outgoing moments), followed by a call of each child
module a norm+act layer runs after normalizing (timm's ``BatchNormAct2d``: ``drop``, ``act``),
and every node between BKN layers gets its twin (:mod:`.table`, :mod:`.twins`), so the
generated ``forward`` runs both with no interpreter in between.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from ..modules import _BatchKalmanNorm
from ..prediction import BatchInput, KalmanPredictor
from .rules import Moments, eval_norm_moments, normalized_moments
from .table import Unsupported, arg, describe, module_rule, rule, supported_ops

__all__ = ["AnalyticKalmanPredictor", "check_analytic"]


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
    """One BKN layer: normalize ``x`` with ``prior``, return the output and outgoing moments.

    The normalization only: the children a norm+act layer runs after it are nodes of the graph.
    """
    if not (layer.training or not layer.track_running_stats):
        # Eval mode: BatchNorm with the running statistics, an affine map of the moments (the
        # sampled prediction passes its shadow rows through it the same way). A norm+act
        # layer without its children, which follow as graph nodes.
        y = _BatchKalmanNorm.forward(layer, x) if getattr(layer, "_then", ()) else layer(x)
        return y, None if prior is None else eval_norm_moments(layer, prior)
    layer._check_input_dim(x)
    valid = None
    if prior is None or layer.gain == 0:
        prior = None
    else:
        # As prior_from_rows: non-finite moments (an overflow) are zeroed so that neither pass
        # meets them, and the flag rejects that group's prior.
        mean, var = prior
        valid = torch.isfinite(mean + var).all(dim=1)
        prior = (torch.nan_to_num(mean, 0.0, 0.0, 0.0), torch.nan_to_num(var, 0.0, 0.0, 0.0))
    y, mean, var = layer.forward_with_prior(x, prior, state.groups, valid)
    if layer.propagate == "normalized":
        return y, normalized_moments(mean, var, layer.weight, layer.bias, layer.eps)
    return y, (mean, var)



class _Tracer(fx.Tracer):
    """Keeps normalization layers (BKN, BatchNorm, ...), ``torch.nn`` layers and the modules
    with a rule of their own (torchvision's ``StochasticDepth``) as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, _NormBase) or super().is_leaf_module(m, qualname)
                or module_rule(m) is not None)


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


def _children_after(node: fx.Node, gm: fx.GraphModule) -> Tuple[str, ...]:
    """The child modules the norm layer of ``node`` runs on its output, in order.

    A norm+act BKN layer (:func:`~kalmannorm.norm_then`, e.g. from timm's ``BatchNormAct2d``)
    names them in ``_then``; a BatchNorm subclass still to be converted (:func:`check_analytic`)
    is taken to run all its children in order, as timm's (``drop``, then ``act``). Another BKN
    layer with children other than ``nn.Identity`` is refused: they are inside the traced leaf,
    where no moment rule can follow them.
    """
    layer = gm.get_submodule(node.target)
    then = getattr(layer, "_then", None)
    if then is not None:
        return tuple(then)
    if not isinstance(layer, _BatchKalmanNorm):
        return tuple(name for name, _ in layer.named_children())
    hidden = [f"{name} ({type(m).__name__})" for name, m in layer.named_children()
              if not isinstance(m, nn.Identity)]
    if hidden:
        raise NotImplementedError(
            f"the analytic prediction cannot follow the layers that {node.target!r} runs "
            f"after normalizing: {', '.join(hidden)}; use the sampled prediction "
            "(kalmannorm.KalmanPredictor, or convert_batchnorm(..., prediction='sampled')), "
            "which runs any layer"
        )
    return ()


def _follow(graph: fx.Graph, node: fx.Node, moments: Dict[fx.Node, fx.Node],
            gm: fx.GraphModule, where: str = "") -> None:
    """Insert the twin of ``node`` at the graph's insertion point and record its moments.

    An op without a rule is refused, naming it (``where``: how it is reached, if not plainly).
    """
    emit = rule(node, gm)
    mv = None
    if emit is not None:
        try:
            mv = emit(graph, node, moments)
        except Unsupported:
            emit = None
    if emit is None:
        raise NotImplementedError(
            f"the analytic prediction has no moment rule for {describe(node, gm)} (node "
            f"{node.name!r}), which receives the statistics of a BKN layer{where}; supported: "
            f"{', '.join(supported_ops())}. Use the sampled prediction "
            "(kalmannorm.KalmanPredictor, or convert_batchnorm(..., prediction='sampled')), "
            "which runs any layer"
        )
    if mv is not None:
        moments[node] = mv


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
            children = _children_after(node, gm)
            x = arg(node, 0, "input")
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
                # A norm+act layer's children, each a module call followed by its own rule.
                for name in children:
                    y = graph.call_module(f"{node.target}.{name}", (y,))
                    if node in feeds:
                        _follow(graph, y, moments, gm, f" ({node.target!r} runs it after "
                                                       "normalizing)")
            node.replace_all_uses_with(y)
            graph.erase_node(node)
            count += 1
            continue
        if node not in feeds or not any(n in moments for n in node.all_input_nodes):
            continue  # no BKN layer upstream, or none downstream: no moments needed
        with graph.inserting_before(node.next):
            _follow(graph, node, moments, gm)
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

