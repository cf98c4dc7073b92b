"""BatchKalmanNorm layers: equivalences with BatchNorm, buffers, state dicts, numerics, errors."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kalmannorm as kn

LAYERS = [
    (kn.BatchKalmanNorm1d, nn.BatchNorm1d, (8, 3)),
    (kn.BatchKalmanNorm1d, nn.BatchNorm1d, (8, 3, 5)),
    (kn.BatchKalmanNorm2d, nn.BatchNorm2d, (8, 3, 4, 5)),
    (kn.BatchKalmanNorm3d, nn.BatchNorm3d, (8, 3, 2, 3, 2)),
]


def randomize(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.num_features, generator=g) + 0.5)
        layer.bias.copy_(torch.randn(layer.num_features, generator=g))
        layer.running_mean.copy_(torch.randn(layer.num_features, generator=g))
        layer.running_var.copy_(torch.rand(layer.num_features, generator=g) + 0.5)
    return layer


@pytest.mark.parametrize("bkn_cls,bn_cls,shape", LAYERS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_group_equals_batchnorm(bkn_cls, bn_cls, shape, momentum):
    """micro_batch=None: forward, backward and buffers of nn.BatchNorm over 3 steps."""
    bkn = randomize(bkn_cls(3, momentum=momentum, gain=0.9))
    bn = randomize(bn_cls(3, momentum=momentum))
    for step in range(3):
        x = torch.randn(shape) * 2 + step
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ya = bkn(xa)
        yb = bn(xb)
        torch.testing.assert_close(ya, yb)
        g = torch.randn_like(ya)
        ga = torch.autograd.grad(ya, (xa, bkn.weight, bkn.bias), g)
        gb = torch.autograd.grad(yb, (xb, bn.weight, bn.bias), g)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(bkn, name), getattr(bn, name))


@pytest.mark.parametrize("bkn_cls,bn_cls,shape", LAYERS)
def test_gain_zero_is_per_group_batchnorm_with_averaged_buffers(bkn_cls, bn_cls, shape):
    bkn = randomize(bkn_cls(3, gain=0.0, micro_batch=2, running_stats="all"))
    rm0, rv0 = bkn.running_mean.clone(), bkn.running_var.clone()
    x = torch.randn(shape, requires_grad=True)
    y = bkn(x)
    chunks = x.chunk(4)
    y_ref = torch.cat([F.batch_norm(c, None, None, bkn.weight, bkn.bias, True, 0.0, 1e-5)
                       for c in chunks])
    # two rows per group on [8, 3]: a tiny variance amplifies rounding differences
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, bkn.weight), g),
                    torch.autograd.grad(y_ref, (x, bkn.weight), g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    dims = [0] + list(range(2, x.dim()))
    means = torch.stack([c.detach().mean(dims) for c in chunks]).mean(0)
    vars_ = torch.stack([c.detach().var(dims, unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(bkn.running_mean, 0.9 * rm0 + 0.1 * means)
    torch.testing.assert_close(bkn.running_var, 0.9 * rv0 + 0.1 * vars_)


def test_running_stats_group0_option():
    bkn = kn.BatchKalmanNorm2d(3, gain=0.0, micro_batch=2, running_stats="group0", momentum=1.0)
    x = torch.randn(6, 3, 4, 4)
    bkn(x)
    torch.testing.assert_close(bkn.running_mean, x[:2].mean((0, 2, 3)))
    torch.testing.assert_close(bkn.running_var, x[:2].var((0, 2, 3), unbiased=True))


@pytest.mark.parametrize("bkn_cls,bn_cls,shape", LAYERS)
def test_eval_is_exactly_batch_norm_with_running_stats(bkn_cls, bn_cls, shape):
    bkn = randomize(bkn_cls(3, micro_batch=2)).eval()
    x = torch.randn(shape)
    ref = F.batch_norm(x, bkn.running_mean, bkn.running_var, bkn.weight, bkn.bias, False, 0.0,
                       bkn.eps)
    assert torch.equal(bkn(x), ref)


def test_no_running_stats_uses_batch_statistics_in_eval():
    bkn = kn.BatchKalmanNorm2d(3, micro_batch=2, track_running_stats=False).eval()
    x = torch.randn(4, 3, 4, 4)
    ref = torch.cat([F.batch_norm(c, None, None, bkn.weight, bkn.bias, True, 0.0, 1e-5)
                     for c in x.chunk(2)])
    torch.testing.assert_close(bkn(x), ref)


@pytest.mark.parametrize("bkn_cls,bn_cls,shape", LAYERS)
def test_state_dicts_load_both_ways(bkn_cls, bn_cls, shape):
    bn = randomize(bn_cls(3))
    bn.num_batches_tracked.fill_(7)
    bkn = bkn_cls(3, micro_batch=2)
    bkn.load_state_dict(bn.state_dict())  # strict
    assert set(bkn.state_dict()) == set(bn.state_dict())
    back = bn_cls(3)
    back.load_state_dict(bkn.state_dict())
    for name, value in bn.state_dict().items():
        assert torch.equal(back.state_dict()[name], value)


def test_old_batchnorm_checkpoint_without_num_batches_tracked_loads():
    state = randomize(nn.BatchNorm2d(3)).state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}
    bkn = kn.BatchKalmanNorm2d(3)
    bkn.load_state_dict(state)
    assert int(bkn.num_batches_tracked) == 0


def test_standalone_training_warns_once_and_gain_zero_does_not_warn():
    layer = kn.BatchKalmanNorm2d(3, micro_batch=2)
    with pytest.warns(UserWarning, match="outside a KalmanPredictor"):
        layer(torch.randn(4, 3, 2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(4, 3, 2, 2))
        kn.BatchKalmanNorm2d(3, gain=0.0, micro_batch=2)(torch.randn(4, 3, 2, 2))


def test_autocast_bfloat16_keeps_statistics_float32():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=1.0),
                        nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    model = kn.convert_batchnorm(net, micro_batch=2, running_stats="all")
    seen = []
    net[1].register_forward_pre_hook(lambda m, a: seen.append(a[0][:8].detach()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(8, 3, 8, 8) * 100 + 50)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # The first layer has no prior, so with momentum 1 its running buffers are the average of
    # the groups' statistics of the bf16 input, computed in float32 (bf16 arithmetic would be
    # off by ~1e-2 relative).
    x = seen[0]
    assert x.dtype == torch.bfloat16
    groups = x.float().reshape(4, 2, 8, -1).transpose(1, 2).reshape(4, 8, -1)
    assert net[1].running_mean.dtype == torch.float32
    torch.testing.assert_close(net[1].running_mean, groups.mean(-1).mean(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(net[1].running_var, groups.var(-1).mean(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layer_and_buffers(dtype):
    layer = kn.BatchKalmanNorm2d(4, gain=0.0, micro_batch=2).to(dtype)
    x = (torch.randn(4, 4, 6, 6) * 50 + 300).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    ref = torch.cat([F.batch_norm(c.float(), None, None, None, None, True, 0.0, 1e-5)
                     for c in x.chunk(2)])
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    assert layer.running_mean.dtype == dtype and torch.isfinite(layer.running_var).all()


def test_zero_variance_channel_gives_finite_output_and_gradients():
    layer = kn.BatchKalmanNorm2d(3, gain=0.0, micro_batch=2)
    x = torch.randn(4, 3, 4, 4)
    x[:, 1] = 2.5
    x.requires_grad_(True)
    y = layer(x)
    assert torch.isfinite(y).all() and torch.count_nonzero(y[:, 1] - layer.bias[1]) == 0
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_non_finite_batch_leaves_running_stats_intact():
    layer = kn.BatchKalmanNorm2d(3, gain=0.0)
    before = (layer.running_mean.clone(), layer.running_var.clone())
    x = torch.randn(4, 3, 2, 2)
    x[0, 0, 0, 0] = float("nan")
    y = layer(x)
    assert torch.isnan(y[:, 0]).all()  # the bad values stay visible in the output
    assert torch.equal(layer.running_mean, before[0])
    assert torch.equal(layer.running_var, before[1])


@pytest.mark.parametrize(
    "make,x,match",
    [
        (lambda: kn.BatchKalmanNorm2d(3), torch.randn(4, 3, 5), r"expected 4D input \(got 3D"),
        (lambda: kn.BatchKalmanNorm1d(3), torch.randn(4, 3, 2, 2), r"expected 2D or 3D input"),
        (lambda: kn.BatchKalmanNorm3d(3), torch.randn(4, 3, 2, 2), r"expected 5D input"),
        (lambda: kn.BatchKalmanNorm2d(3), torch.randn(4, 5, 2, 2), r"expected input with 3 ch"),
        (lambda: kn.BatchKalmanNorm2d(3, micro_batch=3), torch.randn(4, 3, 2, 2),
         r"batch of 4 rows does not split into groups of micro_batch=3"),
        (lambda: kn.BatchKalmanNorm1d(3, micro_batch=1), torch.randn(4, 3),
         r"more than 1 value per channel"),
        (lambda: kn.BatchKalmanNorm1d(3), torch.randn(1, 3), r"more than 1 value per channel"),
    ],
)
def test_bad_input_raises_value_error(make, x, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match):
            make()(x)


def test_single_row_group_with_spatial_positions_is_allowed():
    layer = kn.BatchKalmanNorm2d(3, gain=0.0, micro_batch=1)
    y = layer(torch.randn(2, 3, 4, 4))
    torch.testing.assert_close(y.mean((2, 3)), torch.zeros(2, 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"gain": 1.5}, r"gain must be in \[0, 1\]"),
        ({"gain": -0.1}, r"gain must be in \[0, 1\]"),
        ({"micro_batch": 0}, r"micro_batch must be a positive int"),
        ({"guard_threshold": 0}, r"guard_threshold must be positive"),
        ({"propagate": "sampled"}, r"propagate must be one of \('raw', 'normalized'\)"),
        ({"running_stats": "mean"}, r"running_stats must be one of \('all', 'group0'\)"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kn.BatchKalmanNorm2d(3, **kwargs)


def test_extra_repr_lists_options():
    text = repr(kn.BatchKalmanNorm2d(4, gain=0.5, micro_batch=2))
    assert "gain=0.5" in text and "micro_batch=2" in text and "propagate='normalized'" in text
    assert "guard='upper'" in text and "gain_rule='kalman'" in text and "gain_warmup=0" in text


def test_reset_running_stats_and_parameters():
    layer = randomize(kn.BatchKalmanNorm2d(3))
    layer.reset_parameters()
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert torch.equal(layer.running_var, torch.ones(3))
    assert torch.equal(layer.weight, torch.ones(3)) and torch.equal(layer.bias, torch.zeros(3))
