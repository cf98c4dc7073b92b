"""The ``cpu_fused`` backend: one eager autograd node for a BKN training step on the CPU.

Wang et al., "Batch Kalman Normalization" (arXiv 1802.03133), method.md sections 3, 4 and 7.
It computes exactly what :func:`.composite.training_step` computes, but written as
torch ops the composite form costs 3-10x a BatchNorm on CPU: ``var_mean`` is a slow Welford pass,
every full-size temporary (``x.float()``, the float32 affine result, slices of the shadow rows,
``torch.cat``) is a fresh allocation that the CPU allocator pays in page faults, and autograd
replays all of it backwards. Here one :class:`torch.autograd.Function` does the whole layer:

- forward: per-row sums, the centred second moment in the output buffer (two-pass, exact), the
  Kalman update on ``[S, C]`` tensors, and one ``addcmul`` writing the real rows' output and one
  writing the shadow rows' samples into a single preallocated output (no ``cat``);
- backward: the two reductions per (group, channel), ``sum(g)`` and ``sum(g * (x - mean))``, in
  one pass by the native BatchNorm backward kernel run on an ``[1, N * C, L]`` view (each
  (row, channel) is one "channel" there), the ``[S, C]`` chain by autograd on the small graph
  kept from the forward, and ``dx = g * a + x * b + c`` written once.

The full-size tensors touched are those of a BatchNorm (input, output, gradients) plus the
shadow rows' noise, which the reparameterised sample needs for its gradient as the composite
form does. Statistics are float32 (float64 for float64 inputs) whatever the input dtype.

The kernel is first-order and is used in eager mode only; under ``torch.compile`` the composite
form is traced (the compiler fuses it itself). Double backward needs the composite backend
(``kalmannorm.use_backend("composite")``); the backward says so when a higher-order graph is
requested.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .composite import StepOptions, StepResult, combine, prior_offered, safe_std, stat_dtype

__all__ = ["supports", "supports_options", "preferred", "training_step"]


def first_order_only(backend: str) -> None:
    """Raise if a backward runs with grad mode on (``create_graph=True``): it is first-order."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the {backend!r} kernels of kalmannorm compute first-order gradients only; for "
            "double backward (create_graph=True, e.g. a gradient penalty) run the forward under "
            "kalmannorm.use_backend('composite')"
        )


def supports_options(options: StepOptions) -> bool:
    """Every option of the composite form but a tensor gain (``gain_warmup``) and a smoothed
    backward (``backward_window``)."""
    return not isinstance(options.gain, Tensor) and options.backward_window == 1


def supports(x: Tensor) -> bool:
    """Whether this kernel can compute a step on ``x``: eager mode, a floating dtype, at least
    one value (it also runs on CUDA, where the ``triton`` backend is the fast one)."""
    if torch.compiler.is_compiling() or torch.jit.is_scripting():
        return False
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return False
    return x.dim() >= 2 and x.numel() > 0


def preferred(x: Tensor) -> bool:
    """Whether ``"auto"`` picks this kernel for ``x``: where it was measured faster than the
    composite form (docs/performance.md): the CPU, except half precision in channels-last."""
    if x.device.type != "cpu" or not supports(x):
        # On an H100 the composite form was faster than this kernel (launch-bound there); the
        # kernel's savings are CPU memory passes.
        return False
    # The generic (channels-last) path needs float32 copies of half-precision tensors on CPU;
    # measured 2-3x slower there than the composite form.
    return not (x.dtype in (torch.bfloat16, torch.float16) and not x.is_contiguous())


def _dense(x: Tensor) -> Tensor:
    """``x`` itself if it is contiguous or channels-last, else a contiguous copy."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def _format_of(x: Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _rows(t: Tensor, groups: int) -> Tensor:
    """``[N, C, *spatial]`` as a ``[S, m, C, L]`` view (a view for both dense layouts)."""
    return t.view(groups, t.shape[0] // groups, t.shape[1], -1)


def _bn_reduce(grad: Tensor, inp: Tensor, center: Tensor) -> Tuple[Tensor, Tensor]:
    """``(sum(grad), sum(grad * (inp - center)))`` over the last axis of ``[S, m, C, L]`` views.

    One fused pass by the native BatchNorm backward kernel on an ``[1, S * m * C, L]`` view, each
    (row, channel) being one of its channels. ``center`` is ``[S, C]`` (shared by the rows of a
    group). Both inputs must be contiguous. Returns ``[S, m, C]`` tensors in the stat dtype.
    """
    groups, m, channels, length = inp.shape
    sdt = stat_dtype(inp.dtype)
    if inp.device.type != "cpu":
        # The CUDA native kernel needs a weight and running buffers; reductions are cheap there.
        g = grad.to(sdt)
        return g.sum(-1), (g * (inp.to(sdt) - center.to(sdt)[:, None, :, None])).sum(-1)
    rows = groups * m * channels
    # contiguous: the kernel reads ``save_mean`` as dense memory, and a stride-0 view (an
    # expanded zero centre) would be read past its end
    mean = center.to(sdt)[:, None, :].expand(groups, m, channels).reshape(rows).contiguous()
    ones = torch.ones(rows, dtype=sdt, device=inp.device)
    _, dot, total = torch.ops.aten.native_batch_norm_backward(
        grad.view(1, rows, length), inp.view(1, rows, length), None, None, None, mean, ones,
        True, 0.0, [False, True, True],
    )
    return total.view(groups, m, channels), dot.view(groups, m, channels)


def _affine_into(v: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> None:
    """``out = v * scale[s, c] + shift[s, c]`` for ``[S, m, C, L]`` views, in ``out``'s dtype.

    Contiguous views go through the native evaluation-mode BatchNorm kernel on an
    ``[1, S * m * C, L]`` view (weight ``scale``, bias ``shift``, zero mean, unit variance, no
    eps: ``x * w + b`` exactly), which vectorizes over ``L``; a broadcast ``addcmul`` with two
    per-channel operands does not on CPU and costs twice as much.
    """
    groups, m, channels, length = v.shape
    if v.device.type != "cpu" or v.dtype != out.dtype:
        # GPUs broadcast both operands in one kernel; on CPU this is only for float32 samples
        # into a half-precision output (one rounding)
        torch.addcmul(shift[:, None, :, None], v, scale[:, None, :, None], out=out)
    elif v.numel() < 1 << 16:  # small: fewer ops beat fewer passes
        torch.mul(v, scale[:, None, :, None], out=out)
        out.add_(shift[:, None, :, None])
    elif v.is_contiguous() and out.is_contiguous():
        rows = groups * m * channels
        sdt = scale.dtype
        weight = scale[:, None, :].expand(groups, m, channels).reshape(rows)
        bias = shift[:, None, :].expand(groups, m, channels).reshape(rows)
        zeros = torch.zeros(rows, dtype=sdt, device=v.device)
        ones = torch.ones(rows, dtype=sdt, device=v.device)
        empty = torch.empty(0, dtype=sdt, device=v.device)
        torch.ops.aten.native_batch_norm.out(
            v.view(1, rows, length), weight, bias, zeros, ones, False, 0.0, 0.0,
            out=out.view(1, rows, length), save_mean=empty, save_invstd=empty.clone(),
        )
    else:
        torch.mul(v, scale[:, None, :, None], out=out)
        out.add_(shift[:, None, :, None])


def _sum_rows(v: Tensor) -> Tensor:
    """Sum of a ``[S, m, C, L]`` view over rows and positions, ``[S, C]`` in the stat dtype."""
    sdt = stat_dtype(v.dtype)
    if v.dtype == sdt:
        return v.sum(dim=(1, 3))
    return v.sum(dim=-1, dtype=sdt).sum(dim=1)


def _moments_into(v: Tensor, scratch: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance per group of a ``[S, m, C, L]`` view, in the stat dtype.

    float32/float64: two passes with the same ops as
    :func:`kalmannorm.functional.group_moments` (bit-identical results); ``scratch`` (same shape
    and layout as ``v``, the output buffer, so no allocation) receives ``(v - mean)^2`` and is
    overwritten later by the caller. Half precision, contiguous: ``sum((v - mean) * v)`` in
    float32 registers by the BatchNorm backward kernel, never rounding ``v - mean`` to the input
    dtype (relative error about ``1e-7 * (mean / std)^2``).
    """
    sdt = stat_dtype(v.dtype)
    count = v.shape[1] * v.shape[3]
    if v.dtype == sdt:
        mean = v.sum(dim=(1, 3)) / count  # [S, C]
        torch.sub(v, mean[:, None, :, None], out=scratch)  # [S, m, C, L]
        return mean, scratch.square_().sum(dim=(1, 3)) / count
    if v.is_contiguous():  # two kernel passes, float32 accumulation, no cast of v
        zero = torch.zeros((), dtype=sdt, device=v.device).expand(v.shape[0], v.shape[2])
        total, _ = _bn_reduce(v, v, zero)
        mean = total.sum(dim=1) / count
        _, dot = _bn_reduce(v, v, mean)
        return mean, dot.sum(dim=1) / count
    mean = v.sum(dim=(1, 3), dtype=sdt) / count
    return mean, (v.to(sdt) - mean[:, None, :, None]).square().sum(dim=(1, 3)) / count


def _reduce_grad(g: Tensor, x: Tensor, center: Tensor, scratch: Tensor) -> Tuple[Tensor, Tensor]:
    """``(sum(g), sum(g * (x - center)))`` per group of ``[S, m, C, L]`` views, ``[S, C]``."""
    if g.is_contiguous() and x.is_contiguous():
        total, dot = _bn_reduce(g, x, center)
        return total.sum(dim=1), dot.sum(dim=1)
    sdt = stat_dtype(x.dtype)
    torch.sub(x, center[:, None, :, None].to(sdt), out=scratch)
    scratch.mul_(g)
    return _sum_rows(g), _sum_rows(scratch)


class _KalmanNormFunction(torch.autograd.Function):
    """The BKN training step of one layer, with or without shadow rows; see the module doc."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean_prior, var_prior, options: StepOptions, prior_valid,
                generator, need_graph, running):
        o = options
        real_rows, groups, eps = o.real_rows, o.groups, o.eps
        shadow_rows, shadow_prior, normalized, detach_prior = (o.shadow_rows, o.shadow_prior,
                                                               o.normalized, o.detach_prior)

        sdt = stat_dtype(x.dtype)
        x = _dense(x)
        y = torch.empty_like(x)
        xr, yr = _rows(x[:real_rows], groups), _rows(y[:real_rows], groups)  # [S, m, C, L]
        mean_obs, var_obs = _moments_into(xr, yr)
        count = xr.shape[1] * xr.shape[3]

        valid = prior_valid
        if shadow_prior:
            xs, ys = _rows(x[real_rows:], groups), _rows(y[real_rows:], groups)  # [S, K, C, L]
            mean_prior, var_prior = _moments_into(xs, ys)
            # A non-finite shadow row (half-precision overflow) rejects its group's prior; its
            # moments are swapped for zeros so that no inf/nan enters the arithmetic or gradient.
            finite = torch.isfinite(mean_prior).all(dim=1) & torch.isfinite(var_prior).all(dim=1)
            valid = finite if valid is None else valid & finite
            available = prior_offered(var_prior, o.decisions)  # before the swap: nan != 0
            mean_prior = torch.where(finite[:, None], mean_prior, torch.zeros_like(mean_prior))
            var_prior = torch.where(finite[:, None], var_prior, torch.zeros_like(var_prior))
        has_prior = mean_prior is not None
        if has_prior and not shadow_prior:
            available = prior_offered(var_prior, o.decisions)
        elif not has_prior:
            available = torch.zeros((), dtype=torch.bool, device=x.device)

        def leaf(t: Optional[Tensor], grad: bool = True) -> Optional[Tensor]:
            if t is None:
                return None
            return t.detach().to(sdt).requires_grad_(need_graph and grad)

        leaves = [leaf(mean_obs), leaf(var_obs), leaf(mean_prior, not detach_prior),
                  leaf(var_prior, not detach_prior), leaf(weight), leaf(bias)]
        mo, vo, mp, vp, w, b = leaves
        with torch.enable_grad():
            # the running statistics (time prior) are constants here: buffers, no gradient
            mean, var, used = combine(mo, vo, (mp, vp) if has_prior else None, valid, o, count,
                                      x[:real_rows], running)
            if not has_prior:
                used = torch.zeros((), dtype=torch.bool, device=x.device)
            scale = torch.rsqrt(var + eps)
            if w is not None:
                scale = scale * w
            shift = -mean * scale
            if b is not None:
                shift = shift + b
            zmean = zstd = noise = None
            if shadow_rows:
                zmean, zstd = mean, safe_std(var)
                if normalized:
                    zmean, zstd = mean * scale + shift, zstd * scale

        with torch.no_grad():
            _affine_into(xr, scale, shift, yr)
            if shadow_rows:
                spatial = tuple(x.shape[2:])
                noise = torch.randn(
                    (groups, shadow_rows, x.shape[1]) + spatial,
                    generator=generator, device=x.device, dtype=sdt,
                ).view((groups * shadow_rows, x.shape[1]) + spatial)  # as sample_rows draws it
                ys = _rows(y[real_rows:], groups)
                _affine_into(_rows(noise, groups), zstd, zmean, ys)
                if noise.dtype != x.dtype:
                    # the gradient's sum(g * noise) runs in the gradient's dtype; the samples
                    # themselves were drawn and applied in float32 (half the memory kept)
                    noise = noise.to(x.dtype)

        ctx.config = (real_rows, groups, count, shadow_prior, shadow_rows, has_prior)
        ctx.graph = (leaves, scale, shift, zmean, zstd, mean, var, valid)
        ctx.param_dtypes = tuple(None if t is None else t.dtype
                                 for t in (weight, bias, mean_prior, var_prior))
        ctx.save_for_backward(x, noise)
        ctx.mark_non_differentiable(used, available)
        ctx.set_materialize_grads(False)
        return y, mean.detach(), var.detach(), used, available

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_var, _grad_used, _grad_available):
        first_order_only("cpu_fused")
        real_rows, groups, count, shadow_prior, shadow_rows, has_prior = ctx.config
        leaves, scale, shift, zmean, zstd, mean, var, valid = ctx.graph
        mo = leaves[0]
        x, noise = ctx.saved_tensors
        sdt = mo.dtype
        dx = torch.empty_like(x)
        xr, dxr = _rows(x[:real_rows], groups), _rows(dx[:real_rows], groups)

        outputs, grads = [], []
        if grad_y is not None:
            grad_y = grad_y.contiguous(memory_format=_format_of(x))
            gr = _rows(grad_y[:real_rows], groups)
            total, dot = _reduce_grad(gr, xr, mo.detach(), dxr)  # dxr is scratch here
            outputs += [scale, shift]
            grads += [dot + mo.detach() * total, total]  # d/dscale = sum(g * x)
            if shadow_rows:
                gs = _rows(grad_y[real_rows:], groups)
                noise_rows = _rows(noise, groups)
                if gs.is_contiguous() and gs.dtype == noise_rows.dtype:
                    zero = torch.zeros((), dtype=sdt, device=x.device).expand(zstd.shape)
                    total_s, dot_s = _bn_reduce(gs, noise_rows, zero)
                    total_s, dot_s = total_s.sum(dim=1), dot_s.sum(dim=1)
                else:
                    total_s, dot_s = _sum_rows(gs), _sum_rows(gs.to(sdt) * noise_rows)
                outputs += [zmean, zstd]
                grads += [total_s, dot_s]
        if grad_mean is not None:
            outputs.append(mean)
            grads.append(grad_mean.to(sdt))
        if grad_var is not None:
            outputs.append(var)
            grads.append(grad_var.to(sdt))

        wanted = [t for t in leaves if t is not None and t.requires_grad]
        found = {}
        if outputs and wanted:
            pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
            if pairs:
                result = torch.autograd.grad(
                    [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True,
                    retain_graph=True,  # backward may run again (retain_graph, gradcheck)
                )
                found = {id(t): r for t, r in zip(wanted, result)}

        def grad_of(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None:
                return None
            r = found.get(id(t))
            return torch.zeros_like(t) if r is None else r

        g_mo, g_vo, g_mp, g_vp, g_w, g_b = (grad_of(t) for t in leaves)

        # dx = g * scale + d(mean_obs)/dx + d(var_obs)/dx, per group (s, c):
        #    = g * a + x * b + c with a = scale, b = 2 g_vo / n, c = g_mo / n - b * mean_obs.
        # b is rounded to x's dtype first and c computed from the rounded b, so that
        # x * b + c = b (x - mean_obs) + g_mo / n holds without cancellation; the in-place
        # addcmul_ then runs in x's dtype (a mixed-dtype one casts whole tensors on CPU).
        coef_x = (2.0 * g_vo / count).to(x.dtype)
        const = g_mo / count - coef_x.to(sdt) * mo.detach()
        if grad_y is not None:
            _affine_into(gr, scale.detach(), const, dxr)
        else:
            dxr.copy_(const[:, None, :, None].expand(dxr.shape))
        # the per-channel operand first: CPU addcmul_ vectorizes a broadcast tensor1 only
        dxr.addcmul_(coef_x[:, None, :, None], xr)

        if shadow_rows:
            xs, dxs = _rows(x[real_rows:], groups), _rows(dx[real_rows:], groups)
            if shadow_prior and leaves[2].requires_grad:
                count_s = xs.shape[1] * xs.shape[3]
                coef_s = 2.0 * g_vp / count_s
                const_s = g_mp / count_s - coef_s * leaves[2].detach()
                _affine_into(xs, coef_s, const_s, dxs)
                # A non-finite row rejected its group's prior: its zero gradient must not become
                # inf * 0 (valid is 0-dim or one flag per group). On the CPU the flag is read
                # first (no device synchronisation) to skip the fill when every group is valid.
                if x.device.type != "cpu" or not bool(valid.all()):
                    dxs.masked_fill_(~valid.reshape(-1, 1, 1, 1), 0.0)
            else:
                dxs.zero_()

        w_dtype, b_dtype, mp_dtype, vp_dtype = ctx.param_dtypes
        grad_w = None if g_w is None else g_w.to(w_dtype)
        grad_b = None if g_b is None else g_b.to(b_dtype)
        grad_mp = grad_vp = None
        if has_prior and not shadow_prior:
            grad_mp, grad_vp = g_mp.to(mp_dtype), g_vp.to(vp_dtype)
        return dx, grad_w, grad_b, grad_mp, grad_vp, None, None, None, None, None


def training_step(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    options: StepOptions,
    prior: Optional[Tuple[Tensor, Tensor]] = None,
    prior_valid: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    running: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
) -> StepResult:
    """One BKN training step, fused; same arguments and result as
    :func:`.composite.training_step`."""
    mean_prior, var_prior = prior if prior is not None else (None, None)
    if prior is not None and options.detach_prior:
        mean_prior, var_prior = mean_prior.detach(), var_prior.detach()
    need_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, mean_prior, var_prior)
    )
    return StepResult(*_KalmanNormFunction.apply(
        x, weight, bias, mean_prior, var_prior, options, prior_valid, generator, need_graph,
        running))
