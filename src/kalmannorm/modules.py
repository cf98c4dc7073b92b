"""Batch Kalman Normalization layers, drop-in replacements for ``nn.BatchNorm1d/2d/3d``.

Follows Wang et al., "Batch Kalman Normalization" (arXiv 1802.03133), as restated in this
project's ``docs/method.md``. The math lives in :mod:`kalmannorm.functional`; a layer owns the
parameters and buffers of a BatchNorm (same names, same state dict) and chooses the mode:

- training inside a :class:`~kalmannorm.prediction.KalmanPredictor`: the layer reads its prior
  from the shadow rows of the batch, normalizes the real rows with the combined statistics and
  writes fresh samples of those statistics into the shadow rows for the next layer;
- training alone: per-group BatchNorm (no predecessor, so no prior);
- evaluation: plain BatchNorm with the running statistics.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from . import functional as KF

__all__ = ["BatchKalmanNorm1d", "BatchKalmanNorm2d", "BatchKalmanNorm3d", "BatchKalmanNormNd",
           "PROPAGATE_MODES", "RUNNING_STATS_MODES"]

PROPAGATE_MODES = ("raw", "normalized")
RUNNING_STATS_MODES = ("all", "group0")


class _GroupedNorm(_NormBase):
    """A BatchNorm-shaped layer whose training statistics are per group of ``micro_batch``
    contiguous rows (method.md section 2): input checks and group arithmetic shared by the BKN
    and Batch Renormalization layers."""

    _input_dims: Tuple[int, ...] = ()

    def __init__(self, num_features, eps, momentum, affine, track_running_stats, device, dtype,
                 micro_batch: Optional[int], running_stats: str = "group0") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if running_stats not in RUNNING_STATS_MODES:
            raise ValueError(
                f"running_stats must be one of {RUNNING_STATS_MODES} (got {running_stats!r})"
            )
        self.running_stats = running_stats
        if micro_batch is not None and (
            isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1
        ):
            raise ValueError(f"micro_batch must be a positive int or None (got {micro_batch!r})")
        self.micro_batch = micro_batch

    def _check_input_dim(self, x: Tensor) -> None:
        self._check_input_dtype(x)
        if x.dim() not in self._input_dims:
            allowed = " or ".join(f"{d}D" for d in self._input_dims)
            raise ValueError(f"expected {allowed} input (got {x.dim()}D input)")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} channels (got {x.shape[1]})"
            )

    def _check_input_dtype(self, x: Tensor) -> None:
        # BatchNorm raises on integer input too; BKN would silently truncate its output.
        if not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} expected a floating-point input (got {x.dtype}); "
                "convert it first, e.g. x.float()"
            )

    def _empty_output(self, x: Tensor) -> Tensor:
        """The output for a batch of zero rows: empty, as BatchNorm's, connected to the affine
        parameters; no statistics and no buffer update."""
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.affine:
            return x * self.weight.reshape(shape) + self.bias.reshape(shape)
        return x.clone()

    def _groups(self, rows: int) -> int:
        """Number of statistics groups in a batch of ``rows`` rows."""
        if self.micro_batch is None:
            return 1
        if rows % self.micro_batch != 0:
            raise ValueError(
                f"a batch of {rows} rows does not split into groups of micro_batch="
                f"{self.micro_batch}; use a batch size that is a multiple of it"
            )
        return rows // self.micro_batch

    def _values_per_group(self, x: Tensor, groups: int) -> int:
        """Values behind one group's statistics of ``x``; at least 2, as BatchNorm requires."""
        values_per_group = (x.shape[0] // groups) * math.prod(x.shape[2:])
        if values_per_group < 2:
            raise ValueError(
                f"expected more than 1 value per channel in each statistics group when "
                f"training (got input of shape {tuple(x.shape)} split into {groups} groups)"
            )
        return values_per_group


class _BatchKalmanNorm(_GroupedNorm):
    """Base class of the BKN layers; see :class:`BatchKalmanNorm2d`."""

    _bn_class: type = torch.nn.BatchNorm2d
    # called as observer(layer, x, options, prior, result) after each training step (prior: the
    # one supplied; with options.shadow_prior the shadow rows of x carry it); set by
    # kalmannorm.statistics_error for one forward pass
    _step_observer: Optional[Callable[..., None]] = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
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
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         micro_batch, running_stats)
        if not 0.0 <= float(gain) <= 1.0:
            raise ValueError(f"gain must be in [0, 1] (got {gain})")
        if not guard_threshold > 0:
            raise ValueError(f"guard_threshold must be positive (got {guard_threshold})")
        if propagate not in PROPAGATE_MODES:
            raise ValueError(f"propagate must be one of {PROPAGATE_MODES} (got {propagate!r})")
        if decisions not in KF.DECISION_SCOPES:
            raise ValueError(
                f"decisions must be one of {KF.DECISION_SCOPES} (got {decisions!r})"
            )
        if guard not in KF.GUARD_MODES:
            raise ValueError(f"guard must be one of {KF.GUARD_MODES} (got {guard!r})")
        if gain_rule not in KF.GAIN_RULES:
            raise ValueError(f"gain_rule must be one of {KF.GAIN_RULES} (got {gain_rule!r})")
        if not isinstance(time_prior, bool):
            raise ValueError(f"time_prior must be a bool (got {time_prior!r})")
        if time_prior and (gain_rule != "kalman" or decisions != "group"):
            raise ValueError(
                "time_prior=True weighs the running statistics by their measured error, per "
                "group: it needs gain_rule='kalman' and decisions='group' (got gain_rule="
                f"{gain_rule!r}, decisions={decisions!r}); set those, or time_prior=False")
        if isinstance(backward_window, bool) or not isinstance(backward_window, int) \
                or backward_window < 1:
            raise ValueError(f"backward_window must be an int >= 1 (got {backward_window!r}); 1 "
                             "is the true gradient")
        if isinstance(gain_warmup, bool) or not isinstance(gain_warmup, int) or gain_warmup < 0:
            raise ValueError(f"gain_warmup must be a non-negative int (got {gain_warmup!r})")
        if gain_warmup and not track_running_stats:
            raise ValueError("gain_warmup counts steps in num_batches_tracked, so it needs "
                             "track_running_stats=True")
        self.gain = float(gain)
        self.guard = guard
        self.gain_rule = gain_rule
        self.gain_warmup = gain_warmup
        self.guard_threshold = float(guard_threshold)
        self.detach_prior = detach_prior
        self.propagate = propagate
        self.decisions = decisions
        self.time_prior = time_prior
        self.backward_window = backward_window
        # The smoothed backward's past gradients and how many steps they hold: buffers, so that
        # DDP gives every rank rank 0's; not in the state dict (BatchNorm checkpoints load
        # unchanged), so after a load the window refills.
        self.register_buffer("grad_history", None, persistent=False)
        self.register_buffer("grad_history_filled", None, persistent=False)
        self._grad_window(KF.stat_dtype(dtype or torch.get_default_dtype()), device)
        # [fallbacks, priors offered]: how often the guard rejected an available prior. Not part
        # of the state dict, so BatchNorm checkpoints load unchanged.
        self.register_buffer(
            "guard_counters", torch.zeros(2, dtype=torch.long, device=device), persistent=False
        )
        # Set by KalmanPredictor, which owns the per-pass state; None when used alone.
        self._shadow_batch = None
        self._warned_alone = False

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, gain={self.gain}, micro_batch={self.micro_batch}, "
            f"guard_threshold={self.guard_threshold}, detach_prior={self.detach_prior}, "
            f"propagate={self.propagate!r}, running_stats={self.running_stats!r}, "
            f"guard={self.guard!r}, gain_rule={self.gain_rule!r}, gain_warmup={self.gain_warmup}, "
            f"decisions={self.decisions!r}, time_prior={self.time_prior}, "
            f"backward_window={self.backward_window}"
        )

    def _effective_gain(self):
        """``gain``, ramped linearly from 0 over the first ``gain_warmup`` steps (a tensor
        computed from ``num_batches_tracked``, no host synchronisation)."""
        if not self.gain_warmup:
            return self.gain
        ramp = self.num_batches_tracked.to(torch.float32) / self.gain_warmup
        return ramp.clamp(max=1.0) * self.gain

    def _grad_window(self, dtype: torch.dtype, device) -> Optional[Tuple[Tensor, Tensor]]:
        """``(history, filled)`` of the smoothed backward, made empty where the window changed
        (``configure``); ``None`` for the true gradient."""
        if self.backward_window == 1:
            self.grad_history = self.grad_history_filled = None
            return None
        shape = (2, self.backward_window - 1, self.num_features)
        if self.grad_history is None or tuple(self.grad_history.shape) != shape:
            self.grad_history = torch.zeros(shape, dtype=dtype, device=device)
            self.grad_history_filled = torch.zeros((), dtype=torch.long, device=device)
        return self.grad_history, self.grad_history_filled

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling it.
        raise TypeError(
            f"{type(self).__name__} does not support TorchScript; script the deployable "
            "BatchNorm copy instead: torch.jit.script(kalmannorm.to_batchnorm(model).eval())"
        )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training and self.track_running_stats:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                self.eps,
            )
        if x.shape[0] == 0:
            return self._empty_output(x)
        shadow_batch = self._shadow_batch
        if shadow_batch is None or not shadow_batch.active:
            if self.training and self.gain > 0 and not self._warned_alone:
                self._warned_alone = True
                warnings.warn(
                    f"{type(self).__name__} is training outside a KalmanPredictor, so it has "
                    "no layer-to-layer prediction and acts as per-group BatchNorm; wrap the "
                    "model with kalmannorm.KalmanPredictor (convert_batchnorm does this)",
                    stacklevel=2,
                )
            return self.forward_with_prior(x, None, self._groups(x.shape[0]))[0]

        real_rows, groups = shadow_batch.split(x, self)
        use_prior = shadow_batch.has_predecessor and self.gain > 0
        result = self._step(
            x, real_rows, groups, shadow_rows=(x.shape[0] - real_rows) // groups,
            shadow_prior=use_prior, generator=shadow_batch.generator,
        )
        shadow_batch.has_predecessor = True
        return result.y

    def _step(self, x: Tensor, real_rows: int, groups: int, *, shadow_rows: int = 0,
              shadow_prior: bool = False, prior: Optional[Tuple[Tensor, Tensor]] = None,
              prior_valid: Optional[Tensor] = None, generator=None) -> KF.StepResult:
        """One training step through the functional core, then the buffers."""
        values_per_group = self._values_per_group(x[:real_rows], groups)
        options = KF.StepOptions(
            real_rows=real_rows, groups=groups, gain=self._effective_gain(), eps=self.eps,
            guard_threshold=self.guard_threshold, shadow_rows=shadow_rows,
            shadow_prior=shadow_prior, normalized=self.propagate == "normalized",
            detach_prior=self.detach_prior, guard=self.guard, gain_rule=self.gain_rule,
            decisions=self.decisions, time_prior=self.time_prior,
            backward_window=self.backward_window if torch.is_grad_enabled() else 1,
        )
        running = None
        if self.time_prior and self.track_running_stats and self.running_mean is not None:
            # read before this step's update; none yet until a step was tracked (a tensor flag)
            running = (self.running_mean, self.running_var, self.num_batches_tracked > 0)
        grad_history = None  # no backward to smooth without autograd
        if options.backward_window > 1:
            grad_history = self._grad_window(KF.stat_dtype(x.dtype), x.device)
        result = KF.training_step(x, self.weight, self.bias, options, prior, prior_valid,
                                  generator, running=running, grad_history=grad_history)
        if self._step_observer is not None:
            self._step_observer(self, x, options, prior, result)
        if self.training:
            track = self.track_running_stats
            KF.update_buffers(
                self.running_mean if track else None, self.running_var if track else None,
                self.num_batches_tracked if track else None, self.guard_counters, result,
                self.momentum, values_per_group, group0_only=self.running_stats == "group0",
            )
        return result

    def forward_with_prior(
        self,
        x: Tensor,
        prior: Optional[Tuple[Tensor, Tensor]],
        groups: int,
        prior_valid: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Normalize ``x`` with batch statistics corrected by ``prior``; update the buffers.

        The training-mode step of the layer for a caller that supplies the prediction itself
        (see :func:`kalmannorm.functional.batch_kalman_norm` for the arguments).

        Returns:
            ``(y, mean, var)``: the output and the combined statistics ``[S, C]``.
        """
        result = self._step(x, x.shape[0], groups, prior=prior, prior_valid=prior_valid)
        return result.y, result.mean, result.var


_DOC_OPTIONS = """
    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variance for numerical stability. Default: 1e-5.
        momentum: weight of the newest value in the running averages; ``None`` for a
            cumulative average. Default: 0.1.
        affine: learnable per-channel ``weight`` and ``bias``. Default: ``True``.
        track_running_stats: keep running averages for evaluation. Default: ``True``.
        gain: ``p`` in ``[0, 1]``, the weight on the prediction; 0 is per-group BatchNorm.
            The released code uses 0.9 for micro-batches and 0.05 for batch 128. Default: 0.9.
        micro_batch: rows per statistics group (``S = N / micro_batch`` groups of contiguous
            rows); ``None`` makes the whole batch one group. Default: ``None``.
        guard_threshold: a group's prior is rejected when the mean of ``var_prior /
            var_obs`` over its channels reaches this value or is not finite (with
            ``decisions="layer"``: the mean over all groups, for the whole layer). Default: 100.
        detach_prior: stop gradients through the prior (ablation). Default: ``False``.
        propagate: what the shadow rows carry to the next layer: ``"raw"`` samples the combined
            statistics of this layer's input (the released code), ``"normalized"`` the same
            samples after this layer's normalization and affine, on the scale the next layer
            really sees; measured to help from the first step (``docs/results/prior/``).
            Default: ``"normalized"``.
        running_stats: ``"group0"`` updates the running buffers from group 0's combined
            statistics, what a DDP run over separate devices does (each device starts a step
            with rank 0's buffers; also the released code's choice); ``"all"`` averages all
            groups, smoother than any real device gets. Default: ``"group0"``.
        guard: ``"upper"`` rejects the prior when it over-estimates the variance (the released
            guard); ``"two_sided"`` decides on the geometric mean of ``var_prior / var_obs`` and
            rejects under-estimates by the same factor too. Default: ``"upper"``.
        gain_rule: ``"kalman"`` weighs the prior by ``min(gain, a / d)`` per group and step,
            ``a`` the group's observation noise (the spread of its rows' statistics) and ``d``
            the measured prior-minus-observation error (see
            :func:`kalmannorm.functional.measured_gain`): a prior is trusted by how well it
            predicts; ``"fixed"`` weighs it by ``gain`` (the released code). Measured in
            ``docs/results/prior/``: a fixed 0.9 keeps a MobileNetV2 at chance where the
            measured gain trains it. Default: ``"kalman"``.
        gain_warmup: ramp the gain linearly from 0 over this many training steps (counted by
            ``num_batches_tracked``); 0 for none. Default: 0.
        decisions: ``"group"`` takes the guard's and the measured gain's decisions per
            statistics group from that group's own rows and prior, so each group behaves as a
            device holding only its rows; ``"layer"`` decides once for the whole layer from all
            groups (the released code's guard, for exact reproduction), which couples the
            groups. Default: ``"group"``. The Triton kernels implement both.
        time_prior: this library's extension, not the paper's: fuse the layer's running
            statistics (``running_mean``, and ``running_var`` as it is, the unbiased estimate
            that evaluation normalizes with) as a third source besides the observation and the
            prediction from the layer below. Per group, each source is weighted by the inverse
            of its error variance (the observation: its noise ``a``; a prior: its measured error
            beyond ``a``), the prior weights capped together by ``gain``, and the statistics are
            the moments of the three-component mixture (see
            :func:`kalmannorm.functional.fusion_weights`). The running statistics get weight 0
            before the first tracked step and with ``track_running_stats=False``. Needs
            ``gain_rule="kalman"`` and ``decisions="group"``; runs the composite form on CUDA.
            Default: ``False``.
        backward_window: this library's extension, not the paper's: above 1, the backward pass
            averages the gradient reaching each group's observed statistics (its mean and
            variance) with group 0's from the last ``backward_window - 1`` steps, as MABN
            smooths BatchNorm's backward (see
            :func:`kalmannorm.functional.smooth_statistics_gradient`); the true gradient until
            the window has filled, again after a load. Runs the composite form. 1 is the true
            gradient. Default: 1.

    The running variance is unbiased (``count / (count - 1)`` with ``count`` the values per
    group); normalization uses the biased variance. Statistics are float32 for any input dtype.
"""


class BatchKalmanNorm1d(_BatchKalmanNorm):
    __doc__ = r"""Batch Kalman Normalization over a 2D ``[N, C]`` or 3D ``[N, C, L]`` input.

    See :class:`BatchKalmanNorm2d` for the method.
    """ + _DOC_OPTIONS + """
    Shape:
        - Input: ``[N, C]`` or ``[N, C, L]``; Output: same shape.

    >>> from kalmannorm import KalmanPredictor
    >>> bkn = BatchKalmanNorm1d(16, micro_batch=4)
    >>> KalmanPredictor(bkn)(torch.randn(8, 16)).shape
    torch.Size([8, 16])
    """
    _input_dims = (2, 3)
    _bn_class = torch.nn.BatchNorm1d


class BatchKalmanNorm2d(_BatchKalmanNorm):
    __doc__ = r"""Batch Kalman Normalization over a 4D input ``[N, C, H, W]``.

    Per statistics group ``s`` and channel, with observed statistics ``mu_obs, var_obs`` of the
    micro-batch and a prediction ``mu_pred, var_pred`` carried from the previous BKN layer::

        mu  = p * mu_pred  + (1 - p) * mu_obs
        var = p * var_pred + (1 - p) * var_obs + p * (1 - p) * (mu_obs - mu_pred)^2
        y   = weight * (x - mu) / sqrt(var + eps) + bias

    The prediction needs the model wrapped in :class:`~kalmannorm.KalmanPredictor` (which
    :func:`~kalmannorm.convert_batchnorm` returns). In evaluation the layer is exactly
    ``nn.BatchNorm2d`` with its running statistics.
    """ + _DOC_OPTIONS + """
    Shape:
        - Input: ``[N, C, H, W]``; Output: same shape.

    >>> from kalmannorm import KalmanPredictor
    >>> bkn = BatchKalmanNorm2d(16, gain=0.9, micro_batch=2)
    >>> KalmanPredictor(bkn)(torch.randn(8, 16, 4, 4)).shape
    torch.Size([8, 16, 4, 4])
    """
    _input_dims = (4,)
    _bn_class = torch.nn.BatchNorm2d


class BatchKalmanNorm3d(_BatchKalmanNorm):
    __doc__ = r"""Batch Kalman Normalization over a 5D input ``[N, C, D, H, W]``.

    See :class:`BatchKalmanNorm2d` for the method.
    """ + _DOC_OPTIONS + """
    Shape:
        - Input: ``[N, C, D, H, W]``; Output: same shape.

    >>> from kalmannorm import KalmanPredictor
    >>> bkn = BatchKalmanNorm3d(8, micro_batch=2)
    >>> KalmanPredictor(bkn)(torch.randn(4, 8, 2, 4, 4)).shape
    torch.Size([4, 8, 2, 4, 4])
    """
    _input_dims = (5,)
    _bn_class = torch.nn.BatchNorm3d


class BatchKalmanNormNd(_BatchKalmanNorm):
    __doc__ = r"""Batch Kalman Normalization over an input of any rank ``[N, C, *]``, like
    ``nn.SyncBatchNorm``, which :func:`~kalmannorm.convert_batchnorm` turns into this layer.

    See :class:`BatchKalmanNorm2d` for the method. The layer remembers the rank it was last fed
    so that :func:`~kalmannorm.to_batchnorm` deploys it as ``nn.BatchNorm1d/2d/3d`` (an unused
    layer deploys as ``nn.SyncBatchNorm``, which also accepts any rank).
    """ + _DOC_OPTIONS + """
    Shape:
        - Input: ``[N, C]``, ``[N, C, L]``, ``[N, C, H, W]`` or ``[N, C, D, H, W]``; Output:
          same shape.

    >>> from kalmannorm import KalmanPredictor
    >>> bkn = BatchKalmanNormNd(8, micro_batch=2)
    >>> KalmanPredictor(bkn)(torch.randn(4, 8, 3)).shape
    torch.Size([4, 8, 3])
    """
    _input_dims = (2, 3, 4, 5)
    _bn_for_rank = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                    5: torch.nn.BatchNorm3d}
    _input_rank: Optional[int] = None

    def _check_input_dim(self, x: Tensor) -> None:
        super()._check_input_dim(x)
        self._input_rank = x.dim()

    @property
    def _bn_class(self) -> type:
        return self._bn_for_rank.get(self._input_rank, torch.nn.SyncBatchNorm)
