"""The prior options of issue 9: two-sided guard, measured (Kalman) gain, gain warm-up, and the
choice of shadow rows per group from the smallest map (issue 8 item 9)."""
import math
import warnings

import pytest
import torch
from torch import nn

import kalmannorm as kn
from kalmannorm import functional as KF


def stats(s=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(s, c, generator=g, dtype=torch.float64)
    var = torch.rand(s, c, generator=g, dtype=torch.float64) + 0.5
    return mean, var


def test_two_sided_guard_rejects_under_estimates_the_released_guard_keeps():
    mo, vo = stats()
    for factor, upper, two_sided in ((1 / 20, True, False), (1 / 5, True, True),
                                     (5.0, True, True), (20.0, True, False), (200.0, False, False)):
        vp = vo * factor
        assert bool(KF.kalman_update(mo, vo, mo, vp, 0.9, 10.0)[2]) == (factor * 1.0 < 10.0)
        used = KF.kalman_update(mo, vo, mo, vp, 0.9, 10.0, guard="two_sided")[2]
        assert bool(used) == two_sided, factor
    # the released guard at its default threshold keeps a 20x under-estimate
    assert bool(KF.kalman_update(mo, vo, mo, vo / 20, 0.9)[2])


def test_measured_gain_matches_its_closed_form():
    mo, vo = stats(s=6)
    mp, vp = mo + 0.3, vo * 2.0
    d = ((math.log(2.0)) ** 2 + (0.09 / vo).mean()).item()
    a = (vo.log().var(dim=0) + mo.var(dim=0) / vo.mean(dim=0)).mean().item()
    expected = a / max(d, a)
    assert KF.measured_gain(mo, vo, mp, vp, count=8).item() == pytest.approx(expected, rel=1e-12)
    # one group: the Gaussian sampling noise of `count` values
    a1 = 2.0 / 63 + 1.0 / 64
    d1 = (math.log(2.0) ** 2 + (0.09 / vo[:1]).mean()).item()
    got = KF.measured_gain(mo[:1], vo[:1], mp[:1], vp[:1], count=64).item()
    assert got == pytest.approx(a1 / max(d1, a1), rel=1e-12)
    # a perfect prior gets weight 1; a zero-variance channel in the prior gets almost 0
    assert KF.measured_gain(mo, vo, mo, vo, count=8).item() == 1.0
    vp0 = vo.clone()
    vp0[0, 0] = 0.0
    assert KF.measured_gain(mo, vo, mo, vp0, count=8).item() < 0.01


def test_kalman_gain_rule_is_the_mixture_at_the_measured_gain_capped_by_gain():
    mo, vo = stats(s=6)
    mp, vp = mo + 0.3, vo * 2.0
    p = KF.measured_gain(mo, vo, mp, vp, count=8)
    for cap in (0.9, 0.05):
        mean, var, used = KF.kalman_update(mo, vo, mp, vp, cap, gain_rule="kalman")
        q = min(p.item(), cap)
        assert bool(used)
        torch.testing.assert_close(mean, q * mp + (1 - q) * mo)
        torch.testing.assert_close(var, q * vp + (1 - q) * vo + q * (1 - q) * (mo - mp) ** 2)


def test_kalman_gain_rule_needs_count_with_one_group():
    mo, vo = stats(s=1)
    with pytest.raises(ValueError, match="count"):
        KF.kalman_update(mo, vo, mo, vo, 0.9, gain_rule="kalman")


def gradcheck_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    mp = torch.randn(2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    vp = (torch.rand(2, 3, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    w = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    return x, mp, vp, w


def test_two_sided_guard_gradcheck_float64():
    def f(x, mp, vp, w):
        y, mean, var, used = KF.batch_kalman_norm(x, (mp, vp), w, None, groups=2, gain=0.8,
                                                  guard_threshold=10.0, guard="two_sided")
        assert bool(used)
        return y, mean, var

    assert torch.autograd.gradcheck(f, gradcheck_inputs())


def test_kalman_gain_is_a_decision_gradients_are_those_at_the_fixed_measured_gain():
    # Like the guard, the measured gain gets no gradient: the step's gradients are exactly the
    # fixed rule's at that gain.
    inputs = gradcheck_inputs()
    x, mp, vp, w = inputs
    mo, vo = KF.group_moments(x.detach(), 2)
    p = KF.measured_gain(mo, vo, mp.detach(), vp.detach(), count=18).item()
    assert 0.0 < p < 0.8
    grads = []
    for options in (dict(gain=0.8, gain_rule="kalman"), dict(gain=p)):
        y, mean, var, _ = KF.batch_kalman_norm(x, (mp, vp), w, None, groups=2, fused=False,
                                               **options)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() \
            + mean.sum() + var.square().sum()
        grads.append(torch.autograd.grad(loss, inputs))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("options", [dict(gain_rule="kalman"), dict(guard="two_sided")])
def test_fused_kernel_implements_the_prior_options(options):
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    prior = stats(s=2)
    results = []
    for backend in ("cpu_fused", "composite"):
        y, mean, var, used = KF.batch_kalman_norm(x, prior, None, None, groups=2,
                                                  backend=backend, **options)
        (grad,) = torch.autograd.grad((y * torch.arange(48.0).view(y.shape)).sum(), x)
        results.append([y, mean, var, used, grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_fused_kernel_refuses_a_tensor_gain():
    x = torch.randn(4, 3, 2, 2)
    options = KF.StepOptions(real_rows=4, groups=2, gain=torch.tensor(0.5))
    with pytest.raises(ValueError, match="'cpu_fused' backend does not implement"):
        KF.training_step(x, None, None, options, backend="cpu_fused")
    KF.training_step(x, None, None, options)  # "auto" takes the composite form for it


def test_gain_warmup_ramps_the_gain_from_zero():
    torch.manual_seed(0)
    layer = kn.BatchKalmanNorm2d(3, micro_batch=2, gain=0.8, gain_warmup=4, gain_rule="fixed")
    x = torch.randn(4, 3, 5, 5)
    prior = (torch.randn(2, 3), torch.rand(2, 3) + 0.5)
    for step in range(6):
        p = 0.8 * min(step / 4, 1.0)
        expected = KF.batch_kalman_norm(x, prior, layer.weight, layer.bias, groups=2, gain=p,
                                        fused=False)[0]
        y = layer.forward_with_prior(x, prior, 2)[0]
        torch.testing.assert_close(y, expected)
    assert int(layer.num_batches_tracked) == 6


@pytest.mark.parametrize("bad, match", [(dict(guard="lower"), "guard"),
                                        (dict(gain_rule="learned"), "gain_rule"),
                                        (dict(gain_warmup=-1), "gain_warmup"),
                                        (dict(gain_warmup=True), "gain_warmup")])
def test_layer_rejects_bad_prior_options(bad, match):
    with pytest.raises(ValueError, match=match):
        kn.BatchKalmanNorm2d(4, **bad)


def test_gain_warmup_needs_running_stats():
    with pytest.raises(ValueError, match="track_running_stats"):
        kn.BatchKalmanNorm2d(4, gain_warmup=10, track_running_stats=False)


def small_map_net(**options):
    norm = kn.get_norm_layer("bkn", micro_batch=2, **options)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), norm(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1), norm(6), nn.ReLU(),   # 4x4
        nn.AdaptiveAvgPool2d(1), nn.Conv2d(6, 6, 1), norm(6),          # 1x1
        nn.Flatten(), nn.Linear(6, 2),
    )


def test_predictor_reports_layers_without_prior():
    net = kn.KalmanPredictor(small_map_net())
    assert net.layers_without_prior() == []
    with pytest.warns(UserWarning, match=r"\['8'\].*one value per group"):
        net(torch.randn(4, 3, 8, 8))
    assert net.layers_without_prior() == ["8"]
    assert net.prior_sizes == {"4": 16, "8": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(torch.randn(4, 3, 8, 8))  # reported once


def test_auto_rows_give_every_prior_enough_values():
    torch.manual_seed(0)
    net = kn.KalmanPredictor(small_map_net(), rows_per_group="auto", min_prior_values=8)
    assert net.rows_per_group == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = net(torch.randn(4, 3, 8, 8))
    assert out.shape == (4, 2)
    assert net.rows_per_group == 8 and net.layers_without_prior() == []
    seen = {}
    layer = net.module[8]
    layer.register_forward_pre_hook(lambda m, inp: seen.update(rows=inp[0].shape[0]))
    net(torch.randn(4, 3, 8, 8))
    assert seen["rows"] == 4 + 2 * 8
    # the 1x1 layer now gets a prior with nonzero variance, used by the guard
    assert layer.guard_counters[1].item() >= 1


def test_predictor_rejects_bad_rows_options():
    with pytest.raises(ValueError, match="rows_per_group"):
        kn.KalmanPredictor(small_map_net(), rows_per_group="many")
    with pytest.raises(ValueError, match="min_prior_values"):
        kn.KalmanPredictor(small_map_net(), rows_per_group="auto", min_prior_values=1)


@pytest.mark.parametrize("options", [dict(gain_rule="kalman"), dict(guard="two_sided"),
                                     dict(gain_warmup=3)])
def test_converted_model_trains_with_new_options(options):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    model = kn.convert_batchnorm(net, micro_batch=2, **options)
    assert all(getattr(m, k) == v for m in model.modules()
               if isinstance(m, kn.BatchKalmanNorm2d) for k, v in options.items())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(torch.randn(8, 3, 6, 6)).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert kn.guard_report(model)["priors"] == 3 * 4  # 3 steps, 4 groups


def test_convert_refuses_bad_rows_options_before_touching_the_model():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                        nn.BatchNorm2d(4))
    for bad in (dict(rows_per_group="many"), dict(rows_per_group="auto", min_prior_values=0)):
        with pytest.raises(ValueError):
            kn.convert_batchnorm(net, micro_batch=2, **bad)
        assert type(net[1]) is nn.BatchNorm2d and type(net[4]) is nn.BatchNorm2d
    model = kn.convert_batchnorm(net, micro_batch=2, rows_per_group="auto", min_prior_values=4)
    predictor = kn.predictor_of(model)
    assert predictor.auto_rows and predictor.min_prior_values == 4
