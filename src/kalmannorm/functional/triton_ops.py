"""The ``triton`` backend: the BKN training step as ``torch.library`` custom ops on CUDA.

Three operators wrap the kernels of :mod:`.triton_kernels` (docs/gpu.md):

- ``kalmannorm::bkn_forward`` (functional, with a registered autograd formula): statistics,
  guard, normalization and fresh shadow-row samples, 2 launches (3 with the measured gain of
  ``gain_rule="kalman"`` decided for the layer, which a one-program kernel computes between
  them; decided per group, ``decisions="group"``, the apply kernel computes it);
- ``kalmannorm::bkn_backward`` (functional): the slab-local backward, 1 launch, plus one sum
  over the groups for dweight/dbias;
- ``kalmannorm::bkn_update_buffers`` (mutates the layer's buffers): running averages,
  ``num_batches_tracked`` and guard counters, 1 launch.

Being ``torch.library.triton_op`` operators, eager mode, ``torch.compile`` (no graph break; the
compiler sees the kernels) and CUDA graphs run the same kernels. Nothing synchronises with the
host: the guard is decided on the device, per statistics group (``decisions="group"``, each
group's decision from its own rows and prior) or for the layer, with either guard and gain rule. Samples come from Philox keyed by a seed tensor drawn
on the device (one ``randint`` per layer step, from the caller's generator) and by each shadow
element's index, and the backward regenerates them, so no noise is stored; they differ bitwise
from ``torch.randn``'s stream (same distribution). Gradients are first-order; double backward
needs the composite backend.

The kernels also run on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before this module is imported), which is how the test suite checks them without a GPU.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from .composite import DECISION_SCOPES, GAIN_RULES, GUARD_MODES, StepOptions, StepResult

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
triton = None
if _INTERPRET or torch.cuda.is_available():  # only where a kernel can run: no import cost else
    try:  # triton is optional: CUDA wheels of torch bring it, CPU wheels do not
        import triton
        from torch.library import triton_op, wrap_triton

        from . import triton_kernels as K
    except ImportError:  # pragma: no cover - exercised where triton is absent
        triton = None

__all__ = ["available", "supports", "supports_options", "supports_buffers", "training_step",
           "update_buffers", "batch_renorm", "update_running_stats", "torch_noise"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_state = {"torch_noise": False, "ops": False, "no_launch": False}


def available() -> bool:
    """Whether triton is importable here."""
    return triton is not None


def supports(x: Tensor) -> bool:
    """Whether the kernels handle ``x``: triton installed, a CUDA tensor (or any tensor under
    the Triton interpreter), float32/bfloat16/float16, fewer than 2**31 elements."""
    if triton is None or torch.jit.is_scripting():
        return False
    if not (x.is_cuda or _INTERPRET):
        return False
    return x.dtype in _DTYPES and x.dim() >= 2 and 0 < x.numel() < 2 ** 31  # int32 offsets


def supports_options(options: StepOptions) -> bool:
    """Every guard (``"upper"``, ``"two_sided"``), gain rule (``"fixed"``, ``"kalman"``) and
    decision scope (``"group"``, ``"layer"``) with a float gain (not a warm-up's tensor); not the
    time prior nor a smoothed backward."""
    return options.guard in GUARD_MODES and options.gain_rule in GAIN_RULES \
        and options.decisions in DECISION_SCOPES and not isinstance(options.gain, Tensor) \
        and not options.time_prior and options.backward_window == 1


@contextlib.contextmanager
def torch_noise() -> Iterator[None]:
    """Tests: draw the samples' noise with ``torch.randn`` from the step's generator, exactly as
    the composite form does (stored for the backward), so both backends can be compared."""
    previous = _state["torch_noise"]
    _state["torch_noise"] = True
    try:
        yield
    finally:
        _state["torch_noise"] = previous


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (``n >= 1``). Plain Python: triton's own helpers are
    constexpr functions whose host-side calls cost about 10 us each, several times per step."""
    return 1 << (n - 1).bit_length()


def _strides(t: Tensor) -> Tuple[Tensor, int, int, int]:
    """``t`` (or a dense copy) and its row, channel and position strides: the positions of a
    ``[N, C, *spatial]`` tensor must be one strided axis (contiguous or channels-last)."""
    if t.dim() == 2:
        return t, t.stride(0), t.stride(1), 1
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d):
        if (fmt is torch.channels_last and t.dim() != 4) or \
                (fmt is torch.channels_last_3d and t.dim() != 5):
            continue
        if t.is_contiguous(memory_format=fmt):
            return t, t.stride(0), t.stride(1), t.stride(-1)
    t = t.contiguous()
    return t, t.stride(0), t.stride(1), 1


def _blocks(x: Tensor, sC: int, groups: int) -> Tuple[int, int]:
    """Channel block ``BC`` and position block ``BL`` of a program's tile (fixed, no autotuning:
    a changed tile would change the reduction order)."""
    channels = x.shape[1]
    length = math.prod(x.shape[2:])
    # enough programs to fill a GPU; the interpreter runs programs one by one, so fewer there
    min_programs = 1 if _INTERPRET else 256
    if sC == 1 and length > 1:  # channels-last: tiles run along the contiguous channels
        bc = min(_pow2(channels), 32)
        while bc > 8 and groups * _cdiv(channels, bc) < min_programs:
            bc //= 2
        bl = max(1, min(_pow2(length), 2048 // bc))
    else:
        bl = min(_pow2(length), 512)
        bc = max(1, min(_pow2(channels), 2048 // bl))
        while bc > 1 and groups * _cdiv(channels, bc) < min_programs:
            bc //= 2
    return bc, bl


def _use_ops() -> bool:
    """The custom ops under ``torch.compile`` (or when tests ask for them); plain calls else."""
    return torch.compiler.is_compiling() or _state["ops"]


class _Skip:
    """A launcher that launches nothing (:func:`without_launches`)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _direct(kernel):
    """Eager launches call the JIT kernel itself (``wrap_triton`` is for traced calls)."""
    return _Skip() if _state["no_launch"] else kernel


@contextlib.contextmanager
def without_launches() -> Iterator[None]:
    """Benchmarks: eager steps do everything but launch the kernels (outputs are left
    uninitialised), so that the host time of the library's own path (dispatch, module, autograd
    node, allocations, tile choice) can be measured anywhere, the Triton launcher excluded."""
    previous = _state["no_launch"]
    _state["no_launch"] = True
    try:
        yield
    finally:
        _state["no_launch"] = previous


def _forward_impl(x, weight, bias, mean_prior, var_prior, prior_valid, seed, noise,
                  real_rows, groups, shadow_rows, prior_mode, normalized, gain, eps,
                  guard_threshold, measured, per_group=False, two_sided=False, launch=_direct,
                  renorm=None):
    """``per_group``: decisions per group (``flags`` ``[2, S]``, and with ``measured`` the
    gains ``[S]``, written by the apply kernel); else for the layer (``flags`` ``[2]``, the
    measured gain ``[1]`` from the gain kernel). ``prior_valid``: ``[1]`` or ``[S]``.
    ``renorm``: ``(running_mean, running_var, limits, rd)`` for Batch Renormalization (no
    prior, no shadow rows): ``limits`` a float32 ``[2]`` tensor ``[r_max, d_max]`` or a pair of
    floats, ``rd`` the ``[2, S, C]`` float32 output of the correction ``(r, d)``."""
    x, sN, sC, sL = _strides(x)
    channels, length = x.shape[1], math.prod(x.shape[2:])
    m = real_rows // groups
    kin = (x.shape[0] - real_rows) // groups
    y, ySN, ySC, ySL = _strides(_empty_rows(x, real_rows + groups * shadow_rows, sC))
    bc, bl = _blocks(x, sC, groups)
    grid = (groups, _cdiv(channels, bc))
    nprog = grid[0] * grid[1]
    per_group = per_group and prior_mode != K.NO_PRIOR  # no prior: no decision (0-dim flags)
    measure = measured and per_group  # the measured gain per group: in the apply kernel
    rows = measure and m >= 2  # the group's noise from its rows' spread
    stats = torch.empty((4, groups, channels), dtype=torch.float32, device=x.device)
    part = torch.empty((5 if measure else 3, nprog), dtype=torch.float32, device=x.device)
    meanvar = torch.empty((2, groups, channels), dtype=torch.float32, device=x.device)
    flags = torch.empty((2, groups) if per_group else (2,), dtype=torch.bool, device=x.device)
    dummy = stats
    launch(K.stats_kernel)[grid](
        x, sN, sC, sL, stats, part,
        dummy if mean_prior is None else mean_prior, dummy if var_prior is None else var_prior,
        dummy if prior_valid is None else prior_valid,
        0 if prior_valid is None or prior_valid.numel() == 1 else 1,
        groups, channels, length, m, kin, real_rows,
        PRIOR=prior_mode, HAS_PVALID=prior_valid is not None, TWO_SIDED=two_sided,
        MEASURE=measure, ROWS=rows, BC=bc, BL=bl,
    )
    gains = stats.new_empty(0)
    count = m * length
    if measure:
        gains = stats.new_empty(groups)
    elif measured and prior_mode != K.NO_PRIOR:  # gain_rule="kalman" for the layer
        gains = _measured_gain(stats, count, gain, launch)
    rm, rv, limits, rd = renorm if renorm is not None else (dummy, dummy, (0.0, 0.0), dummy)
    lim_ptr = isinstance(limits, Tensor)
    rmax, dmax = (0.0, 0.0) if lim_ptr else limits
    launch(K.apply_kernel)[grid](
        x, y, sN, sC, sL, ySN, ySC, ySL, stats, part, flags,
        dummy if weight is None else weight, dummy if bias is None else bias, meanvar,
        dummy if noise is None else noise, seed, gains, rm, rv, limits if lim_ptr else dummy,
        rd, groups, channels, length, m, shadow_rows, real_rows, gain, eps, guard_threshold,
        2.0 / max(count - 1, 1) + 1.0 / count, float(rmax), float(dmax),
        PRIOR=prior_mode, HAS_W=weight is not None, HAS_B=bias is not None,
        NORMALIZED=normalized, NOISE_FROM_PTR=noise is not None,
        GAIN_FROM_PTR=gains.numel() > 0 and not measure, RENORM=renorm is not None,
        LIM_FROM_PTR=lim_ptr, GROUP=per_group, TWO_SIDED=two_sided, MEASURE=measure, ROWS=rows,
        RB=256 if not per_group else min(256, _pow2(grid[1])), BC=bc, BL=bl,
    )
    return y, stats, meanvar, flags, gains


def _measured_gain(stats: Tensor, count: int, gain: float, launch=_direct) -> Tensor:
    """``[min(gain, p)]``, ``p`` the measured gain (:func:`.composite.measured_gain`) of the
    ``[4, S, C]`` moments that the stats kernel wrote, computed on the device by one program;
    ``count``: values behind one group's observed statistics."""
    groups, channels = stats.shape[1:]
    out = stats.new_empty(1)
    sb = _pow2(groups)
    launch(K.gain_kernel)[(1,)](
        stats, out, groups, channels, 2.0 / max(count - 1, 1) + 1.0 / count, gain,
        GROUPED=groups >= 2, SB=sb, BC=max(1, min(_pow2(channels), 4096 // sb)))
    return out


def _empty_rows(x: Tensor, rows: int, sC: int) -> Tensor:
    """An uninitialised ``[rows, C, *spatial]`` tensor in ``x``'s dense layout."""
    fmt = torch.contiguous_format
    if sC == 1 and x.dim() in (4, 5) and math.prod(x.shape[2:]) > 1:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.empty((rows,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device,
                       memory_format=fmt)


def _backward_impl(grad_y, x, stats, flags, weight, bias, seed, noise, gains, grad_meanvar,
                   real_rows, groups, shadow_rows, prior_mode, normalized, gain, eps,
                   prior_grad, launch=_direct, rd=None):
    """``flags`` (``[2, S]`` for decisions per group, else ``[2]``) and ``gains`` (``[S]``,
    ``[1]`` or empty) as the forward returned them."""
    x, sN, sC, sL = _strides(x)
    grad_y, gSN, gSC, gSL = _strides(grad_y)
    channels, length = x.shape[1], math.prod(x.shape[2:])
    m = real_rows // groups
    kin = (x.shape[0] - real_rows) // groups
    dx = torch.empty_like(x)
    bc, bl = _blocks(x, sC, groups)
    grid = (groups, _cdiv(channels, bc))
    gpart = torch.empty((2, groups, channels), dtype=torch.float32, device=x.device)
    gprior = torch.empty((2, groups, channels) if prior_mode == K.GIVEN_PRIOR and prior_grad
                         else (0,), dtype=torch.float32, device=x.device)
    dummy = stats
    launch(K.backward_kernel)[grid](
        x, grad_y, dx, sN, sC, sL, gSN, gSC, gSL, stats, flags,
        dummy if weight is None else weight, dummy if bias is None else bias,
        dummy if noise is None else noise, seed, gains, dummy if rd is None else rd,
        dummy if grad_meanvar is None else grad_meanvar, gpart,
        gprior if gprior.numel() else dummy,
        groups, channels, length, m, shadow_rows, real_rows, kin, gain, eps,
        PRIOR=prior_mode, HAS_W=weight is not None, HAS_B=bias is not None,
        NORMALIZED=normalized, NOISE_FROM_PTR=noise is not None,
        GAIN_FROM_PTR=gains.numel() > 0, PRIOR_GRAD=prior_grad,
        HAS_GMV=grad_meanvar is not None, RENORM=rd is not None, GROUP=flags.dim() == 2,
        BC=bc, BL=bl,
    )
    return dx, gpart.sum(dim=1), gprior


def _buffers_impl(running_mean, running_var, num_batches_tracked, guard_counters, mean, var,
                  used, available, momentum, unbias, track, group0, launch=_direct,
                  count_guard=True):
    """``used``, ``available``: the step's guard decisions (``[S]`` or one), counted each."""
    groups, channels = mean.shape
    launch(K.buffers_kernel)[(1,)](
        mean, var, used, available, running_mean, running_var, num_batches_tracked,
        guard_counters, groups, channels, used.numel(), momentum, unbias, TRACK=track,
        GROUP0=group0, COUNT_GUARD=count_guard, BC=min(_pow2(channels), 1024),
    )


def _save(ctx, x, weight, bias, mean_prior, var_prior, seed, noise, stats, flags, gains,
          config):
    ctx.save_for_backward(x, stats, flags, weight, bias, seed, noise, gains)
    ctx.config = config
    ctx.prior_dtypes = (None if mean_prior is None else mean_prior.dtype,
                        None if var_prior is None else var_prior.dtype)
    ctx.mark_non_differentiable(stats, flags, gains)


def _backward_common(ctx, grad_y, grad_meanvar, backward):
    """The backward of a step for both entry points: ``backward`` is the traced op or the eager
    implementation."""
    from .cpu_fused import first_order_only

    first_order_only("triton")
    x, stats, flags, weight, bias, seed, noise, gains = ctx.saved_tensors
    real_rows, groups, shadow_rows, prior_mode, normalized, gain, eps, prior_grad = ctx.config
    prior_grad = prior_grad and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4] or (
        prior_mode == K.SHADOW_PRIOR and ctx.needs_input_grad[0]))
    if grad_y is None:
        grad_y = torch.zeros((real_rows + groups * shadow_rows,) + tuple(x.shape[1:]),
                             dtype=x.dtype, device=x.device)
    if grad_meanvar is not None:
        grad_meanvar = grad_meanvar.contiguous()
    dx, gwb, gprior = backward(
        grad_y, x, stats, flags, weight, bias, seed, noise, gains, grad_meanvar, real_rows,
        groups, shadow_rows, prior_mode, normalized, gain, eps, prior_grad)
    grad_w = None if weight is None else gwb[0].to(weight.dtype)
    grad_b = None if bias is None else gwb[1].to(bias.dtype)
    grad_mp = grad_vp = None
    if prior_mode == K.GIVEN_PRIOR and prior_grad:
        grad_mp, grad_vp = gprior[0].to(ctx.prior_dtypes[0]), gprior[1].to(ctx.prior_dtypes[1])
    return (dx, grad_w, grad_b, grad_mp, grad_vp) + (None,) * 15


class _EagerStep(torch.autograd.Function):
    """Eager mode: the same kernels without the custom-op machinery (its dispatch costs more
    host time than the kernels take on the GPU at small shapes)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean_prior, var_prior, prior_valid, seed, noise,
                real_rows, groups, shadow_rows, prior_mode, normalized, gain, eps,
                guard_threshold, prior_grad, measured, per_group, two_sided):
        y, stats, meanvar, flags, gains = _forward_impl(
            x, weight, bias, mean_prior, var_prior, prior_valid, seed, noise, real_rows,
            groups, shadow_rows, prior_mode, normalized, gain, eps, guard_threshold, measured,
            per_group, two_sided)
        _save(ctx, x, weight, bias, mean_prior, var_prior, seed, noise, stats, flags, gains,
              (real_rows, groups, shadow_rows, prior_mode, normalized, gain, eps, prior_grad))
        return y, stats, meanvar, flags, gains

    @staticmethod
    def backward(ctx, grad_y, _grad_stats, grad_meanvar, _grad_flags, _grad_gains):
        return _backward_common(ctx, grad_y, grad_meanvar, _backward_impl)


class _EagerRenorm(torch.autograd.Function):
    """Batch Renormalization in eager mode: the kernels of a step without prior, the correction
    ``(r, d)`` computed and applied by the apply kernel and kept for the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, limits, groups, eps):
        rd = torch.empty((2, groups, x.shape[1]), dtype=torch.float32, device=x.device)
        seed = torch.empty(1, dtype=torch.int64, device=x.device)  # no shadow rows: not read
        y, stats, meanvar, flags, gains = _forward_impl(
            x, weight, bias, None, None, None, seed, None, x.shape[0], groups, 0, K.NO_PRIOR,
            False, 0.0, eps, 0.0, False, renorm=(running_mean, running_var, limits, rd))
        ctx.save_for_backward(x, stats, flags, weight, bias, seed, gains, rd)
        ctx.groups, ctx.eps = groups, eps
        return y, meanvar

    @staticmethod
    def backward(ctx, grad_y, grad_meanvar):
        from .cpu_fused import first_order_only

        first_order_only("triton")
        x, stats, flags, weight, bias, seed, gains, rd = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        if grad_meanvar is not None:
            grad_meanvar = grad_meanvar.contiguous()
        dx, gwb, _ = _backward_impl(
            grad_y, x, stats, flags, weight, bias, seed, None, gains, grad_meanvar, x.shape[0],
            ctx.groups, 0, K.NO_PRIOR, False, 0.0, ctx.eps, False, rd=rd)
        return (dx, None if weight is None else gwb[0].to(weight.dtype),
                None if bias is None else gwb[1].to(bias.dtype)) + (None,) * 5


def batch_renorm(x: Tensor, running_mean: Tensor, running_var: Tensor,
                 weight: Optional[Tensor], bias: Optional[Tensor], groups: int,
                 r_max, d_max, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Batch Renormalization in training mode by the kernels, eager mode; same arguments and
    result as :func:`kalmannorm.batchrenorm.batch_renorm` with running statistics (``r_max``,
    ``d_max`` floats or 0-dim tensors, read on the device)."""
    if isinstance(r_max, Tensor) or isinstance(d_max, Tensor):
        limits = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=x.device).reshape(())
                              for v in (r_max, d_max)])
    else:
        limits = (float(r_max), float(d_max))
    y, meanvar = _EagerRenorm.apply(x, weight, bias, running_mean, running_var, limits, groups,
                                    eps)
    return y, meanvar[0], meanvar[1]


if triton is not None:

    @triton_op("kalmannorm::bkn_forward", mutates_args=())
    def bkn_forward(
        x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
        mean_prior: Optional[Tensor], var_prior: Optional[Tensor],
        prior_valid: Optional[Tensor], seed: Tensor, noise: Optional[Tensor],
        real_rows: int, groups: int, shadow_rows: int, prior_mode: int, normalized: bool,
        gain: float, eps: float, guard_threshold: float, prior_grad: bool, measured: bool,
        per_group: bool, two_sided: bool,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(y, stats [4, S, C], meanvar [2, S, C], flags [used, available] ([2] or [2, S]),
        gain [1], [S] or empty)``."""
        return _forward_impl(x, weight, bias, mean_prior, var_prior, prior_valid, seed, noise,
                             real_rows, groups, shadow_rows, prior_mode, normalized, gain, eps,
                             guard_threshold, measured, per_group, two_sided, wrap_triton)

    @triton_op("kalmannorm::bkn_backward", mutates_args=())
    def bkn_backward(
        grad_y: Tensor, x: Tensor, stats: Tensor, flags: Tensor, weight: Optional[Tensor],
        bias: Optional[Tensor], seed: Tensor, noise: Optional[Tensor], gains: Tensor,
        grad_meanvar: Optional[Tensor], real_rows: int, groups: int, shadow_rows: int,
        prior_mode: int, normalized: bool, gain: float, eps: float, prior_grad: bool,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """``(dx, [dweight; dbias] [2, C], dprior [2, S, C] or empty)``."""
        return _backward_impl(grad_y, x, stats, flags, weight, bias, seed, noise, gains,
                              grad_meanvar, real_rows, groups, shadow_rows, prior_mode,
                              normalized, gain, eps, prior_grad, wrap_triton)

    @triton_op("kalmannorm::bkn_update_buffers",
               mutates_args={"running_mean", "running_var", "num_batches_tracked",
                             "guard_counters"})
    def bkn_update_buffers(
        running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor,
        guard_counters: Tensor, mean: Tensor, var: Tensor, used: Tensor, available: Tensor,
        momentum: float, unbias: float, track: bool, group0: bool,
    ) -> None:
        """Running averages, ``num_batches_tracked`` and guard counters, in place."""
        _buffers_impl(running_mean, running_var, num_batches_tracked, guard_counters, mean, var,
                      used, available, momentum, unbias, track, group0, wrap_triton)

    def _setup_context(ctx, inputs, output) -> None:
        (x, weight, bias, mean_prior, var_prior, _, seed, noise, real_rows, groups,
         shadow_rows, prior_mode, normalized, gain, eps, _, prior_grad, _, _, _) = inputs
        _, stats, _, flags, gains = output
        _save(ctx, x, weight, bias, mean_prior, var_prior, seed, noise, stats, flags, gains,
              (real_rows, groups, shadow_rows, prior_mode, normalized, gain, eps, prior_grad))

    def _backward(ctx, grad_y, _grad_stats, grad_meanvar, _grad_flags, _grad_gains):
        return _backward_common(ctx, grad_y, grad_meanvar, bkn_backward)

    bkn_forward.register_autograd(_backward, setup_context=_setup_context)


def training_step(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    options: StepOptions,
    prior: Optional[Tuple[Tensor, Tensor]] = None,
    prior_valid: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> StepResult:
    """One BKN training step by the Triton kernels; same arguments and result as
    :func:`.composite.training_step` (samples from a different random stream)."""
    o = options
    groups, channels = o.groups, x.shape[1]
    noise = None
    if _state["torch_noise"]:  # the composite form's draw, from the same generator state
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
        if o.shadow_rows:
            noise = torch.randn((groups, o.shadow_rows, channels) + tuple(x.shape[2:]),
                                generator=generator, device=x.device, dtype=torch.float32)
    else:
        seed = torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=x.device)
    mean_prior = var_prior = None
    prior_mode = K.SHADOW_PRIOR if o.shadow_prior else K.NO_PRIOR
    if prior is not None and not o.shadow_prior:
        prior_mode = K.GIVEN_PRIOR
        mean_prior, var_prior = prior
        if o.detach_prior:
            mean_prior, var_prior = mean_prior.detach(), var_prior.detach()
        mean_prior, var_prior = mean_prior.contiguous(), var_prior.contiguous()
    valid = None  # [1] or [S] (a group's validity); contiguous for the kernel
    if prior_valid is not None:
        valid = prior_valid.reshape(-1).contiguous()
        if valid.numel() not in (1, groups):
            raise ValueError(f"prior_valid must be 0-dim or [{groups}] (got "
                             f"{tuple(prior_valid.shape)})")
    step = bkn_forward if _use_ops() else _EagerStep.apply
    y, _, meanvar, flags, _ = step(
        x, weight, bias, mean_prior, var_prior, valid, seed, noise, o.real_rows, groups,
        o.shadow_rows, prior_mode, o.normalized, float(o.gain), float(o.eps),
        float(o.guard_threshold), not o.detach_prior, o.gain_rule == "kalman",
        o.decisions == "group", o.guard == "two_sided")
    return StepResult(y, meanvar[0], meanvar[1], flags[0], flags[1])


def update_running_stats(running_mean: Tensor, running_var: Tensor,
                         num_batches_tracked: Tensor, mean: Tensor, var: Tensor,
                         momentum: Optional[float], count: int,
                         group0_only: bool = False) -> None:
    """Batch Renormalization's buffers after a step by the kernels (eager), one launch:
    ``num_batches_tracked += 1`` and :func:`.composite.update_running_stats` (``momentum=None``:
    a cumulative average, which reads the count on the host as BatchNorm does)."""
    if momentum is None:
        momentum = 1.0 / (float(num_batches_tracked) + 1.0)
    mean, var = mean.detach(), var.detach()
    _buffers_impl(running_mean, running_var, num_batches_tracked, mean, mean, var, mean, mean,
                  float(momentum), count / (count - 1), True, group0_only, count_guard=False)


def supports_buffers(mean: Tensor) -> bool:
    """Whether :func:`update_buffers` applies (statistics of a step on a supported device)."""
    return triton is not None and (mean.is_cuda or _INTERPRET) and mean.dtype == torch.float32


def update_buffers(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   num_batches_tracked: Optional[Tensor], guard_counters: Tensor,
                   step: StepResult, momentum: Optional[float], count: int,
                   group0_only: bool) -> None:
    """``kalmannorm::bkn_update_buffers`` (see :func:`.dispatch.update_buffers`)."""
    track = running_mean is not None
    if track and momentum is None:  # cumulative average; reads the count as BatchNorm does
        momentum = 1.0 / (float(num_batches_tracked) + 1.0)
    if not track:  # placeholders the kernel never reads (TRACK=False); distinct, not aliased
        running_mean, running_var, num_batches_tracked = (
            torch.empty(0, device=guard_counters.device) for _ in range(3))
    update = bkn_update_buffers if _use_ops() else _buffers_impl
    update(
        running_mean, running_var, num_batches_tracked, guard_counters,
        step.mean.detach(), step.var.detach(), step.used.reshape(-1),
        step.available.reshape(-1),
        float(momentum or 0.0), count / (count - 1), track, group0_only)
