"""The norm registry: every entry is a working drop-in norm_layer(num_channels)."""
import functools
import warnings

import pytest
import torch
from torch import nn

import kalmannorm as kn
from test_faithful_groups import takes_micro_batch  # this folder


def inputs_for(name):
    if name.endswith("1d"):
        return [torch.randn(8, 32), torch.randn(8, 32, 5)]
    if name.endswith("3d"):
        return [torch.randn(8, 32, 2, 3, 3)]
    return [torch.randn(8, 32, 4, 4)]


@pytest.mark.parametrize("name", kn.norm_names())
def test_every_registered_norm_runs_forward_and_backward(name):
    layer = kn.get_norm_layer(name)(32)
    assert isinstance(layer, nn.Module)
    for x in inputs_for(name):
        x = x.clone().requires_grad_(True)
        for training in (True, False):
            layer.train(training)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y = layer(x)
            assert y.shape == x.shape and torch.isfinite(y).all()
            y.square().sum().backward()
            assert torch.isfinite(x.grad).all()
            params = list(layer.parameters())
            assert params and all(p.grad is not None for p in params)


@pytest.mark.parametrize("name", ["ghost_batchnorm", "batchrenorm", "bkn"])
def test_micro_batch_norms_take_micro_batch(name):
    layer = kn.get_norm_layer(name, micro_batch=2)(4)
    with pytest.raises(ValueError, match="micro_batch=2"):
        layer(torch.randn(3, 4, 2, 2))


def test_ghost_batchnorm_is_per_group_batchnorm():
    layer = kn.get_norm_layer("ghost_batchnorm", micro_batch=2)(3)
    x = torch.randn(4, 3, 5, 5)
    ref = torch.cat([nn.functional.batch_norm(c, None, None, training=True) for c in x.chunk(2)])
    torch.testing.assert_close(layer(x), ref)


def test_layer_and_instance_norm_statistics():
    x = torch.randn(2, 4, 3, 3) * 5 + 2
    y = kn.get_norm_layer("layernorm")(4)(x)
    torch.testing.assert_close(y.mean((1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    y = kn.get_norm_layer("instancenorm")(4)(x)
    torch.testing.assert_close(y.mean((2, 3)), torch.zeros(2, 4), atol=1e-5, rtol=0)
    y = kn.get_norm_layer("groupnorm", num_groups=2)(4)(x)
    torch.testing.assert_close(y.reshape(2, 2, -1).mean(-1), torch.zeros(2, 2), atol=1e-5, rtol=0)


def test_resolution_of_names_classes_and_partials():
    assert kn.get_norm_layer("BatchNorm") is nn.BatchNorm2d
    assert kn.get_norm_layer("batchnorm3d") is nn.BatchNorm3d
    assert kn.get_norm_layer(nn.BatchNorm2d) is nn.BatchNorm2d
    partial = functools.partial(kn.GroupNorm, num_groups=2)
    assert kn.get_norm_layer(partial)(4).num_groups == 2
    assert kn.get_norm_layer(kn.GroupNorm, num_groups=4)(8).num_groups == 4
    assert kn.get_norm_layer("bkn", gain=0.3)(4).gain == 0.3


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown norm 'batchnrom'; valid names: .*bkn.*"):
        kn.get_norm_layer("batchnrom")
    with pytest.raises(TypeError, match="norm must be a name, a class or a callable"):
        kn.get_norm_layer(3)
    with pytest.raises(TypeError):  # unknown keyword arguments are not swallowed
        kn.get_norm_layer("groupnorm", micro_batch=2)(8)


def test_register_norm_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        kn.register_norm("bkn", kn.BatchKalmanNorm2d)


def test_groupnorm1_is_layer_norm_over_channels_and_positions_with_a_channel_affine():
    layer = kn.GroupNorm1(4)
    nn.init.normal_(layer.weight), nn.init.normal_(layer.bias)
    x = torch.randn(3, 4, 5, 6) * 3 + 1
    ref = (nn.functional.layer_norm(x, x.shape[1:], eps=layer.eps)
           * layer.weight[:, None, None] + layer.bias[:, None, None])
    torch.testing.assert_close(layer(x), ref)


@pytest.mark.parametrize("shape, torch_class", [((3, 4, 5, 6), nn.InstanceNorm2d),
                                                ((3, 4, 2, 3, 3), nn.InstanceNorm3d),
                                                ((3, 4, 7), nn.InstanceNorm1d)])
def test_instance_groupnorm_equals_torch_instance_norm_with_affine(shape, torch_class):
    layer = kn.InstanceGroupNorm(4)
    nn.init.normal_(layer.weight), nn.init.normal_(layer.bias)
    ref = torch_class(4, affine=True)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(shape) * 3 + 1
    for training in (True, False):
        torch.testing.assert_close(layer.train(training)(x), ref.train(training)(x))


@pytest.mark.parametrize("name", [n for n in kn.norm_names() if not n.endswith(("1d", "3d"))])
def test_channels_last_input_gives_the_same_result_in_its_own_layout(name):
    """A channels-last model stays channels-last through every norm (else its convolutions
    convert back and forth): the output and the input gradient keep the input's layout and
    equal the contiguous computation, as do the parameter gradients."""
    options = dict(micro_batch=2) if takes_micro_batch(name) else {}
    torch.manual_seed(0)
    x = torch.randn(8, 64, 5, 6, dtype=torch.float64)  # 2 channels per group of 32
    dy = torch.randn_like(x)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(1)
        layer = kn.get_norm_layer(name, **options)(64).double()
        with torch.no_grad():
            for p in layer.parameters():  # away from the identity initialization
                p.add_(0.1 * torch.randn_like(p))
        xi = x.clone(memory_format=layout).requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = layer(xi)
        y.backward(dy.contiguous(memory_format=layout))
        assert y.is_contiguous(memory_format=layout) and xi.grad.is_contiguous(memory_format=layout)
        results.append([y, xi.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("mode", ["standardize", "center"])
def test_reparametrized_conv_weights_keep_the_weights_layout(mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3).double()
    weight = conv.weight.detach().clone()
    kn.baselines.standardize_conv_weights(conv.to(memory_format=torch.channels_last), mode)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    flat = weight.flatten(1) - weight.flatten(1).mean(dim=1, keepdim=True)
    if mode == "standardize":
        flat = flat / torch.sqrt(flat.square().mean(dim=1, keepdim=True) + 1e-6)
    torch.testing.assert_close(conv.weight, flat.view_as(weight))
