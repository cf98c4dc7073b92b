"""The layer-to-layer prediction of Batch Kalman Normalization, by shadow rows.

method.md section 4: the released code predicts layer ``k``'s statistics by drawing, for every
statistics group, one pseudo-image from layer ``k-1``'s combined statistics and pushing it
through the layers in between. :class:`KalmanPredictor` does this for any network without
per-architecture wiring: in training it appends ``S * K`` rows of zeros to the batch (``K`` per
group, the "shadow rows"); every BKN layer reads its prior from the shadow rows it receives,
normalizes the real rows and writes fresh samples of its combined statistics into the shadow
rows of its output. Whatever lies between two BKN layers (activations, convs, pooling, residual
sums, concatenation, channel padding) transforms the samples exactly as it transforms the real
activations. The wrapper strips the shadow rows from the outputs.
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from .modules import BatchKalmanNorm1d, _BatchKalmanNorm

__all__ = ["KalmanPredictor", "ShadowBatch", "has_kalman_layers", "guard_report", "BatchInput",
           "predictor_of"]

# Where an attached predictor lives on its model: a plain attribute, not a submodule (the
# model's modules(), state dict and Sequential indexing stay as they were).
ATTRIBUTE = "_kalman_predictor"

# Which input of the model carries the batch: a positional index, a parameter name, a tuple of
# them (several inputs carry the batch), or None (found from the inputs, refusing ambiguity).
BatchInput = Union[None, int, str, Tuple[Union[int, str], ...]]


class ShadowBatch:
    """State of one training forward pass through a :class:`KalmanPredictor`.

    Owned by the predictor and shared by its BKN layers; :meth:`begin` resets it at the start of
    every pass and :meth:`end` closes it, so nothing carries over from one pass to the next.

    Attributes:
        real_rows: ``N``, the rows of the user's batch.
        groups: ``S``, statistics groups of the batch.
        rows_per_group: ``K``, shadow rows per group.
        has_predecessor: whether a BKN layer has already written shadow rows in this pass; the
            first one to run has no prior.
        generator: random generator for the samples (``None``: the global one).
    """

    def __init__(self, generator: Optional[torch.Generator] = None) -> None:
        self.generator = generator
        self.active = False
        self.real_rows = 0
        self.groups = 1
        self.rows_per_group = 1
        self.has_predecessor = False
        # layer -> (values per shadow row behind its prior, had a predecessor), this pass
        self.prior_sizes: Dict[nn.Module, Tuple[int, bool]] = {}

    def begin(self, real_rows: int, groups: int, rows_per_group: int) -> None:
        self.active = True
        self.real_rows = real_rows
        self.groups = groups
        self.rows_per_group = rows_per_group
        self.has_predecessor = False
        self.prior_sizes = {}

    def end(self) -> None:
        self.active = False
        self.has_predecessor = False

    @property
    def total_rows(self) -> int:
        return self.real_rows + self.groups * self.rows_per_group

    def split(self, x: Tensor, layer: nn.Module) -> Tuple[int, int]:
        """The real rows of a layer's input (the rest are shadow rows) and the number of groups.

        An input whose rows are a multiple ``t`` of the batch's (time folded into the batch, as
        video models do) holds ``t * N`` real rows followed by ``t * S * K`` shadow rows.
        """
        rows, total = x.shape[0], self.total_rows
        if rows % total != 0:
            raise ValueError(
                f"{type(layer).__name__} received {rows} rows, expected a multiple of {total} "
                f"(the batch's {self.real_rows} rows plus {total - self.real_rows} shadow rows); "
                "inside a KalmanPredictor a BKN layer must receive tensors computed row by row "
                "from the batch"
            )
        # values behind one group's prior per shadow row: (time steps) x positions
        self.prior_sizes[layer] = ((rows // total) * math.prod(x.shape[2:]), self.has_predecessor)
        return (rows // total) * self.real_rows, self.groups


def check_rows_options(rows_per_group: Union[int, str, None], min_prior_values: int) -> None:
    """Validate :class:`KalmanPredictor`'s ``rows_per_group`` and ``min_prior_values``."""
    if rows_per_group not in (None, "auto") and (
        isinstance(rows_per_group, bool) or not isinstance(rows_per_group, int)
        or rows_per_group < 1
    ):
        raise ValueError(
            f"rows_per_group must be a positive int, 'auto' or None (got {rows_per_group!r})"
        )
    if isinstance(min_prior_values, bool) or not isinstance(min_prior_values, int) \
            or min_prior_values < 2:
        raise ValueError(f"min_prior_values must be an int >= 2 (got {min_prior_values!r})")


def has_kalman_layers(module: nn.Module) -> bool:
    """Whether ``module`` contains a Batch Kalman Normalization layer."""
    return any(isinstance(m, _BatchKalmanNorm) for m in module.modules())


def guard_report(module: nn.Module) -> dict:
    """How often the guard rejected a prior, summed over the BKN layers of ``module``.

    Counts layer-steps since the layers were created (the layers' non-persistent counters, so a
    loaded checkpoint starts from zero).

    Returns:
        ``{"fallbacks": layer-steps where the guard rejected an available prior,
        "priors": layer-steps where a prior was available}``.

    >>> guard_report(nn.Sequential(nn.Conv2d(3, 8, 3)))
    {'fallbacks': 0, 'priors': 0}
    """
    total = torch.zeros(2, dtype=torch.long)
    for m in module.modules():
        if isinstance(m, _BatchKalmanNorm):
            total += m.guard_counters.cpu()
    return {"fallbacks": int(total[0]), "priors": int(total[1])}


def guard_counts(module: nn.Module) -> dict:
    """Deprecated name of :func:`guard_report` (it clashed with the layers' buffer)."""
    warnings.warn(
        "kalmannorm.guard_counts(model) is deprecated and will be removed in the next release; "
        "use kalmannorm.guard_report(model), which returns the same dict",
        DeprecationWarning, stacklevel=2,
    )
    return guard_report(module)


def _batch_coupled(module: nn.Module) -> List[str]:
    """Names of training-mode layers other than BKN whose statistics span the batch."""
    return [
        name or type(m).__name__
        for name, m in module.named_modules()
        if isinstance(m, _NormBase) and not isinstance(m, (_BatchKalmanNorm, _InstanceNorm))
        and m.training
    ]


def _leading_sizes(obj: Any, sizes: Set[int]) -> Set[int]:
    """Add the first dimension of every tensor nested in ``obj`` to ``sizes``."""
    sizes.update(t.shape[0] for t in _tensors(obj) if t.dim() > 0)
    return sizes


def _is_sample_list(obj: Any) -> bool:
    """A list of separate per-sample tensors (torchvision detection's images)."""
    return isinstance(obj, list) and len(obj) > 0 and all(isinstance(t, Tensor) for t in obj)


def _map_batch(obj: Any, rows: int, fn) -> Any:
    """Apply ``fn`` to every tensor with ``rows`` rows inside nested tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        return fn(obj) if obj.dim() > 0 and obj.shape[0] == rows else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_batch(v, rows, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_batch(v, rows, fn) for v in obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_batch(v, rows, fn)) for k, v in obj.items())
    return obj


class KalmanPredictor(nn.Module):
    r"""Carries the layer-to-layer prediction of BKN through any model, by shadow rows.

    In training, the wrapper appends ``S * K`` zero rows to every input tensor whose first
    dimension is the batch size ``N`` (``S = N / micro_batch`` statistics groups, ``K`` shadow
    rows per group), runs the model, and removes those rows from every output tensor with
    ``N + S * K`` rows (nested tuples, lists and dicts included). Each BKN layer takes the moments
    of its group's shadow rows as the prior and replaces them with samples of its combined
    statistics (method.md section 4). The first BKN layer of a pass has no prior. In evaluation,
    or when every BKN layer has gain 0, the wrapper adds nothing.

    The cost is ``S * K`` extra rows per ``N``: ``K / micro_batch`` more compute (+50% at
    micro-batch 2, ``K = 1``), as in the released code.

    Args:
        module: the model, containing BKN layers and no other layer whose statistics span the
            batch (``nn.BatchNorm*`` etc. would mix shadow rows into their statistics).
        rows_per_group: ``K``. A layer without spatial positions (``BatchKalmanNorm1d`` on
            ``[N, C]``) needs ``K > 1`` to estimate a variance. ``None`` picks 1, or 4 if the
            model holds a ``BatchKalmanNorm1d``. ``"auto"`` measures the smallest map of the
            first training pass (run with the ``None`` choice) and sets ``K`` so that every
            prior is estimated from at least ``min_prior_values`` values per group. After the
            first pass, layers that cannot get a prior (one value per group) are reported by a
            warning and by :meth:`layers_without_prior`. Default: ``None``.
        min_prior_values: the target of ``rows_per_group="auto"``. Default: 16.
        generator: random generator for the samples. Default: the global one.
        batch_input: which input carries the batch, as a positional index or a ``forward``
            parameter name, or a tuple of them; the batch size ``N`` is its first dimension
            (or that of the tensors inside it), and only these inputs get the shadow rows.
            ``None`` takes ``N`` from the inputs' tensors when they all have the same first
            dimension, and refuses inputs with several first dimensions or a list of
            per-sample tensors, naming this option; every input tensor with ``N`` rows then
            gets the shadow rows (a warning when that is several inputs). Default: ``None``.

    The state dict has the wrapped model's keys (no ``module.`` prefix), so checkpoints of the
    original model load strictly into the wrapper and back; ``module.``-prefixed keys load too.

    Shape:
        Inputs and outputs are the wrapped model's; the batch size must be a multiple of the BKN
        layers' ``micro_batch``.

    >>> from kalmannorm import BatchKalmanNorm2d
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), BatchKalmanNorm2d(8, micro_batch=2), nn.ReLU(),
    ...                     nn.Conv2d(8, 8, 3), BatchKalmanNorm2d(8, micro_batch=2))
    >>> KalmanPredictor(net)(torch.randn(4, 3, 8, 8)).shape
    torch.Size([4, 8, 4, 4])
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        rows_per_group: Union[int, str, None] = None,
        generator: Optional[torch.Generator] = None,
        min_prior_values: int = 16,
        batch_input: BatchInput = None,
    ) -> None:
        super().__init__()
        nested = [name for name, m in module.named_modules() if isinstance(m, KalmanPredictor)
                  or ATTRIBUTE in m.__dict__]
        if nested:
            raise ValueError(
                f"the module already holds a KalmanPredictor at {nested} (the root is '');"
                " a model takes one predictor: wrap the inner model once, and change a "
                "converted model's options with kalmannorm.configure(model, ...)"
            )
        layers = [m for m in module.modules() if isinstance(m, _BatchKalmanNorm)]
        if not layers:
            raise ValueError(
                f"{type(module).__name__} has no BatchKalmanNorm layer to predict statistics "
                "for; build it with a BKN norm_layer or use kalmannorm.convert_batchnorm"
            )
        micro_batches = {layer.micro_batch for layer in layers}
        if len(micro_batches) > 1:
            raise ValueError(
                "all BKN layers of one model must share one micro_batch (got "
                f"{sorted(micro_batches, key=str)})"
            )
        coupled = _batch_coupled(module)
        if coupled:
            raise ValueError(self._coupled_message(coupled))
        check_rows_options(rows_per_group, min_prior_values)
        self.auto_rows = rows_per_group == "auto"
        if rows_per_group is None or self.auto_rows:
            rows_per_group = 4 if any(isinstance(m, BatchKalmanNorm1d) for m in layers) else 1
        _check_batch_input(batch_input)
        self.batch_input = batch_input
        self.module = module
        self.micro_batch = micro_batches.pop()
        self.rows_per_group = rows_per_group
        self.min_prior_values = min_prior_values
        # per layer name: values per shadow row behind its prior, measured in the first pass
        self.prior_sizes: Optional[Dict[str, int]] = None
        self.shadow_batch = ShadowBatch(generator)
        self._attached = False  # True: forward hooks on the model itself (attach)
        self._pass: Optional[Tuple[int, int]] = None  # (rows, shadow rows) of the hooked pass
        self._warned: Set[str] = set()
        self._claim(layers)
        self._register_state_dict_hook(_strip_module_prefix)
        self._register_load_state_dict_pre_hook(_add_module_prefix, with_module=True)

    @classmethod
    def attach(cls, module: nn.Module, **options: Any) -> nn.Module:
        """Attach the prediction to ``module`` itself and return ``module``.

        Same options and rules as the constructor, but instead of a wrapper the predictor sits
        in forward hooks of ``module`` (a pre-hook appends the shadow rows to the inputs, a
        hook strips them from the outputs), so the model keeps its class, attributes, methods
        and state dict keys. :func:`predictor_of` returns the predictor;
        :func:`kalmannorm.to_batchnorm` removes it with the hooks. Only a call of the model
        itself (``model(x)``) carries the prediction: another method (timm's
        ``forward_features``) trains its BKN layers as per-group BatchNorm, with a warning.

        >>> from kalmannorm import BatchKalmanNorm2d
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), BatchKalmanNorm2d(8, micro_batch=2))
        >>> KalmanPredictor.attach(net) is net and predictor_of(net).micro_batch == 2
        True
        """
        if ATTRIBUTE in module.__dict__:
            raise ValueError(
                f"{type(module).__name__} already has the prediction attached; change its "
                "options with kalmannorm.configure(model, ...)")
        predictor = cls(module, **options)
        del predictor._modules["module"]  # not a submodule: no cycle, no state dict level
        object.__setattr__(predictor, "module", module)
        predictor._attached = True
        predictor._handles = [
            module.register_forward_pre_hook(predictor._pre_hook, with_kwargs=True),
            # prepend: the outputs are stripped before the user's own hooks see them; always:
            # a forward that raises still closes the pass
            module.register_forward_hook(predictor._post_hook, with_kwargs=True, prepend=True,
                                         always_call=True),
            # checkpoints of a KalmanPredictor wrapper (a "module." level) still load
            module._register_load_state_dict_pre_hook(_drop_module_level, with_module=True),
        ]
        object.__setattr__(module, ATTRIBUTE, predictor)
        return module

    def detach(self) -> None:
        """Remove an attached predictor's hooks from its model (the layers stay BKN)."""
        if not self._attached:
            raise ValueError("this KalmanPredictor is a wrapper, not attached; use its .module")
        for handle in self._handles:
            handle.remove()
        self.module.__dict__.pop(ATTRIBUTE, None)

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        self._pass = None
        started = self._enter(args, kwargs)
        if started is None:
            return None
        args, kwargs, self._pass = started
        return args, kwargs

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        state, self._pass = self._pass, None
        if state is None:
            return None
        return self._exit(output, *state)

    def __getattr__(self, name: str) -> Any:
        # A wrapper is transparent for reading the model's public attributes and methods
        # (model.fc, reset_classifier, ...); private names stay the wrapper's own.
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None or name.startswith("_"):
                raise
            return getattr(inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Setting a public attribute the model has and the wrapper has not sets the model's
        # (predictor.fc = nn.Linear(...) replaces the model's head, not a dead copy).
        inner = self.__dict__.get("_modules", {}).get("module")
        if (inner is not None and not name.startswith("_") and name not in self.__dict__
                and not hasattr(type(self), name)
                and not any(name in self.__dict__[d] for d in ("_parameters", "_buffers",
                                                               "_modules"))
                and hasattr(inner, name)):
            setattr(inner, name, value)
        else:
            super().__setattr__(name, value)

    def _claim(self, layers: List[_BatchKalmanNorm]) -> None:
        # Claimed again at every pass, so that two predictors around one model each see their
        # own shadow rows.
        for layer in layers:
            layer._shadow_batch = self.shadow_batch

    def __prepare_scriptable__(self):
        raise TypeError(
            f"{type(self).__name__} does not support TorchScript; script the deployable "
            "BatchNorm copy instead: torch.jit.script(kalmannorm.to_batchnorm(model).eval())"
        )

    @staticmethod
    def _coupled_message(names: List[str]) -> str:
        return (
            f"layers {names} compute statistics over the batch and would mix the shadow rows "
            "of the prediction into them; convert them (kalmannorm.convert_batchnorm) or "
            "replace them with a per-sample norm"
        )

    def extra_repr(self) -> str:
        auto = ", auto" if self.auto_rows else ""
        return f"micro_batch={self.micro_batch}, rows_per_group={self.rows_per_group}{auto}"

    def layers_without_prior(self) -> List[str]:
        """Names of the BKN layers whose prior has one value per group, so zero variance: they
        act as per-group BatchNorm (measured in the first training pass; empty before it)."""
        if self.prior_sizes is None:
            return []
        return [name for name, per_row in self.prior_sizes.items()
                if per_row * self.rows_per_group < 2]

    def _calibrate(self) -> None:
        """After the first training pass: choose ``K`` (``"auto"``) and report priorless layers."""
        names = {m: name for name, m in self.module.named_modules()}
        self.prior_sizes = {
            names.get(layer, type(layer).__name__): per_row
            for layer, (per_row, had_predecessor) in self.shadow_batch.prior_sizes.items()
            if had_predecessor and layer.gain > 0
        }
        if self.auto_rows and self.prior_sizes:
            smallest = min(self.prior_sizes.values())
            self.rows_per_group = max(self.rows_per_group,
                                      math.ceil(self.min_prior_values / smallest))
        missing = self.layers_without_prior()
        if missing:
            warnings.warn(
                f"BKN layers {missing} get one value per group in their prior (1x1 maps with "
                f"rows_per_group={self.rows_per_group}), so no prior: they act as per-group "
                "BatchNorm; use rows_per_group='auto' or a larger int (convert_batchnorm, "
                "kalmannorm.configure(model, ...) or KalmanPredictor)",
                stacklevel=3,
            )

    def _predicting(self) -> bool:
        if not (self.module.training if self._attached else self.training):
            return False
        layers = [m for m in self.module.modules() if isinstance(m, _BatchKalmanNorm)]
        if not any(m.training and m.gain > 0 for m in layers):
            return False
        self._claim(layers)
        return True

    def _keys(self) -> Tuple[Union[int, str], ...]:
        key = self.batch_input
        return tuple(key) if isinstance(key, (tuple, list)) else (key,)

    def _locate(self, key: Union[int, str], args: tuple, kwargs: dict) -> Tuple[str, Any]:
        """Where the input ``key`` of ``batch_input`` is: ``("args", index)`` or
        ``("kwargs", name)``."""
        if isinstance(key, int):
            if not -len(args) <= key < len(args):
                raise ValueError(f"batch_input={key} but the model got {len(args)} positional "
                                 "inputs")
            return "args", key % len(args)
        if key in kwargs:
            return "kwargs", key
        try:
            params = list(inspect.signature(self.module.forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        positional = [p.name for p in params[:len(args)]
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if key not in positional:
            raise ValueError(f"batch_input={key!r} names no input of this call (got "
                             f"{len(args)} positional inputs and keywords {sorted(kwargs)})")
        return "args", positional.index(key)

    def _batch_rows(self, args: tuple, kwargs: dict) -> int:
        """The batch size ``N`` of a call, from ``batch_input`` or unambiguous inputs."""
        how = ("; name the input that carries the batch with batch_input= (an index or a "
               "parameter name) in KalmanPredictor or convert_batchnorm")
        if self.batch_input is not None:
            sizes: Set[int] = set()
            for key in self._keys():
                where, at = self._locate(key, args, kwargs)
                _leading_sizes((args if where == "args" else kwargs)[at], sizes)
            if len(sizes) != 1:
                raise ValueError(f"batch_input={self.batch_input!r} holds tensors with first "
                                 f"dimensions {sorted(sizes)}; expected one batch size")
            return sizes.pop()
        samples = [i for i, a in enumerate(list(args) + list(kwargs.values()))
                   if _is_sample_list(a)]
        if samples:
            raise ValueError(
                "an input is a list of separate tensors (per-sample inputs, such as the images "
                "of a torchvision detection model), so the batch is not one tensor's rows; "
                "wrap the part of the model that receives the batched tensor (detection: "
                "model.backbone = kalmannorm.convert_batchnorm(model.backbone, ...))" + how
            )
        sizes = _leading_sizes((args, kwargs), set())
        if not sizes:
            raise ValueError(f"{type(self).__name__} found no batched tensor among the inputs")
        if len(sizes) > 1:
            raise ValueError(f"cannot tell the batch size: the inputs hold tensors with "
                             f"{sorted(sizes)} rows" + how)
        return sizes.pop()

    def _start_pass(self, args: tuple, kwargs: dict) -> Tuple[int, int]:
        """Check a training pass's model and inputs; return ``(rows, groups)`` of the batch."""
        coupled = _batch_coupled(self.module)
        if coupled:
            raise ValueError(self._coupled_message(coupled))
        rows = self._batch_rows(args, kwargs)
        if self.micro_batch is None:
            return rows, 1
        if rows % self.micro_batch != 0:
            raise ValueError(
                f"a batch of {rows} rows does not split into groups of micro_batch="
                f"{self.micro_batch}; use a batch size that is a multiple of it, and drop a "
                "smaller last batch of an epoch: DataLoader(..., drop_last=True)"
            )
        return rows, rows // self.micro_batch

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, stacklevel=4)

    def _pad_inputs(self, args: tuple, kwargs: dict, rows: int, fn) -> Tuple[tuple, dict]:
        """Append the shadow rows to the batch inputs: those named by ``batch_input``, or else
        every input holding a tensor with ``rows`` rows (warning when that is several)."""
        if self.batch_input is None:
            names = [f"positional input {i}" for i, a in enumerate(args)
                     if rows in _leading_sizes(a, set())]
            names += [repr(k) for k, v in kwargs.items() if rows in _leading_sizes(v, set())]
            if len(names) > 1:
                self._warn_once("inputs", (
                    f"inputs {', '.join(names)} all have {rows} rows, so all got the shadow "
                    "rows of the prediction; an input that does not flow row by row into the "
                    "BKN layers (labels, targets, per-sample weights) gets zero rows appended, "
                    "and a loss computed inside forward averages over the shadow samples. "
                    "Name the inputs that carry the batch: convert_batchnorm(..., batch_input="
                    "'x') (a parameter name, an index, or a tuple of them), which also "
                    "silences this warning"))
            return _map_batch((args, kwargs), rows, fn)
        args, kwargs = list(args), dict(kwargs)
        for key in self._keys():
            where, at = self._locate(key, tuple(args), kwargs)
            box = args if where == "args" else kwargs
            box[at] = _map_batch(box[at], rows, fn)
        return tuple(args), kwargs

    def _check_outputs(self, out: Any, total: int) -> None:
        """Warn once about outputs the stripping cannot fix: a scalar computed from the batch
        (a loss inside forward) and a batch dimension that is not the first."""
        for t in _tensors(out):
            if t.dim() == 0 and t.is_floating_point() and t.requires_grad:
                self._warn_once("scalar", (
                    "the model returned a scalar computed from the batch in training (a loss "
                    "computed inside forward?): it includes the shadow rows of the prediction, "
                    "which cannot be stripped from it. Compute the loss outside the model on "
                    "its outputs, or return per-sample values (reduction='none'), whose shadow "
                    "rows are removed"))
            elif t.dim() > 1 and t.shape[0] != total and total in t.shape[1:]:
                self._warn_once("layout", (
                    f"an output of shape {tuple(t.shape)} has the batch with its shadow rows "
                    f"({total} rows) in a dimension other than the first, so it comes back with "
                    "the shadow rows (the last ones of that dimension); return the batch "
                    "dimension first (e.g. batch_first=True, or transpose in forward)"))

    def _enter(self, args: tuple, kwargs: dict) -> Optional[Tuple[tuple, dict, Tuple[int, int]]]:
        """Start a training pass: ``(args, kwargs, (rows, shadow rows))`` with the shadow rows
        appended, or ``None`` when this call predicts nothing."""
        if not self._predicting():
            return None
        rows, groups = self._start_pass(args, kwargs)
        if rows == 0:  # an empty batch: nothing to predict, every layer returns empty rows
            return None
        extra = groups * self.rows_per_group

        def append(t: Tensor) -> Tensor:
            return torch.cat([t, t.new_zeros((extra,) + t.shape[1:])])

        args, kwargs = self._pad_inputs(args, kwargs, rows, append)
        self.shadow_batch.begin(rows, groups, self.rows_per_group)
        return args, kwargs, (rows, extra)

    def _exit(self, out: Any, rows: int, extra: int) -> Any:
        """Close the pass and strip the shadow rows from the outputs."""
        self.shadow_batch.end()
        if out is None:  # also a forward that raised (the attached hook runs anyway)
            return None
        if self.prior_sizes is None:
            self._calibrate()
        self._check_outputs(out, rows + extra)
        return _map_batch(out, rows + extra, lambda t: t[:rows])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        started = self._enter(args, kwargs)
        if started is None:
            return self.module(*args, **kwargs)
        args, kwargs, (rows, extra) = started
        try:
            out = self.module(*args, **kwargs)
        except BaseException:
            self.shadow_batch.end()
            raise
        return self._exit(out, rows, extra)


def predictor_of(module: nn.Module) -> Optional[KalmanPredictor]:
    """The :class:`KalmanPredictor` of a converted model: the one attached to it
    (:func:`kalmannorm.convert_batchnorm`), the wrapper itself, or ``None``.

    >>> predictor_of(nn.Linear(2, 2)) is None
    True
    """
    if isinstance(module, KalmanPredictor):
        return module
    return module.__dict__.get(ATTRIBUTE)


def _check_batch_input(batch_input: BatchInput) -> None:
    keys = batch_input if isinstance(batch_input, tuple) and batch_input else (batch_input,)
    if batch_input is not None and not all(
            not isinstance(k, bool) and isinstance(k, (int, str)) for k in keys):
        raise TypeError("batch_input must be an int, a str, a non-empty tuple of them or None "
                        f"(got {batch_input!r})")


def _tensors(obj: Any):
    """The tensors nested in ``obj`` (tuples, lists, dicts)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _strip_module_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State dict hook: the wrapped model's keys without the ``module.`` level.

    The metadata (module versions) is kept under both names, so that a version-checking module
    (e.g. torchvision's MNASNet) finds it whichever form is loaded.
    """
    inner = prefix + "module."
    keys = [k for k in state_dict if k.startswith(inner)]
    for key in keys:  # re-inserted in order; they are the last keys written
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k == inner[:-1] or k.startswith(inner)]:
            metadata[prefix + key[len(inner):] if key != inner[:-1] else prefix[:-1]] = (
                metadata[key])


def _add_module_prefix(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: accept the wrapped model's keys (and ``module.``-prefixed ones)."""
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)
    # Module versions of a checkpoint without the "module." level: only reachable when the
    # predictor is the model loaded (a nested predictor sees no metadata; BatchNorm needs none).
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k.startswith(prefix[:-1]) and
                    not (k == inner[:-1] or k.startswith(inner))]:
            rest = key[len(prefix):] if prefix else key
            metadata.setdefault(inner[:-1] + ("." + rest if rest else ""), metadata[key])


def _drop_module_level(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook of an attached model: accept the keys of a ``KalmanPredictor`` wrapper's
    checkpoint written with a ``module.`` level."""
    if "module" in module._modules:
        return
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)
