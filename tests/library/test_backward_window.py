"""The smoothed backward (``backward_window``, issue 14 item 2): BKN's backward pass averages
the gradient reaching each group's observed statistics over the last steps, as MABN smooths
BatchNorm's. Checked against the closed form of per-group BatchNorm's gradient in float64, for
a forward that is unchanged, group independence (also in ``test_faithful_groups.py``), the state
dict, ``configure`` and the backends."""
import pytest
import torch
from torch import nn

import kalmannorm as kn
from kalmannorm.harness.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore:BatchKalmanNorm2d is training outside")

EPS = 1e-5


def reference_step(x, weight, bias, c, groups):
    """Per-group BatchNorm, ``loss = sum(c * y)``, in float64: the input gradient with the
    statistics held fixed, the gradients reaching the statistics ``[S, C]``, and the pieces
    that map them to the input."""
    rows = x.reshape(groups, -1, *x.shape[1:])  # [S, m, C, H, W]
    dims = (1, 3, 4)
    mean = rows.mean(dim=dims).requires_grad_(True)
    var = (rows - mean[:, None, :, None, None]).square().mean(dim=dims).detach().requires_grad_()
    inv_std = (var + EPS).rsqrt()
    y = (rows - mean[:, None, :, None, None]) * inv_std[:, None, :, None, None]
    y = y * weight[None, None, :, None, None] + bias[None, None, :, None, None]
    grad_mean, grad_var = torch.autograd.grad((y * c.reshape(rows.shape)).sum(), (mean, var))
    direct = c.reshape(rows.shape) * (weight[None, None, :, None, None]
                                      * inv_std[:, None, :, None, None])
    count = rows.shape[1] * rows.shape[3] * rows.shape[4]
    centred = rows - mean.detach()[:, None, :, None, None]
    return direct, grad_mean, grad_var, centred, count


@pytest.mark.parametrize("window", [2, 3])
def test_the_input_gradient_is_the_closed_form_with_averaged_statistics_gradients(window):
    torch.manual_seed(0)
    groups, channels = 3, 4
    layer = kn.BatchKalmanNorm2d(channels, micro_batch=2, backward_window=window,
                                 dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    past = []  # group 0's gradients of earlier steps, in the normalized output's units
    for step in range(window + 2):
        # groups and steps on very different scales: raw gradients would not average
        scale = torch.tensor([0.01, 1.0, 30.0], dtype=torch.float64)[torch.randperm(3)]
        x = torch.randn(2 * groups, channels, 3, 3, dtype=torch.float64)
        x = (x * scale.repeat_interleave(2)[:, None, None, None]).requires_grad_(True)
        c = torch.randn_like(x)
        (layer(x) * c).sum().backward()
        direct, g_mean, g_var, centred, count = reference_step(
            x.detach(), layer.weight.detach(), layer.bias.detach(), c, groups)
        var = centred.square().mean(dim=(1, 3, 4))
        u_mean, u_var = g_mean * (var + EPS).sqrt(), g_var * (var + EPS)
        if step >= window - 1:  # the window is full: its past from group 0, the present own
            u_mean = (sum(p[0] for p in past[-(window - 1):]) + u_mean) / window
            u_var = (sum(p[1] for p in past[-(window - 1):]) + u_var) / window
        used_mean, used_var = u_mean / (var + EPS).sqrt(), u_var / (var + EPS)
        expected = direct + used_mean[:, None, :, None, None] / count \
            + used_var[:, None, :, None, None] * 2 * centred / count
        torch.testing.assert_close(x.grad, expected.reshape(x.shape), rtol=1e-10, atol=1e-12)
        past.append((g_mean[0] * (var[0] + EPS).sqrt(), g_var[0] * (var[0] + EPS)))
    assert int(layer.grad_history_filled) == window - 1


def test_the_forward_pass_and_the_parameter_gradients_of_one_step_are_unchanged():
    torch.manual_seed(0)
    model = build_model("preact_resnet20", 10, nn.BatchNorm2d, width=4)
    x = torch.randn(8, 3, 16, 16)
    outs = []
    for window in (1, 4):  # the composite form for both: the fused kernel rounds differently
        net = kn.convert_batchnorm(build_model("preact_resnet20", 10, nn.BatchNorm2d, width=4),
                                   micro_batch=2, backward_window=window,
                                   generator=torch.Generator().manual_seed(1))
        net.load_state_dict(model.state_dict())
        with kn.use_backend("composite"):
            y = net(x)
            y.square().sum().backward()
        outs.append((y.detach(), [p.grad.clone() for p in net.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    # the first step has no past: the true gradient
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.equal(a, b)


def test_the_history_stays_out_of_the_state_dict_and_refills_after_a_load():
    torch.manual_seed(0)
    bn = build_model("preact_resnet20", 10, nn.BatchNorm2d, width=4)
    keys = set(bn.state_dict())
    model = kn.convert_batchnorm(build_model("preact_resnet20", 10, nn.BatchNorm2d, width=4),
                                 micro_batch=2, backward_window=3)
    for _ in range(3):
        model(torch.randn(4, 3, 16, 16)).sum().backward()
    layer = next(m for m in model.modules() if isinstance(m, kn.BatchKalmanNorm2d))
    assert int(layer.grad_history_filled) == 2 and layer.grad_history.abs().sum() > 0
    assert set(model.state_dict()) == keys
    bn.load_state_dict(model.state_dict())  # strict, and back
    model.load_state_dict(bn.state_dict())
    kn.configure(model, backward_window=5)  # another window: an empty history
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    assert layer.grad_history.shape[1] == 4 and int(layer.grad_history_filled) == 1


def test_no_history_moves_without_a_backward_pass():
    layer = kn.BatchKalmanNorm2d(3, micro_batch=2, backward_window=3)
    assert layer.grad_history.shape == (2, 2, 3)  # made with the layer: DDP broadcasts it
    with torch.no_grad():
        layer(torch.randn(4, 3, 2, 2))
    assert int(layer.grad_history_filled) == 0
    layer(torch.randn(4, 3, 2, 2, requires_grad=True)).square().sum().backward()
    assert int(layer.grad_history_filled) == 1


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "3"])
def test_a_bad_window_is_refused_and_configure_leaves_the_model_as_it_was(value):
    with pytest.raises(ValueError, match="backward_window must be an int >= 1"):
        kn.BatchKalmanNorm2d(3, backward_window=value)
    model = kn.convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="backward_window"):
        kn.configure(model, backward_window=value, gain=0.5)
    assert model[1].backward_window == 1 and model[1].gain == 0.9


def test_a_named_fused_backend_refuses_the_smoothed_backward_and_auto_takes_the_composite():
    layer = kn.BatchKalmanNorm2d(3, micro_batch=2, backward_window=2)
    x = torch.randn(4, 3, 2, 2)
    with kn.use_backend("cpu_fused"), pytest.raises(ValueError, match="backward_window=2"):
        layer(x)
    with kn.use_backend("auto"):
        layer(x).sum().backward()
    from kalmannorm.functional import cpu_fused, triton_ops
    options = kn.functional.StepOptions(real_rows=4, groups=2, backward_window=2)
    assert not cpu_fused.supports_options(options)
    assert not triton_ops.supports_options(options)
    assert cpu_fused.supports_options(options._replace(backward_window=1))


def test_a_torchvision_resnet_with_a_full_window_of_one_repeated_step_is_torch_batchnorm():
    """Torch's BatchNorm as the oracle: one group, no prediction (gain 0), the same batch and
    loss at every step, so the window averages equal gradients and the smoothed input gradient
    must be BatchNorm's."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    bn = torchvision.models.resnet18(num_classes=5).double().train()
    model = kn.convert_batchnorm(torchvision.models.resnet18(num_classes=5).double(), gain=0.0,
                                 backward_window=3)
    model.load_state_dict(bn.state_dict())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    c = torch.randn(4, 5, dtype=torch.float64)

    def input_grad(net):
        xi = x.clone().requires_grad_(True)
        (net(xi) * c).sum().backward()
        return xi.grad

    expected = input_grad(bn)
    with kn.use_backend("composite"):
        grads = [input_grad(model) for _ in range(4)]
    layer = next(m for m in model.modules() if isinstance(m, kn.BatchKalmanNorm2d))
    assert int(layer.grad_history_filled) == 2  # the last two steps averaged a full window
    for grad in grads:
        torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)
