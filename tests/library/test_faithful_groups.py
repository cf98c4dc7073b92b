"""A statistics group stands for a device (issue 13 item 1): with ``micro_batch=m``, a batch of
``S*m`` rows simulates ``S`` devices holding ``m`` rows each. Nothing a group computes may read
another group's rows, so group 0's outputs, input gradients and (with the default
``running_stats="group0"``, what DDP's buffer broadcast gives) the running buffers must be
bitwise the same whatever the other groups hold, blank rows included.

Checked for every registered norm that takes ``micro_batch``, alone and inside a pre-activation
ResNet-20 on real CIFAR images (sampled and analytic prediction); and the released code's
layer-wide decisions are shown to couple the groups, which is why they are not the default."""
import copy

import pytest
import torch
from torch import nn

import kalmannorm as kn
from kalmannorm.harness.data import load_dataset
from kalmannorm.harness.models import build_model

M = 2  # rows per group


def takes_micro_batch(name):
    """Whether the registered norm ``name``'s constructor takes ``micro_batch``."""
    try:
        kn.get_norm_layer(name, micro_batch=M)(8)
    except TypeError:
        return False
    return True


def micro_batch_norms():
    """Registered 2d norms whose constructor takes ``micro_batch``."""
    return [name for name in kn.norm_names()
            if not name.endswith(("1d", "2d", "3d")) and takes_micro_batch(name)]


def images(n, seed):
    data = load_dataset("cifar10_subset")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train_x), generator=g)[:n]
    return data.train_x[idx].float() / 255.0


def variants(x):
    """The batch, then the same group 0 with the other groups' rows swapped for other images,
    for blank (zero) rows, and for a constant bright image."""
    others = images(x.shape[0], seed=7)[M:]
    yield x
    yield torch.cat([x[:M], others])
    yield torch.cat([x[:M], torch.zeros_like(x[M:])])
    yield torch.cat([x[:M], torch.full_like(x[M:], 3.0)])


def group0(model, x, steps=2):
    """Group 0's outputs and input gradients over ``steps`` training steps of a copy of
    ``model``, and its buffers after them."""
    model = copy.deepcopy(model).train()
    outs = []
    for _ in range(steps):
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y[:M].square().sum().backward()
        outs += [y[:M].detach(), xi.grad[:M]]
    buffers = [b.clone() for b in model.buffers() if b.is_floating_point()]
    return outs, buffers


def assert_group0_unchanged(model, x):
    ref_out, ref_buf = group0(model, x)
    for i, xv in enumerate(variants(x)):
        out, buf = group0(model, xv)
        for a, b in zip(ref_out + ref_buf, out + buf):
            assert torch.equal(a, b), f"variant {i}: group 0 changed by the other groups"


@pytest.mark.parametrize("name", micro_batch_norms())
def test_every_micro_batch_norm_keeps_group0_to_itself(name):
    torch.manual_seed(0)
    norm = kn.get_norm_layer(name, micro_batch=M)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm(6), nn.ReLU(),
                        nn.Conv2d(6, 6, 3, padding=1), norm(6))
    if any(isinstance(m, kn.BatchKalmanNorm2d) for m in net.modules()):
        net = kn.KalmanPredictor(net, generator=torch.Generator().manual_seed(1))
    assert_group0_unchanged(net, images(8, seed=0))


def test_the_list_of_micro_batch_norms_is_not_empty():
    names = micro_batch_norms()
    assert {"bkn", "ghost_batchnorm", "batchrenorm"} <= set(names), names


@pytest.mark.parametrize("prediction", ["sampled", "analytic"])
@pytest.mark.parametrize("options", [{}, {"gain_rule": "fixed"}, {"guard": "two_sided"},
                                     {"propagate": "raw", "gain_rule": "fixed"},
                                     {"time_prior": True}, {"backward_window": 2}])
def test_bkn_resnet_keeps_group0_to_itself(prediction, options):
    torch.manual_seed(0)
    model = build_model("preact_resnet20", 10, nn.BatchNorm2d, width=8)
    model = kn.convert_batchnorm(model, micro_batch=M, prediction=prediction,
                                 generator=torch.Generator().manual_seed(1)
                                 if prediction == "sampled" else None, **options)
    assert_group0_unchanged(model, images(8, seed=0))


def test_layer_wide_decisions_couple_the_groups():
    """The released layer-wide guard and the layer-wide measured gain read every group: blank
    rows in the other groups change group 0 (the reason they are an option, not the default)."""
    torch.manual_seed(0)
    model = build_model("preact_resnet20", 10, nn.BatchNorm2d, width=8)
    model = kn.convert_batchnorm(model, micro_batch=M, decisions="layer",
                                 generator=torch.Generator().manual_seed(1))
    x = images(8, seed=0)
    ref, _ = group0(model, x, steps=1)
    out, _ = group0(model, torch.cat([x[:M], torch.zeros_like(x[M:])]), steps=1)
    assert not torch.equal(ref[0], out[0])
