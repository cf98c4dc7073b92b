"""The CPU fused backend (kalmannorm.functional.cpu_fused) equals the composite form it replaces."""
import functools

import pytest
import torch
from torch import nn

import kalmannorm as kn
from kalmannorm import functional as KF


def _functional_step(fused, dtype=torch.float64, prior=True, affine=True,
                     channels_last=False, detach_prior=False, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(8, 3, 5, 4, dtype=dtype) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = (torch.rand(3, dtype=dtype) + 0.5).requires_grad_() if affine else None
    b = torch.randn(3, dtype=dtype).requires_grad_() if affine else None
    pr = None
    if prior:
        pr = (torch.randn(4, 3, dtype=dtype).requires_grad_(),
              (torch.rand(4, 3, dtype=dtype) + 0.5).requires_grad_())
    y, mean, var, used = KF.batch_kalman_norm(x, pr, w, b, groups=4, gain=0.7, fused=fused,
                                              detach_prior=detach_prior)
    g = torch.randn(y.shape, dtype=dtype)
    loss = (y * g).sum() + (mean * torch.arange(12.0, dtype=dtype).view(4, 3)).sum() \
        + var.square().sum()
    inputs = [t for t in [x, w, b] + (list(pr) if pr else []) if t is not None]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [y, mean, var, used] + list(grads)


@pytest.mark.parametrize("options", [
    {}, {"prior": False}, {"affine": False}, {"channels_last": True}, {"detach_prior": True},
    {"dtype": torch.float32},
])
def test_fused_functional_matches_composite(options):
    fused = _functional_step(True, **options)
    composite = _functional_step(False, **options)
    tol = {} if options.get("dtype") == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    for a, b in zip(fused, composite):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, **tol)


def test_fused_statistics_are_bit_identical_to_group_moments():
    x = torch.randn(16, 5, 7, 7) * 3 + 2
    _, mean, var, _ = KF.batch_kalman_norm(x, None, None, None, groups=8, fused=True)
    mean_ref, var_ref = KF.group_moments(x, 8)
    assert torch.equal(mean, mean_ref) and torch.equal(var, var_ref)


@pytest.mark.parametrize("prior", [False, True])
def test_gradcheck_fused_float64(prior):
    torch.manual_seed(0)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    mp = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    vp = (torch.rand(2, 2, dtype=torch.float64) + 0.5).requires_grad_()

    def f(x, w, b, mp, vp):
        y, mean, var, _ = KF.batch_kalman_norm(x, (mp, vp) if prior else None, w, b, groups=2,
                                               gain=0.6, fused=True)
        return y, mean, var

    assert torch.autograd.gradcheck(f, (x, w, b, mp, vp))


@pytest.mark.parametrize("propagate", ["raw", "normalized"])
def test_gradcheck_fused_shadow_step_float64(propagate):
    torch.manual_seed(0)
    x = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)  # 4 real + 2 shadow
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        gen = torch.Generator().manual_seed(1)  # the same samples at every evaluation
        options = KF.StepOptions(real_rows=4, groups=2, gain=0.6, eps=1e-5,
                                 shadow_rows=1, shadow_prior=True,
                                 normalized=propagate == "normalized")
        y, mean, var, _, _ = KF.training_step(x, w, b, options, generator=gen,
                                              backend="cpu_fused")
        return y, mean, var

    assert torch.autograd.gradcheck(f, (x, w, b))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AvgPool2d(2), nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
        )

    def forward(self, x):
        h = self.body(x)
        return h.mean((2, 3))


def _model_step(fused, monkeypatch, propagate="raw", channels_last=False, detach_prior=False,
                autocast=False):
    torch.manual_seed(0)
    net = _Net()
    # the fused kernel implements the released update (gain_rule="fixed")
    model = kn.convert_batchnorm(net, gain=0.9, micro_batch=2, propagate=propagate,
                                 detach_prior=detach_prior, gain_rule="fixed")
    x = torch.randn(8, 3, 8, 8)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with kn.use_backend("cpu_fused" if fused else "composite"):
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        out.float().square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    return out, grads, buffers, kn.guard_report(model)


@pytest.mark.parametrize("options", [{}, {"propagate": "normalized"}, {"channels_last": True},
                                     {"detach_prior": True}, {"autocast": True},
                                     {"autocast": True, "channels_last": True}])
def test_fused_shadow_rows_match_composite_in_a_model(monkeypatch, options):
    out_f, grads_f, buffers_f, counts_f = _model_step(True, monkeypatch, **options)
    out_c, grads_c, buffers_c, counts_c = _model_step(False, monkeypatch, **options)
    if options.get("autocast"):
        # bfloat16 rounds the same math in different places; both forms are ~1-8% (of the
        # largest entry) from float32 here, so compare relative to each tensor's largest entry.
        for a, b in zip([out_f] + grads_f + buffers_f, [out_c] + grads_c + buffers_c):
            scale = b.double().abs().max().clamp_min(1e-6)
            assert ((a.double() - b.double()).abs().max() / scale) < 0.1
    else:
        torch.testing.assert_close(out_f, out_c, rtol=1e-4, atol=1e-5)
        for a, b in zip(grads_f + buffers_f, grads_c + buffers_c):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert counts_f == counts_c and counts_f["priors"] == 2 * 4  # 2 layers x 4 groups


def test_fused_shadow_rows_reject_non_finite_rows_with_finite_gradients():
    layer = kn.BatchKalmanNorm2d(3, micro_batch=2)
    model = kn.KalmanPredictor(nn.Sequential(kn.BatchKalmanNorm2d(3, micro_batch=2), layer))
    x = torch.randn(4, 3, 4, 4, requires_grad=True)
    # The second layer's shadow rows overflow: its prior must be rejected, not propagated.
    model.module[0].register_forward_hook(
        lambda m, a, out: out.index_fill(0, torch.tensor([4]), float("inf")))
    y = model(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    counts = kn.guard_report(model)
    assert counts == {"fallbacks": 1, "priors": 2}  # row 4 is group 0's shadow row


def test_fused_bfloat16_statistics_stay_float32():
    x = (torch.randn(8, 4, 6, 6) * 3 + 1).to(torch.bfloat16)
    _, mean, var, _ = KF.batch_kalman_norm(x, None, None, None, groups=4, fused=True)
    mean_ref, var_ref = KF.group_moments(x, 4)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(var, var_ref, rtol=1e-5, atol=1e-6)


def test_fused_is_not_used_under_compile():
    assert KF.resolve_backend(torch.randn(2, 3)) == "cpu_fused"
    seen = []

    def f(x):
        seen.append(KF.resolve_backend(x))
        return x + 1

    torch.compile(f, backend="eager")(torch.randn(2, 3))
    assert seen == ["composite"]


def test_double_backward_with_the_composite_form():
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    y = KF.batch_kalman_norm(x, None, None, None, groups=2, fused=False)[0]
    (g,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    g.sum().backward()
    assert x.grad is not None


def test_double_backward_through_the_fused_kernel_names_the_way_out():
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    y = KF.batch_kalman_norm(x, None, None, None, groups=2, backend="cpu_fused")[0]
    with pytest.raises(RuntimeError, match=r"use_backend\('composite'\)"):
        torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)


@pytest.mark.parametrize("dtype,propagate", [(torch.float64, "raw"), (torch.float32, "raw"),
                                             (torch.bfloat16, "raw"),
                                             (torch.float64, "normalized")])
@pytest.mark.parametrize("shape,rows_per_group", [((8, 6), 4), ((8, 6, 1, 1), 1), ((8, 6, 1, 1), 3),
                                                  ((8, 6, 1), 2)])
def test_fused_equals_composite_at_one_position_per_row(dtype, propagate, shape, rows_per_group):
    """Regression (issue 8, defect 1): rows with one value per channel ([N, C], [N, C, 1, 1])
    once made the fused backward read an expanded stride-0 centre past its end, so gradients
    were wrong and changed from run to run. Many repetitions, since the error depended on
    memory contents. Normalized propagation is checked in float64 only: at two values per group
    its samples amplify rounding far beyond the float32/bfloat16 tolerances below."""
    layer_cls = {2: kn.BatchKalmanNorm1d, 3: kn.BatchKalmanNorm1d, 4: kn.BatchKalmanNorm2d}
    cls = functools.partial(layer_cls[len(shape)], propagate=propagate, gain_rule="fixed")

    def runs(backend, run_dtype):
        out = []
        for rep in range(8):
            torch.manual_seed(rep)
            model = kn.KalmanPredictor(nn.Sequential(cls(6, micro_batch=2), nn.ReLU(),
                                                     cls(6, micro_batch=2)),
                                       rows_per_group=rows_per_group).to(run_dtype)
            x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(run_dtype).requires_grad_()
            with kn.use_backend(backend):
                torch.manual_seed(100 + rep)
                y = model(x)
                (y.double() * torch.linspace(-1, 1, y.numel(), dtype=torch.float64)
                 .view(y.shape)).sum().backward()
            out.append([y.detach(), x.grad] + [p.grad for p in model.parameters()])
        return out

    def max_error(run, ref):
        # relative to the largest entry, at least 1: some gradients here are zero in exact
        # arithmetic (two values per group normalize to +-1 whatever x is)
        return max(float((a.double() - b.double()).abs().max()
                         / b.double().abs().max().clamp_min(1.0)) for a, b in zip(run, ref))

    fused, composite = runs("cpu_fused", dtype), runs("composite", dtype)
    for run in fused:
        assert all(torch.isfinite(t).all() for t in run)
    if dtype == torch.bfloat16:
        # Both forms round differently; each must be as close to the float64 result as the other.
        exact = runs("composite", torch.float64)
        for f, c, e in zip(fused, composite, exact):
            assert max_error(f, e) <= max(2 * max_error(c, e), 0.02)
    else:
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}[dtype]
        for f, c in zip(fused, composite):
            assert max_error(f, c) < tol
