"""The Triton backend equals the composite form: outputs, every gradient, running buffers and guard
counters, for the prior supplied, taken from shadow rows, rejected or absent; NCHW, channels-last
and rows of one position (against float64); float32 and bfloat16; the measured gain's kernel;
the guard and the measured gain decided per group (``decisions="group"``) or for the layer;
Batch Renormalization.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``,
set by the root ``conftest.py`` before kalmannorm is imported); shapes are tiny and odd so that every
mask is exercised. On a CUDA machine the same tests run the compiled kernels on the GPU.
"""
import os

import pytest
import torch
from torch import nn

import kalmannorm as kn
from kalmannorm import functional as KF
from kalmannorm.functional import triton_ops

pytestmark = pytest.mark.skipif(
    not triton_ops.available(),
    reason="triton is not installed (pip install triton, or a CUDA build of torch)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, dtype, channels_last=False, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    x = x.to(device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def _close(a, b, dtype, float32_tol=2e-5):
    """Relative to the largest entry (at least 1): both forms round the same math differently."""
    if a is None or b is None:
        assert a is None and b is None
        return
    tol = {torch.float32: float32_tol, torch.bfloat16: 2e-2}[dtype]
    scale = b.double().abs().max().clamp_min(1.0)
    err = (a.double() - b.double()).abs().max() / scale
    assert err < tol, f"relative error {float(err):.2e}"


def _functional(backend, x, prior, affine, **kw):
    channels = x.shape[1]
    w = b = None
    if affine:
        w = torch.linspace(0.5, 1.5, channels, device=DEVICE).requires_grad_()
        b = torch.linspace(-1, 1, channels, device=DEVICE).requires_grad_()
    y, mean, var, used = KF.batch_kalman_norm(x, prior, w, b, backend=backend, **kw)
    g = torch.linspace(-1, 1, y.numel(), device=DEVICE).view(y.shape)
    loss = (y.float() * g).sum() + (mean * mean.new_tensor(range(mean.numel())).view(
        mean.shape)).sum() + var.square().sum()
    leaves = [t for t in [x, w, b] + list(prior or ()) if t is not None]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [y, mean, var, used] + list(grads)


@pytest.mark.parametrize("case", [
    dict(), dict(affine=False), dict(channels_last=True), dict(detach_prior=True),
    dict(no_prior=True), dict(reject=True), dict(nonfinite=True), dict(gain=0.3),
    dict(shape=(6, 5, 3)), dict(dtype=torch.bfloat16), dict(guard="two_sided"),
    dict(guard="two_sided", reject=True), dict(guard="two_sided", reject="under"),
])
def test_prior_supplied_matches_composite(case):
    shape = case.get("shape", (8, 5, 3, 7))
    dtype = case.get("dtype", torch.float32)
    groups = 4 if len(shape) == 4 else 3
    x = _inputs(shape, dtype, case.get("channels_last", False))
    prior = None
    if not case.get("no_prior"):
        mp = torch.randn(groups, shape[1], device=DEVICE)
        vp = torch.rand(groups, shape[1], device=DEVICE) + 0.5
        if case.get("reject"):  # mean ratio far above (or below) the guard threshold
            vp = vp * (1e-4 if case["reject"] == "under" else 1e4)
        if case.get("nonfinite"):
            mp[1, 2] = float("inf")
        prior = (mp.requires_grad_(), vp.requires_grad_())
    kw = dict(groups=groups, gain=case.get("gain", 0.7),
              detach_prior=case.get("detach_prior", False), guard=case.get("guard", "upper"))
    expected = _functional("composite", x, prior, case.get("affine", True), **kw)
    got = _functional("triton", x, prior, case.get("affine", True), **kw)
    assert got[0].dtype == dtype and got[0].is_contiguous(
        memory_format=torch.channels_last if case.get("channels_last") else
        torch.contiguous_format)
    assert bool(got[3]) == bool(expected[3]) == (prior is not None and not case.get("reject")
                                                 and not case.get("nonfinite"))
    for a, b in zip(got, expected):
        _close(a, b, dtype)


class _Net(nn.Module):
    """Three BKN layers with a convolution, pooling and a residual sum between them."""

    def __init__(self, channels=5, **options):
        super().__init__()
        # the released options unless a case names others; the cases were
        # written when raw propagation was the default
        options = {"gain_rule": "fixed", "propagate": "raw", "decisions": "layer", **options}
        bkn = lambda: kn.BatchKalmanNorm2d(channels, micro_batch=2, **options)  # noqa: E731
        self.n1, self.n2, self.n3 = bkn(), bkn(), bkn()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.n1(x))
        h = self.n2(self.conv(h)) + h
        return self.n3(nn.functional.avg_pool2d(h, 2, ceil_mode=True))


def _model_step(backend, x, rows_per_group, steps, generator_seed=3, **options):
    torch.manual_seed(0)
    model = kn.KalmanPredictor(_Net(x.shape[1], **options), rows_per_group=rows_per_group,
                               generator=torch.Generator(DEVICE).manual_seed(generator_seed))
    model.to(device=DEVICE, dtype=x.dtype)
    with kn.use_backend(backend), triton_ops.torch_noise():
        out = []
        for _ in range(steps):
            y = model(x)
            (y.float() * torch.linspace(-1, 1, y.numel(), device=DEVICE).view(y.shape)).sum() \
                .backward()
            out.append(y.detach())
    grads = [x.grad] + [p.grad for p in model.parameters()]
    buffers = [b for b in model.buffers()]
    return out, grads, buffers, kn.guard_report(model)


@pytest.mark.parametrize("case", [
    dict(steps=2, momentum=None), dict(propagate="normalized"), dict(rows_per_group=2),
    dict(channels_last=True), dict(detach_prior=True, running_stats="group0"),
    dict(dtype=torch.bfloat16), dict(custom_ops=True),
    dict(steps=2, gain_rule="kalman", propagate="normalized"),
    dict(gain_rule="kalman", custom_ops=True, rows_per_group=2),
])
def test_shadow_rows_match_composite_in_a_model(case, monkeypatch):
    """Also through the ``torch.library`` ops that ``torch.compile`` traces (``custom_ops``),
    which eager mode bypasses."""
    case = dict(case)
    if case.pop("custom_ops", False):
        monkeypatch.setitem(triton_ops._state, "ops", True)
    dtype = case.pop("dtype", torch.float32)
    rows = case.pop("rows_per_group", 1)
    steps = case.pop("steps", 1)  # two steps: buffers and counters accumulate
    channels_last = case.pop("channels_last", False)
    results = {}
    for backend in ("composite", "triton"):
        x = _inputs((4, 5, 5, 6), dtype, channels_last)
        results[backend] = _model_step(backend, x, rows, steps, **case)
    (ys_c, grads_c, bufs_c, counts_c), (ys_t, grads_t, bufs_t, counts_t) = \
        results["composite"], results["triton"]
    for a, b in zip(ys_t + grads_t + bufs_t, ys_c + grads_c + bufs_c):
        _close(a, b, dtype, float32_tol=1e-4)
    assert counts_t == counts_c and counts_t["priors"] == 2 * steps


def test_non_finite_shadow_row_rejects_the_prior_with_finite_gradients():
    results = {}
    for backend in ("composite", "triton"):
        torch.manual_seed(0)
        layer = kn.BatchKalmanNorm2d(3, micro_batch=2, gain_rule="fixed", decisions="layer")
        model = kn.KalmanPredictor(nn.Sequential(
            kn.BatchKalmanNorm2d(3, micro_batch=2, gain_rule="fixed", decisions="layer"), layer))
        model.module[0].register_forward_hook(
            lambda m, a, out: out.index_fill(0, torch.tensor([4], device=out.device),
                                             float("inf")))
        x = _inputs((4, 3, 4, 4), torch.float32)
        with kn.use_backend(backend), triton_ops.torch_noise():
            y = model.to(DEVICE)(x)
            y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        assert kn.guard_report(model) == {"fallbacks": 1, "priors": 1}
        results[backend] = (y, x.grad)
    for a, b in zip(results["triton"], results["composite"]):
        _close(a, b, torch.float32)


def test_philox_samples_are_gaussian_repeatable_and_regenerated_in_the_backward():
    """Without injected noise: samples ~ N(mean, var) of the combined statistics, the same
    generator seed gives bitwise the same step, and the backward regenerates exactly the noise
    of the forward (its gradient equals autograd's through ``mean + std * z`` with the ``z``
    read back from the samples)."""
    x = _inputs((4, 2, 16, 16), torch.float32)
    options = KF.StepOptions(real_rows=2, groups=1, gain=0.5, shadow_rows=2, shadow_prior=True)
    g = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def step():
        gen = torch.Generator(DEVICE).manual_seed(7)
        result = KF.training_step(x, None, None, options, generator=gen, backend="triton")
        (grad,) = torch.autograd.grad((result.y[2:] * g).sum(), x)
        return result, grad

    (y, mean, var, used, _), grad = step()
    (y2, *_), grad2 = step()
    assert bool(used) and torch.equal(y, y2) and torch.equal(grad, grad2)
    std = KF.safe_std(var).view(1, -1, 1, 1)
    z = ((y[2:] - mean.view(1, -1, 1, 1)) / std).detach()  # [2, C, 16, 16]: 512 per channel
    assert z.mean().abs() < 0.15 and (z.std() - 1).abs() < 0.1
    ref = KF.training_step(x, None, None, options, backend="composite")
    manual = ref.mean.view(1, -1, 1, 1) + KF.safe_std(ref.var).view(1, -1, 1, 1) * z
    (expected,) = torch.autograd.grad((manual * g).sum(), x)
    _close(grad, expected, torch.float32)


def test_double_backward_names_the_composite_backend():
    x = _inputs((4, 2, 3, 3), torch.float32)
    y = KF.batch_kalman_norm(x, None, None, None, groups=2, backend="triton")[0]
    with pytest.raises(RuntimeError, match=r"use_backend\('composite'\)"):
        torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)



@pytest.mark.parametrize("prior,dtype,flags", [
    (0, "fp32", "1100"), (1, "bf16", "1010"), (2, "fp32", "0101"), (0, "bf16", "0011"),
])
def test_kernels_compile_for_hopper(prior, dtype, flags):
    """Every kernel compiles to sm_90 machine code with triton's own ptxas (no GPU needed):
    catches what the interpreter lets pass, e.g. a global that is not a constexpr. Runs in a
    subprocess because the kernels must be defined without TRITON_INTERPRET."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, script, str(prior), dtype, flags], env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode == 3:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.parametrize("groups", [1, 4])
def test_measured_gain_matches_composite(groups):
    """``gain_rule="kalman"``: the gain measured on the device from the stats kernel's moments,
    the same as the composite form's, with a supplied prior (also one group: ``count``)."""
    x = _inputs((8, 5, 3, 7), torch.float32)
    prior = (torch.randn(groups, 5, device=DEVICE).requires_grad_(),
             (torch.rand(groups, 5, device=DEVICE) + 0.5).requires_grad_())
    options = KF.StepOptions(real_rows=8, groups=groups, gain=0.9, gain_rule="kalman")
    results = {}
    for backend in ("composite", "triton"):
        r = KF.training_step(x, None, None, options, prior, backend=backend)
        g = torch.linspace(-1, 1, r.y.numel(), device=DEVICE).view(r.y.shape)
        grads = torch.autograd.grad((r.y * g).sum() + r.var.sum(), [x, *prior])
        results[backend] = [r.y, r.mean, r.var] + list(grads)
    for a, b in zip(results["triton"], results["composite"]):
        _close(a, b, torch.float32)


@pytest.mark.parametrize("shape", [(6, 5), (8, 7, 1, 1), (16, 33)])
@pytest.mark.parametrize("gain_rule", ["fixed", "kalman"])
def test_one_position_rows_as_accurate_as_the_composite_form(shape, gain_rule):
    """Rows with one value per channel (``[N, C]``, ``[N, C, 1, 1]``: two values per group at
    m = 2) are ill-conditioned, so float32 results of either form differ from float64 by up to
    about 1e-4 (measured on an H100, ``docs/perf/gpu-check-h100-20261127-followup.json``). The
    Triton step takes them and stays within a small multiple of the composite float32 step's
    own error, both against the composite step in float64, with the same guard decision."""
    assert triton_ops.supports(torch.empty(shape, device=DEVICE))
    n, c = shape[:2]
    options = KF.StepOptions(real_rows=n, groups=n // 2, gain=0.9, gain_rule=gain_rule)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        leaves = [torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1,
                  torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
                  torch.randn(c, generator=gen, dtype=torch.float64),
                  torch.randn(n // 2, c, generator=gen, dtype=torch.float64),
                  torch.rand(n // 2, c, generator=gen, dtype=torch.float64) + 0.5]
        g = torch.randn(shape, generator=gen, dtype=torch.float64)

        def run(backend, dtype):
            x, w, b, mp, vp = (t.to(DEVICE, dtype).requires_grad_() for t in leaves)
            r = KF.training_step(x, w, b, options, (mp, vp), backend=backend)
            loss = (r.y * g.to(DEVICE, dtype)).sum() + r.mean.sum() + r.var.sum()
            return [r.y, r.mean, r.var, *torch.autograd.grad(loss, [x, w, b, mp, vp])], r.used

        reference, used = run("composite", torch.float64)
        errors = {}
        for backend in ("composite", "triton"):
            got, got_used = run(backend, torch.float32)
            assert bool(got_used) == bool(used)
            errors[backend] = max(float((a.double() - e).abs().max() / e.abs().max().clamp_min(1))
                                  for a, e in zip(got, reference))
        assert errors["triton"] <= max(4 * errors["composite"], 2e-5), errors


@pytest.mark.parametrize("groups,channels", [(1, 5), (3, 7), (4, 300), (16, 300)])
@pytest.mark.parametrize("case", ["random", "exact_prior", "zero_variance", "nonfinite", "clamp"])
def test_gain_kernel_equals_measured_gain(groups, channels, case):
    """The one-program gain kernel against :func:`measured_gain` on the same moments: groups not
    a power of two, channels over several blocks, one group (the Gaussian noise of ``count``
    values), a prior equal to the observation (p = 1, clamped to the gain), a zero-variance prior
    channel (log of the smallest float) and a non-finite prior (p = 0)."""
    from kalmannorm.functional.composite import measured_gain

    gen = torch.Generator().manual_seed(groups * 1000 + channels)
    mo, mp = (torch.randn(groups, channels, generator=gen) for _ in range(2))
    vo, vp = (torch.rand(groups, channels, generator=gen) * 3 + 0.1 for _ in range(2))
    gain = 0.3 if case == "clamp" else 0.9
    if case in ("exact_prior", "clamp"):
        mp, vp = mo.clone(), vo.clone()
    elif case == "zero_variance":
        vp[0, 1] = 0.0
    elif case == "nonfinite":
        mp[groups - 1, 2] = float("nan")
    stats = torch.stack([mo, vo, mp, vp]).to(DEVICE)
    count = 2 * 21
    got = triton_ops._measured_gain(stats, count, gain)
    expected = measured_gain(mo, vo, mp, vp, count).clamp(max=gain)
    assert got.shape == (1,)
    torch.testing.assert_close(got.cpu()[0], expected, rtol=2e-5, atol=1e-7)
    if case == "clamp":
        assert float(got) == float(torch.tensor(gain))
    if case == "nonfinite":
        assert float(got) == 0.0


def test_measured_gain_adds_no_torch_operations():
    """The measured gain is one kernel between stats and apply, not a dozen small torch
    launches: the forward of a step issues no torch compute operation (only allocations, the
    seed draw and what the interpreter does to move arguments), with either gain rule and
    decisions per layer or per group."""
    from torch.utils._python_dispatch import TorchDispatchMode

    allowed = ("aten.empty", "aten.new_empty", "aten.set_", "aten.copy_", "aten.select",
               "aten.randint")

    class Compute(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not str(func).startswith(allowed):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = _inputs((8, 5, 3, 3), torch.float32)
    prior = (torch.randn(4, 5, device=DEVICE), torch.rand(4, 5, device=DEVICE) + 0.5)
    for rule in ("fixed", "kalman"):
        for decisions in ("layer", "group"):
            options = KF.StepOptions(real_rows=8, groups=4, gain_rule=rule, decisions=decisions)
            with Compute() as mode:
                triton_ops.training_step(x, None, None, options, prior=prior)
            assert mode.ops == [], (rule, decisions, mode.ops)


@pytest.mark.parametrize("case", [
    dict(), dict(affine=False), dict(channels_last=True), dict(shape=(6, 5)),
    dict(limits="tensor"), dict(clipped=True), dict(dtype=torch.bfloat16),
])
def test_batch_renorm_matches_composite(case):
    """Batch Renormalization by the kernels (the correction ``(r, d)`` in the apply kernel, kept
    for the backward) against the composite form: output, statistics and every gradient; also
    with the running statistics changed after the forward, as the module does."""
    shape = case.get("shape", (8, 5, 3, 7))
    dtype = case.get("dtype", torch.float32)
    groups = shape[0] // 2
    c = shape[1]
    rm = torch.linspace(-0.5, 0.5, c, device=DEVICE)
    rv = torch.linspace(0.5, 4.0, c, device=DEVICE)
    if case.get("clipped"):  # far from the batch: r and d both hit their limits
        rm, rv = rm + 20.0, rv * 100.0
    r_max, d_max = 1.5, 0.5
    from kalmannorm.batchrenorm import batch_renorm

    if case.get("limits") == "tensor":
        r_max, d_max = torch.tensor(1.5, device=DEVICE), torch.tensor(0.5, device=DEVICE)
    results = {}
    for backend in ("composite", "triton"):
        x = _inputs(shape, dtype, case.get("channels_last", False))
        w = b = None
        if case.get("affine", True):
            w = torch.linspace(0.5, 1.5, c, device=DEVICE).requires_grad_()
            b = torch.linspace(-1, 1, c, device=DEVICE).requires_grad_()
        running = (rm.clone(), rv.clone())
        y, mean, var = batch_renorm(x, *running, w, b, groups=groups, r_max=r_max,
                                       d_max=d_max, backend=backend)
        running[0].add_(1.0)  # the module updates them before the backward runs
        running[1].mul_(2.0)
        g = torch.linspace(-1, 1, y.numel(), device=DEVICE).view(y.shape)
        loss = (y.float() * g).sum() + (mean * torch.arange(mean.numel(), device=DEVICE)
                                        .view(mean.shape)).sum() + var.square().sum()
        leaves = [t for t in (x, w, b) if t is not None]
        results[backend] = [y, mean, var] + list(torch.autograd.grad(loss, leaves))
    assert results["triton"][0].dtype == dtype
    for a, e in zip(results["triton"], results["composite"]):
        _close(a, e, dtype)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_batch_renorm_module_uses_the_kernels_and_trains_like_composite(momentum):
    """BatchRenorm2d past its warm-up: three steps per backend from the same state give the same
    outputs, gradients, running statistics and step count (the buffers by the buffers kernel;
    ``momentum=None``: a cumulative average)."""
    torch.manual_seed(0)
    x = _inputs((8, 5, 3, 3), torch.float32).detach()
    outs = {}
    for backend in ("composite", "triton"):
        layer = kn.BatchRenorm2d(5, micro_batch=2, warmup_steps=0, ramp_steps=0, r_max=1.2,
                                 d_max=0.3, momentum=momentum).to(DEVICE)
        record = []
        with kn.use_backend(backend):
            for step in range(3):
                xi = (x * (1 + step)).requires_grad_()
                y = layer(xi)
                (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).view(y.shape)).sum() \
                    .backward()
                record += [y.detach(), xi.grad, layer.weight.grad.clone()]
        assert int(layer.num_batches_tracked) == 3
        outs[backend] = record + [layer.running_mean, layer.running_var]
    for a, e in zip(outs["triton"], outs["composite"]):
        _close(a, e, torch.float32)


def test_host_helpers_equal_tritons():
    """The plain-Python tile helpers (triton's are constexpr functions, costly on the host)."""
    import triton

    assert all(triton_ops._pow2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
    assert all(triton_ops._cdiv(a, b) == triton.cdiv(a, b) for a in range(300) for b in range(1, 40))


# decisions="group": the guard and the measured gain decided per statistics group


@pytest.mark.parametrize("gain_rule", ["fixed", "kalman"])
@pytest.mark.parametrize("case", [
    dict(), dict(guard="two_sided"), dict(nonfinite=True), dict(invalid=True),
    dict(one_row=True), dict(channels_last=True), dict(affine=False), dict(detach_prior=True),
    dict(shape=(6, 5)), dict(dtype=torch.bfloat16), dict(all_rejected=True),
])
def test_group_decisions_match_composite(gain_rule, case):
    """Per-group guard and measured gain: group 2's prior trips the guard while the others are
    used (and group 1's is non-finite, or marked invalid by a ``[S]`` ``prior_valid``); the
    decisions ``[S]``, outputs, statistics and every gradient equal the composite form's, and a
    rejected group's prior gets exactly zero gradient. ``one_row``: one real row per group (the
    measured gain's sampling noise instead of the rows' spread)."""
    shape = case.get("shape", (4 if case.get("one_row") else 8, 5, 3, 7))
    dtype = case.get("dtype", torch.float32)
    groups = 4 if len(shape) == 4 else 3
    x = _inputs(shape, dtype, case.get("channels_last", False))
    gen = torch.Generator().manual_seed(1)
    mp = torch.randn(groups, shape[1], generator=gen).to(DEVICE)
    vp = (torch.rand(groups, shape[1], generator=gen) + 0.5).to(DEVICE)
    vp[2] = vp[2] * (1e4 if case.get("guard") != "two_sided" else 1e-4)  # trips the guard
    if case.get("all_rejected"):
        vp = vp * 1e4
    if case.get("nonfinite"):
        mp[1, 2] = float("inf")
    valid = None
    if case.get("invalid"):
        valid = torch.tensor([True, False, True, True][:groups], device=DEVICE)
    prior = (mp.requires_grad_(), vp.requires_grad_())
    kw = dict(groups=groups, gain=0.7, detach_prior=case.get("detach_prior", False),
              guard=case.get("guard", "upper"), gain_rule=gain_rule, decisions="group",
              prior_valid=valid)
    expected = _functional("composite", x, prior, case.get("affine", True), **kw)
    got = _functional("triton", x, prior, case.get("affine", True), **kw)
    used = expected[3]
    assert got[3].shape == used.shape == (groups,) and torch.equal(got[3], used)
    rejected = [2] + ([1] if case.get("nonfinite") or case.get("invalid") else [])
    assert not used[rejected].any()
    assert bool(used.any()) != bool(case.get("all_rejected"))
    for a, b in zip(got, expected):
        _close(a, b, dtype)
    if not case.get("detach_prior"):
        for grad in got[-2:]:  # the prior's gradients: zero for a rejected group
            assert torch.equal(grad[~used], torch.zeros_like(grad[~used]))


def test_group_decisions_are_the_groups_own():
    """With decisions per group, group 0's output and gradients by the kernels do not depend on
    what the other groups hold (their rows or priors), bitwise."""
    opts = dict(groups=4, gain=0.9, gain_rule="kalman", decisions="group")
    outs = []
    for other in (1.0, 1e3):
        x = _inputs((8, 5, 3, 7), torch.float32).detach()
        mp = torch.randn(4, 5, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        vp = torch.rand(4, 5, generator=torch.Generator().manual_seed(2)).to(DEVICE) + 0.5
        x[2:] *= other
        vp[1:] *= other
        x.requires_grad_()
        y, mean, var, used = KF.batch_kalman_norm(x, (mp, vp), None, None, backend="triton",
                                                  **opts)
        (grad,) = torch.autograd.grad((y[:2] * y[:2]).sum(), x)
        outs.append((y[:2], mean[0], var[0], used[0], grad[:2]))
    assert bool(outs[0][3]) and all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("case", [
    dict(), dict(gain_rule="kalman"), dict(gain_rule="kalman", propagate="normalized", steps=2),
    dict(gain_rule="kalman", rows_per_group=2, running_stats="group0"),
    dict(guard="two_sided", gain_rule="kalman", custom_ops=True),
    dict(gain_rule="kalman", channels_last=True, momentum=None, steps=2),
])
def test_group_decisions_in_a_model_match_composite(case, monkeypatch):
    """The model of :func:`test_shadow_rows_match_composite_in_a_model` with decisions per
    group: outputs, every gradient, running buffers and the guard counters (one decision per
    group: 2 groups x the 2 layers that get a prior, per step)."""
    case = dict(case)
    if case.pop("custom_ops", False):
        monkeypatch.setitem(triton_ops._state, "ops", True)
    rows = case.pop("rows_per_group", 1)
    steps = case.pop("steps", 1)
    channels_last = case.pop("channels_last", False)
    results = {}
    for backend in ("composite", "triton"):
        x = _inputs((4, 5, 5, 6), torch.float32, channels_last)
        results[backend] = _model_step(backend, x, rows, steps, decisions="group", **case)
    (ys_c, grads_c, bufs_c, counts_c), (ys_t, grads_t, bufs_t, counts_t) = \
        results["composite"], results["triton"]
    for a, b in zip(ys_t + grads_t + bufs_t, ys_c + grads_c + bufs_c):
        _close(a, b, torch.float32, float32_tol=1e-4)
    assert counts_t == counts_c and counts_t["priors"] == 2 * 2 * steps


@pytest.mark.parametrize("gain_rule", ["fixed", "kalman"])
@pytest.mark.parametrize("fault", ["nonfinite", "tripped"])
def test_group_decisions_reject_one_groups_shadow_prior(gain_rule, fault):
    """Group 1's incoming shadow row has a non-finite value, or is so large that its guard
    trips: only group 1 falls back to its observed statistics (one fallback of two priors),
    group 0 uses its prior; outputs, every gradient (finite) and the counters equal the
    composite form's."""
    results = {}
    for backend in ("composite", "triton"):
        torch.manual_seed(0)
        opts = dict(micro_batch=2, gain_rule=gain_rule, decisions="group")
        model = kn.KalmanPredictor(nn.Sequential(kn.BatchKalmanNorm2d(3, **opts),
                                                 kn.BatchKalmanNorm2d(3, **opts)))
        def hook(module, args, out):  # row 5: group 1's shadow row (real rows 0..3)
            keep, bad = torch.ones_like(out), torch.zeros_like(out)
            keep[5] = 0.0
            bad[5] = torch.linspace(1, 2, out[0].numel(), device=out.device).view(out[0].shape)
            if fault == "nonfinite":  # one value: the prior is offered (a non-zero variance)
                bad[5, 1, 2, 3] = float("inf")
            else:
                bad[5] *= 1e4
            return out * keep + bad

        model.module[0].register_forward_hook(hook)
        x = _inputs((4, 3, 4, 4), torch.float32)
        with kn.use_backend(backend), triton_ops.torch_noise():
            y = model.to(DEVICE)(x)
            (y * torch.linspace(-1, 1, y.numel(), device=DEVICE).view(y.shape)).sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        assert kn.guard_report(model) == {"fallbacks": 1, "priors": 2}
        results[backend] = [y, x.grad] + [p.grad for p in model.parameters()]
    for a, b in zip(results["triton"], results["composite"]):
        _close(a, b, torch.float32)


@pytest.mark.parametrize("gain_rule", ["fixed", "kalman"])
@pytest.mark.parametrize("normalized", [False, True])
def test_group_decisions_shadow_rows_gradients(gain_rule, normalized):
    """One step with the prior from the incoming shadow rows (2 per group): group 1's hold a
    non-finite value and group 2's trip the guard. The kernels' decisions, output, statistics
    and gradients (real rows, every shadow row, weight, bias) equal the composite form's; the
    shadow rows of the rejected groups get exactly zero gradient, the others not."""
    groups, m, k = 4, 2, 2
    x = _inputs((groups * (m + k), 5, 3, 4), torch.float32).detach()
    x[groups * m + 1 * k, 2, 1, 1] = float("nan")
    x[groups * m + 2 * k: groups * m + 3 * k] *= 1e3
    options = KF.StepOptions(real_rows=groups * m, groups=groups, gain=0.8, shadow_rows=k,
                             shadow_prior=True, normalized=normalized, gain_rule=gain_rule,
                             decisions="group")
    results = {}
    for backend in ("composite", "triton"):
        xi = x.clone().requires_grad_()
        w = torch.linspace(0.5, 1.5, 5, device=DEVICE).requires_grad_()
        b = torch.linspace(-1, 1, 5, device=DEVICE).requires_grad_()
        gen = torch.Generator(DEVICE).manual_seed(5)
        with triton_ops.torch_noise():
            r = KF.training_step(xi, w, b, options, generator=gen, backend=backend)
        g = torch.linspace(-1, 1, r.y.numel(), device=DEVICE).view(r.y.shape)
        grads = torch.autograd.grad((r.y * g).sum() + r.var.sum(), [xi, w, b])
        results[backend] = [r.y, r.mean, r.var, r.used, r.available, *grads]
    got, expected = results["triton"], results["composite"]
    assert torch.equal(got[3], expected[3]) and got[3].tolist() == [True, False, False, True]
    assert torch.equal(got[4], expected[4]) and bool(got[4].all())
    for a, e in zip(got, expected):
        _close(a, e, torch.float32)
    shadow = got[5][groups * m:].reshape(groups, k, -1)
    assert torch.isfinite(got[5]).all()
    assert not shadow[1:3].any() and shadow[0].any() and shadow[3].any()
