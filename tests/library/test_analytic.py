"""Analytic prediction (kalmannorm.analytic): closed forms against Monte Carlo, the expected
sampled prior, equivalences with BatchNorm, and refusals."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kalmannorm import (
    BatchKalmanNorm1d,
    BatchKalmanNorm2d,
    BatchKalmanNormAct2d,
    KalmanPredictor,
    convert_batchnorm,
    guard_report,
    norm_then,
    to_batchnorm,
)
from kalmannorm.analytic import (
    AnalyticKalmanPredictor,
    conv_moments,
    dropout_moments,
    linear_moments,
    pool_moments,
    relu_moments,
)
from kalmannorm.functional import group_moments, prior_from_rows, sample_rows

S = 2  # statistics groups in the Monte Carlo tests


def _stats(seed: int, channels: int, groups: int = S, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(groups, channels, generator=g, dtype=dtype)
    var = torch.rand(groups, channels, generator=g, dtype=dtype) * 2 + 0.2
    return mean, var


def _close(actual, expected, tol=0.05):
    """Monte Carlo agreement, relative to the scale of the variance."""
    (mc_mean, mc_var), (mean, var) = actual, expected
    scale = var.sqrt() + 1e-3
    assert ((mc_mean - mean).abs() / scale).max() < tol, (mc_mean, mean)
    assert ((mc_var - var).abs() / (var + 1e-3)).max() < 2 * tol, (mc_var, var)


# ------------------------------------------------------------------ rules, pure functions


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_moments_monte_carlo(dims):
    torch.manual_seed(dims)
    mean, var = _stats(1, 4)
    kernel = (3,) * dims
    weight = torch.randn((6, 2) + kernel) * 0.5
    bias = torch.randn(6)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    rows = {1: 4000, 2: 1000, 3: 100}[dims]
    x = sample_rows(mean, var, rows, (9,) * dims)
    # No padding: every output position is interior; stride and dilation do not matter.
    y = conv(x, weight, bias, stride=2, dilation=2, groups=2)
    _close(group_moments(y, S), conv_moments(mean, var, weight, bias, groups=2))


def test_linear_moments_monte_carlo():
    torch.manual_seed(0)
    mean, var = _stats(2, 5)
    weight, bias = torch.randn(3, 5), torch.randn(3)
    y = F.linear(sample_rows(mean, var, 40000, ()), weight, bias)
    _close(group_moments(y, S), linear_moments(mean, var, weight, bias))


def test_relu_moments_monte_carlo_and_limits():
    torch.manual_seed(0)
    mean = torch.tensor([[-3.0, -1.0, 0.0, 0.5, 2.0, 6.0]]).repeat(S, 1)
    var = torch.tensor([[1.0, 0.5, 2.0, 1.0, 0.1, 1.0]]).repeat(S, 1)
    y = F.relu(sample_rows(mean, var, 100000, ()))
    got = relu_moments(mean, var)
    mc_mean, mc_var = group_moments(y, S)
    torch.testing.assert_close(got[0], mc_mean, atol=0.01, rtol=0.02)
    torch.testing.assert_close(got[1], mc_var, atol=0.01, rtol=0.03)
    # Zero variance: relu of the mean, exactly, with finite gradients.
    m = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    v = torch.zeros(3, requires_grad=True)
    mean0, var0 = relu_moments(m, v)
    torch.testing.assert_close(mean0, torch.tensor([0.0, 0.0, 2.0]))
    torch.testing.assert_close(var0, torch.zeros(3))
    (mean0.sum() + var0.sum()).backward()
    assert torch.isfinite(m.grad).all() and torch.isfinite(v.grad).all()


def test_pool_and_dropout_moments_monte_carlo():
    torch.manual_seed(0)
    mean, var = _stats(3, 3)
    x = sample_rows(mean, var, 4000, (4, 4))
    _close(group_moments(F.avg_pool2d(x, 2), S), pool_moments(mean, var, 4))
    _close(group_moments(F.dropout(x, 0.3, training=True), S), dropout_moments(mean, var, 0.3))


def test_rules_gradcheck():
    mean, var = _stats(4, 3, dtype=torch.float64)
    mean.requires_grad_()
    var.requires_grad_()
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(relu_moments, (mean, var))
    assert torch.autograd.gradcheck(lambda m, v, w: conv_moments(m, v, w), (mean, var, weight))


# --------------------------------------------------- rules through the graph, end to end


class _Pipe(nn.Module):
    """``bkn1(x) [, bkn1b(x)] -> op -> bkn2``: the prior of ``bkn2`` is the rule applied to the
    combined statistics of the first layer(s)."""

    def __init__(self, op, channels, out_channels, *, two=False, flat=False):
        super().__init__()
        # raw propagation: the outgoing moments are the combined statistics themselves
        self.n1 = BatchKalmanNorm2d(channels, micro_batch=2, propagate="raw")
        self.n1b = BatchKalmanNorm2d(channels, micro_batch=2, propagate="raw")
        self.op = op
        self.two = two
        norm = BatchKalmanNorm1d if flat else BatchKalmanNorm2d
        self.n2 = norm(out_channels, micro_batch=2)

    def forward(self, x):
        a = self.n1(x)
        out = self.op(a, self.n1b(x)) if self.two else self.op(a)
        return self.n2(out)


class _Scale(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(shape))
        self.shift = nn.Parameter(torch.randn(shape))

    def forward(self, a):
        return a * self.scale + self.shift


def _eval_bn(channels):
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn.eval()


PIPES = {
    "F.relu": (F.relu, 3, {}),
    "nn.ReLU(inplace)": (nn.ReLU(inplace=True), 3, {}),
    "Tensor.relu": (lambda a: a.relu(), 3, {}),
    "nn.AvgPool2d": (nn.AvgPool2d(2), 3, {}),
    "F.avg_pool2d": (lambda a: F.avg_pool2d(a, 2), 3, {}),
    "adaptive+flatten": (lambda a: torch.flatten(F.adaptive_avg_pool2d(F.relu(a), 2), 1), 12,
                         {"flat": True}),
    "mean+linear": (nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(3, 5)), 5, {"flat": True}),
    "spatial mean": (lambda a: a.mean((2, 3)), 3, {"flat": True}),
    "conv": (nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), 4, {}),
    "grouped F.conv": (lambda a: F.conv2d(F.pad(a, (1, 1, 1, 1), mode="circular"),
                                          torch.ones(6, 1, 3, 3) * 0.3, torch.ones(6), groups=3),
                       6, {}),
    "add": (lambda a, b: a + b, 3, {"two": True}),
    "sub alpha": (lambda a, b: torch.sub(a, b, alpha=2.0), 3, {"two": True}),
    "cat": (lambda a, b: torch.cat([a, F.relu(b)], dim=1), 6, {"two": True}),
    "pad channels": (lambda a: F.pad(a, (0, 0, 0, 0, 1, 2)), 6, {}),
    "scalar mul/div": (lambda a: 2.5 * a / 4.0 - 1.0, 3, {}),
    "parameter affine": (_Scale((3, 1, 1)), 3, {}),
    "dropout": (nn.Dropout(0.3), 3, {}),
    "nn.MaxPool2d": (nn.MaxPool2d(2), 3, {}),
    "adaptive max": (lambda a: F.adaptive_max_pool2d(a, 3), 3, {}),
    # One nonlinearity per pipe: a second one would see a non-Gaussian input, which the rules
    # (moment matching) take as Gaussian.
    "nn.ReLU6": (nn.ReLU6(), 3, {}),
    "nn.Hardswish": (nn.Hardswish(), 3, {}),
    "F.hardsigmoid": (F.hardsigmoid, 3, {}),
    "nn.SiLU": (nn.SiLU(), 3, {}),
    "F.gelu": (F.gelu, 3, {}),
    "Tensor.sigmoid": (lambda a: a.sigmoid(), 3, {}),
    "squeeze-excitation": (lambda a, b: a * torch.sigmoid(b.mean((2, 3), keepdim=True)), 3,
                           {"two": True}),
    "upsample": (nn.Upsample(scale_factor=2, mode="bilinear"), 3, {}),
    "getitem, split": (lambda a: torch.cat([a[:, 1:], a.split(1, 1)[0]], 1), 3, {}),
    "channel shuffle": (lambda a: a.view(a.shape[0], 3, 1, 4, 4).transpose(1, 2).reshape(
        a.shape[0], 3, 4, 4), 3, {}),
    "eval BatchNorm2d": (_eval_bn(3), 3, {}),
}


def test_constant_varying_over_positions_raises():
    model = AnalyticKalmanPredictor(_Pipe(_Scale((1, 3, 4, 4)), 3, 3))
    with pytest.raises(ValueError, match="vary over positions"):
        model(torch.randn(4, 3, 4, 4))


def _record_priors(layers):
    """Patch each layer's forward_with_prior to record its prior and its combined statistics."""
    log = {}
    for name, layer in layers.items():
        original = layer.forward_with_prior

        def patched(x, prior, groups, prior_valid=None, _name=name, _original=original):
            y, mean, var = _original(x, prior, groups, prior_valid)
            log[_name] = (prior, (mean.detach(), var.detach()))
            return y, mean, var

        layer.forward_with_prior = patched
    return log


@pytest.mark.parametrize("name", list(PIPES))
def test_graph_rules_monte_carlo(name):
    torch.manual_seed(0)
    op, out_channels, options = PIPES[name]
    pipe = _Pipe(op, 3, out_channels, **options)
    model = AnalyticKalmanPredictor(pipe)
    log = _record_priors({"n1": pipe.n1, "n1b": pipe.n1b, "n2": pipe.n2})
    x = torch.randn(4, 3, 4, 4) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 0.7
    model(x)
    prior = log["n2"][0]
    assert prior is not None
    with torch.no_grad():
        # Flat outputs have one value per row: more rows for the same precision.
        rows = 16000 if options.get("flat") else 4000
        a = sample_rows(*log["n1"][1], rows, (4, 4))
        if options.get("two"):
            out = op(a, sample_rows(*log["n1b"][1], rows, (4, 4)))
        else:
            out = op(a)
        _close(group_moments(out, S), tuple(t.detach() for t in prior))


# ------------------------------------------------ the expected sampled prior, whole net


class _Net(nn.Module):
    """Pre-activation residual net with a stride-2 channel-padding shortcut, a concat branch and
    a BatchNorm1d head. Circular padding, so that borders do not matter; every conv reads fresh
    BKN samples, so the independence assumptions hold exactly."""

    def __init__(self, norm=nn.BatchNorm2d, norm1d=nn.BatchNorm1d, c=4, classes=6):
        super().__init__()
        conv = functools.partial(nn.Conv2d, padding=1, padding_mode="circular")
        self.c = c
        self.conv0 = conv(3, c, 3)
        self.norm0 = norm(c)
        self.a_norm1, self.a_conv1 = norm(c), conv(c, 2 * c, 3, stride=2)
        self.a_norm2, self.a_conv2 = norm(2 * c), conv(2 * c, 2 * c, 3)
        self.b_norm_a, self.b_conv_a = norm(2 * c), conv(2 * c, c, 3)
        self.b_norm_b, self.b_conv_b = norm(2 * c), nn.Conv2d(2 * c, c, 1)
        self.norm_last = norm(2 * c)
        self.fc = nn.Linear(2 * c, classes)
        self.norm_fc = norm1d(classes)

    def forward(self, x):
        c = self.c
        x = F.relu(self.norm0(self.conv0(x)))
        short = F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, c // 2, c - c // 2))
        out = self.a_conv1(F.relu(self.a_norm1(x)))
        x = self.a_conv2(F.relu(self.a_norm2(out))) + short
        a = self.b_conv_a(F.relu(self.b_norm_a(x)))
        b = self.b_conv_b(F.relu(self.b_norm_b(x)))
        x = torch.cat([a, b], 1) + x
        x = F.relu(self.norm_last(x))
        return self.norm_fc(self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


def _bkn_net(seed=0, **options):
    torch.manual_seed(seed)
    options.setdefault("micro_batch", 2)
    return _Net(functools.partial(BatchKalmanNorm2d, **options),
                functools.partial(BatchKalmanNorm1d, **options))


@pytest.mark.parametrize("propagate", ["raw", "normalized"])
def test_analytic_prior_is_expected_sampled_prior(propagate):
    # A guard threshold no prior passes keeps each layer's combined statistics equal to its
    # observed ones, so both predictions start every layer from the same statistics.
    net = _bkn_net(propagate=propagate, guard_threshold=1e-30)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (BatchKalmanNorm1d, BatchKalmanNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    layers = {n: m for n, m in net.named_modules() if isinstance(m, (BatchKalmanNorm1d, BatchKalmanNorm2d))}
    x = torch.randn(4, 3, 8, 8) + 0.5

    analytic = AnalyticKalmanPredictor(net)
    log = _record_priors(layers)
    analytic(x)
    expected = {n: log[n][0] for n in layers}
    for layer in layers.values():
        del layer.forward_with_prior
    assert expected["norm0"] is None and all(expected[n] is not None for n in layers if n != "norm0")

    # Sampled prediction: the prior is the moments of the shadow rows each layer receives.
    rows_per_group, passes = 16, 40
    sampled = KalmanPredictor(net, rows_per_group=rows_per_group,
                              generator=torch.Generator().manual_seed(0))
    draws = {n: [] for n in layers}
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, _n=n: draws[_n].append(prior_from_rows(args[0][4:], S)[:2])
        )
        for n, layer in layers.items()
    ]
    with torch.no_grad():
        for _ in range(passes):
            sampled(x)
    for h in hooks:
        h.remove()
    for n in layers:
        if n == "norm0":
            continue
        mean, var = (t.detach() for t in expected[n])
        means = torch.stack([d[0] for d in draws[n]])  # [passes, S, C]
        # Pooled over all draws (law of total variance): the population moments of the
        # pseudo-image, which the analytic rules compute; a single draw's biased variance is
        # lower by the variance of its mean. Tolerance: 5 standard errors over the passes.
        spread = torch.stack([d[1] for d in draws[n]]) + (means - means.mean(0)).square()
        for draws_n, target in ((means, mean), (spread, var)):
            error = (draws_n.mean(0) - target).abs()
            stderr = draws_n.std(0) / passes ** 0.5
            assert (error <= 5 * stderr + 1e-3 * (1 + target.abs())).all(), (n, error, stderr)


# -------------------------------------------------------------- equivalences and training


def _bn_pair(micro_batch=None, seed=0):
    torch.manual_seed(seed)
    bn = _Net()
    bkn = convert_batchnorm(copy.deepcopy(bn), gain=0.0, micro_batch=micro_batch,
                            prediction="analytic")
    assert isinstance(bkn, AnalyticKalmanPredictor)
    # Gain 0 everywhere but the first layer, which has no prior: per-group BatchNorm, while the
    # wrapper still runs the analytic graph.
    bkn.module.norm0.gain = 0.9
    return bn, bkn


def _assert_same_grads(reference, model):
    # Float32 sums in another order: compare against the largest gradient of the model (the
    # bias of a layer followed by a norm has a zero gradient, up to rounding).
    grads = dict(model.named_parameters())
    scale = max(p.grad.abs().max().item() for p in reference.parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-5 * scale, rtol=1e-4,
                                   msg=name)


def test_gain0_equals_batchnorm_forward_backward_buffers():
    bn, bkn = _bn_pair()
    x, r = torch.randn(8, 3, 8, 8), torch.randn(8, 6)
    y_bn, y_bkn = bn(x), bkn(x)
    torch.testing.assert_close(y_bkn, y_bn, atol=1e-5, rtol=1e-5)
    (y_bn * r).sum().backward()
    (y_bkn * r).sum().backward()
    _assert_same_grads(bn, bkn.module)
    buffers = dict(bkn.module.named_buffers())
    for name, b in bn.named_buffers():
        torch.testing.assert_close(buffers[name], b, atol=1e-5, rtol=1e-5, msg=name)


def test_gain0_equals_per_group_batchnorm():
    bn, bkn = _bn_pair(micro_batch=2)
    x, r = torch.randn(8, 3, 8, 8), torch.randn(8, 6)
    y_bn = torch.cat([bn(chunk) for chunk in x.split(2)])
    y_bkn = bkn(x)
    torch.testing.assert_close(y_bkn, y_bn, atol=1e-5, rtol=1e-5)
    (y_bn * r).sum().backward()
    (y_bkn * r).sum().backward()
    _assert_same_grads(bn, bkn.module)


def test_eval_is_pass_through_and_equals_to_batchnorm():
    model = AnalyticKalmanPredictor(_bkn_net())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 3, 8, 8)).square().mean().backward()
        opt.step()
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    deploy = to_batchnorm(model)
    assert not isinstance(deploy, KalmanPredictor)
    assert isinstance(deploy.norm0, nn.BatchNorm2d) and isinstance(deploy.norm_fc, nn.BatchNorm1d)
    torch.testing.assert_close(model(x), deploy.eval()(x), atol=0, rtol=0)
    torch.testing.assert_close(model(x), model.module(x), atol=0, rtol=0)


def test_converted_resnet_trains():
    torch.manual_seed(0)
    # No norm on the logits: per-group normalization of 2 rows of logits makes the loss erratic.
    net = _Net(norm1d=lambda c: nn.Identity(), classes=4)
    # the released fixed gain: 8 steps show that the analytic prediction trains (the measured
    # gain starts more cautiously)
    model = convert_batchnorm(net, gain=0.9, micro_batch=2, prediction="analytic",
                              gain_rule="fixed")
    x, labels = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    counts = guard_report(model)
    assert counts["priors"] > 0 and counts["fallbacks"] < counts["priors"]


def test_gradients_flow_through_the_prior():
    x = torch.randn(4, 3, 8, 8)
    grads = []
    for detach in (False, True):
        model = AnalyticKalmanPredictor(_bkn_net(seed=1, detach_prior=detach))
        model(x).square().sum().backward()
        grads.append(model.module.conv0.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


# ------------------------------------------------- norm+act layers (timm's BatchNormAct2d)

# act_layer, act_kwargs, drop_layer of timm's BatchNormAct2d
NORM_ACTS = {
    "SiLU": (nn.SiLU, None, None),
    "ReLU, dropout": (nn.ReLU, None, functools.partial(nn.Dropout, 0.2)),
    "Hardswish": (nn.Hardswish, None, None),
    "LeakyReLU": (nn.LeakyReLU, {"negative_slope": 0.2}, None),
}


class _NormActNet(nn.Module):
    """``conv -> BatchNormAct2d -> conv -> BatchNormAct2d``, as timm builds its norm+act models."""

    def __init__(self, norm_act, act_layer, act_kwargs, drop_layer):
        super().__init__()
        conv = functools.partial(nn.Conv2d, padding=1, padding_mode="circular")
        options = dict(act_layer=act_layer, act_kwargs=act_kwargs)
        self.conv1, self.bn1 = conv(3, 4, 3), norm_act(4, drop_layer=drop_layer, **options)
        self.conv2, self.bn2 = conv(4, 5, 3), norm_act(5, **options)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_()

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))))


def _split_norm_act(net):
    """A copy of ``net`` with each norm+act layer as ``Sequential(BatchNorm2d, drop, act)``."""
    split = copy.deepcopy(net)
    for name in ("bn1", "bn2"):
        norm_act = getattr(split, name)
        bn = nn.BatchNorm2d(norm_act.num_features)
        bn.load_state_dict(norm_act.state_dict())
        setattr(split, name, nn.Sequential(bn, norm_act.drop, norm_act.act))
    return split


@pytest.mark.parametrize("act", list(NORM_ACTS))
def test_norm_act_layers_equal_separate_activations(act):
    timm_layers = pytest.importorskip("timm.layers")
    net = _NormActNet(timm_layers.BatchNormAct2d, *NORM_ACTS[act])
    split = _split_norm_act(net)
    fused = convert_batchnorm(net, micro_batch=2, prediction="analytic")
    apart = convert_batchnorm(split, micro_batch=2, prediction="analytic")
    assert isinstance(fused.module.bn1, BatchKalmanNormAct2d)
    assert type(apart.module.bn1[0]) is BatchKalmanNorm2d
    logs = [_record_priors({"bn2": fused.module.bn2}), _record_priors({"bn2": apart.module.bn2[0]})]
    x, r = torch.randn(4, 3, 8, 8) + 0.5, torch.randn(4, 5, 8, 8)
    # the first layer frozen (eval mode) in the second pass: it normalizes with its running
    # statistics and its children still run once
    for frozen in (False, True):
        outputs = []
        for model in (fused, apart):
            model.module.bn1.train(not frozen)
            model.zero_grad()
            torch.manual_seed(1)  # the same dropout masks
            y = model(x)
            (y * r).sum().backward()
            outputs.append((y, model.module.conv1.weight.grad))
        (y_fused, g_fused), (y_apart, g_apart) = outputs
        torch.testing.assert_close(y_fused, y_apart, atol=0, rtol=0)
        torch.testing.assert_close(g_fused, g_apart, atol=1e-6, rtol=1e-5)
        if not frozen:  # a frozen first layer has no prior to pass on
            priors = [log["bn2"][0] for log in logs]
            assert priors[0] is not None
            torch.testing.assert_close(priors[0], priors[1], atol=0, rtol=0)


# Without dropout: after it, the activation's rule takes its input (no longer Gaussian) as
# Gaussian, the moment matching of two nonlinearities in a row (docs/analytic.md).
@pytest.mark.parametrize("act", [name for name, spec in NORM_ACTS.items() if spec[2] is None])
def test_norm_act_rules_monte_carlo(act):
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    act_layer, act_kwargs, _ = NORM_ACTS[act]
    net = nn.Sequential(timm_layers.BatchNormAct2d(3, act_layer=act_layer, act_kwargs=act_kwargs),
                        nn.BatchNorm2d(3))
    # raw propagation: the moments leaving the first layer are its combined statistics
    model = convert_batchnorm(net, micro_batch=2, propagate="raw", prediction="analytic")
    n1 = model.module[0]
    log = _record_priors({"n1": n1, "n2": model.module[1]})
    model(torch.randn(4, 3, 4, 4) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 0.7)
    with torch.no_grad():
        out = n1.act(n1.drop(sample_rows(*log["n1"][1], 4000, (4, 4))))
        _close(group_moments(out, S), tuple(t.detach() for t in log["n2"][0]))


def test_timm_norm_act_model_trains_with_the_analytic_prediction():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # refused before the analytic prediction followed the children of BatchNormAct2d
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    model = convert_batchnorm(model, micro_batch=2, prediction="analytic")
    assert isinstance(model, AnalyticKalmanPredictor)
    assert any(isinstance(m, BatchKalmanNormAct2d) for m in model.modules())
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert guard_report(model)["priors"] > 0


def test_norm_act_child_without_rule_is_refused():
    timm_layers = pytest.importorskip("timm.layers")
    needle = (r"no moment rule for module '1\.act' \(SELU\).*\('1' runs it after normalizing\)"
              r".*sampled prediction")

    def net(last=nn.BatchNorm2d(3)):
        return nn.Sequential(nn.Conv2d(3, 3, 1), timm_layers.BatchNormAct2d(3, act_layer=nn.SELU),
                             nn.Conv2d(3, 3, 1), last)

    model = net()
    with pytest.raises(NotImplementedError, match=needle):
        convert_batchnorm(model, micro_batch=2, prediction="analytic")
    assert type(model[1]) is timm_layers.BatchNormAct2d  # left as it was
    converted = net(BatchKalmanNorm2d(3, micro_batch=2))
    converted[1] = norm_then(BatchKalmanNorm2d, "drop", "act")(converted[1], {"micro_batch": 2})
    with pytest.raises(NotImplementedError, match=needle):
        AnalyticKalmanPredictor(converted)
    # after the last BKN layer, no rule is needed
    last = convert_batchnorm(net()[:2], micro_batch=2, prediction="analytic")
    assert last(torch.randn(4, 3, 4, 4)).shape == (4, 3, 4, 4)
    # a BKN layer of another class does not say which children it runs
    hidden = BatchKalmanNorm2d(3, micro_batch=2)
    hidden.act = nn.ReLU()
    with pytest.raises(NotImplementedError, match=r"cannot follow the layers that '0' runs"):
        AnalyticKalmanPredictor(nn.Sequential(hidden, BatchKalmanNorm2d(3, micro_batch=2)))


# -------------------------------------------------------------------- interface, refusals


class _Head(nn.Module):
    def __init__(self, mid):
        super().__init__()
        self.n1 = BatchKalmanNorm2d(3, micro_batch=2)
        self.mid = mid
        self.n2 = BatchKalmanNorm2d(3, micro_batch=2)

    def forward(self, x):
        return self.n2(self.mid(self.n1(x)))


@pytest.mark.parametrize("mid, needle", [
    (nn.Softmax(dim=1), "Softmax"),
    (lambda a: F.softmax(a, 1), "softmax"),
    (torch.exp, "exp"),
    (lambda a: a / F.relu(a), "truediv"),
    (lambda a: torch.matmul(a, a.transpose(2, 3)), "matmul"),
])
def test_unsupported_op_raises_at_conversion(mid, needle):
    with pytest.raises(NotImplementedError, match=needle) as info:
        AnalyticKalmanPredictor(_Head(mid))
    assert "supported:" in str(info.value) and "sampled" in str(info.value)


def test_ops_after_last_layer_need_no_rule():
    net = nn.Sequential(BatchKalmanNorm2d(3, micro_batch=2), nn.Conv2d(3, 3, 1),
                        BatchKalmanNorm2d(3, micro_batch=2), nn.MaxPool2d(2), nn.Sigmoid())
    assert AnalyticKalmanPredictor(net)(torch.randn(4, 3, 4, 4)).shape == (4, 3, 2, 2)


def test_convert_refuses_before_converting():
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Softmax(dim=1),
                        nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    with pytest.raises(NotImplementedError, match="Softmax"):
        convert_batchnorm(net, micro_batch=2, prediction="analytic")
    assert isinstance(net[1], nn.BatchNorm2d)  # left as it was
    with pytest.raises(ValueError, match="prediction"):
        convert_batchnorm(net, prediction="exact")


def test_untraceable_model_raises():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.n = BatchKalmanNorm2d(3, micro_batch=2)

        def forward(self, x):
            return self.n(x) if x.sum() > 0 else x

    with pytest.raises(TypeError, match="sampled"):
        AnalyticKalmanPredictor(Branchy())


def test_keyword_inputs_and_nested_outputs():
    class Multi(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1 = BatchKalmanNorm2d(3, micro_batch=2)
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.n2 = BatchKalmanNorm2d(3, micro_batch=2)

        def forward(self, x, *, shift=0.0):
            h = F.relu(self.n1(x))
            return {"out": self.n2(self.conv(h) + shift), "features": (h, x.shape[0])}

    with pytest.raises(ValueError, match=r"tensors with \[1, 4\] rows; name the input"):
        AnalyticKalmanPredictor(Multi())(torch.randn(4, 3, 6, 6), shift=torch.ones(1, 3, 1, 1))
    model = AnalyticKalmanPredictor(Multi(), batch_input="x")
    out = model(torch.randn(4, 3, 6, 6), shift=torch.ones(1, 3, 1, 1))
    assert out["out"].shape == (4, 3, 6, 6) and out["features"][1] == 4
    assert guard_report(model)["priors"] == 2  # one layer with a prior, one decision per group


def test_wrapper_rules_match_kalman_predictor():
    net = _bkn_net()
    model = AnalyticKalmanPredictor(net)
    assert model.state_dict().keys() == KalmanPredictor(net).state_dict().keys()
    with pytest.raises(ValueError, match="micro_batch=2"):
        model(torch.randn(5, 3, 8, 8))
    with pytest.raises(ValueError, match="no BatchKalmanNorm"):
        AnalyticKalmanPredictor(nn.Sequential(nn.Conv2d(3, 3, 1)))
    mixed = nn.Sequential(BatchKalmanNorm2d(3, micro_batch=2), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="statistics over the batch"):
        AnalyticKalmanPredictor(mixed)
    with pytest.raises(TypeError, match="already converted; change its options"):
        convert_batchnorm(model)
    clone = copy.deepcopy(model)
    assert clone(torch.randn(4, 3, 8, 8)).shape == (4, 6)
    double = model.double()
    assert double(torch.randn(4, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_non_finite_prior_is_rejected_without_nan_gradients():
    from kalmannorm.analytic.graph import _kalman_step, _PassState

    layer, state = BatchKalmanNorm2d(3, micro_batch=2), _PassState()
    state.groups = 2
    mean = torch.tensor([[0.0, float("nan"), 1.0], [1.0, float("inf"), 3.0]], requires_grad=True)
    var = torch.ones(2, 3, requires_grad=True)
    y, _ = _kalman_step(layer, state, torch.randn(4, 3, 4, 4), (mean * 1, var * 1))
    y.square().sum().backward()
    assert torch.isfinite(y).all()
    assert layer.guard_counters.tolist() == [2, 2]  # both groups' priors rejected
    assert torch.equal(mean.grad, torch.zeros(2, 3)) and torch.equal(var.grad, torch.zeros(2, 3))
