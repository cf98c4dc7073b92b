"""Inference example weighing (kalmannorm.weigh_examples): the closed form per layer, its two
ends (ordinary evaluation, instance normalization), layers that act after normalizing,
converted and deployed models giving the same outputs, and training left alone."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kalmannorm as kn


def _trained_bn(channels=6, dims=2, seed=0):
    torch.manual_seed(seed)
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](channels)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return bn.eval()


def _reference(bn, x, alpha):
    """The weighed normalization in float64, written from the equations."""
    x = x.double()
    dims = tuple(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mp, vp = bn.running_mean.double().reshape(shape), bn.running_var.double().reshape(shape)
    mx = x.mean(dims, keepdim=True) if dims else x
    m2 = (x * x).mean(dims, keepdim=True) if dims else x * x
    mu = alpha * mx + (1 - alpha) * mp
    var = alpha * m2 + (1 - alpha) * (vp + mp * mp) - mu * mu
    y = (x - mu) / torch.sqrt(var + bn.eps)
    return y * bn.weight.double().reshape(shape) + bn.bias.double().reshape(shape)


@pytest.mark.parametrize("dims,shape", [(1, (5, 6)), (1, (5, 6, 7)), (2, (5, 6, 4, 3)),
                                        (3, (3, 6, 2, 3, 4))])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_closed_form(dims, shape, alpha):
    bn = _trained_bn(dims=dims)
    x = torch.randn(*shape) * 2 + 0.5
    plain = bn(x)
    with kn.weigh_examples(bn, alpha) as weighing:
        weighed = bn(x)
    assert weighing.layers == [""]
    torch.testing.assert_close(weighed.double(), _reference(bn, x, alpha), rtol=1e-5, atol=1e-5)
    if alpha == 0:
        assert torch.equal(weighed, plain)  # ordinary evaluation, bitwise
    assert torch.equal(bn(x), plain)  # removed on leaving the context


def test_alpha_one_is_instance_normalization():
    bn = _trained_bn()
    x = torch.randn(4, 6, 5, 5) * 3 - 1
    with kn.weigh_examples(bn, 1.0):
        out = bn(x)
    torch.testing.assert_close(out, F.instance_norm(x, weight=bn.weight, bias=bn.bias, eps=bn.eps),
                               rtol=1e-4, atol=1e-4)


def test_each_example_is_normalized_independently_of_the_batch():
    bn = _trained_bn()
    x = torch.randn(6, 6, 4, 4)
    with kn.weigh_examples(bn, 0.4):
        together = bn(x)
        alone = torch.cat([bn(x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)


def test_training_passes_and_state_are_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4))
    twin = copy.deepcopy(model)
    x = torch.randn(8, 3, 6, 6)
    weighing = kn.weigh_examples(model, 0.5)
    assert weighing.layers == ["1", "4"]
    torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)  # training: plain BN
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)
    model.eval(), twin.eval()
    assert not torch.allclose(model(x), twin(x))
    weighing.remove()
    assert torch.equal(model(x), twin(x))


def test_layers_that_act_after_normalizing_keep_acting():
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    layer = BatchNormAct2d(6, act_layer=nn.ReLU).eval()
    with torch.no_grad():
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2)
        layer.bias.normal_()
    x = torch.randn(3, 6, 4, 4)
    with kn.weigh_examples(layer, 0.3):
        out = layer(x)
    assert (out >= 0).all()
    torch.testing.assert_close(out.double(), _reference(layer, x, 0.3).relu(), rtol=1e-5,
                               atol=1e-5)


def test_converted_bkn_model_equals_its_deployed_batchnorm_model():
    """A BKN model and the plain BatchNorm model it deploys to evaluate alike, weighed too;
    and on a torchvision ResNet every BatchNorm is found."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model = kn.convert_batchnorm(model, micro_batch=2)
    model.train()
    for _ in range(2):  # give the running statistics something to hold
        model(torch.randn(4, 3, 64, 64))
    model.eval()
    deployed = kn.to_batchnorm(copy.deepcopy(model)).eval()
    x = torch.randn(3, 3, 64, 64)
    with kn.weigh_examples(model, 0.2) as weighing, kn.weigh_examples(deployed, 0.2):
        assert len(weighing.layers) == n_bn
        torch.testing.assert_close(model(x), deployed(x), rtol=1e-5, atol=1e-5)
        weighed = model(x)
    assert not torch.allclose(weighed, model(x), atol=1e-3)


def test_batchrenorm_and_ghost_batchnorm_are_weighed_mabn_and_groupnorm_are_not():
    model = nn.Sequential(kn.BatchRenorm2d(4, micro_batch=2),
                          kn.get_norm_layer("ghost_batchnorm", micro_batch=2)(4),
                          kn.MovingAverageBatchNorm2d(4), kn.GroupNorm(4, num_groups=2),
                          nn.InstanceNorm2d(4, track_running_stats=True))
    assert kn.weigh_examples(model, 0.1).layers == ["0", "1"]


def test_bad_input_names_the_way_out():
    for alpha in (-0.1, 1.5, float("nan"), True, "0.2", None):
        with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
            kn.weigh_examples(_trained_bn(), alpha)
    with pytest.raises(ValueError, match="no layer that normalizes by running statistics"):
        kn.weigh_examples(nn.Sequential(nn.Conv2d(3, 3, 1), nn.GroupNorm(1, 3)), 0.2)
    bn = _trained_bn()
    with kn.weigh_examples(bn, 0.2), pytest.raises(ValueError, match="expected 4D input"):
        bn(torch.randn(2, 6))
