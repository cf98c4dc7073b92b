"""The shadow-row prediction against a hand-threaded reference, and the wrapper's behaviour."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kalmannorm as kn


# --- a pre-activation CIFAR ResNet as in the released code (method.md section 6) -------------

def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class Block(nn.Module):
    def __init__(self, cin, cout, first):
        super().__init__()
        self.increase = cout != cin
        self.bn1 = None if first else nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, cout, 2 if self.increase else 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)

    def shortcut(self, x):
        if not self.increase:
            return x
        pad = (self.conv2.out_channels - x.shape[1]) // 2
        return F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, pad, pad))

    def forward(self, x):
        b = x if self.bn1 is None else F.relu(self.bn1(x))
        c = self.conv2(F.relu(self.bn2(self.conv1(b))))
        return c + self.shortcut(x)


class PreActResNet(nn.Module):
    def __init__(self, widths=(4, 8, 16), blocks=2, classes=5):
        super().__init__()
        self.conv0 = conv3x3(3, widths[0])
        self.bn0 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks):
                layers.append(Block(cin, width, first=stage == 0 and i == 0))
                cin = width
        self.blocks = nn.Sequential(*layers)
        self.bnlast = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, classes)

    def forward(self, x):
        h = self.blocks(F.relu(self.bn0(self.conv0(x))))
        return self.linear(F.relu(self.bnlast(h)).mean((2, 3)))


# --- the hand-threaded reference: (x, pseudo-image) pairs, statistics written out -------------

def reference_bkn(x, pseudo, layer, groups, gain, threshold=100.0, eps=1e-5):
    """BKN of method.md section 3, written independently of kalmannorm.functional."""
    n, c = x.shape[:2]
    rows = x.reshape(groups, n // groups, c, -1).transpose(1, 2).reshape(groups, c, -1)
    mean_obs, var_obs = rows.mean(-1), rows.var(-1, unbiased=False)
    mean, var = mean_obs, var_obs
    if pseudo is not None:
        flat = pseudo.reshape(groups, c, -1)  # one pseudo-image per group
        mean_pred, var_pred = flat.mean(-1), flat.var(-1, unbiased=False)
        ratio = (var_pred / var_obs).mean()
        if bool(var_pred.abs().sum() > 0) and bool(torch.isfinite(ratio)) and ratio < threshold:
            mean = gain * mean_pred + (1 - gain) * mean_obs
            var = (gain * var_pred + (1 - gain) * var_obs
                   + gain * (1 - gain) * (mean_obs - mean_pred) ** 2)
    spatial = x.shape[2:]
    view = (groups, 1, c) + (1,) * len(spatial)
    xg = x.reshape((groups, n // groups, c) + spatial)
    y = (xg - mean.reshape(view)) / torch.sqrt(var.reshape(view) + eps)
    y = y * layer.weight.reshape((1, 1, c) + (1,) * len(spatial)) + layer.bias.reshape(
        (1, 1, c) + (1,) * len(spatial))
    # Raw propagation: the next prediction starts from z ~ N(mean, var) of this layer's input,
    # one pseudo-image per group with the activation's spatial size.
    noise = torch.randn((groups, 1, c) + spatial)
    z = (mean.reshape(view) + var.sqrt().reshape(view) * noise).reshape((groups, c) + spatial)
    return y.reshape(x.shape), z, (mean, var)


def reference_forward(net, x, groups, gain):
    stats = []

    def norm(layer, h, pseudo):
        y, z, st = reference_bkn(h, pseudo, layer, groups, gain)
        stats.append(st)
        return y, z

    h, z = norm(net.bn0, net.conv0(x), None)  # the first layer has no predecessor
    h, z = F.relu(h), F.relu(z)  # the stream's prediction includes the stem's ReLU
    for blk in net.blocks:
        if blk.bn1 is None:
            b, zb = h, z
        else:
            b, zb = norm(blk.bn1, h, z)
            b, zb = F.relu(b), F.relu(zb)
        c, zc = norm(blk.bn2, blk.conv1(b), blk.conv1(zb))
        c, zc = blk.conv2(F.relu(c)), blk.conv2(F.relu(zc))
        # shortcut: 2x2 average pooling and zero channel padding applied to each group's
        # pseudo-image (per-group padding, not the released code's flattened [S*C] padding)
        h, z = c + blk.shortcut(h), zc + blk.shortcut(z)
    h, z = norm(net.bnlast, h, z)
    return net.linear(F.relu(h).mean((2, 3))), stats


@pytest.fixture(params=["cpu_fused", "composite"])
def kernel(request):
    """Run a test on the fused eager kernel and on the composite functional form."""
    with kn.use_backend(request.param):
        yield request.param


def test_shadow_rows_match_the_hand_threaded_reference(kernel):
    torch.manual_seed(0)
    net = PreActResNet()
    x = torch.randn(8, 3, 16, 16)
    converted = copy.deepcopy(net)
    for m in converted.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0  # running buffers = this step's combined statistics
    # the reference threads the released code's raw statistics (method.md section 4)
    model = kn.convert_batchnorm(converted, gain=0.9, micro_batch=2, propagate="raw",
                                 gain_rule="fixed", decisions="layer", running_stats="all")
    layers = [m for m in model.modules() if isinstance(m, kn.BatchKalmanNorm2d)]
    spatial = {}

    def record_spatial(layer, args):
        spatial[layer] = args[0].shape[2] * args[0].shape[3]

    for layer in layers:
        layer.register_forward_pre_hook(record_spatial)

    torch.manual_seed(123)
    ref_out, ref_stats = reference_forward(net, x, groups=4, gain=0.9)
    torch.manual_seed(123)
    out = model(x)

    assert len(layers) == len(ref_stats) == 1 + 2 * 6 - 1 + 1  # .modules() is call order
    for layer, (ref_mean, ref_var) in zip(layers, ref_stats):
        n = 2 * spatial[layer]  # values behind one group's statistics
        torch.testing.assert_close(layer.running_mean, ref_mean.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.running_var, ref_var.mean(0) * n / (n - 1),
                                   rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    # every layer after the first had a prior, and the check above means priors were used
    assert kn.guard_report(model)["priors"] == len(ref_stats) - 1

    # gradients flow through the prior exactly as in the reference
    ref_grads = torch.autograd.grad(ref_out.square().sum(), list(net.parameters()))
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)


def test_reference_differs_without_prediction():
    """The comparison above can fail: gain 0 gives other outputs than gain 0.9."""
    torch.manual_seed(0)
    net = PreActResNet()
    x = torch.randn(8, 3, 16, 16)
    torch.manual_seed(1)
    with_prior, _ = reference_forward(net, x, 4, 0.9)
    torch.manual_seed(1)
    without, _ = reference_forward(net, x, 4, 0.0)
    assert (with_prior - without).abs().max() > 1e-3


def test_gain_zero_model_matches_per_group_batchnorm_and_adds_no_rows():
    torch.manual_seed(0)
    net = PreActResNet()
    x = torch.randn(8, 3, 16, 16)
    ref, _ = reference_forward(net, x, 4, 0.0)
    model = kn.convert_batchnorm(copy.deepcopy(net), gain=0.0, micro_batch=2)
    rows = []
    model.bn0.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    assert rows == [8]


def test_eval_adds_nothing_and_equals_deployed_batchnorm():
    torch.manual_seed(0)
    model = kn.convert_batchnorm(PreActResNet(), micro_batch=2)
    for _ in range(3):
        model(torch.randn(8, 3, 16, 16))
    model.eval()
    rows = []
    model.bn0.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    x = torch.randn(5, 3, 16, 16)
    assert torch.equal(model(x), kn.to_batchnorm(model)(x))
    assert rows == [5]


def test_propagate_normalized_carries_the_output_distribution(kernel):
    for propagate in ("raw", "normalized"):
        first = kn.BatchKalmanNorm2d(2, micro_batch=4, propagate=propagate, gain_rule="fixed")
        with torch.no_grad():
            first.weight.copy_(torch.tensor([2.0, 0.5]))
            first.bias.copy_(torch.tensor([1.0, -3.0]))
        # gain 1 and momentum 1: the second layer's running buffers are its prior
        second = kn.BatchKalmanNorm2d(2, micro_batch=4, gain=1.0, momentum=1.0,
                                      gain_rule="fixed")
        model = kn.KalmanPredictor(nn.Sequential(first, second))
        x = torch.randn(8, 2, 64, 64) * torch.tensor([3.0, 0.2])[:, None, None] + 5
        model(x)
        n = 4 * 64 * 64  # values per group behind the unbiased running variance
        mean, var = second.running_mean, second.running_var * (n - 1) / n
        if propagate == "raw":  # the statistics of the first layer's input
            torch.testing.assert_close(mean, torch.tensor([5.0, 5.0]), atol=0.1, rtol=0)
            torch.testing.assert_close(var, torch.tensor([9.0, 0.04]), atol=0, rtol=0.1)
        else:  # bias and weight^2
            torch.testing.assert_close(mean, torch.tensor([1.0, -3.0]), atol=0.1, rtol=0)
            torch.testing.assert_close(var, torch.tensor([4.0, 0.25]), atol=0, rtol=0.1)


def test_generator_makes_samples_reproducible():
    net = PreActResNet()
    x = torch.randn(4, 3, 8, 8)
    outs = []
    for _ in range(2):
        model = kn.convert_batchnorm(copy.deepcopy(net), micro_batch=2,
                                     generator=torch.Generator().manual_seed(5))
        torch.manual_seed(_)  # the global generator differs between the two runs
        outs.append(model(x))
    assert torch.equal(outs[0], outs[1])


class KeywordsAndDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.bn = nn.BatchNorm2d(8)  # after a concatenation of two branches
        self.head = nn.Linear(8, 2)

    def forward(self, x, *, scale=None, extra=None):
        h = F.max_pool2d(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1), 2)
        h = F.relu(self.bn(h))
        if scale is not None:
            h = h * scale[:, None, None, None]
        feat = h.mean((2, 3))
        return {"logits": self.head(feat), "pair": (feat, extra), "const": torch.ones(3)}


def test_keyword_inputs_nested_outputs_concatenation_and_pooling():
    model = kn.convert_batchnorm(KeywordsAndDict(), micro_batch=2)
    x, scale, extra = torch.randn(6, 3, 8, 8), torch.rand(6), torch.randn(6, 7)
    out = model(x, scale=scale, extra=extra)
    assert out["logits"].shape == (6, 2) and out["pair"][0].shape == (6, 8)
    assert torch.equal(out["pair"][1], extra) and out["const"].shape == (3,)
    out["logits"].sum().backward()
    # two first layers (a, b) have no prior; the concatenation's layer has one (3 groups)
    assert kn.guard_report(model)["priors"] == 3


def test_mlp_with_batchnorm1d_gets_several_shadow_rows_per_group():
    net = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(),
                        nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    model = kn.convert_batchnorm(net, micro_batch=4)
    assert kn.predictor_of(model).rows_per_group == 4
    rows = []
    net[4].register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    y = model(torch.randn(8, 5))
    assert y.shape == (8, 3) and rows == [8 + 2 * 4]
    y.sum().backward()
    assert kn.guard_report(model)["priors"] == 2  # one layer with a prior, 2 groups


def test_time_folded_into_batch():
    class Video(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(4))

        def forward(self, clip):  # [B, T, C, H, W]
            b, t = clip.shape[:2]
            return self.body(clip.flatten(0, 1)).reshape(b, t, -1).mean(1)

    model = kn.convert_batchnorm(Video(), micro_batch=2)
    out = model(torch.randn(4, 3, 3, 6, 6))
    assert out.shape == (4, 4 * 36)
    assert kn.guard_report(model)["priors"] == 2  # the clips' 2 groups


def test_unconverted_batchnorm_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), kn.BatchKalmanNorm2d(4, micro_batch=2),
                        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"\['3'\] compute statistics over the batch"):
        kn.KalmanPredictor(net)
    net[3].eval()  # a frozen BatchNorm does not look at the batch
    model = kn.KalmanPredictor(net)
    model(torch.randn(4, 3, 8, 8))
    net[3].train()  # switched back later: refused at the next training step
    with pytest.raises(ValueError, match="shadow rows"):
        model(torch.randn(4, 3, 8, 8))


def test_wrapper_errors():
    with pytest.raises(ValueError, match="has no BatchKalmanNorm layer"):
        kn.KalmanPredictor(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="share one micro_batch"):
        kn.KalmanPredictor(nn.Sequential(kn.BatchKalmanNorm2d(2, micro_batch=2),
                                         kn.BatchKalmanNorm2d(2, micro_batch=4)))
    with pytest.raises(ValueError, match="rows_per_group must be a positive int"):
        kn.KalmanPredictor(kn.BatchKalmanNorm2d(2), rows_per_group=0)
    model = kn.KalmanPredictor(nn.Sequential(nn.Conv2d(3, 2, 1), kn.BatchKalmanNorm2d(2,
                                                                                  micro_batch=4)))
    with pytest.raises(ValueError, match="batch of 6 rows does not split into groups of "
                                         "micro_batch=4"):
        model(torch.randn(6, 3, 2, 2))


def test_layer_fed_a_tensor_not_computed_row_by_row_is_refused():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1 = kn.BatchKalmanNorm2d(2, micro_batch=2)
            self.bn2 = kn.BatchKalmanNorm2d(2, micro_batch=2)

        def forward(self, x):
            return self.bn2(self.bn1(x)[:3])

    with pytest.raises(ValueError, match="received 3 rows, expected a multiple of 6"):
        kn.KalmanPredictor(Mixer())(torch.randn(4, 2, 3, 3))


def test_a_failed_pass_does_not_leak_state():
    model = kn.convert_batchnorm(PreActResNet(), micro_batch=2)
    with pytest.raises(RuntimeError):
        model(torch.randn(4, 5, 8, 8))  # conv0 expects 3 channels
    assert not kn.predictor_of(model).shadow_batch.active
    assert model(torch.randn(4, 3, 8, 8)).shape == (4, 5)
