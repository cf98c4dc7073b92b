"""The composite form of Batch Kalman Normalization: the reference math, in torch ops.

Follows Wang et al., "Batch Kalman Normalization: Towards Training Deep Neural Networks with
Micro-Batches" (arXiv 1802.03133), as restated in ``docs/method.md`` of this project: statistics
per (micro-batch group, channel), the predict/update step with its cross term, the guard of the
released code, and the sampled prediction that carries statistics from one layer to the next.

Every function here is pure: tensors and flags in, tensors out. Statistics are float32 whatever
the input dtype (float64 stays float64); outputs keep the input dtype. :func:`training_step` is
the whole training step of one layer written with these functions; the other backends
(:mod:`.cpu_fused`, :mod:`.triton_ops`) compute the same step with fewer passes and are tested
against it. Autograd differentiates this form to any order.

Shapes: ``x`` is ``[N, C, *spatial]``; its ``N`` rows split into ``S`` contiguous groups of
``m = N / S`` rows (row ``i`` belongs to group ``i // m``); statistics are ``[S, C]``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "StepOptions",
    "released_update",
    "StepResult",
    "group_moments",
    "kalman_update",
    "measured_gain",
    "fusion_weights",
    "GUARD_MODES",
    "GAIN_RULES",
    "DECISION_SCOPES",
    "row_spread",
    "group_affine",
    "normalize",
    "prior_from_rows",
    "sample_rows",
    "safe_std",
    "stat_dtype",
    "update_running_stats",
    "training_step",
    "smooth_statistics_gradient",
]

_TINY = torch.finfo(torch.float32).tiny

#: ``"upper"``: the released guard (rejects over-estimates only); ``"two_sided"`` also rejects
#: under-estimates, on the geometric mean of the ratio.
GUARD_MODES = ("upper", "two_sided")
#: ``"fixed"``: the weight on the prior is ``gain`` (the released code); ``"kalman"``: it is
#: measured per layer and step by :func:`measured_gain`, at most ``gain``.
GAIN_RULES = ("fixed", "kalman")
#: Where the guard and the measured gain are decided. ``"group"``: per statistics group, from
#: that group's own rows and prior only, so that a group behaves exactly as a device holding only
#: its rows (the default of the layers). ``"layer"``: once for the whole layer from all groups
#: (the released code's guard, and this library's earlier measured gain): a group's output then
#: depends on the other groups' rows, which separate devices cannot see.
DECISION_SCOPES = ("group", "layer")


class StepOptions(NamedTuple):
    """What one training step of a BKN layer computes (the flags every backend takes).

    Attributes:
        real_rows: ``N``, the rows of the batch; rows after them are shadow rows.
        groups: ``S``, statistics groups of the real rows (contiguous, ``N / S`` rows each).
        gain: ``p`` in ``[0, 1]``, the weight on the prior.
        eps: added to the variance.
        guard_threshold: see :func:`kalman_update`.
        shadow_rows: ``K``, shadow rows per group written into the output (0: none).
        shadow_prior: take the prior from the moments of the incoming shadow rows.
        normalized: the shadow rows carry samples of the normalized output (``"normalized"``
            propagation) instead of the combined statistics of the raw input.
        detach_prior: no gradient through the prior.
        guard, gain_rule, decisions: see :func:`kalman_update`; ``gain`` may be a 0-dim tensor
            (a warm-up ramp). Each backend says which it implements (``supports_options``).
        time_prior: fuse the layer's running statistics as a third source (the ``running``
            argument of :func:`training_step`; see :func:`kalman_update`). Needs
            ``gain_rule="kalman"`` and ``decisions="group"``.
        backward_window: ``k``; above 1 the backward pass averages the gradients reaching the
            observed statistics over the last ``k`` steps (:func:`smooth_statistics_gradient`,
            the ``grad_history`` argument of :func:`training_step`). 1: the true gradient.
    """

    real_rows: int
    groups: int
    gain: Union[float, Tensor] = 0.9
    eps: float = 1e-5
    guard_threshold: float = 100.0
    shadow_rows: int = 0
    shadow_prior: bool = False
    normalized: bool = False
    detach_prior: bool = False
    guard: str = "upper"
    gain_rule: str = "fixed"
    decisions: str = "layer"
    time_prior: bool = False
    backward_window: int = 1


def released_update(options: StepOptions) -> bool:
    """Whether ``options`` ask for the released code's update (a float gain, the upper guard
    decided for the whole layer, the fixed gain rule), the one every backend implements."""
    return options.guard == "upper" and options.gain_rule == "fixed" \
        and options.decisions == "layer" and not isinstance(options.gain, Tensor) \
        and not options.time_prior and options.backward_window == 1


class StepResult(NamedTuple):
    """The outputs of one training step.

    Attributes:
        y: the output, shadow rows included; ``x``'s shape and dtype.
        mean, var: combined statistics ``[S, C]`` (float32, float64 for float64 inputs), the
            start of the next layer's prediction.
        used: bool tensor, whether the prior was used: ``[S]``, one decision per group
            (``decisions="group"``), or 0-dim (``"layer"``, or no prior offered).
        available: bool tensor of ``used``'s shape, whether a prior was offered with a variance
            not zero everywhere (what the guard counters count).
    """

    y: Tensor
    mean: Tensor
    var: Tensor
    used: Tensor
    available: Tensor


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def safe_std(var: Tensor) -> Tensor:
    """``sqrt(var)`` whose gradient at a zero variance is zero instead of infinite."""
    return var.clamp_min(_TINY).sqrt()


def _check_groups(x: Tensor, groups: int) -> int:
    if x.dim() < 2:
        raise ValueError(f"expected at least 2D input [N, C, *] (got {x.dim()}D input)")
    if groups < 1 or x.shape[0] % groups != 0:
        raise ValueError(
            f"a batch of {x.shape[0]} rows does not split into {groups} equal groups; "
            "the batch size must be a multiple of the number of groups"
        )
    return x.shape[0] // groups


def group_moments(x: Tensor, groups: int) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance of ``x`` per (group, channel), in float32 (float64 stays).

    ``mean[s, c]`` and ``var[s, c]`` are taken over the rows of group ``s`` and every spatial
    position: ``var = E[(x - mean)^2]`` (biased, the variance used to normalize).

    Args:
        x: input ``[N, C, *spatial]``.
        groups: ``S``, the number of contiguous row groups; must divide ``N``.

    Shape:
        - Output: two tensors ``[S, C]``, float32.

    >>> mean, var = group_moments(torch.randn(8, 3, 4, 4), groups=4)
    >>> mean.shape
    torch.Size([4, 3])
    """
    m = _check_groups(x, groups)
    channels = x.shape[1]
    # Two passes (sum, then centred squares): exact like Welford's ``var_mean`` but several times
    # faster on CPU, and the same ops as the fused kernel (:mod:`.cpu_fused`), so both paths give
    # bit-identical statistics for float32/float64 inputs.
    rows = x.to(stat_dtype(x.dtype)).reshape(groups, m, channels, -1)  # [S, m, C, L]
    count = m * rows.shape[-1]
    mean = rows.sum(dim=(1, 3)) / count  # [S, C]
    var = (rows - mean[:, None, :, None]).square().sum(dim=(1, 3)) / count
    return mean, var


class _SmoothedStatisticsGradient(torch.autograd.Function):
    """Identity on ``(mean, var)`` forward; backward averages their gradients with the
    window's past gradients of group 0 (:func:`smooth_statistics_gradient`)."""

    @staticmethod
    def forward(ctx, mean, var, history, filled, eps):
        ctx.history, ctx.filled = history, filled
        std = (var.detach() + eps).sqrt()
        # read now: the window of this step; the units: the gradients times std and variance
        ctx.save_for_backward(filled >= history.shape[1], torch.stack([std, std.square()]))
        return mean.clone(), var.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean, grad_var):
        use_average, units = ctx.saved_tensors  # [2, S, C]
        history = ctx.history  # [2, k - 1, C]: group 0's past, in the normalized output's units
        grads = torch.stack([grad_mean, grad_var])  # unused outputs give zeros
        scaled = grads * units
        window = history.shape[1] + 1
        average = (history.sum(dim=1, keepdim=True).to(scaled.dtype) + scaled) / window
        used = torch.where(use_average, average / units, grads)
        with torch.no_grad():  # the newest past from group 0 only (DDP: rank 0's buffers)
            history.copy_(torch.cat([history[:, 1:], scaled[:, :1].to(history.dtype)], dim=1))
            ctx.filled.add_(1).clamp_(max=history.shape[1])
        return used[0], used[1], None, None, None


def smooth_statistics_gradient(mean: Tensor, var: Tensor, history: Tensor, filled: Tensor,
                               eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    r"""``(mean, var)`` unchanged, with a backward that smooths their gradient over steps.

    The noise of a micro-batch's statistics reaches the backward pass through the gradient
    flowing into them; MABN (Yan et al. 2020) smooths the same terms of BatchNorm's backward,
    ``mean(g)`` and ``mean(g * z)`` for ``g`` the gradient with respect to the normalized
    output ``z``. Those are the gradients ``G_mu``, ``G_var`` with respect to the mean and the
    variance in the normalized output's units: ``u_mu = G_mu * std`` and ``u_var = G_var *
    std^2`` (``std = sqrt(var + eps)``, up to constant factors), which do not grow where a
    group's variance is small. With ``k - 1 = history.shape[1]`` past steps, group ``s`` at
    step ``t`` gets::

        u_used[s] = (u_0[t-k+1] + ... + u_0[t-1] + u_s[t]) / k
        G_used[s] = u_used[s] / std_s        (mean),    u_used[s] / std_s^2    (variance)

    once the window holds ``k - 1`` past steps, and its true gradient until then. Averaging the
    gradients themselves instead mixes groups and steps whose variances differ by orders of
    magnitude (a gradient scales as ``var^-1.5``), and diverged within 30 steps on a ResNet-20.
    The past is group 0's alone, as a device gets rank 0's buffers under DDP, so no group reads
    another group's current rows. ``history`` (``[2, k - 1, C]``: ``u_mu``, then ``u_var``) is
    shifted in place during the backward pass, group 0's newest last, and ``filled`` counts the
    past steps it holds (at most ``k - 1``).

    Args:
        mean, var: the observed statistics ``[S, C]`` of a step.
        history: the window's past, updated in place by the backward pass.
        filled: 0-dim integer tensor, updated in place by the backward pass.
        eps: added to the variance, as in the normalization.

    Returns:
        ``(mean, var)``: equal values; gradients as above.
    """
    return _SmoothedStatisticsGradient.apply(mean, var, history, filled, eps)


def row_spread(x: Tensor, groups: int, var_obs: Tensor) -> Optional[Tensor]:
    """The observation noise of each group's statistics, from the spread of its own rows.

    A group's observed statistics average those of its ``m`` rows, so their noise is the
    spread of the rows' statistics divided by ``m``. In the units of :func:`measured_gain`
    (log-variance and standardized mean), per group ``s``::

        a[s] = mean over channels of ( var_rows(log v_row) + var_rows(mu_row) / var_obs ) / m

    with ``mu_row, v_row`` the mean and biased variance of each row over its positions and
    ``var_rows`` the unbiased variance over the group's ``m`` rows. Each group reads only its
    own rows, so a device holding only that group would compute the same value. It counts what
    a sampling formula misses: how much whole images differ, and positions that are not
    independent.

    Args:
        x: the real rows ``[N, C, *spatial]``.
        groups: ``S``; must divide ``N``.
        var_obs: the groups' observed variances ``[S, C]``.

    Returns:
        ``[S]`` (no gradient), or ``None`` with one row per group (``m = 1``: no spread to
        measure).
    """
    m = _check_groups(x, groups)
    if m < 2:
        return None
    with torch.no_grad():
        mean_row, var_row = group_moments(x, x.shape[0])  # [N, C]
        mean_row = mean_row.reshape(groups, m, -1)
        log_row = var_row.clamp_min(_TINY).log().reshape(groups, m, -1)
        spread = log_row.var(dim=1) + mean_row.var(dim=1) / var_obs.clamp_min(_TINY)
        return spread.mean(dim=1) / m


def measured_gain(
    mean_obs: Tensor,
    var_obs: Tensor,
    mean_prior: Tensor,
    var_prior: Tensor,
    count: int,
    *,
    decisions: str = "layer",
    noise: Optional[Tensor] = None,
) -> Tensor:
    """The weight on the prior that a Kalman filter would give it, measured at every step.

    In log-variance and standardized-mean units the observed statistics of one group have a
    noise variance ``a`` and the prior an error variance ``e`` (its own sampling noise plus how
    far the prediction is off); the Kalman weight on the prior is ``a / (a + e)``. The squared
    prior-minus-observation difference estimates ``a + e`` (independent errors), so::

        d = mean((log var_prior - log var_obs)^2 + (mean_prior - mean_obs)^2 / var_obs)
        p = a / max(d, a)

    ``decisions="group"``: ``d`` is the mean over the channels of each group, and ``a`` is the
    group's own ``noise`` (:func:`row_spread`), or for one row per group the noise of a
    Gaussian sample of ``count`` values, ``2 / (count - 1) + 1 / count``: one gain per group,
    from that group alone. ``decisions="layer"`` (this library's 0.1 rule): ``d`` is the mean
    over all groups and channels and ``a`` the spread of the groups' observations around their
    average (the sampling formula for one group): one gain per layer, which reads every group.

    A prior as good as a second observation gets ``a / (2a) = 1/2``; one ten times worse than
    the observation noise gets about 0.1; a zero prior variance counts as the smallest float
    (its squared log difference, about 7,600, enters the mean). Computed without gradient (it
    is a decision, like the guard) and without a host synchronisation.

    Args:
        mean_obs, var_obs, mean_prior, var_prior: ``[S, C]`` statistics.
        count: values behind one group's observed statistics (rows per group times positions).
        decisions: ``"group"`` or ``"layer"`` (:data:`DECISION_SCOPES`). Default: ``"layer"``.
        noise: ``[S]`` observation noise per group (``decisions="group"``), or ``None``.

    Returns:
        ``[S]`` (``"group"``) or 0-dim (``"layer"``) float tensor in ``[0, 1]``.
    """
    with torch.no_grad():
        error = _prior_error(mean_obs, var_obs, mean_prior, var_prior)
        if decisions == "group":
            d = error.mean(dim=1)
            a = _group_noise(var_obs, count, noise).to(d.dtype)
        elif var_obs.shape[0] >= 2:  # the spread across groups (reads every group)
            d = error.mean()
            scale = var_obs.clamp_min(_TINY)
            a = (scale.log().var(dim=0) + mean_obs.var(dim=0) / scale.mean(dim=0)).mean()
        else:
            d, a = error.mean(), _group_noise(var_obs, count, None)[0]
        p = a / torch.maximum(d, a)
        return torch.where(torch.isfinite(p), p, torch.zeros_like(p))


def _prior_error(mean_obs: Tensor, var_obs: Tensor, mean_prior: Tensor,
                 var_prior: Tensor) -> Tensor:
    """``(log var_prior - log var_obs)^2 + (mean_prior - mean_obs)^2 / var_obs``, ``[S, C]``:
    the squared prior-minus-observation difference in the units of :func:`measured_gain`."""
    log_obs = var_obs.clamp_min(_TINY).log()
    log_prior = var_prior.clamp_min(_TINY).log()
    return (log_prior - log_obs).square() \
        + (mean_prior - mean_obs).square() / var_obs.clamp_min(_TINY)


def _group_noise(var_obs: Tensor, count: int, noise: Optional[Tensor]) -> Tensor:
    """Each group's observation noise ``[S]``: ``noise`` (:func:`row_spread`), or without it the
    noise of a Gaussian sample of ``count`` values, ``2 / (count - 1) + 1 / count``."""
    if noise is not None:
        return noise
    # a fill, not a copy from the host: nothing here may synchronise (CUDA graph capture)
    sampling = torch.full((), 2.0 / max(count - 1, 1) + 1.0 / count, device=var_obs.device,
                          dtype=var_obs.dtype)
    return sampling.expand(var_obs.shape[0])


def fusion_weights(
    mean_obs: Tensor,
    var_obs: Tensor,
    sources,
    gain: Union[float, Tensor],
    count: int,
    noise: Optional[Tensor] = None,
) -> Tensor:
    """Inverse-variance weights of prior sources fused with the observation, per group.

    In the units of :func:`measured_gain`, the observation of group ``s`` has the noise
    variance ``a[s]`` (``noise``, or the Gaussian sampling noise of ``count`` values) and each
    prior source ``i`` the error variance ``e_i[s] = max(d_i[s] - a[s], tiny)``, ``d_i[s]`` its
    measured squared difference from the observation (mean over the group's channels): what it
    is off beyond the observation's own noise. The weights are ``w_i = (1 / e_i) / (1 / a +
    sum_j 1 / e_j)`` (a Kalman filter's fusion of independent sources); a source whose flag is
    false gets ``w_i = 0``; when the prior weights sum to more than ``gain`` they are scaled
    down together to sum to ``gain``. With one source this is :func:`measured_gain`'s ``a /
    max(d, a)`` capped by ``gain``, up to rounding. Computed without gradient, no host sync.

    Args:
        mean_obs, var_obs: observed statistics ``[S, C]``.
        sources: a sequence of ``(mean, var, valid)``: ``[S, C]`` statistics (finite, or swapped
            for the observation where ``valid`` is false) and a ``[S]`` bool flag.
        gain: the cap on the total prior weight (a float or a 0-dim tensor).
        count: values behind one group's observed statistics (used when ``noise`` is None).
        noise: ``[S]`` observation noise of each group (:func:`row_spread`), or ``None``.

    Returns:
        ``[S, len(sources)]`` weights of the prior sources; the observation's is one minus their
        sum.
    """
    with torch.no_grad():
        a = _group_noise(var_obs, count, noise).to(var_obs.dtype).clamp_min(_TINY)
        inverse = [a.reciprocal()]
        for mean, var, valid in sources:
            d = _prior_error(mean_obs, var_obs, mean, var).mean(dim=1)
            e = (d - a).clamp_min(_TINY)
            inverse.append(torch.where(valid, e.reciprocal(), torch.zeros_like(e)))
        inverse = torch.stack(inverse, dim=1)  # [S, 1 + k]
        weights = inverse[:, 1:] / inverse.sum(dim=1, keepdim=True)
        weights = torch.where(torch.isfinite(weights), weights, torch.zeros_like(weights))
        total = weights.sum(dim=1)
        cap = gain.to(total.dtype) if isinstance(gain, Tensor) else gain
        shrink = torch.where(total > cap, cap / total.clamp_min(_TINY), torch.ones_like(total))
        return weights * shrink[:, None]


def kalman_update(
    mean_obs: Tensor,
    var_obs: Tensor,
    mean_prior: Tensor,
    var_prior: Tensor,
    gain: Union[float, Tensor],
    guard_threshold: float = 100.0,
    prior_valid: Optional[Tensor] = None,
    *,
    guard: str = "upper",
    gain_rule: str = "fixed",
    count: Optional[int] = None,
    decisions: str = "layer",
    noise: Optional[Tensor] = None,
    time: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Combine the predicted and the observed statistics (method.md section 3).

    With ``p = gain``::

        mean = p * mean_prior + (1 - p) * mean_obs
        var  = p * var_prior  + (1 - p) * var_obs + p * (1 - p) * (mean_obs - mean_prior)^2

    the mean and variance of the mixture ``p * N(prior) + (1 - p) * N(obs)``. The guard of the
    released code keeps the observed statistics when ``mean(var_prior / var_obs) >=
    guard_threshold`` or that ratio is not finite (so a channel with zero observed variance
    rejects it); a prior with a non-finite mean is rejected, and one whose variance is zero
    everywhere is "no prior". The choice is a tensor ``where`` (no host synchronisation), and
    the branch not taken receives exactly zero gradient.

    ``decisions`` says over what the guard (and the measured gain) decide: ``"layer"`` takes the
    means over all groups and channels and decides once for the layer (the released code);
    ``"group"`` takes them over each group's channels and decides per group, so that a group's
    result depends on its own rows and prior only, as on a device that holds only that group.

    ``guard="two_sided"`` decides on the geometric mean instead and rejects under-estimates too:
    the prior is used when ``|mean(log(var_prior / var_obs))| < log(guard_threshold)``.
    ``gain_rule="kalman"`` replaces ``p`` by ``min(gain, measured_gain(...))``
    (:func:`measured_gain`): the prior is trusted by how well it predicted this step.

    Args:
        mean_obs, var_obs: observed statistics ``[S, C]``.
        mean_prior, var_prior: predicted statistics ``[S, C]``; must be finite where
            ``prior_valid`` is true (see :func:`prior_from_rows`).
        gain: ``p`` in ``[0, 1]``, the weight on the prediction (a float or a 0-dim tensor,
            e.g. a warm-up ramp).
        guard_threshold: ratio at or above which the prior is rejected. Default: 100.
        prior_valid: optional bool tensor, 0-dim or ``[S]`` (per group); false rejects the
            prior (of that group, or with ``decisions="layer"`` of the layer).
        guard: ``"upper"`` (the released guard) or ``"two_sided"``. Default: ``"upper"``.
        gain_rule: ``"fixed"`` (the released code) or ``"kalman"``. Default: ``"fixed"``.
        count: values behind one group's observed statistics; needed by ``gain_rule="kalman"``
            when no group has a measured spread (one group, or ``noise`` missing).
        decisions: ``"layer"`` (the released code) or ``"group"``. Default: ``"layer"``.
        noise: ``[S]`` observation noise of each group (:func:`row_spread`), for
            ``gain_rule="kalman"`` with ``decisions="group"``.
        time: ``(running_mean, running_var, valid)``: the layer's running statistics ``[C]``
            (buffers, no gradient) and a 0-dim or ``[S]`` bool flag, fused as a second prior
            (this library's time prior, not the paper's; needs ``gain_rule="kalman"`` and
            ``decisions="group"``). The weights of the observation, the prior and the running
            statistics are :func:`fusion_weights` (the guard's rejection, a false flag or a
            non-finite running statistic give a source weight 0), and the result is the mean
            and variance of the three-component mixture, ``mean = sum_i w_i mu_i``, ``var =
            sum_i w_i (v_i + (mu_i - mean)^2)``; with the running statistics' weight 0 it is
            the two-component update above, up to rounding.

    Returns:
        ``(mean, var, used_prior)``: ``[S, C]`` float32 statistics and a bool tensor, ``[S]``
        with ``decisions="group"``, else 0-dim.
    """
    if not isinstance(gain, Tensor) and not 0.0 <= gain <= 1.0:
        raise ValueError(f"gain must be in [0, 1] (got {gain})")
    if guard not in GUARD_MODES:
        raise ValueError(f"guard must be one of {GUARD_MODES} (got {guard!r})")
    if gain_rule not in GAIN_RULES:
        raise ValueError(f"gain_rule must be one of {GAIN_RULES} (got {gain_rule!r})")
    if decisions not in DECISION_SCOPES:
        raise ValueError(f"decisions must be one of {DECISION_SCOPES} (got {decisions!r})")
    per_group = decisions == "group"
    if time is not None and (gain_rule != "kalman" or not per_group):
        raise ValueError(
            "the time prior (running statistics as a third source) needs gain_rule='kalman' and "
            f"decisions='group' (got gain_rule={gain_rule!r}, decisions={decisions!r}); set "
            "those, or time_prior=False")
    if gain_rule == "kalman" and count is None and (
            noise is None if per_group else mean_obs.shape[0] < 2):
        raise ValueError("gain_rule='kalman' without a measured spread needs count (values "
                         "per group)")

    def over(t: Tensor, reduce: str) -> Tensor:  # over each group's channels, or everything
        return getattr(t, reduce)(dim=1) if per_group else getattr(t, reduce)()

    with torch.no_grad():
        if guard == "upper":
            ratio = over(var_prior / var_obs, "mean")
            used = torch.isfinite(ratio) & (ratio < guard_threshold)
        else:
            log_ratio = over((var_prior.clamp_min(_TINY) / var_obs.clamp_min(_TINY)).log(),
                             "mean")
            used = torch.isfinite(log_ratio) & (log_ratio.abs() < math.log(guard_threshold))
        used = used & over(var_prior != 0, "any") & over(torch.isfinite(mean_prior), "all")
        if prior_valid is not None:
            used = used & (prior_valid if per_group or prior_valid.dim() == 0
                           else prior_valid.all())
    keep = used[:, None] if per_group else used  # broadcast over the channels
    # A rejected prior (possibly inf/nan) is swapped out before any arithmetic, so the branch
    # not taken cannot turn its zero gradient into nan (0 * inf).
    mean_prior = torch.where(keep, mean_prior, mean_obs.detach())
    var_prior = torch.where(keep, var_prior, var_obs.detach())
    if time is not None:
        return _three_sources(mean_obs, var_obs, mean_prior, var_prior, used, time, gain,
                              count or 2, noise)
    if gain_rule == "kalman":
        measured = measured_gain(mean_obs, var_obs, mean_prior, var_prior, count or 2,
                                 decisions=decisions, noise=noise)
        gain = torch.clamp(measured, max=gain) if not isinstance(gain, Tensor) \
            else torch.minimum(measured, gain.to(measured.dtype))
        if per_group:
            gain = gain[:, None]
    if isinstance(gain, Tensor):
        gain = gain.to(mean_obs.dtype)
    diff = mean_obs - mean_prior
    mean = torch.lerp(mean_obs, mean_prior, gain)
    var = torch.lerp(var_obs, var_prior, gain) + (gain * (1.0 - gain)) * diff.square()
    return torch.where(keep, mean, mean_obs), torch.where(keep, var, var_obs), used


def _three_sources(mean_obs: Tensor, var_obs: Tensor, mean_prior: Tensor, var_prior: Tensor,
                   used: Tensor, time: Tuple[Tensor, Tensor, Tensor], gain: Union[float, Tensor],
                   count: int, noise: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`kalman_update` with the running statistics as a third source (``time``), for
    per-group decisions; the prior was already swapped for the observation where rejected."""
    running_mean, running_var, valid = time
    with torch.no_grad():
        # copies: the buffers change in place after the step, and carry no gradient
        time_mean = running_mean.detach().to(mean_obs.dtype, copy=True).expand_as(mean_obs)
        time_var = running_var.detach().to(var_obs.dtype, copy=True).expand_as(var_obs)
        ok = valid.expand(mean_obs.shape[0]) & torch.isfinite(time_mean).all(dim=1) \
            & torch.isfinite(time_var).all(dim=1)
        time_mean = torch.where(ok[:, None], time_mean, mean_obs)
        time_var = torch.where(ok[:, None], time_var, var_obs)
        weights = fusion_weights(mean_obs, var_obs, [(mean_prior, var_prior, used),
                                                     (time_mean, time_var, ok)],
                                 gain, count, noise).to(mean_obs.dtype)
    w_prior, w_time = weights[:, :1], weights[:, 1:]
    w_obs = 1.0 - w_prior - w_time
    # centred on the observation: no cancellation of large means
    mean = mean_obs + w_prior * (mean_prior - mean_obs) + w_time * (time_mean - mean_obs)
    var = (w_obs * (var_obs + (mean_obs - mean).square())
           + w_prior * (var_prior + (mean_prior - mean).square())
           + w_time * (time_var + (time_mean - mean).square()))
    return mean, var, used


def group_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``y = x * scale[s, c] + shift[s, c]`` for every row of group ``s``, in ``x``'s dtype.

    Args:
        x: ``[N, C, *spatial]``.
        scale, shift: ``[S, C]`` (float32); ``S`` must divide ``N``.
    """
    groups, channels = scale.shape
    m = _check_groups(x, groups)
    rows = x.reshape(groups, m, channels, -1)  # [S, m, C, L]
    y = torch.addcmul(shift[:, None, :, None], rows, scale[:, None, :, None])
    return y.to(x.dtype).reshape(x.shape)


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> Tensor:
    """``y = weight * (x - mean[s]) / sqrt(var[s] + eps) + bias`` per group ``s``.

    Args:
        x: ``[N, C, *spatial]``.
        mean, var: ``[S, C]`` statistics; ``S`` must divide ``N``.
        weight, bias: ``[C]`` affine parameters shared by all groups, or ``None``.
        eps: added to the variance.
    """
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    return group_affine(x, scale, shift)


def prior_from_rows(rows: Tensor, groups: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Predicted statistics from the shadow rows of each group (method.md section 4).

    The prior of group ``s`` is the mean and biased variance over its shadow rows and their
    spatial positions. Non-finite values (an overflow under half precision, say) are replaced by
    zero before the moments are taken, so that neither the forward nor the backward pass meets
    them, and the returned flag rejects that group's prior.

    Args:
        rows: shadow rows ``[S * K, C, *spatial]``, ``K`` rows per group.
        groups: ``S``.

    Returns:
        ``(mean_prior, var_prior, valid)``: ``[S, C]`` float32 and a ``[S]`` bool tensor.
    """
    finite = torch.isfinite(rows)
    mean, var = group_moments(torch.where(finite, rows, torch.zeros_like(rows)), groups)
    return mean, var, finite.reshape(groups, -1).all(dim=1)


def sample_rows(
    mean: Tensor,
    var: Tensor,
    rows_per_group: int,
    spatial: Tuple[int, ...],
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Draw pseudo-rows ``z ~ N(mean[s, c], var[s, c])`` independently at every position.

    The sample is reparameterised (``z = mean + sqrt(var) * noise``), so gradients flow back into
    the statistics it was drawn from, as in the released code. A zero variance gets a zero
    gradient instead of an infinite one.

    Args:
        mean, var: ``[S, C]``.
        rows_per_group: ``K``, rows drawn for each group.
        spatial: spatial shape of each row.
        generator: optional random generator.

    Shape:
        - Output: ``[S * K, C, *spatial]`` in ``mean``'s dtype, rows of group ``s`` contiguous.
    """
    groups, channels = mean.shape
    noise = torch.randn(
        (groups, rows_per_group, channels) + tuple(spatial),
        generator=generator, device=mean.device, dtype=mean.dtype,
    )
    view = (groups, 1, channels) + (1,) * len(spatial)
    std = safe_std(var)
    z = torch.addcmul(mean.reshape(view), noise, std.reshape(view))  # [S, K, C, *spatial]
    return z.reshape((groups * rows_per_group, channels) + tuple(spatial))


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    momentum: float,
    count: int,
    group0_only: bool = False,
) -> None:
    """Exponential moving average of the combined statistics, in place.

    ``running = (1 - momentum) * running + momentum * stat``, where ``stat`` is the average over
    the groups of the combined statistics (or group 0's alone, the released code's choice). The
    variance is made unbiased with ``count / (count - 1)``, ``count`` being the number of values
    behind one group's statistics (rows per group times spatial positions), as BatchNorm does.
    A step whose statistics are not finite leaves the buffers unchanged.

    Args:
        running_mean, running_var: ``[C]`` buffers, updated in place.
        mean, var: combined statistics ``[S, C]``.
        momentum: weight of the new value.
        count: values per group; must be at least 2.
        group0_only: use group 0's statistics only. Default: ``False`` (all groups).
    """
    with torch.no_grad():
        stat_mean = mean[0] if group0_only else mean.mean(dim=0)
        stat_var = (var[0] if group0_only else var.mean(dim=0)) * (count / (count - 1))
        finite = torch.isfinite(stat_mean).all() & torch.isfinite(stat_var).all()
        new_mean = torch.lerp(running_mean.to(stat_mean.dtype), stat_mean, momentum)
        new_var = torch.lerp(running_var.to(stat_var.dtype), stat_var, momentum)
        running_mean.copy_(torch.where(finite, new_mean, running_mean.to(new_mean.dtype)))
        running_var.copy_(torch.where(finite, new_var, running_var.to(new_var.dtype)))


def observation_noise(real: Tensor, options: StepOptions, var_obs: Tensor) -> Optional[Tensor]:
    """The per-group noise the measured gain needs (:func:`row_spread`), or ``None`` where the
    options do not measure it (a fixed gain, or decisions for the whole layer)."""
    if options.gain_rule != "kalman" or options.decisions != "group":
        return None
    return row_spread(real, options.groups, var_obs)


def prior_offered(var_prior: Tensor, decisions: str) -> Tensor:
    """Whether a prior was offered (what the guard counters count), per group or for the layer:
    a prior whose variance is zero everywhere is no prior."""
    offered = var_prior != 0
    return offered.any(dim=1) if decisions == "group" else offered.any()


def combine(
    mean_obs: Tensor,
    var_obs: Tensor,
    prior: Optional[Tuple[Tensor, Tensor]],
    prior_valid: Optional[Tensor],
    options: StepOptions,
    count: int,
    real: Tensor,
    running: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The combined statistics of one step and whether the prior was used (:func:`kalman_update`
    with the step's options, ``count`` values per group, ``real`` the real rows for the
    observation noise); ``running`` is fused only with ``options.time_prior``. Without a prior
    and a time prior: the observed statistics."""
    o = options
    time = running if o.time_prior else None
    if prior is None and time is None:
        return mean_obs, var_obs, torch.zeros((), dtype=torch.bool, device=mean_obs.device)
    if prior is None:  # the time prior alone: an absent prior, rejected in every group
        prior = (mean_obs.detach(), var_obs.detach())
        prior_valid = torch.zeros(mean_obs.shape[0], dtype=torch.bool, device=mean_obs.device)
    mean, var, used = kalman_update(
        mean_obs, var_obs, prior[0].to(mean_obs.dtype), prior[1].to(var_obs.dtype), o.gain,
        o.guard_threshold, prior_valid, guard=o.guard, gain_rule=o.gain_rule, count=count,
        decisions=o.decisions, noise=observation_noise(real, o, var_obs), time=time,
    )
    return mean, var, used


def training_step(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    options: StepOptions,
    prior: Optional[Tuple[Tensor, Tensor]] = None,
    prior_valid: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    running: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
    grad_history: Optional[Tuple[Tensor, Tensor]] = None,
) -> StepResult:
    """One BKN training step in composite form (see :class:`StepOptions`).

    The real rows are normalized with the observed statistics combined with the prior (supplied,
    or the moments of the incoming shadow rows) and, with ``options.time_prior``, the layer's
    running statistics ``running = (running_mean, running_var, valid)``; the output's shadow
    rows are fresh samples of the combined statistics (method.md section 4). With
    ``options.backward_window > 1``, ``grad_history = (history, filled)`` smooths the
    gradient reaching the observed statistics (:func:`smooth_statistics_gradient`).
    """
    o = options
    real = x[: o.real_rows]
    if o.shadow_prior:
        mean_prior, var_prior, prior_valid = prior_from_rows(x[o.real_rows:], o.groups)
        prior = (mean_prior, var_prior)
    mean_obs, var_obs = group_moments(real, o.groups)
    if o.backward_window > 1:
        if grad_history is None:
            raise ValueError("backward_window > 1 needs grad_history (the past gradients)")
        mean_obs, var_obs = smooth_statistics_gradient(mean_obs, var_obs, *grad_history,
                                                       eps=o.eps)
    available = torch.zeros((), dtype=torch.bool, device=x.device)
    if prior is not None:
        if o.detach_prior:
            prior = (prior[0].detach(), prior[1].detach())
        available = prior_offered(prior[1], o.decisions)
    mean, var, used = combine(
        mean_obs, var_obs, prior, prior_valid, o,
        (o.real_rows // o.groups) * math.prod(x.shape[2:]), real, running)
    if prior is None:
        used = available
    y = normalize(real, mean, var, weight, bias, o.eps)
    if o.shadow_rows:
        samples = sample_rows(mean, var, o.shadow_rows, tuple(x.shape[2:]), generator=generator)
        if o.normalized:
            samples = normalize(samples, mean, var, weight, bias, o.eps)
        y = torch.cat([y, samples.to(y.dtype)])
    return StepResult(y, mean, var, used, available)
