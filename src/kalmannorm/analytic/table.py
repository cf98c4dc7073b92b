"""Which twin follows which op: the rule tables of the analytic prediction, and their emitters.

Part of :mod:`kalmannorm.analytic`. An emitter inserts, after a node of the traced graph, the
call of the node's twin (:mod:`.twins`) on the moments of its inputs; the tables map module
classes, functions and tensor method names to emitters.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import nonlinear as a
from . import twins as t


class Unsupported(Exception):
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
            raise Unsupported
        others = [n for n in node.all_input_nodes if n is not x]
        if not isinstance(x, fx.Node) or x not in moments or any(n in moments for n in others):
            raise Unsupported
        if moments[x].meta.get("kn_sequence"):
            raise Unsupported  # a split's parts are reached by indexing
        if node.op == "call_module":
            module = graph.get_attr(node.target)
            return graph.call_function(helper, (module, moments[x], x, node))
        return graph.call_function(helper, (moments[x], x, node) + tuple(rest), kwargs)

    return emit


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _operand(node: Any, moments: Dict[fx.Node, fx.Node]) -> Optional[fx.Node]:
    """The moments node of a tensor operand, ``None`` without moments."""
    mv = moments.get(node) if isinstance(node, fx.Node) else None
    if mv is not None and mv.meta.get("kn_sequence"):
        raise Unsupported  # a split's parts are reached by indexing
    return mv


def _binary_add(sign: float) -> Callable:
    def emit(graph, node, moments):
        a = arg(node, 0, "input")
        b = arg(node, 1, "other")
        alpha = node.kwargs.get("alpha", 1)
        mva, mvb = _operand(a, moments), _operand(b, moments)
        return graph.call_function(t._m_add, (a, b, mva, mvb, sign, alpha))

    return emit


def _binary_mul(divide: bool) -> Callable:
    def emit(graph, node, moments):
        a = arg(node, 0, "input")
        b = arg(node, 1, "other")
        mva, mvb = _operand(a, moments), _operand(b, moments)
        if divide and mvb is not None:
            raise Unsupported  # a division by a random tensor
        if set(node.kwargs) - {"input", "other"}:
            raise Unsupported
        return graph.call_function(t._m_mul, (a, b, mva, mvb, divide))

    return emit


def _emit_cat(graph, node, moments):
    tensors = arg(node, 0, "tensors")
    dim = arg(node, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)):
        raise Unsupported
    mvs = [_operand(tensor, moments) for tensor in tensors]
    return graph.call_function(t._m_cat, (list(tensors), mvs, dim))


def _emit_getitem(graph, node, moments):
    source, index = node.args
    if not isinstance(source, fx.Node) or source not in moments:
        raise Unsupported
    if moments[source].meta.get("kn_sequence"):
        return graph.call_function(t._m_select, (moments[source], index))
    return graph.call_function(t._m_getitem, (moments[source], source, node, index))


def _sequence(helper: Callable) -> Callable:
    """Emitter of a twin that returns one ``(mean, var)`` per part (``split``, ``chunk``)."""
    unary = _unary(helper)

    def emit(graph, node, moments):
        result = unary(graph, node, moments)
        result.meta["kn_sequence"] = True
        return result

    return emit


def _no_moments(graph, node, moments):
    return None


_ACTIVATIONS: Dict[str, Callable] = {
    "relu": t._m_relu, "relu_": t._m_relu, "relu6": a._m_relu6,
    "hardtanh": a._m_hardtanh, "hardtanh_": a._m_hardtanh,
    "leaky_relu": a._m_leaky_relu, "leaky_relu_": a._m_leaky_relu,
    "hardsigmoid": a._m_hardsigmoid, "hardswish": a._m_hardswish,
    "clamp": a._m_clamp, "clamp_": a._m_clamp, "clip": a._m_clamp, "clip_": a._m_clamp,
    "clamp_min": a._m_clamp_min, "clamp_min_": a._m_clamp_min,
    "clamp_max": a._m_clamp_max, "clamp_max_": a._m_clamp_max,
    "sigmoid": a._m_sigmoid, "sigmoid_": a._m_sigmoid, "tanh": a._m_tanh, "tanh_": a._m_tanh,
    "silu": a._m_silu, "mish": a._m_mish, "gelu": a._m_gelu, "softplus": a._m_softplus,
    "elu": a._m_elu, "elu_": a._m_elu,
}
# The same ops as functions of torch and torch.nn.functional, found by name.
_ACTIVATION_FUNCTIONS: Dict[Callable, Callable] = {
    getattr(namespace, name): _unary(twin)
    for name, twin in _ACTIVATIONS.items()
    for namespace in (torch, F, torch.special)
    if callable(getattr(namespace, name, None))
}
# Modules that fx would trace into but that have a rule of their own: leaves of the trace.
_NAMED_MODULE_RULES: Dict[str, Callable] = {
    "torchvision.ops.stochastic_depth.StochasticDepth": _unary(t._m_row_dropout_module),
}


_MODULE_RULES: List[Tuple[tuple, Callable]] = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), _unary(t._m_conv_module)),
    ((nn.Linear,), _unary(t._m_linear_module)),
    ((nn.ReLU,), _unary(t._m_relu_module)),
    (a.ACTIVATION_MODULES, _unary(a._m_activation_module)),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), _unary(a._m_max_pool_module)),
    ((nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
     _unary(a._m_adaptive_max_pool_module)),
    ((nn.Upsample,), _unary(t._m_upsample_module)),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), _unary(t._m_avg_pool_module)),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
     _unary(t._m_adaptive_pool_module)),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d), _unary(t._m_dropout_module)),
    ((nn.Flatten,), _unary(t._m_flatten_module)),
    ((nn.Identity,), _unary(t._m_identity_module)),
    ((_BatchNorm,), _unary(t._m_eval_norm)),
]

_FUNCTION_RULES: Dict[Callable, Callable] = {
    **_ACTIVATION_FUNCTIONS,
    F.max_pool1d: _unary(a._m_max_pool), F.max_pool2d: _unary(a._m_max_pool),
    F.max_pool3d: _unary(a._m_max_pool),
    F.adaptive_max_pool1d: _unary(a._m_adaptive_max_pool),
    F.adaptive_max_pool2d: _unary(a._m_adaptive_max_pool),
    F.adaptive_max_pool3d: _unary(a._m_adaptive_max_pool),
    F.interpolate: _unary(t._m_interpolate), F.upsample: _unary(t._m_interpolate),
    torch.sum: _unary(t._m_sum),
    torch.transpose: _unary(t._m_transpose), torch.permute: _unary(t._m_permute),
    torch.split: _sequence(t._m_split), torch.chunk: _sequence(t._m_chunk),
    operator.getitem: _emit_getitem,
    F.conv1d: _unary(t._m_conv), F.conv2d: _unary(t._m_conv), F.conv3d: _unary(t._m_conv),
    F.linear: _unary(t._m_linear),
    F.avg_pool1d: _unary(t._m_avg_pool), F.avg_pool2d: _unary(t._m_avg_pool),
    F.avg_pool3d: _unary(t._m_avg_pool),
    F.adaptive_avg_pool1d: _unary(t._m_adaptive_pool), F.adaptive_avg_pool2d: _unary(t._m_adaptive_pool),
    F.adaptive_avg_pool3d: _unary(t._m_adaptive_pool),
    torch.mean: _unary(t._m_mean),
    F.dropout: _unary(t._m_dropout), F.dropout1d: _unary(t._m_dropout),
    F.dropout2d: _unary(t._m_dropout), F.dropout3d: _unary(t._m_dropout),
    torch.flatten: _unary(t._m_reshape), torch.reshape: _unary(t._m_reshape),
    torch.squeeze: _unary(t._m_reshape), torch.unsqueeze: _unary(t._m_reshape),
    F.pad: _unary(t._m_pad),
    torch.clone: _unary(t._m_identity), torch.detach: _unary(t._m_detach),
    operator.neg: _unary(t._m_neg), torch.neg: _unary(t._m_neg),
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
    **{name: _unary(twin) for name, twin in _ACTIVATIONS.items()},
    "mean": _unary(t._m_mean), "sum": _unary(t._m_sum),
    "transpose": _unary(t._m_transpose), "permute": _unary(t._m_permute),
    "split": _sequence(t._m_split), "chunk": _sequence(t._m_chunk),
    "flatten": _unary(t._m_reshape), "view": _unary(t._m_reshape), "reshape": _unary(t._m_reshape),
    "view_as": _unary(t._m_reshape), "reshape_as": _unary(t._m_reshape),
    "squeeze": _unary(t._m_reshape), "unsqueeze": _unary(t._m_reshape),
    "contiguous": _unary(t._m_identity), "clone": _unary(t._m_identity),
    "detach": _unary(t._m_detach), "neg": _unary(t._m_neg),
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
    names += [name.rsplit(".", 1)[1] for name in _NAMED_MODULE_RULES]
    names += [_name(fn) for fn, rule in _FUNCTION_RULES.items() if rule is not _no_moments]
    names += [f"Tensor.{m}" for m, rule in _METHOD_RULES.items() if rule is not _no_moments]
    return sorted(set(n.replace("_BatchNorm", "BatchNorm (eval)") for n in names))


def describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(root.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return f"function {_name(node.target)}"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def module_rule(module: nn.Module) -> Optional[Callable]:
    """The emitter for a module, or ``None``."""
    for classes, emit in _MODULE_RULES:
        if isinstance(module, classes):
            return emit
    for cls in type(module).__mro__:
        if _qualname(cls) in _NAMED_MODULE_RULES:
            return _NAMED_MODULE_RULES[_qualname(cls)]
    return None


def rule(node: fx.Node, root: nn.Module) -> Optional[Callable]:
    if node.op == "call_module":
        return module_rule(root.get_submodule(node.target))
    if node.op == "call_function":
        try:
            return _FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHOD_RULES.get(node.target)
    return None

