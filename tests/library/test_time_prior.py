"""The time prior (issue 14 item 2, this library's extension, not the paper's): a layer's running
statistics fused as a third source with the observation and the prediction from the layer below,
by inverse-variance weights capped by ``gain``, as the moments of the three-component mixture."""
import math

import pytest
import torch
from torch import nn

import kalmannorm as kn
from kalmannorm import functional as KF
from kalmannorm.functional import triton_ops

TRUE = torch.tensor(True)
FALSE = torch.tensor(False)


def stats(s=4, c=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(s, c, generator=g, dtype=dtype)
    var = torch.rand(s, c, generator=g, dtype=dtype) + 0.5
    return mean, var


def update(mo, vo, mp, vp, time, gain=0.9, noise=None, **kw):
    return KF.kalman_update(mo, vo, mp, vp, gain, gain_rule="kalman", decisions="group",
                            count=16, noise=noise, time=time, **kw)


def hand_weights(mo, vo, sources, a, gain):
    """The inverse-variance weights written out for one group of one channel."""
    inverse = [1.0 / a]
    for m, v in sources:
        d = math.log(v / vo) ** 2 + (m - mo) ** 2 / vo
        inverse.append(1.0 / max(d - a, torch.finfo(torch.float32).tiny))
    w = [i / sum(inverse) for i in inverse]
    total = w[1] + w[2]
    if total > gain:
        w[1], w[2] = w[1] * gain / total, w[2] * gain / total
    return [1.0 - w[1] - w[2], w[1], w[2]]


@pytest.mark.parametrize("gain", [0.9, 0.3])
def test_three_source_mixture_on_hand_numbers(gain):
    mo, vo, mp, vp, mt, vt, a = 0.0, 1.0, 1.0, 2.0, -0.5, 0.5, 0.5
    w = hand_weights(mo, vo, [(mp, vp), (mt, vt)], a, gain)
    mean = w[0] * mo + w[1] * mp + w[2] * mt
    var = w[0] * (vo + mo ** 2) + w[1] * (vp + mp ** 2) + w[2] * (vt + mt ** 2) - mean ** 2
    t = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    got_mean, got_var, used = update(t(mo), t(vo), t(mp), t(vp),
                                     (t(mt)[0], t(vt)[0], TRUE), gain=gain,
                                     noise=torch.tensor([a], dtype=torch.float64))
    assert bool(used)
    assert got_mean.item() == pytest.approx(mean, rel=1e-12)
    assert got_var.item() == pytest.approx(var, rel=1e-12)
    weights = KF.fusion_weights(t(mo), t(vo), [(t(mp), t(vp), TRUE[None]),
                                               (t(mt), t(vt), TRUE[None])],
                                gain, 16, torch.tensor([a], dtype=torch.float64))
    assert weights[0].tolist() == pytest.approx(w[1:], rel=1e-12)
    if gain == 0.3:
        assert sum(w[1:]) == pytest.approx(0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_without_the_time_prior_it_is_the_two_component_update(dtype):
    mo, vo = stats(s=6, dtype=dtype)
    mp, vp = mo + 0.3, vo * 2.0
    vp[1] = vo[1] * 1000.0  # the guard rejects group 1's prior
    noise = torch.rand(6, dtype=dtype) * 0.2 + 0.01
    valid = torch.tensor([True, True, True, False, True, True])
    mean2, var2, used2 = update(mo, vo, mp, vp, None, noise=noise, prior_valid=valid)
    running = (torch.randn(3, dtype=dtype), torch.rand(3, dtype=dtype) + 0.5)
    for flag in (FALSE, torch.zeros(6, dtype=torch.bool)):
        mean3, var3, used3 = update(mo, vo, mp, vp, running + (flag,), noise=noise,
                                    prior_valid=valid)
        assert torch.equal(used2, used3) and used3.tolist() == [1, 0, 1, 0, 1, 1]
        torch.testing.assert_close(mean3, mean2, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(var3, var2, rtol=1e-6, atol=1e-6)
    # a non-finite running statistic is no source either
    bad = (running[0].clone().fill_(float("nan")), running[1], TRUE)
    torch.testing.assert_close(update(mo, vo, mp, vp, bad, noise=noise, prior_valid=valid)[1],
                               var2, rtol=1e-6, atol=1e-6)


def test_weights_sum_to_one_and_the_priors_are_capped_by_gain():
    mo, vo = stats(s=8)
    g = torch.Generator().manual_seed(3)
    mp = mo + 0.1 * torch.randn(8, 3, generator=g, dtype=torch.float64)
    mt = mo + 0.1 * torch.randn(8, 3, generator=g, dtype=torch.float64)
    noise = torch.full((8,), 0.05, dtype=torch.float64)
    ok = torch.ones(8, dtype=torch.bool)
    for gain in (1.0, 0.9, 0.2, 0.0):
        w = KF.fusion_weights(mo, vo, [(mp, vo * 1.1, ok), (mt, vo * 0.9, ok)], gain, 16,
                              noise)
        assert (w >= 0).all() and (w.sum(dim=1) <= gain + 1e-12).all()
        obs = 1.0 - w.sum(dim=1)
        assert (obs >= 0).all()
    # uncapped, the three weights are the normalized inverse variances
    w = KF.fusion_weights(mo, vo, [(mp, vo * 1.1, ok), (mt, vo * 0.9, ok)], 1.0, 16, noise)
    d1 = (math.log(1.1) ** 2 + (mp - mo).square() / vo).mean(dim=1)
    d2 = (math.log(0.9) ** 2 + (mt - mo).square() / vo).mean(dim=1)
    inv = torch.stack([1 / noise, 1 / (d1 - noise).clamp_min(1.2e-38),
                       1 / (d2 - noise).clamp_min(1.2e-38)], dim=1)
    torch.testing.assert_close(w, (inv / inv.sum(dim=1, keepdim=True))[:, 1:])
    # a tensor gain (a warm-up ramp) caps the same way
    wt = KF.fusion_weights(mo, vo, [(mp, vo, ok), (mt, vo, ok)], torch.tensor(0.25), 16, noise)
    assert (wt.sum(dim=1) <= 0.25 + 1e-12).all()


def test_a_perfect_time_prior_gets_the_largest_weight_a_far_one_about_none():
    mo, vo = stats(s=1, c=4)
    mp, vp = mo + 0.5, vo * 1.5
    noise = torch.tensor([0.1], dtype=torch.float64)
    ok = torch.ones(1, dtype=torch.bool)
    w = KF.fusion_weights(mo, vo, [(mp, vp, ok), (mo, vo, ok)], 1.0, 16, noise)[0]
    assert w[1] > 0.999 and w[1] > w[0] and w[1] > 1.0 - w.sum()
    w = KF.fusion_weights(mo, vo, [(mp, vp, ok), (mo, vo, ok)], 0.9, 16, noise)[0]
    assert w[1] == pytest.approx(0.9, abs=1e-6)
    far = KF.fusion_weights(mo, vo, [(mp, vp, ok), (mo + 100.0, vo * 50, ok)], 0.9, 16,
                            noise)[0]
    assert far[1] < 1e-4 and far[0] > 0.05
    # a rejected source gets exactly nothing
    off = KF.fusion_weights(mo, vo, [(mp, vp, ~ok), (mo, vo, ok)], 0.9, 16, noise)[0]
    assert off[0] == 0.0


def one_group_inputs():
    """One group of 4 rows whose prior and running statistics sit within the observation
    noise: both errors clamp to ``tiny``, so the weights are 0.4, 0.4 (capped from 0.5, 0.5)
    and stay so under gradcheck's perturbations (they are decisions, without gradient)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g)
    mo, vo = KF.group_moments(x, 1)
    mp = (mo + 0.01).requires_grad_()
    vp = (vo * 1.02).requires_grad_()
    w = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    running = ((mo[0] - 0.01).clone(), (vo[0] * 0.98).clone(), TRUE)
    return x.requires_grad_(), mp, vp, w, running


def step(x, mp, vp, w, running, backend="composite"):
    options = KF.StepOptions(real_rows=x.shape[0], groups=mp.shape[0], gain=0.8,
                             gain_rule="kalman", decisions="group", time_prior=True)
    return KF.training_step(x, w, None, options, (mp, vp), None, backend=backend,
                            running=running)


def test_gradcheck_float64_through_x_and_the_depth_prior_not_the_buffers():
    x, mp, vp, w, running = one_group_inputs()
    mo, vo = KF.group_moments(x.detach(), 1)
    noise = KF.row_spread(x.detach(), 1, vo)
    weights = KF.fusion_weights(mo, vo, [(mp.detach(), vp.detach(), TRUE[None]),
                                         (running[0][None], running[1][None], TRUE[None])],
                                0.8, 27, noise)
    assert weights[0].tolist() == pytest.approx([0.4, 0.4], abs=1e-12)

    def f(x, mp, vp, w):
        r = step(x, mp, vp, w, running)
        return r.y, r.mean, r.var

    assert torch.autograd.gradcheck(f, (x, mp, vp, w))
    rm, rv = running[0].clone().requires_grad_(), running[1].clone().requires_grad_()
    r = step(x, mp, vp, w, (rm, rv, TRUE))
    grads = torch.autograd.grad(r.y.square().sum() + r.var.sum(), (x, mp, rm, rv),
                                allow_unused=True)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    assert grads[2] is None and grads[3] is None


@pytest.mark.parametrize("with_prior", [True, False])
def test_fused_kernel_equals_the_composite_form(with_prior):
    g = torch.Generator().manual_seed(2)
    # 8 real rows, then room for one shadow row per group
    x = torch.randn(12, 3, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    mp, vp = stats(s=4)
    mp.requires_grad_(), vp.requires_grad_()
    running = (torch.randn(3, dtype=torch.float64, generator=g) * 0.3,
               torch.rand(3, dtype=torch.float64, generator=g) + 0.6, TRUE)
    options = KF.StepOptions(real_rows=8, groups=4, gain=0.9, gain_rule="kalman",
                             decisions="group", time_prior=True, shadow_rows=1)
    results = []
    for backend in ("cpu_fused", "composite"):
        r = KF.training_step(x, None, None, options, (mp, vp) if with_prior else None, None,
                             torch.Generator().manual_seed(5), backend=backend,
                             running=running)
        inputs = (x, mp, vp) if with_prior else (x,)
        grads = torch.autograd.grad((r.y * torch.arange(float(r.y.numel()), dtype=r.y.dtype)
                                     .view(r.y.shape)).sum() + r.var.sum(), inputs)
        results.append([r.y, r.mean, r.var, r.used, *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    # the time prior moved the statistics off the observation
    mo, _ = KF.group_moments(x.detach()[:8], 4)
    assert not torch.allclose(results[0][1], mo)


def test_the_triton_backend_refuses_it():
    options = KF.StepOptions(real_rows=4, groups=2, gain_rule="kalman", decisions="layer",
                             time_prior=True)
    assert not triton_ops.supports_options(options)
    assert triton_ops.supports_options(options._replace(time_prior=False))
    assert not KF.released_update(options._replace(gain_rule="fixed"))


def test_no_running_statistics_yet_is_no_source():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    prior = (torch.randn(2, 3) * 0.3, torch.rand(2, 3) + 0.5)
    outs = []
    for time_prior in (False, True):
        layer = kn.BatchKalmanNorm2d(3, micro_batch=2, time_prior=time_prior)
        outs.append(layer.forward_with_prior(x, prior, 2)[0])
        assert int(layer.num_batches_tracked) == 1
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    # later steps read the running statistics
    layer = kn.BatchKalmanNorm2d(3, micro_batch=2, time_prior=True)
    plain = kn.BatchKalmanNorm2d(3, micro_batch=2)
    for _ in range(3):
        a, b = layer.forward_with_prior(x, prior, 2)[0], plain.forward_with_prior(x, prior, 2)[0]
    assert not torch.allclose(a, b)
    # without running statistics there is none
    free = kn.BatchKalmanNorm2d(3, micro_batch=2, time_prior=True, track_running_stats=False)
    torch.testing.assert_close(free.forward_with_prior(x, prior, 2)[0], outs[0])


@pytest.mark.parametrize("bad", [dict(gain_rule="fixed"), dict(decisions="layer")])
def test_needs_the_measured_gain_per_group(bad):
    with pytest.raises(ValueError, match="time_prior=False"):
        kn.BatchKalmanNorm2d(4, time_prior=True, **bad)
    mo, vo = stats(s=2)
    with pytest.raises(ValueError, match="time_prior=False"):
        KF.kalman_update(mo, vo, mo, vo, 0.9, count=8, time=(mo[0], vo[0], TRUE),
                         **{"gain_rule": "kalman", "decisions": "group", **bad})


def test_converted_model_trains_with_the_time_prior():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    net = kn.convert_batchnorm(net, micro_batch=2, time_prior=True)
    assert net[1].time_prior and net[4].time_prior
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, target = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(3):
        loss = nn.functional.cross_entropy(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    kn.configure(net, time_prior=False)
    assert not net[1].time_prior
    with pytest.raises(ValueError, match="time_prior"):
        kn.configure(net, time_prior=True, gain_rule="fixed")
