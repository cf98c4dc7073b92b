"""Closed forms, equivalences and gradients of kalmannorm.functional."""
import pytest
import torch
import torch.nn.functional as F

from kalmannorm import functional as KF


def per_group_batch_norm(x, groups, weight=None, bias=None, eps=1e-5):
    """Reference: F.batch_norm applied to each group of rows on its own."""
    return torch.cat([
        F.batch_norm(chunk, None, None, weight, bias, True, 0.0, eps)
        for chunk in x.chunk(groups)
    ])


@pytest.mark.parametrize("shape,groups", [((8, 3, 5, 4), 4), ((6, 4), 2), ((4, 2, 3, 2, 2), 1)])
def test_group_moments_match_per_group_reductions(shape, groups):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    mean, var = KF.group_moments(x.float(), groups)
    mean64, var64 = KF.group_moments(x, groups)
    assert mean.dtype == var.dtype == torch.float32
    assert mean64.dtype == var64.dtype == torch.float64
    for s, chunk in enumerate(x.chunk(groups)):
        dims = [0] + list(range(2, x.dim()))
        torch.testing.assert_close(mean64[s], chunk.mean(dims))
        torch.testing.assert_close(var64[s], chunk.var(dims, unbiased=False))
        torch.testing.assert_close(mean[s], chunk.mean(dims).float())
        torch.testing.assert_close(var[s], chunk.var(dims, unbiased=False).float())


def test_group_moments_float32_for_half_input():
    x = torch.randn(4, 3, 8, 8).to(torch.bfloat16)
    mean, var = KF.group_moments(x, 2)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    ref = x.float().reshape(2, 2, 3, 64).transpose(1, 2).reshape(2, 3, -1)
    torch.testing.assert_close(var, ref.var(-1, unbiased=False))


def test_update_hand_computed_values():
    # p = 0.9: mean = 0.9*1 + 0.1*3 = 1.2; var = 0.9*2 + 0.1*4 + 0.09*(3-1)^2 = 2.56
    t = lambda v: torch.tensor([[v]])
    mean, var, used = KF.kalman_update(t(3.0), t(4.0), t(1.0), t(2.0), gain=0.9)
    assert bool(used)
    torch.testing.assert_close(mean, t(1.2))
    torch.testing.assert_close(var, t(2.56))


def test_update_is_the_mixture_mean_and_variance():
    torch.manual_seed(0)
    p, n = 0.7, 400_000
    mu_pred, var_pred, mu_obs, var_obs = 0.5, 2.0, -1.0, 0.5
    pick = torch.rand(n, dtype=torch.float64) < p
    z = torch.where(pick, mu_pred + var_pred ** 0.5 * torch.randn(n, dtype=torch.float64),
                    mu_obs + var_obs ** 0.5 * torch.randn(n, dtype=torch.float64))
    t = lambda v: torch.tensor([[v]])
    mean, var, _ = KF.kalman_update(t(mu_obs), t(var_obs), t(mu_pred), t(var_pred), gain=p)
    assert abs(mean.item() - z.mean().item()) < 0.01
    assert abs(var.item() - z.var().item()) < 0.02


def test_gain_zero_is_per_group_batch_norm_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4, requires_grad=True)
    w = torch.rand(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    prior = (torch.randn(4, 3), torch.rand(4, 3) + 0.5)
    y, *_ = KF.batch_kalman_norm(x, prior, w, b, groups=4, gain=0.0)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), g)
    y_ref = per_group_batch_norm(x, 4, w, b)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), g)
    torch.testing.assert_close(y, y_ref)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r)


def test_no_prior_uses_observed_statistics():
    x = torch.randn(6, 2, 3, 3)
    y, mean, var, used = KF.batch_kalman_norm(x, None, None, None, groups=3)
    assert not bool(used)
    torch.testing.assert_close(y, per_group_batch_norm(x, 3))


def test_prior_with_zero_variance_everywhere_is_no_prior():
    x = torch.randn(4, 2, 3, 3)
    prior = (torch.randn(2, 2), torch.zeros(2, 2))
    y, _, _, used = KF.batch_kalman_norm(x, prior, None, None, groups=2)
    assert not bool(used)
    torch.testing.assert_close(y, per_group_batch_norm(x, 2))


@pytest.mark.parametrize("case", ["ratio", "zero_obs_var", "inf_prior", "nan_prior"])
def test_guard_falls_back_exactly_with_finite_gradients(case):
    torch.manual_seed(0)
    x = torch.randn(4, 2, 3, 3)
    mean_prior = torch.randn(2, 2)
    var_prior = torch.rand(2, 2) + 0.5
    if case == "ratio":
        var_prior = var_prior * 1e3  # mean(var_pred / var_obs) ~ 1e3 >= 100
    elif case == "zero_obs_var":
        x[:2, 1] = 3.0  # group 0, channel 1 constant: var_obs = 0, the ratio is inf
    elif case == "inf_prior":
        var_prior[0, 0] = float("inf")
    else:
        mean_prior[1, 1] = float("nan")
    x.requires_grad_(True)
    mean_prior.requires_grad_(True)
    var_prior.requires_grad_(True)
    y, mean, var, used = KF.batch_kalman_norm(x, (mean_prior, var_prior), None, None, groups=2)
    assert not bool(used)
    mean_obs, var_obs = KF.group_moments(x, 2)
    assert torch.equal(mean, mean_obs) and torch.equal(var, var_obs)
    y.square().sum().backward()
    for t in (x, mean_prior, var_prior):
        assert torch.isfinite(t.grad).all()
    assert torch.count_nonzero(mean_prior.grad) == 0 and torch.count_nonzero(var_prior.grad) == 0


def test_guard_threshold_is_configurable():
    x = torch.randn(4, 2, 3, 3)
    _, var_obs = KF.group_moments(x, 2)
    prior = (torch.zeros(2, 2), var_obs * 5)  # ratio 5
    assert bool(KF.batch_kalman_norm(x, prior, None, None, groups=2)[3])
    assert not bool(KF.batch_kalman_norm(x, prior, None, None, groups=2, guard_threshold=5)[3])


def test_prior_from_rows_rejects_non_finite_rows_without_poisoning_gradients():
    rows = torch.randn(4, 3, 2, 2)
    rows[1, 2, 0, 0] = float("inf")
    rows.requires_grad_(True)
    mean, var, valid = KF.prior_from_rows(rows, 2)
    assert valid.tolist() == [False, True]  # row 1 belongs to group 0
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    (mean.sum() + var.sum()).backward()
    assert torch.isfinite(rows.grad).all()


def test_detach_prior_stops_gradient():
    x = torch.randn(4, 2, 3, 3, requires_grad=True)
    mean_prior = torch.randn(2, 2, requires_grad=True)
    var_prior = (torch.rand(2, 2) + 0.5).requires_grad_(True)
    for detach in (False, True):
        y, *_ = KF.batch_kalman_norm(x, (mean_prior, var_prior), None, None, groups=2,
                                     detach_prior=detach)
        grads = torch.autograd.grad(y.square().sum(), (mean_prior, var_prior),
                                    allow_unused=True)
        if detach:
            assert all(g is None for g in grads)
        else:
            assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_gradcheck_batch_kalman_norm_float64():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    mp = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    vp = (torch.rand(2, 2, dtype=torch.float64) + 0.5).requires_grad_(True)

    def fn(x, w, b, mp, vp):
        y, mean, var, used = KF.batch_kalman_norm(x, (mp, vp), w, b, groups=2, gain=0.8)
        assert bool(used) and y.dtype == torch.float64
        return y, mean, var

    assert torch.autograd.gradcheck(fn, (x, w, b, mp, vp))


def _moments64(x, groups):
    rows = x.reshape(groups, x.shape[0] // groups, x.shape[1], -1).transpose(1, 2)
    rows = rows.reshape(groups, x.shape[1], -1)
    return rows.mean(-1), rows.var(-1, unbiased=False)


def test_gradcheck_functional_pieces_float64():
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(KF.group_affine, (x, scale, shift))
    assert torch.autograd.gradcheck(lambda x: KF.group_moments(x, 2), (x,))
    assert torch.autograd.gradcheck(lambda x: KF.prior_from_rows(x, 4)[:2], (x,))

    mean = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(2, 3, dtype=torch.float64) + 0.2).requires_grad_(True)

    def sample(mean, var):  # a fresh generator per call: the same noise every evaluation
        return KF.sample_rows(mean, var, 2, (4,), torch.Generator().manual_seed(3))

    assert torch.autograd.gradcheck(sample, (mean, var))


def test_group_moments_gradient_matches_float64_reference():
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    mean, var = KF.group_moments(x, 3)
    g_mean, g_var = torch.randn_like(mean), torch.randn_like(var)
    grad = torch.autograd.grad((mean * g_mean).sum() + (var * g_var).sum(), x)[0]
    x64 = x.detach().double().requires_grad_(True)
    m64, v64 = _moments64(x64, 3)
    grad64 = torch.autograd.grad((m64 * g_mean.double()).sum() + (v64 * g_var.double()).sum(),
                                 x64)[0]
    torch.testing.assert_close(grad, grad64.float(), rtol=1e-4, atol=1e-6)


def test_sample_rows_statistics_and_zero_variance_gradient():
    mean = torch.tensor([[1.0, -2.0]])
    var = torch.tensor([[4.0, 0.0]], requires_grad=True)
    z = KF.sample_rows(mean, var, 2, (100, 100), torch.Generator().manual_seed(0))
    assert z.shape == (2, 2, 100, 100)
    assert abs(z[:, 0].mean().item() - 1.0) < 0.05 and abs(z[:, 0].var().item() - 4.0) < 0.1
    assert torch.all(z[:, 1] == -2.0)
    z.sum().backward()
    assert torch.isfinite(var.grad).all()


def test_update_running_stats_all_groups_and_group0():
    mean = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    var = torch.tensor([[1.0, 1.0], [3.0, 5.0]])
    rm, rv = torch.zeros(2), torch.ones(2)
    KF.update_running_stats(rm, rv, mean, var, 0.1, count=5)
    torch.testing.assert_close(rm, torch.tensor([0.2, 0.3]))
    torch.testing.assert_close(rv, 0.9 + 0.1 * torch.tensor([2.0, 3.0]) * 5 / 4)
    rm, rv = torch.zeros(2), torch.ones(2)
    KF.update_running_stats(rm, rv, mean, var, 0.1, count=5, group0_only=True)
    torch.testing.assert_close(rm, torch.tensor([0.1, 0.2]))
    torch.testing.assert_close(rv, 0.9 + 0.1 * torch.tensor([1.0, 1.0]) * 5 / 4)


def test_update_running_stats_skips_non_finite_step():
    rm, rv = torch.zeros(2), torch.ones(2)
    KF.update_running_stats(rm, rv, torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2),
                            0.1, count=4)
    assert torch.equal(rm, torch.zeros(2)) and torch.equal(rv, torch.ones(2))


def test_bad_arguments_raise():
    x = torch.randn(6, 2, 3)
    with pytest.raises(ValueError, match="does not split into 4 equal groups"):
        KF.group_moments(x, 4)
    with pytest.raises(ValueError, match="gain must be in"):
        KF.batch_kalman_norm(x, (torch.zeros(3, 2), torch.ones(3, 2)), None, None, groups=3,
                             gain=1.5)
    with pytest.raises(ValueError, match="prior statistics must have shape"):
        KF.batch_kalman_norm(x, (torch.zeros(2, 2), torch.ones(2, 2)), None, None, groups=3)
    with pytest.raises(ValueError, match="expected at least 2D"):
        KF.group_moments(torch.randn(4), 1)
