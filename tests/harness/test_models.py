"""Models: output shapes per architecture, norm_layer used everywhere, the padding shortcut."""
import pytest
import torch
from torch import nn

import kalmannorm
from kalmannorm.harness.models import ChannelPadShortcut, PreActResNet, build_model


class MarkedNorm(nn.BatchNorm2d):
    """A norm the test can count: a model must create every norm through norm_layer."""


def _norm_modules(model):
    return [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))]


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
def test_preact_resnet_shapes_and_norms(depth):
    model = build_model(f"preact_resnet{depth}", 10, MarkedNorm)
    n = (depth - 2) // 6
    norms = _norm_modules(model)
    assert all(isinstance(m, MarkedNorm) for m in norms)
    # conv0's norm, one per block (the very first block has no pre-activation) + one, final norm
    assert len(norms) == 1 + (2 * 3 * n - 1) + 1
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 3 * n  # depth - 1 convs + the linear layer = depth layers
    assert all(m.bias is None for m in convs)
    if depth <= 32:
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch,classes,channels,size", [
    ("resnet18", 7, 3, 64), ("resnet50", 5, 1, 64), ("resnet34", 3, 3, 32),
])
def test_resnet_shapes_and_norms(arch, classes, channels, size):
    model = build_model(arch, classes, MarkedNorm, in_channels=channels, width=16)
    assert all(isinstance(m, MarkedNorm) for m in _norm_modules(model))
    assert model(torch.randn(2, channels, size, size)).shape == (2, classes)


@pytest.mark.parametrize("name,kw,cls", [
    ("groupnorm", dict(num_groups=4), nn.GroupNorm),
    ("bkn", dict(gain=0.9, micro_batch=2), kalmannorm.BatchKalmanNorm2d),
])
def test_registry_norm_layer_everywhere(name, kw, cls):
    model = build_model("preact_resnet20", 10, kalmannorm.get_norm_layer(name, **kw), in_channels=1, width=8)
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm))]
    assert norms and all(isinstance(m, cls) for m in norms)
    net = kalmannorm.KalmanPredictor(model) if kalmannorm.has_kalman_layers(model) else model
    out = net(torch.randn(4, 1, 8, 8))
    out.sum().backward()
    assert out.shape == (4, 10)


def test_resnet_cifar_stem_and_zero_init():
    model = build_model("resnet18", 10, stem="cifar", zero_init_residual=True, width=8)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert all(float(b.norm2.weight.detach().abs().sum()) == 0 for b in model.modules() if hasattr(b, "last_norm"))


def test_he_init_fan_out():
    torch.manual_seed(0)
    model = build_model("preact_resnet20", 10, width=64)
    conv = model.blocks[-1].conv2  # 256 -> 256, 3x3: fan_out = 256 * 9
    assert conv.weight.std().item() == pytest.approx((2.0 / (256 * 9)) ** 0.5, rel=0.02)


def test_channel_pad_shortcut_layout():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).view(2, 4, 4, 4)
    y = ChannelPadShortcut(4, 8, stride=2)(x)
    assert y.shape == (2, 8, 2, 2)
    # Released code: tf.pad(l, [[0, 0], [in // 2, in // 2], ...]): input channels in the middle.
    assert torch.equal(y[:, :2], torch.zeros(2, 2, 2, 2))
    assert torch.equal(y[:, 6:], torch.zeros(2, 2, 2, 2))
    assert torch.equal(y[:, 2:6], nn.functional.avg_pool2d(x, 2))
    assert torch.equal(ChannelPadShortcut(4, 4, stride=1)(x), x)


def test_preact_stage_entry_uses_padding_shortcut():
    model = PreActResNet(20, 10)
    shortcuts = [b.shortcut for b in model.blocks]
    pads = [s for s in shortcuts if isinstance(s, ChannelPadShortcut)]
    assert [(s.in_channels, s.out_channels, s.stride) for s in pads] == [(16, 32, 2), (32, 64, 2)]
    assert sum(isinstance(s, nn.Identity) for s in shortcuts) == 9 - 2


def test_bad_arch_lists_valid_names():
    with pytest.raises(ValueError, match="preact_resnet20.*resnet18"):
        build_model("resnet19", 10)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        build_model("preact_resnet21", 10)
    with pytest.raises(ValueError, match="unknown options"):
        build_model("resnet18", 10, stem="cifar", dropout=0.1)


def test_mobilenet_v2_is_torchvision_s_network():
    """The harness's MobileNetV2 (no torchvision needed) computes what torchvision's does: with
    torchvision's weights loaded in order, the same eval outputs at width 0.5 and 1."""
    import torchvision  # conftest makes it importable beside the CPU torch

    for mult, name in ((0.5, "mobilenet_v2_w050"), (1.0, "mobilenet_v2")):
        torch.manual_seed(0)
        ours = build_model(name, 10)
        theirs = torchvision.models.mobilenet_v2(num_classes=10, width_mult=mult)
        values = list(theirs.state_dict().values())
        keys = list(ours.state_dict())
        assert [tuple(v.shape) for v in values] == [tuple(v.shape) for v in ours.state_dict().values()]
        ours.load_state_dict(dict(zip(keys, values)))
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    with pytest.raises(ValueError, match="takes width_mult"):
        build_model("mobilenet_v2_w050", 10, width=8)


def test_mobilenet_v2_stem_stride_one_keeps_twice_the_resolution():
    """``stem_stride=1``: the same parameters and maps twice as wide (2x2 at the end on 32 px,
    where torchvision's layout ends in 1x1); equal to torchvision's model with its stem's
    stride set to 1."""
    import torchvision

    torch.manual_seed(0)
    ours = build_model("mobilenet_v2_w050", 10, stem_stride=1)
    theirs = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5)
    theirs.features[0][0].stride = (1, 1)
    ours.load_state_dict(dict(zip(ours.state_dict(), theirs.state_dict().values())))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    assert ours.features(x).shape[-2:] == (2, 2)
    assert build_model("mobilenet_v2_w050", 10).features(x).shape[-2:] == (1, 1)
    for bad in (3, True, "1"):
        with pytest.raises(ValueError, match="stem_stride must be 1 or 2"):
            build_model("mobilenet_v2_w050", 10, stem_stride=bad)
