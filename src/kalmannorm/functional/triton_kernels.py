"""Triton kernels of the BKN training step (method.md sections 3 and 4; docs/gpu.md).

Imported only where ``triton`` is installed (see :mod:`.triton_ops`, which launches them). One
program owns a *slab*: the rows of one statistics group ``s`` (``m`` real rows, ``K`` shadow
rows) for a block of ``BC`` channels, all positions; the programs of group ``s`` are ``s * ncb``
to ``s * ncb + ncb - 1`` (``ncb`` channel blocks). Everything a slab needs is local to it except
the guard and measured-gain decisions (means over the channels of the group, or with
``decisions="layer"`` over all ``[S, C]``), the running buffers and dweight/dbias (sums over
``S``):

- ``stats_kernel``: two-pass float32 moments of the real rows and of the prior (shadow rows with
  non-finite values zeroed and counted, or a supplied prior, or the caller's validity per group),
  and one partial record per program for the guard (``sum(var_prior / var_obs)``, or of its log
  for the two-sided guard, whether any prior variance is non-zero, the non-finite count); with
  the measured gain per group also the sums of its squared errors ``d`` and of the rows' spread
  ``a`` (:func:`~.composite.row_spread`): with ``m >= 2`` the moments come from each row's own
  two-pass moments (law of total variance, the same two reads of the slab), whose spread over
  the rows is taken by Welford;
- ``gain_kernel`` (``gain_rule="kalman"``, ``decisions="layer"`` only): one program reads the
  ``[4, S, C]`` statistics and writes the layer's measured gain ``min(gain, p)``
  (:func:`~.composite.measured_gain`) to a device scalar, in place of a dozen small torch
  operations;
- ``apply_kernel``: every program reduces the partial records in the same fixed order, all of
  them for the layer's decision or its own group's ``ncb`` for the group's (so all programs
  that share a decision agree on it without a grid barrier), and per group the measured gain
  ``min(gain, a / max(d, a))``; then the Kalman update, ``y`` for the real rows and fresh
  samples ``mean + std * noise`` for the shadow rows, the noise from Philox by ``(seed, flat
  index)``, regenerated rather than stored; the decisions ``[used, available]`` (``[2, S]`` per
  group) and the groups' gains are written for the backward and the counters;
- ``backward_kernel``: per slab ``sum(g)``, ``sum(g (x - mean_obs))``, the shadow rows'
  ``sum(g)``, ``sum(g noise)``, the ``[S, C]`` chain in closed form (with the slab's group's
  decision and gain: a rejected prior gets zero gradient), then ``dx`` (second read of the
  slab, in L2); per-(s, c) partials of dweight/dbias, summed over ``S`` by the caller;
- ``buffers_kernel``: running averages (as :func:`~.composite.update_running_stats`),
  ``num_batches_tracked`` and the guard counters (one count per decision: per group or one).

Statistics are float32 for every input dtype; strides ``(sN, sC, sL)`` let one body serve NCHW and
channels-last. Reductions run in a fixed order and nothing uses float atomics, so results are
bitwise repeatable.
"""
import triton
import triton.language as tl

TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny: safe_std

# prior modes
NO_PRIOR = 0
SHADOW_PRIOR = 1
GIVEN_PRIOR = 2


@triton.jit
def _finite(v):
    return (v == v) & (tl.abs(v) != float("inf"))


@triton.jit
def _tile(row, l0, c, cmask, sN, sC, sL, L, BL: tl.constexpr):
    """Offsets ``[BC, BL]`` and mask of one tile of a row."""
    pos = l0 + tl.arange(0, BL)
    mask = cmask[:, None] & (pos < L)[None, :]
    return row * sN + c[:, None] * sC + pos[None, :] * sL, mask, pos


@triton.jit
def _moments(X, row0, nrows, c, cmask, sN, sC, sL, L, ZERO_NONFINITE: tl.constexpr,
             BC: tl.constexpr, BL: tl.constexpr):
    """Two-pass mean and biased variance over ``nrows`` rows x ``L`` positions, per channel;
    with ``ZERO_NONFINITE`` non-finite values count as 0 and are counted."""
    # 2-D accumulators reduced once after the loops (fewer reductions; also avoids a crash of
    # triton 3.6's thread-locality pass on reductions carried through loops)
    acc = tl.zeros([BC, BL], dtype=tl.float32)
    bad = tl.zeros([BC, BL], dtype=tl.int32)
    for r in range(0, nrows):
        for l0 in range(0, L, BL):
            off, mask, _ = _tile(row0 + r, l0, c, cmask, sN, sC, sL, L, BL)
            v = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
            if ZERO_NONFINITE:
                ok = _finite(v)
                bad += (mask & ~ok).to(tl.int32)
                v = tl.where(ok, v, 0.0)
            acc += v
    count = nrows * L
    mean = tl.sum(acc, axis=1) / count
    acc2 = tl.zeros([BC, BL], dtype=tl.float32)
    for r in range(0, nrows):
        for l0 in range(0, L, BL):
            off, mask, _ = _tile(row0 + r, l0, c, cmask, sN, sC, sL, L, BL)
            v = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
            if ZERO_NONFINITE:
                v = tl.where(_finite(v), v, 0.0)
            d = tl.where(mask, v - mean[:, None], 0.0)
            acc2 += d * d
    return mean, tl.sum(acc2, axis=1) / count, tl.sum(bad, axis=1)


@triton.jit
def _row_moments(X, row0, nrows, c, cmask, sN, sC, sL, L, BC: tl.constexpr, BL: tl.constexpr):
    """The moments of ``nrows`` rows from each row's own two-pass moments (the same two reads of
    the slab as :func:`_moments`): the mean and biased variance of all the rows (law of total
    variance: mean of the rows' variances plus the spread of their means) and, over the rows
    (Welford), the sums of squared deviations of the rows' log-variances and of their means,
    what :func:`~.composite.row_spread` takes the unbiased variance of."""
    mean = tl.zeros([BC], dtype=tl.float32)
    m2 = tl.zeros([BC], dtype=tl.float32)
    lmean = tl.zeros([BC], dtype=tl.float32)
    lm2 = tl.zeros([BC], dtype=tl.float32)
    vsum = tl.zeros([BC], dtype=tl.float32)
    for r in range(0, nrows):
        mr, vr, _ = _moments(X, row0 + r, 1, c, cmask, sN, sC, sL, L, False, BC, BL)
        lr = tl.log(tl.maximum(vr, TINY))
        k = r + 1.0
        dm = mr - mean
        mean += dm / k
        m2 += dm * (mr - mean)
        dl = lr - lmean
        lmean += dl / k
        lm2 += dl * (lr - lmean)
        vsum += vr
    return mean, (vsum + m2) / nrows, lm2, m2


@triton.jit
def stats_kernel(X, sN, sC, sL, STATS, PART, MP, VP, PVALID, pv_stride, S, C, L, m, K,
                 real_rows, PRIOR: tl.constexpr, HAS_PVALID: tl.constexpr,
                 TWO_SIDED: tl.constexpr, MEASURE: tl.constexpr, ROWS: tl.constexpr,
                 BC: tl.constexpr, BL: tl.constexpr):
    """Launch 1: ``STATS[0..3, s, c] = mean_obs, var_obs, mean_prior, var_prior`` and the
    partial record ``PART[0..4, program]`` of the guard (``sum(var_prior / var_obs)``, or of
    the log of the ratio with ``TWO_SIDED``; whether any prior variance is non-zero; the
    non-finite count) and, with ``MEASURE`` (the measured gain per group), of the gain (the
    summed squared errors ``d`` and, with ``ROWS``, the summed row spreads ``a``, see
    :func:`~.composite.measured_gain`). ``PVALID[s * pv_stride]``: the caller's validity."""
    s = tl.program_id(0)
    cb = tl.program_id(1)
    c = cb * BC + tl.arange(0, BC)
    cmask = c < C
    SC = S * C
    if ROWS:
        mo, vo, lm2, mm2 = _row_moments(X, s * m, m, c, cmask, sN, sC, sL, L, BC, BL)
    else:
        mo, vo, _ = _moments(X, s * m, m, c, cmask, sN, sC, sL, L, False, BC, BL)
    tl.store(STATS + 0 * SC + s * C + c, mo, mask=cmask)
    tl.store(STATS + 1 * SC + s * C + c, vo, mask=cmask)
    if PRIOR != 0:
        if PRIOR == 1:
            mp, vp, bad = _moments(X, real_rows + s * K, K, c, cmask, sN, sC, sL, L, True, BC,
                                   BL)
            nonfinite = tl.sum(tl.where(cmask, bad, 0), axis=0).to(tl.float32)
        else:
            mp = tl.load(MP + s * C + c, mask=cmask, other=0.0).to(tl.float32)
            vp = tl.load(VP + s * C + c, mask=cmask, other=0.0).to(tl.float32)
            nonfinite = tl.sum(tl.where(cmask & ~_finite(mp), 1.0, 0.0), axis=0)
            if HAS_PVALID:
                nonfinite += tl.where(tl.load(PVALID + s * pv_stride) != 0, 0.0, 1.0)
        tl.store(STATS + 2 * SC + s * C + c, mp, mask=cmask)
        tl.store(STATS + 3 * SC + s * C + c, vp, mask=cmask)
        pid = s * tl.num_programs(1) + cb
        nprog = tl.num_programs(0) * tl.num_programs(1)
        if TWO_SIDED:
            q = tl.log(tl.maximum(vp, TINY, propagate_nan=tl.PropagateNan.ALL)
                       / tl.maximum(vo, TINY, propagate_nan=tl.PropagateNan.ALL))
        else:
            q = vp / tl.where(cmask, vo, 1.0)
        tl.store(PART + pid, tl.sum(tl.where(cmask, q, 0.0), axis=0))
        tl.store(PART + nprog + pid, tl.max(tl.where(cmask & (vp != 0), 1.0, 0.0), axis=0))
        tl.store(PART + 2 * nprog + pid, nonfinite)
        if MEASURE:  # non-finite where the guard rejects the prior, which leaves p unused
            scale = tl.maximum(vo, TINY, propagate_nan=tl.PropagateNan.ALL)
            dl = tl.log(tl.maximum(vp, TINY, propagate_nan=tl.PropagateNan.ALL)) - tl.log(scale)
            dm = mp - mo
            tl.store(PART + 3 * nprog + pid,
                     tl.sum(tl.where(cmask, dl * dl + dm * dm / scale, 0.0), axis=0))
            if ROWS:
                spread = (lm2 + mm2 / scale) / (m - 1)
                tl.store(PART + 4 * nprog + pid, tl.sum(tl.where(cmask, spread, 0.0), axis=0))


@triton.jit
def _part_sum(PART, first, count, RB: tl.constexpr):
    """The sum of the partial records ``PART[first:first + count]`` in a fixed order."""
    acc = tl.zeros([RB], dtype=tl.float32)
    for p0 in range(0, count, RB):
        p = p0 + tl.arange(0, RB)
        acc += tl.load(PART + first + p, mask=p < count, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _guard(PART, nprog, first, count, values, guard_threshold, TWO_SIDED: tl.constexpr,
           RB: tl.constexpr):
    """The guard from the partial records of programs ``first .. first + count - 1`` (all of
    them for the layer-wide guard, those of one group for the group's), ``values`` statistics
    behind them, summed in a fixed order (every program reading them computes the same result):
    the prior is used if some prior variance is non-zero, nothing is non-finite and the mean
    ratio ``var_prior / var_obs`` is finite and below the threshold (``TWO_SIDED``: the mean
    log-ratio within ``log(threshold)`` of zero)."""
    ratio = tl.zeros([RB], dtype=tl.float32)
    avail = tl.zeros([RB], dtype=tl.float32)
    nonfinite = tl.zeros([RB], dtype=tl.float32)
    for p0 in range(0, count, RB):
        p = first + p0 + tl.arange(0, RB)
        pm = p < first + count
        ratio += tl.load(PART + p, mask=pm, other=0.0)
        avail = tl.maximum(avail, tl.load(PART + nprog + p, mask=pm, other=0.0))
        nonfinite += tl.load(PART + 2 * nprog + p, mask=pm, other=0.0)
    r = tl.sum(ratio, axis=0) / values
    available = tl.max(avail, axis=0) > 0
    if TWO_SIDED:
        inside = tl.abs(r) < tl.log(guard_threshold)
    else:
        inside = r < guard_threshold
    used = available & _finite(r) & inside & (tl.sum(nonfinite, axis=0) == 0)
    return used, available


@triton.jit
def gain_kernel(STATS, GAIN, S, C, single_group_noise, gain, GROUPED: tl.constexpr,
                SB: tl.constexpr, BC: tl.constexpr):
    """Launch between stats and apply, one program: ``GAIN[0] = min(gain, p)`` with ``p`` the
    measured gain of :func:`~.composite.measured_gain` from ``STATS`` (``SB >= S``). With one
    group (not ``GROUPED``) the observation noise is ``single_group_noise``, else the spread of
    the groups' observations (unbiased variance over ``S``)."""
    SC = S * C
    s = tl.arange(0, SB)
    smask = s < S
    dacc = tl.zeros([SB, BC], dtype=tl.float32)
    aacc = tl.zeros([BC], dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cmask = c < C
        mask = smask[:, None] & cmask[None, :]
        off = s[:, None] * C + c[None, :]
        mo = tl.load(STATS + off, mask=mask, other=0.0)
        scale = tl.maximum(tl.load(STATS + SC + off, mask=mask, other=1.0), TINY,
                           propagate_nan=tl.PropagateNan.ALL)
        mp = tl.load(STATS + 2 * SC + off, mask=mask, other=0.0)
        vp = tl.maximum(tl.load(STATS + 3 * SC + off, mask=mask, other=1.0), TINY,
                        propagate_nan=tl.PropagateNan.ALL)
        lo = tl.log(scale)
        dl = tl.log(vp) - lo
        dm = mp - mo
        dacc += tl.where(mask, dl * dl + dm * dm / scale, 0.0)
        if GROUPED:
            lo_mean = tl.sum(tl.where(mask, lo, 0.0), axis=0) / S
            mo_mean = tl.sum(mo, axis=0) / S
            el = tl.where(mask, lo - lo_mean[None, :], 0.0)
            em = tl.where(mask, mo - mo_mean[None, :], 0.0)
            spread = (tl.sum(el * el, axis=0) + tl.sum(em * em, axis=0)
                      / (tl.sum(tl.where(smask[:, None], scale, 0.0), axis=0) / S)) / (S - 1)
            aacc += tl.where(cmask, spread, 0.0)
    d = tl.sum(tl.sum(dacc, axis=1), axis=0) / SC
    if GROUPED:
        a = tl.sum(aacc, axis=0) / C
    else:
        a = single_group_noise
    p = a / tl.maximum(d, a, propagate_nan=tl.PropagateNan.ALL)
    p = tl.where(_finite(p), p, 0.0)
    tl.store(GAIN, tl.minimum(p, gain))


@triton.jit
def _lerp(start, end, w):
    """``torch.lerp``'s formula (bit-close to the composite form)."""
    if w < 0.5:
        out = start + w * (end - start)
    else:
        out = end - (end - start) * (1.0 - w)
    return out


@triton.jit
def _combined(STATS, W, B, s, c, cmask, S, C, used, gain, eps, ren_r, ren_d,
              PRIOR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              NORMALIZED: tl.constexpr, RENORM: tl.constexpr):
    """The ``[S, C]`` chain of one program's channels: Kalman update, affine, sample mean/std.
    Recomputed in the backward from the saved statistics (a few flops per channel).
    With ``RENORM`` (no prior) Batch Renormalization's constant correction ``(ren_r, ren_d)``
    sits between the normalization and the affine: ``((x - mean) r ren_r + ren_d) w + b``."""
    SC = S * C
    mo = tl.load(STATS + 0 * SC + s * C + c, mask=cmask, other=0.0)
    vo = tl.load(STATS + 1 * SC + s * C + c, mask=cmask, other=1.0)
    mp = mo
    vp = vo
    diff = mo - mo
    mean = mo
    var = vo
    if PRIOR != 0:
        mp = tl.load(STATS + 2 * SC + s * C + c, mask=cmask, other=0.0)
        vp = tl.load(STATS + 3 * SC + s * C + c, mask=cmask, other=1.0)
        # a rejected prior is swapped out before any arithmetic (it may be inf/nan)
        mpu = tl.where(used, mp, mo)
        vpu = tl.where(used, vp, vo)
        diff = mo - mpu
        var_u = _lerp(vo, vpu, gain) + (gain * (1.0 - gain)) * (diff * diff)
        mean = tl.where(used, _lerp(mo, mpu, gain), mo)
        var = tl.where(used, var_u, vo)
    r = 1.0 / tl.sqrt(var + eps)
    w = tl.full([c.shape[0]], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + c, mask=cmask, other=1.0).to(tl.float32)
    if RENORM:
        scale = r * ren_r * w
        shift = (-mean * r * ren_r + ren_d) * w
    else:
        scale = r * w
        shift = -mean * scale
    if HAS_B:
        shift = shift + tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
    sd = tl.sqrt(tl.maximum(var, TINY))
    zmean = mean
    zstd = sd
    if NORMALIZED:
        zmean = mean * scale + shift
        zstd = sd * scale
    return mo, vo, mp, diff, mean, var, r, w, scale, shift, sd, zmean, zstd


@triton.jit
def _noise(NOISE, seed, flat, mask, NOISE_FROM_PTR: tl.constexpr):
    if NOISE_FROM_PTR:  # tests: the composite form's own torch.randn draw
        return tl.load(NOISE + flat, mask=mask, other=0.0).to(tl.float32)
    return tl.randn(seed, flat)  # Philox: regenerated bit-identically in the backward


@triton.jit
def apply_kernel(X, Y, sN, sC, sL, ySN, ySC, ySL, STATS, PART, FLAGS, W, B, MEANVAR, NOISE,
                 SEED, GAIN, RM, RV, LIM, RD, S, C, L, m, K, real_rows, gain, eps,
                 guard_threshold, single_group_noise, rmax, dmax, PRIOR: tl.constexpr,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, NORMALIZED: tl.constexpr,
                 NOISE_FROM_PTR: tl.constexpr, GAIN_FROM_PTR: tl.constexpr,
                 RENORM: tl.constexpr, LIM_FROM_PTR: tl.constexpr, GROUP: tl.constexpr,
                 TWO_SIDED: tl.constexpr, MEASURE: tl.constexpr, ROWS: tl.constexpr,
                 RB: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr):
    """Launch 2: guard, combined statistics ``MEANVAR[0..1, s, c]``, ``y`` for the real rows,
    ``K`` fresh samples per group into the shadow rows of ``Y``; ``FLAGS = [used, available]``,
    or with ``GROUP`` (decisions per group) ``FLAGS[0..1, s]``, each group's guard reduced
    from its own programs' partial records only.
    ``GAIN_FROM_PTR``: the gain is a device scalar (the layer's measured gain), not ``gain``.
    ``MEASURE`` (with ``GROUP``): the gain is ``min(gain, p[s])``, ``p[s]`` the group's
    measured gain from its programs' partials (the observation noise from its rows' spread with
    ``ROWS``, else ``single_group_noise``), written to ``GAIN[s]`` for the backward.
    ``RENORM`` (no prior, no shadow rows): Batch Renormalization, ``r = clip(sqrt(var + eps) /
    sigma, 1 / rmax, rmax)``, ``d = clip((mean - RM) / sigma, -dmax, dmax)`` with ``sigma =
    sqrt(RV + eps)`` (limits from ``LIM[0..1]`` with ``LIM_FROM_PTR``), kept in ``RD[0..1, s,
    c]`` for the backward (the running statistics change after the step)."""
    if GAIN_FROM_PTR:
        gain = tl.load(GAIN)
    s = tl.program_id(0)
    cb = tl.program_id(1)
    c = cb * BC + tl.arange(0, BC)
    cmask = c < C
    SC = S * C
    used = s < 0  # False
    available = s < 0
    if PRIOR != 0:
        nprog = tl.num_programs(0) * tl.num_programs(1)
        if GROUP:  # group s's programs are s * ncb .. s * ncb + ncb - 1
            ncb = tl.num_programs(1)
            used, available = _guard(PART, nprog, s * ncb, ncb, C, guard_threshold, TWO_SIDED,
                                     RB)
            if MEASURE:
                d = _part_sum(PART + 3 * nprog, s * ncb, ncb, RB) / C
                a = single_group_noise
                if ROWS:
                    a = _part_sum(PART + 4 * nprog, s * ncb, ncb, RB) / C / m
                p = a / tl.maximum(d, a, propagate_nan=tl.PropagateNan.ALL)
                gain = tl.minimum(tl.where(_finite(p), p, 0.0), gain)
                if cb == 0:
                    tl.store(GAIN + s, gain)
        else:
            used, available = _guard(PART, nprog, 0, nprog, SC, guard_threshold, TWO_SIDED, RB)
    if GROUP:
        if cb == 0:
            tl.store(FLAGS + s, used)
            tl.store(FLAGS + S + s, available)
    elif (s == 0) & (cb == 0):
        tl.store(FLAGS + 0, used)
        tl.store(FLAGS + 1, available)
    ren_r = tl.full([BC], 1.0, tl.float32)
    ren_d = tl.zeros([BC], dtype=tl.float32)
    if RENORM:
        if LIM_FROM_PTR:
            rmax = tl.load(LIM)
            dmax = tl.load(LIM + 1)
        sigma = tl.sqrt(tl.load(RV + c, mask=cmask, other=1.0).to(tl.float32) + eps)
        sd_b = tl.sqrt(tl.load(STATS + SC + s * C + c, mask=cmask, other=1.0) + eps)
        ren_r = tl.minimum(tl.maximum(sd_b / sigma, 1.0 / rmax), rmax)
        ren_d = (tl.load(STATS + s * C + c, mask=cmask, other=0.0)
                 - tl.load(RM + c, mask=cmask, other=0.0).to(tl.float32)) / sigma
        ren_d = tl.minimum(tl.maximum(ren_d, -dmax), dmax)
        tl.store(RD + s * C + c, ren_r, mask=cmask)
        tl.store(RD + SC + s * C + c, ren_d, mask=cmask)
    (mo, vo, mp, diff, mean, var, r, w, scale, shift, sd, zmean, zstd) = _combined(
        STATS, W, B, s, c, cmask, S, C, used, gain, eps, ren_r, ren_d, PRIOR, HAS_W, HAS_B,
        NORMALIZED, RENORM)
    tl.store(MEANVAR + 0 * SC + s * C + c, mean, mask=cmask)
    tl.store(MEANVAR + 1 * SC + s * C + c, var, mask=cmask)
    for rr in range(0, m):
        for l0 in range(0, L, BL):
            off, mask, _ = _tile(s * m + rr, l0, c, cmask, sN, sC, sL, L, BL)
            yoff, _, _ = _tile(s * m + rr, l0, c, cmask, ySN, ySC, ySL, L, BL)
            x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
            y = x * scale[:, None] + shift[:, None]
            tl.store(Y + yoff, y.to(Y.dtype.element_ty), mask=mask)
    for k in range(0, K):
        for l0 in range(0, L, BL):
            yoff, mask, pos = _tile(real_rows + s * K + k, l0, c, cmask, ySN, ySC, ySL, L, BL)
            flat = ((s * K + k) * C + c[:, None]) * L + pos[None, :]  # layout-free index
            z = _noise(NOISE, tl.load(SEED), flat, mask, NOISE_FROM_PTR)
            sample = zmean[:, None] + zstd[:, None] * z
            tl.store(Y + yoff, sample.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def backward_kernel(X, DY, DX, sN, sC, sL, gSN, gSC, gSL, STATS, FLAGS, W, B, NOISE, SEED,
                    GAIN, RD, GMV, GPART, GPRIOR, S, C, L, m, K, real_rows, Kin, gain, eps,
                    PRIOR: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    NORMALIZED: tl.constexpr, NOISE_FROM_PTR: tl.constexpr,
                    GAIN_FROM_PTR: tl.constexpr, PRIOR_GRAD: tl.constexpr,
                    HAS_GMV: tl.constexpr, RENORM: tl.constexpr, GROUP: tl.constexpr,
                    BC: tl.constexpr, BL: tl.constexpr):
    """The whole backward of a slab: sums, the closed-form ``[S, C]`` chain, ``dx`` (real and
    incoming shadow rows), the prior's gradient (``GPRIOR``) and per-(s, c) dweight/dbias
    partials (``GPART``). ``DX`` has ``X``'s strides. The gain is a constant of the backward
    (the measured gain carries no gradient). ``GROUP``: the guard decision ``FLAGS[0, s]`` and
    the gain ``GAIN[s]`` are the group's (a rejected group's prior gets zero gradient)."""
    s = tl.program_id(0)
    cb = tl.program_id(1)
    c = cb * BC + tl.arange(0, BC)
    cmask = c < C
    SC = S * C
    if GROUP:
        used = tl.load(FLAGS + s) != 0
        if GAIN_FROM_PTR:
            gain = tl.load(GAIN + s)
    else:
        used = tl.load(FLAGS + 0) != 0
        if GAIN_FROM_PTR:
            gain = tl.load(GAIN)
    ren_r = tl.full([BC], 1.0, tl.float32)
    ren_d = tl.zeros([BC], dtype=tl.float32)
    if RENORM:  # Batch Renormalization's correction, constants of the backward
        ren_r = tl.load(RD + s * C + c, mask=cmask, other=1.0)
        ren_d = tl.load(RD + SC + s * C + c, mask=cmask, other=0.0)
    (mo, vo, mp, diff, mean, var, r, w, scale, shift, sd, zmean, zstd) = _combined(
        STATS, W, B, s, c, cmask, S, C, used, gain, eps, ren_r, ren_d, PRIOR, HAS_W, HAS_B,
        NORMALIZED, RENORM)
    # pass 1: real rows sum g, sum g (x - mean_obs); shadow rows sum g, sum g noise
    tot = tl.zeros([BC, BL], dtype=tl.float32)
    dot = tl.zeros([BC, BL], dtype=tl.float32)
    for rr in range(0, m):
        for l0 in range(0, L, BL):
            off, mask, _ = _tile(s * m + rr, l0, c, cmask, sN, sC, sL, L, BL)
            goff, _, _ = _tile(s * m + rr, l0, c, cmask, gSN, gSC, gSL, L, BL)
            g = tl.load(DY + goff, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
            tot += g
            dot += g * tl.where(mask, x - mo[:, None], 0.0)
    tot_s = tl.zeros([BC, BL], dtype=tl.float32)
    dot_s = tl.zeros([BC, BL], dtype=tl.float32)
    for k in range(0, K):
        for l0 in range(0, L, BL):
            goff, mask, pos = _tile(real_rows + s * K + k, l0, c, cmask, gSN, gSC, gSL, L, BL)
            flat = ((s * K + k) * C + c[:, None]) * L + pos[None, :]
            g = tl.load(DY + goff, mask=mask, other=0.0).to(tl.float32)
            z = _noise(NOISE, tl.load(SEED), flat, mask, NOISE_FROM_PTR)
            tot_s += g
            dot_s += tl.where(mask, g * z, 0.0)
    tot = tl.sum(tot, axis=1)
    dot = tl.sum(dot, axis=1)
    tot_s = tl.sum(tot_s, axis=1)
    dot_s = tl.sum(dot_s, axis=1)
    # the [S, C] chain in closed form: scale, shift (real rows) and zmean, zstd (samples)
    ds = dot + mo * tot  # d/dscale of the real rows: sum g x
    if NORMALIZED:  # zmean = mean scale + shift, zstd = sd scale
        g_shift = tot + tot_s
        g_scale = ds + tot_s * mean + dot_s * sd - mean * g_shift
        g_mean = tot_s * scale - scale * g_shift
        g_sd = dot_s * scale
    else:  # zmean = mean, zstd = sd
        g_shift = tot
        g_scale = ds - mean * tot
        g_mean = tot_s - scale * tot
        g_sd = dot_s
    if RENORM:
        w = w * ren_r  # scale = r ren_r w
    g_var = g_scale * w * (-0.5) * r * r * r
    g_var += tl.where(var >= TINY, g_sd * 0.5 / sd, 0.0)
    if HAS_GMV:  # gradients of the returned statistics
        g_mean += tl.load(GMV + 0 * SC + s * C + c, mask=cmask, other=0.0).to(tl.float32)
        g_var += tl.load(GMV + 1 * SC + s * C + c, mask=cmask, other=0.0).to(tl.float32)
    g_mo = g_mean
    g_vo = g_var
    g_mp = tl.zeros([BC], dtype=tl.float32)
    g_vp = tl.zeros([BC], dtype=tl.float32)
    if PRIOR != 0:
        pq = gain * (1.0 - gain)
        g_mo = tl.where(used, (1.0 - gain) * g_mean + 2.0 * pq * diff * g_var, g_mean)
        g_vo = tl.where(used, (1.0 - gain) * g_var, g_var)
        if PRIOR_GRAD:
            g_mp = tl.where(used, gain * g_mean - 2.0 * pq * diff * g_var, 0.0)
            g_vp = tl.where(used, gain * g_var, 0.0)
            if PRIOR == 2:
                tl.store(GPRIOR + 0 * SC + s * C + c, g_mp, mask=cmask)
                tl.store(GPRIOR + 1 * SC + s * C + c, g_vp, mask=cmask)
    dweight = g_scale * r
    if RENORM:
        dweight = dweight * ren_r + ren_d * tot
    tl.store(GPART + 0 * SC + s * C + c, dweight, mask=cmask)  # dweight partial
    tl.store(GPART + 1 * SC + s * C + c, g_shift, mask=cmask)      # dbias partial
    # pass 2: dx = g scale + x b + c (re-reads this program's slab, in L2)
    n = m * L
    bco = 2.0 * g_vo / n
    cco = g_mo / n - bco * mo
    for rr in range(0, m):
        for l0 in range(0, L, BL):
            off, mask, _ = _tile(s * m + rr, l0, c, cmask, sN, sC, sL, L, BL)
            goff, _, _ = _tile(s * m + rr, l0, c, cmask, gSN, gSC, gSL, L, BL)
            g = tl.load(DY + goff, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
            dx = g * scale[:, None] + x * bco[:, None] + cco[:, None]
            tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
    # incoming shadow rows: the prior's moments (zero where the prior was not taken from them)
    n_s = tl.maximum(Kin * L, 1)
    b_s = 2.0 * g_vp / n_s
    c_s = g_mp / n_s - b_s * mp
    for k in range(0, Kin):
        for l0 in range(0, L, BL):
            off, mask, _ = _tile(real_rows + s * Kin + k, l0, c, cmask, sN, sC, sL, L, BL)
            if PRIOR == 1:
                x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
                dxs = tl.where(_finite(x), x * b_s[:, None] + c_s[:, None], 0.0)
            else:
                dxs = tl.zeros([BC, BL], dtype=tl.float32)
            tl.store(DX + off, dxs.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _group_average(MEAN, VAR, c, cmask, S, C, unbias, GROUP0: tl.constexpr, BC: tl.constexpr):
    sm = tl.zeros([BC], dtype=tl.float32)
    sv = tl.zeros([BC], dtype=tl.float32)
    if GROUP0:
        sm = tl.load(MEAN + c, mask=cmask, other=0.0)
        sv = tl.load(VAR + c, mask=cmask, other=0.0)
    else:
        for s in range(0, S):
            sm += tl.load(MEAN + s * C + c, mask=cmask, other=0.0)
            sv += tl.load(VAR + s * C + c, mask=cmask, other=0.0)
        sm = sm / S
        sv = sv / S
    return sm, sv * unbias


@triton.jit
def buffers_kernel(MEAN, VAR, USED, AVAIL, RUN_MEAN, RUN_VAR, NBT, GUARD, S, C, decisions,
                   momentum, unbias, TRACK: tl.constexpr, GROUP0: tl.constexpr,
                   COUNT_GUARD: tl.constexpr, BC: tl.constexpr):
    """One program: running averages of the combined statistics (left unchanged by a step with
    a non-finite statistic anywhere, as the composite form), ``num_batches_tracked += 1`` and,
    with ``COUNT_GUARD``, the guard counters ``[fallbacks, priors offered]``, counting each of
    the step's ``decisions`` guard decisions (``USED``/``AVAIL``: one per group, or one)."""
    if TRACK:
        bad = tl.zeros([BC], dtype=tl.int32)
        for c0 in range(0, C, BC):
            c = c0 + tl.arange(0, BC)
            cmask = c < C
            sm, sv = _group_average(MEAN, VAR, c, cmask, S, C, unbias, GROUP0, BC)
            bad += tl.where(cmask & ~(_finite(sm) & _finite(sv)), 1, 0)
        if tl.sum(bad, axis=0) == 0:
            for c0 in range(0, C, BC):
                c = c0 + tl.arange(0, BC)
                cmask = c < C
                sm, sv = _group_average(MEAN, VAR, c, cmask, S, C, unbias, GROUP0, BC)
                rm = tl.load(RUN_MEAN + c, mask=cmask, other=0.0).to(tl.float32)
                rv = tl.load(RUN_VAR + c, mask=cmask, other=0.0).to(tl.float32)
                tl.store(RUN_MEAN + c, _lerp(rm, sm, momentum).to(RUN_MEAN.dtype.element_ty),
                         mask=cmask)
                tl.store(RUN_VAR + c, _lerp(rv, sv, momentum).to(RUN_VAR.dtype.element_ty),
                         mask=cmask)
        tl.store(NBT, tl.load(NBT) + 1)
    if COUNT_GUARD:
        fallbacks = tl.zeros([BC], dtype=tl.int32)
        offered = tl.zeros([BC], dtype=tl.int32)
        for i0 in range(0, decisions, BC):
            i = i0 + tl.arange(0, BC)
            imask = i < decisions
            used = tl.load(USED + i, mask=imask, other=0) != 0
            available = tl.load(AVAIL + i, mask=imask, other=0) != 0
            fallbacks += (available & ~used).to(tl.int32)
            offered += available.to(tl.int32)
        tl.store(GUARD + 0, tl.load(GUARD + 0) + tl.sum(fallbacks, axis=0).to(tl.int64))
        tl.store(GUARD + 1, tl.load(GUARD + 1) + tl.sum(offered, axis=0).to(tl.int64))
