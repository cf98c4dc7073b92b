"""The nonlinear moment rules of kalmannorm.analytic against Monte Carlo, with tolerances from
the standard errors of the sampled moments."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kalmannorm.analytic import (
    clamp_moments,
    leaky_relu_moments,
    max_moments,
    piecewise_moments,
    product_moments,
    smooth_moments,
)
from kalmannorm.analytic import activations as act
from kalmannorm.analytic import nonlinear, twins

SAMPLES = 200_000
# Means and variances that cover both sides of every bend, narrow and wide Gaussians.
MEAN = torch.tensor([-4.0, -1.0, 0.0, 0.3, 2.0, 5.0, 0.5, -2.0], dtype=torch.float64)
VAR = torch.tensor([1.0, 0.25, 2.0, 1.0, 9.0, 1.0, 100.0, 0.01], dtype=torch.float64)


def _samples(mean, var, seed=0, n=SAMPLES):
    g = torch.Generator().manual_seed(seed)
    return mean + var.sqrt() * torch.randn((n,) + tuple(mean.shape), generator=g,
                                           dtype=torch.float64)


def _assert_matches_samples(y, mean, var, z=5.0):
    """``(mean, var)`` within ``z`` standard errors of the sample moments of ``y`` (dim 0)."""
    n = y.shape[0]
    centred = y - y.mean(0)
    sample_var = centred.square().mean(0)
    se_mean = (sample_var / n).sqrt()
    se_var = ((centred.pow(4).mean(0) - sample_var.square()).clamp_min(0) / n).sqrt()
    floor = 1e-9 * (1 + y.abs().mean(0))
    assert ((y.mean(0) - mean).abs() <= z * se_mean + floor).all(), (y.mean(0), mean, se_mean)
    assert ((sample_var - var).abs() <= z * se_var + floor).all(), (sample_var, var, se_var)


ACTIVATIONS = {
    "relu6": (F.relu6, lambda m, v: clamp_moments(m, v, 0.0, 6.0)),
    "hardtanh": (F.hardtanh, lambda m, v: clamp_moments(m, v, -1.0, 1.0)),
    "clamp_min": (lambda z: z.clamp_min(-1.0), lambda m, v: clamp_moments(m, v, low=-1.0)),
    "leaky_relu": (lambda z: F.leaky_relu(z, 0.2), lambda m, v: leaky_relu_moments(m, v, 0.2)),
    "hardsigmoid": (F.hardsigmoid, lambda m, v: piecewise_moments(m, v, act.HARDSIGMOID)),
    "hardswish": (F.hardswish, lambda m, v: piecewise_moments(m, v, act.HARDSWISH)),
    "sigmoid": (torch.sigmoid, lambda m, v: nonlinear._m_sigmoid((m, v), None, None)),
    "tanh": (torch.tanh, lambda m, v: nonlinear._m_tanh((m, v), None, None)),
    "silu": (F.silu, lambda m, v: nonlinear._m_silu((m, v), None, None)),
    "gelu": (F.gelu, lambda m, v: nonlinear._m_gelu((m, v), None, None)),
    "gelu tanh": (lambda z: F.gelu(z, approximate="tanh"),
                  lambda m, v: nonlinear._m_gelu((m, v), None, None, "tanh")),
    "mish": (F.mish, lambda m, v: nonlinear._m_mish((m, v), None, None)),
    "softplus": (lambda z: F.softplus(z, 2.0), lambda m, v: nonlinear._m_softplus((m, v), None, None, 2.0)),
    "elu": (lambda z: F.elu(z, 0.5), lambda m, v: nonlinear._m_elu((m, v), None, None, 0.5)),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_moments_monte_carlo(name):
    fn, rule = ACTIVATIONS[name]
    mean, var = rule(MEAN, VAR)
    _assert_matches_samples(fn(_samples(MEAN, VAR)), mean, var)


@pytest.mark.parametrize("name", ["silu", "sigmoid", "hardswish", "relu6"])
def test_activation_moments_float32_gradients_and_zero_variance(name):
    fn, rule = ACTIVATIONS[name]
    mean = MEAN.float().requires_grad_()
    var = torch.cat([VAR[:-1], torch.zeros(1, dtype=torch.float64)]).float().requires_grad_()
    m, v = rule(mean, var)
    assert m.dtype == v.dtype == torch.float32
    # A zero variance: the function of the mean, no spread.
    torch.testing.assert_close(m[-1], fn(mean[-1].detach()), atol=1e-6, rtol=0)
    assert v[-1].item() == pytest.approx(0.0, abs=1e-6)
    (m.sum() + v.sum()).backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(var.grad).all()


def test_piecewise_and_smooth_gradcheck():
    # Away from std = 1, where the smooth rule switches from Gauss-Hermite to the asymptote
    # form (they agree to ~1e-8, not to a finite difference's precision).
    mean = MEAN[:6].clone().requires_grad_()
    var = (VAR[:6] * 1.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, v: piecewise_moments(m, v, act.HARDSWISH),
                                    (mean, var))
    assert torch.autograd.gradcheck(
        lambda m, v: smooth_moments(m, v, torch.sigmoid, ((0.0, math.inf, (1.0,)),)), (mean, var))


def test_modules_use_their_options():
    mean, var = MEAN[:4].float(), VAR[:4].float()
    for module, expected in [
        (nn.ReLU6(), clamp_moments(mean, var, 0.0, 6.0)),
        (nn.Hardtanh(-2.0, 3.0), clamp_moments(mean, var, -2.0, 3.0)),
        (nn.LeakyReLU(0.3), leaky_relu_moments(mean, var, 0.3)),
        (nn.GELU("tanh"), nonlinear._m_gelu((mean, var), None, None, "tanh")),
    ]:
        got = nonlinear._m_activation_module(module, (mean, var), None, None)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("k", [2, 4, 9])
def test_max_moments_monte_carlo(k):
    mean, var = MEAN[:6], VAR[:6]
    y = _samples(mean, var, n=50_000 * k).reshape(50_000, k, -1).amax(1)
    _assert_matches_samples(y, *max_moments(mean, var, k))


def test_max_pool_twins_monte_carlo():
    # 3x3 windows, stride 3 (no overlap): exactly the max of 9 independent values.
    mean, var = torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, 0.5]])
    g = torch.Generator().manual_seed(0)
    x = (mean.view(1, 2, 1, 1) + var.sqrt().view(1, 2, 1, 1)
         * torch.randn(4000, 2, 8, 8, generator=g)).double()  # i.i.d. positions
    for pooled, mv in [
        (F.max_pool2d(x, 2), nonlinear._m_max_pool((mean, var), x, None, 2)),
        # Adaptive 8 -> 3: windows of 3 and 4 positions per dim, a mixture.
        (F.adaptive_max_pool2d(x, 3), nonlinear._m_adaptive_max_pool(
            (mean, var), x, torch.empty(1, 2, 3, 3))),
    ]:
        y = pooled.permute(0, 2, 3, 1).reshape(-1, 1, 2)
        _assert_matches_samples(y, mv[0].double(), mv[1].double())
    assert act.adaptive_windows([8, 8], [3, 3]) == {9: 4, 12: 4, 16: 1}


def test_product_moments_monte_carlo():
    mx, vx = MEAN[:4], VAR[:4]
    my, vy = MEAN[4:], VAR[4:]
    y = _samples(mx, vx, seed=1) * _samples(my, vy, seed=2)
    _assert_matches_samples(y, *product_moments(mx, vx, my, vy))


@pytest.mark.parametrize("mode, size, align", [
    ("bilinear", (10, 6), False), ("bilinear", (7, 7), True), ("bicubic", (9, 9), False),
    ("nearest", (10, 5), None), ("area", (2, 3), None),
])
def test_interpolation_moments_monte_carlo(mode, size, align):
    mean, var = torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, 0.5]])
    g = torch.Generator().manual_seed(0)
    x = mean.view(1, 2, 1, 1) + var.sqrt().view(1, 2, 1, 1) * torch.randn(20000, 2, 5, 6, generator=g)
    y = F.interpolate(x.double(), size=size, mode=mode, align_corners=align)
    m, v = twins._m_interpolate((mean, var), x, y, size=size, mode=mode, align_corners=align)
    torch.testing.assert_close(m, mean)  # weights sum to 1
    # Positions of one row are correlated (shared inputs): standard errors over rows of the
    # row's average and of its mean squared deviation from the (known) mean.
    rows = y.shape[0]
    row_mean = y.mean((2, 3))
    row_var = (y - mean.double().view(1, 2, 1, 1)).square().mean((2, 3))
    for sample, target in ((row_mean, m), (row_var, v)):
        error = (sample.mean(0) - target.double()).abs()
        assert (error <= 5 * sample.std(0) / rows ** 0.5).all(), (sample.mean(0), target)
