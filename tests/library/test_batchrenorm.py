"""Batch Renormalization (kalmannorm.batchrenorm): equivalences with BatchNorm and closed forms."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kalmannorm.batchrenorm import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    batch_renorm,
    renorm_correction,
    renorm_limits,
)
from kalmannorm.functional import group_moments

VARIANTS = [
    (BatchRenorm1d, (8, 3)),
    (BatchRenorm1d, (8, 3, 5)),
    (BatchRenorm2d, (8, 3, 4, 4)),
    (BatchRenorm3d, (8, 3, 2, 3, 3)),
]


def _per_group_bn(x, m, weight, bias, running_mean, running_var, momentum, eps):
    """Reference: F.batch_norm on each group of m rows, each with its own copy of the buffers.

    The EMA is linear, so averaging the per-group updated buffers equals the EMA of the
    group-averaged statistics.
    """
    outs, means, vars_ = [], [], []
    for g in x.split(m):
        rm, rv = running_mean.clone(), running_var.clone()
        outs.append(F.batch_norm(g, rm, rv, weight, bias, True, momentum, eps))
        means.append(rm)
        vars_.append(rv)
    return torch.cat(outs), torch.stack(means).mean(0), torch.stack(vars_).mean(0)


def _randomize_affine(module, gen):
    with torch.no_grad():
        module.weight.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
        module.bias.copy_(torch.randn(module.num_features, generator=gen))


@pytest.mark.parametrize("cls,shape", VARIANTS)
@pytest.mark.parametrize("limits", ["warmup", "r1d0"])
def test_warmup_equals_per_group_batchnorm(cls, shape, limits):
    gen = torch.Generator().manual_seed(0)
    if limits == "warmup":  # inside the warm-up phase of the default schedule
        kw = dict(warmup_steps=5, ramp_steps=10)
    else:  # limits r_max = 1, d_max = 0 for good
        kw = dict(r_max=1.0, d_max=0.0, warmup_steps=0, ramp_steps=0)
    layer = cls(3, momentum=0.1, micro_batch=2, running_stats="all", **kw)
    _randomize_affine(layer, gen)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    for step in range(3):  # later steps start from non-initial running buffers
        x = (torch.randn(shape, generator=gen) * 2 + 1).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        rm, rv = layer.running_mean.clone(), layer.running_var.clone()
        y = layer(x)
        y_ref, rm_ref, rv_ref = _per_group_bn(x_ref, 2, weight, bias, rm, rv, 0.1, layer.eps)
        # Groups of two values can be ill-conditioned (x - mean cancels) in float32 on both sides.
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
        grad = torch.randn(shape, generator=gen)
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.weight.grad, weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.bias.grad, bias.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.running_mean, rm_ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.running_var, rv_ref, atol=1e-6, rtol=1e-5)
        assert int(layer.num_batches_tracked) == step + 1
        for p in (layer.weight, layer.bias, weight, bias):
            p.grad = None


@pytest.mark.parametrize("momentum", [0.01, None])
def test_whole_batch_warmup_equals_batchnorm2d(momentum):
    gen = torch.Generator().manual_seed(1)
    layer = BatchRenorm2d(4, momentum=momentum)  # micro_batch=None: one group
    bn = nn.BatchNorm2d(4, momentum=momentum)  # BatchNorm's default momentum is 0.1, not 0.01
    _randomize_affine(layer, gen)
    bn.load_state_dict(layer.state_dict())
    for _ in range(3):
        x = torch.randn(6, 4, 5, 5, generator=gen) * 3 - 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = layer(x1), bn(x2)
        torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
        grad = torch.randn_like(x)
        y1.backward(grad)
        y2.backward(grad)
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.weight.grad, bn.weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.bias.grad, bn.bias.grad, atol=1e-4, rtol=1e-4)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(layer, name), getattr(bn, name))


def test_active_correction_matches_hand_formula():
    # Two groups of two rows, two channels, three positions; full limits r_max=3, d_max=5.
    x = torch.tensor(
        [
            [[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]],
            [[3.0, 4.0, 5.0], [2.0, 2.0, 2.0]],
            [[-1.0, 0.0, 1.0], [10.0, 12.0, 14.0]],
            [[0.0, 0.0, 0.0], [10.0, 11.0, 12.0]],
        ]
    )
    layer = BatchRenorm1d(2, eps=0.0, momentum=0.5, micro_batch=2, warmup_steps=0,
                          ramp_steps=0, running_stats="all")
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([2.0, 0.5]))
        layer.bias.copy_(torch.tensor([1.0, -1.0]))
        layer.running_mean.copy_(torch.tensor([1.0, 1.0]))
        layer.running_var.copy_(torch.tensor([4.0, 1.0]))
    y = layer(x)

    # By hand, in float64 from the raw numbers.
    xd = x.double()
    expected = torch.empty_like(xd)
    batch_means, batch_vars, rs, ds = [], [], [], []
    for s in range(2):
        g = xd[2 * s : 2 * s + 2]  # [2, C, 3]
        for c in range(2):
            v = g[:, c].flatten()
            mu_b = v.sum() / 6
            var_b = ((v - mu_b) ** 2).sum() / 6
            sigma_b, sigma = var_b.sqrt(), [2.0, 1.0][c]
            r = min(max(float(sigma_b / sigma), 1 / 3), 3)
            d = min(max(float((mu_b - 1.0) / sigma), -5), 5)
            w, b = [2.0, 0.5][c], [1.0, -1.0][c]
            expected[2 * s : 2 * s + 2, c] = ((g[:, c] - mu_b) / sigma_b * r + d) * w + b
            batch_means.append(mu_b)
            batch_vars.append(var_b)
            rs.append(r)
            ds.append(d)
    # The numbers cover r and d inside their bounds, r clipped to 1/3 (group 1, channel 0:
    # sigma_B / sigma = 0.29) and d clipped to 5 (group 1, channel 1: (11.5 - 1) / 1).
    assert rs[2] == 1 / 3 and ds[3] == 5
    assert all(1 / 3 < r < 3 for r in (rs[0], rs[1], rs[3])) and all(abs(d) < 5 for d in ds[:3])
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)

    # Running statistics: EMA (momentum 0.5) of the group-averaged mean and unbiased variance.
    mean_avg = torch.stack(batch_means).view(2, 2).mean(0)
    var_avg = torch.stack(batch_vars).view(2, 2).mean(0) * 6 / 5
    torch.testing.assert_close(
        layer.running_mean.double(), 0.5 * torch.tensor([1.0, 1.0]).double() + 0.5 * mean_avg
    )
    torch.testing.assert_close(
        layer.running_var.double(), 0.5 * torch.tensor([4.0, 1.0]).double() + 0.5 * var_avg
    )


def test_r_and_d_carry_no_gradient():
    gen = torch.Generator().manual_seed(2)
    layer = BatchRenorm2d(3, momentum=0.1, micro_batch=4, warmup_steps=0, ramp_steps=0)
    _randomize_affine(layer, gen)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1]))
        layer.running_var.copy_(torch.tensor([1.5, 0.7, 1.1]))
    rm, rv = layer.running_mean.double(), layer.running_var.double()
    x = torch.randn(8, 3, 3, 3, generator=gen).requires_grad_()
    grad = torch.randn(8, 3, 3, 3, generator=gen)
    layer(x).backward(grad)

    def reference(detach):
        xr = x.detach().double().requires_grad_()
        w = layer.weight.detach().double().requires_grad_()
        b = layer.bias.detach().double().requires_grad_()
        g = xr.view(2, 4, 3, 9)  # [S, m, C, L]
        mu = g.mean(dim=(1, 3), keepdim=True)
        sigma_b = (g.var(dim=(1, 3), keepdim=True, correction=0) + layer.eps).sqrt()
        sigma = (rv + layer.eps).sqrt().view(1, 1, 3, 1)
        r = (sigma_b / sigma).clamp(1 / 3, 3)
        d = ((mu - rm.view(1, 1, 3, 1)) / sigma).clamp(-5, 5)
        if detach:
            r, d = r.detach(), d.detach()
        y = ((g - mu) / sigma_b * r + d) * w.view(1, 1, 3, 1) + b.view(1, 1, 3, 1)
        y.reshape(x.shape).backward(grad.double())
        return xr.grad, w.grad, b.grad

    gx, gw, gb = reference(detach=True)
    torch.testing.assert_close(x.grad.double(), gx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.weight.grad.double(), gw, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.bias.grad.double(), gb, atol=1e-4, rtol=1e-4)
    # The comparison can tell the two apart: letting r, d carry gradient changes d/dx.
    gx_live, _, _ = reference(detach=False)
    assert (gx_live - gx).abs().max() > 1e-2


def test_renorm_limits_schedule():
    def limits(t, warmup=10, ramp=20):
        r, d = renorm_limits(torch.tensor(t), 3.0, 5.0, warmup, ramp)
        return float(r), float(d)

    assert limits(0) == (1.0, 0.0)
    assert limits(10) == (1.0, 0.0)
    assert limits(20) == (2.0, 2.5)
    assert limits(30) == (3.0, 5.0)
    assert limits(1000) == (3.0, 5.0)
    assert limits(9, ramp=0) == (1.0, 0.0)
    assert limits(10, ramp=0) == (3.0, 5.0)
    r, d = renorm_limits(torch.tensor(3), 3.0, 5.0, 0, 10)
    assert r.dtype == d.dtype == torch.float32 and r.dim() == 0


def test_clipping_bounds_at_chosen_step():
    # Step 20 of warmup 10 + ramp 20: r_max_t = 2, d_max_t = 2.5.
    gen = torch.Generator().manual_seed(3)
    layer = BatchRenorm2d(3, eps=1e-5, micro_batch=2, warmup_steps=10, ramp_steps=20)
    with torch.no_grad():
        layer.num_batches_tracked.fill_(20)
        # channel 0: running sigma tiny, mean far below -> r = 2, d = +2.5 (both clipped)
        # channel 1: running sigma huge, mean far above -> r = 1/2, d = -2.5 (both clipped)
        # channel 2: running stats equal to the batch's -> r = 1, d = 0 (inside)
        layer.running_mean.copy_(torch.tensor([-100.0, 1000.0, 0.0]))
        layer.running_var.copy_(torch.tensor([1e-4, 1e4, 1.0]))
    x = torch.randn(4, 3, 5, 5, generator=gen)
    with torch.no_grad():
        mean, var = group_moments(x, 2)
        layer.running_mean[2] = mean[:, 2].mean()
        layer.running_var[2] = var[:, 2].mean()
    r, d = renorm_correction(
        mean, var, layer.running_mean, layer.running_var,
        *renorm_limits(layer.num_batches_tracked, 3.0, 5.0, 10, 20), layer.eps,
    )
    assert torch.all(r <= 2.0) and torch.all(r >= 0.5)
    assert torch.all(d.abs() <= 2.5)
    torch.testing.assert_close(r[:, 0], torch.full((2,), 2.0))
    torch.testing.assert_close(d[:, 0], torch.full((2,), 2.5))
    torch.testing.assert_close(r[:, 1], torch.full((2,), 0.5))
    torch.testing.assert_close(d[:, 1], torch.full((2,), -2.5))
    assert torch.all((r[:, 2] > 0.5) & (r[:, 2] < 2.0)) and torch.all(d[:, 2].abs() < 2.5)

    y = layer(x)
    view = (2, 1, 3, 1)  # statistics [S, C] against rows [S, m, C, H*W]
    xhat = (x.view(2, 2, 3, 25) - mean.view(view)) * torch.rsqrt(var + 1e-5).view(view)
    expected = (xhat * r.view(view) + d.view(view)).reshape(x.shape)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert int(layer.num_batches_tracked) == 21


@pytest.mark.parametrize("cls,shape", VARIANTS)
def test_eval_equals_f_batch_norm(cls, shape):
    gen = torch.Generator().manual_seed(4)
    layer = cls(3, momentum=0.3, micro_batch=2, warmup_steps=1, ramp_steps=2)
    _randomize_affine(layer, gen)
    for _ in range(4):
        layer(torch.randn(shape, generator=gen) + 0.5)
    layer.eval()
    x = torch.randn(shape, generator=gen)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    expected = F.batch_norm(
        x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
    )
    assert torch.equal(layer(x), expected)
    # Eval leaves the buffers alone and accepts a single row.
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])
    assert layer(x[:1]).shape == x[:1].shape


def test_batchnorm_state_dict_loads_and_round_trips():
    gen = torch.Generator().manual_seed(5)
    bn = nn.BatchNorm2d(3)
    _randomize_affine(bn, gen)
    for _ in range(3):
        bn(torch.randn(4, 3, 4, 4, generator=gen))
    layer = BatchRenorm2d(3, micro_batch=2)
    assert set(layer.state_dict()) == set(bn.state_dict())
    layer.load_state_dict(bn.state_dict())  # strict
    for k, v in bn.state_dict().items():
        assert torch.equal(layer.state_dict()[k], v)
    bn.eval()
    layer.eval()
    x = torch.randn(4, 3, 4, 4, generator=gen)
    assert torch.equal(layer(x), bn(x))

    back = nn.BatchNorm2d(3)
    back.load_state_dict(layer.state_dict())
    for k, v in layer.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)

    # A version-1 checkpoint (no num_batches_tracked) loads as BatchNorm's does.
    old = bn.state_dict()
    del old["num_batches_tracked"]
    old._metadata = {"": {"version": 1}}
    fresh = BatchRenorm2d(3)
    fresh.load_state_dict(old)
    assert int(fresh.num_batches_tracked) == 0


def test_bf16_autocast_float32_statistics():
    gen = torch.Generator().manual_seed(6)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = BatchRenorm2d(4, momentum=1.0, micro_batch=2, warmup_steps=0, ramp_steps=0,
                          running_stats="all")
    x = torch.randn(8, 3, 6, 6, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = layer(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert torch.isfinite(y).all()
    y.float().sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    assert layer.running_mean.dtype == layer.running_var.dtype == torch.float32
    # momentum 1: the buffers are this step's statistics, computed from the bf16 values in
    # float32 (a bf16 reduction would be off by ~1e-2 relative).
    hf = h.detach().float()
    mean, var = group_moments(hf, 4)
    torch.testing.assert_close(layer.running_mean, mean.mean(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.running_var, var.mean(0) * 72 / 71, atol=1e-6, rtol=1e-6)
    _, mean_b, var_b = batch_renorm(h.detach(), None, None, None, None, groups=4)
    assert mean_b.dtype == var_b.dtype == torch.float32


def _gradcheck_tolerances():
    # group_moments computes in float32 whatever the input dtype; while it does, a float64
    # gradcheck only sees float32 precision and needs a larger step and tolerance.
    stat_dtype = group_moments(torch.zeros(2, 1, dtype=torch.float64), 1)[0].dtype
    if stat_dtype == torch.float64:
        return dict(eps=1e-6, atol=1e-5, rtol=1e-3)
    return dict(eps=1e-3, atol=5e-3, rtol=1e-2)


@pytest.mark.parametrize("regime", ["warmup", "clipped"])
def test_gradcheck_float64(regime):
    # gradcheck differentiates numerically through r and d too, so it applies where they are
    # locally constant: r = 1, d = 0 by the limits, or both held at their clipping bounds.
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 2, 3, dtype=torch.float64, generator=gen).requires_grad_()
    w = (torch.rand(2, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, generator=gen).requires_grad_()
    if regime == "warmup":
        rm, rv = torch.tensor([0.5, -0.5]), torch.tensor([2.0, 0.5])
        r_max, d_max = torch.tensor(1.0), torch.tensor(0.0)
    else:
        rm, rv = torch.tensor([-50.0, 50.0]), torch.tensor([1e-3, 1e3])
        r_max, d_max = torch.tensor(2.0), torch.tensor(1.5)

    def fn(x, w, b):
        return batch_renorm(x, rm, rv, w, b, groups=2, r_max=r_max, d_max=d_max)[0]

    assert torch.autograd.gradcheck(fn, (x, w, b), **_gradcheck_tolerances())


def test_without_running_stats_is_per_group_bn_in_train_and_eval():
    gen = torch.Generator().manual_seed(8)
    layer = BatchRenorm2d(3, micro_batch=2, track_running_stats=False, warmup_steps=0)
    _randomize_affine(layer, gen)
    assert layer.running_mean is None and layer.num_batches_tracked is None
    x = torch.randn(6, 3, 4, 4, generator=gen)
    expected = torch.cat(
        [F.batch_norm(g, None, None, layer.weight, layer.bias, True, 0.0, layer.eps) for g in
         x.split(2)]
    )
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_no_affine():
    x = torch.randn(4, 3, 4, 4)
    layer = BatchRenorm2d(3, affine=False, micro_batch=2)
    assert layer.weight is None and layer.bias is None
    y = layer(x)
    expected, _, _ = _per_group_bn(x, 2, None, None, torch.zeros(3), torch.ones(3), 0.01, 1e-5)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "cls,shape,message",
    [
        (BatchRenorm2d, (4, 3, 5), "expected 4D input (got 3D input)"),
        (BatchRenorm1d, (4, 3, 5, 5), "expected 2D or 3D input (got 4D input)"),
        (BatchRenorm3d, (4, 3, 5, 5), "expected 5D input (got 4D input)"),
        (BatchRenorm2d, (4, 5, 2, 2), "expected input with 3 channels (got 5)"),
        (BatchRenorm2d, (5, 3, 2, 2), "does not split into groups of micro_batch=2"),
    ],
)
def test_bad_input_errors(cls, shape, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cls(3, micro_batch=2)(torch.randn(shape))


def test_single_value_per_channel_error():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchRenorm1d(3, micro_batch=1)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchRenorm1d(3)(torch.randn(1, 3))
    # One row with several positions is enough, as in BatchNorm.
    assert BatchRenorm1d(3, micro_batch=1)(torch.randn(4, 3, 2)).shape == (4, 3, 2)


@pytest.mark.parametrize(
    "kw", [dict(micro_batch=0), dict(r_max=0.5), dict(d_max=-1.0), dict(warmup_steps=-1)]
)
def test_bad_constructor_arguments(kw):
    with pytest.raises(ValueError):
        BatchRenorm2d(3, **kw)


def test_extra_repr_and_defaults():
    layer = BatchRenorm2d(3)
    assert layer.momentum == 0.01 and layer.micro_batch is None
    assert (layer.r_max, layer.d_max, layer.warmup_steps, layer.ramp_steps) == (3.0, 5.0, 400, 800)
    text = repr(BatchRenorm2d(3, micro_batch=2))
    assert "micro_batch=2" in text and "r_max=3.0" in text and "warmup_steps=400" in text
