"""kalmannorm.baselines: against timm's layers, float64 equations, group-0 faithfulness."""
import copy
import functools
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import kalmannorm as kn
from kalmannorm.harness.models import build_model

timm_layers = pytest.importorskip("timm.layers")


def _randomize(module, gen, names):
    with torch.no_grad():
        for name in names:
            p = getattr(module, name)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if name == "weight" else 0))


def _outputs_and_grads(layer, x, dy):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return [y, x.grad] + [p.grad for _, p in sorted(layer.named_parameters())]


def _other_rows(x, dy, start, others, gen):
    """Copies of ``x`` and ``dy`` whose rows from ``start`` on are blank (``others="zeros"``)
    or other random rows (``"random"``, inputs 5 times larger)."""
    x2, dy2 = x.clone(), dy.clone()
    if others == "zeros":
        x2[start:], dy2[start:] = 0, 0
    else:
        x2[start:] = torch.randn(x2[start:].shape, generator=gen) * 5
        dy2[start:] = torch.randn(dy2[start:].shape, generator=gen)
    return x2, dy2


def _frn_eps_outside(x, layer):
    nu = x.square().mean((2, 3), keepdim=True).sqrt()
    y = x / (nu + layer.eps) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    return torch.maximum(y, layer.tau.view(1, -1, 1, 1))


def _evonorm_eps_outside(x, layer):
    n, c, h, w = x.shape
    std = x.reshape(n, layer.num_groups, -1).var(2, unbiased=False, keepdim=True).sqrt()
    act = (x * torch.sigmoid(x * layer.v.view(1, -1, 1, 1))).reshape(n, layer.num_groups, -1)
    y = (act / (std + layer.eps)).reshape(x.shape)
    return y * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("ours, theirs, params, scale, eps_outside", [
    (lambda: kn.FilterResponseNorm2d(8, eps=1e-6),
     lambda: timm_layers.FilterResponseNormTlu2d(8, eps=1e-6), ("weight", "bias", "tau"), 1e-3,
     _frn_eps_outside),
    (lambda: kn.EvoNormS0(8, num_groups=4, eps=1e-5),
     lambda: timm_layers.EvoNorm2dS0(8, groups=4, eps=1e-5), ("weight", "bias", "v"), 3e-3,
     _evonorm_eps_outside),
])
def test_frn_and_evonorm_equal_timm_outputs_and_gradients(ours, theirs, params, scale,
                                                          eps_outside):
    gen = torch.Generator().manual_seed(0)
    layer, ref = ours(), theirs()
    _randomize(layer, gen, params)
    ref.load_state_dict(layer.state_dict())
    # Small inputs: the mean square (or variance) is of the order of eps, so eps matters.
    x = torch.randn(3, 8, 5, 4, generator=gen) * scale * torch.rand(1, 8, 1, 1, generator=gen)
    dy = torch.randn(x.shape, generator=gen)
    for a, b in zip(_outputs_and_grads(layer, x, dy), _outputs_and_grads(ref, x, dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The comparison sees where eps goes: inside the square root, not added to the root.
    with torch.no_grad():
        wrong = eps_outside(x, layer)
        assert (wrong - layer(x)).abs().max() > 100 * (1e-5 + 1e-5 * wrong.abs().max())


def test_frn_learnable_eps_is_a_learned_addition_above_the_fixed_eps():
    layer = kn.FilterResponseNorm2d(4, eps=1e-6, learnable_eps=True).double()
    with torch.no_grad():
        layer.eps_learned.copy_(torch.tensor([1e-4, -2e-4, 0.0, 3e-5]))
    x = torch.randn(2, 4, 1, 1, dtype=torch.float64) * 1e-2  # 1x1 maps: the paper's case
    eps = 1e-6 + layer.eps_learned.detach().abs().view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), torch.clamp_min(x / (x.square() + eps).sqrt(), 0.0))
    layer(x).sum().backward()
    assert layer.eps_learned.grad.abs().sum() > 0


def test_weight_standardization_equals_timm_stdconv2d():
    gen = torch.Generator().manual_seed(1)
    ref = timm_layers.StdConv2d(6, 5, 3, padding=1, bias=True)  # eps 1e-6
    conv = nn.Conv2d(6, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.01)  # var ~ 1e-4
        conv.bias.copy_(torch.randn(5, generator=gen))
    ref.load_state_dict(conv.state_dict())
    kn.standardize_conv_weights(conv)
    x = torch.randn(2, 6, 7, 7, generator=gen)
    torch.testing.assert_close(conv(x), ref(x), rtol=1e-5, atol=1e-5)
    w = conv.parametrizations.weight.original.detach()
    # eps inside the square root of the biased variance (the paper's code: unbiased std + eps).
    flat = w.flatten(1)
    expected = (flat - flat.mean(1, keepdim=True)) / (flat.var(1, unbiased=False, keepdim=True)
                                                      + 1e-6).sqrt()
    torch.testing.assert_close(conv.weight, expected.view_as(w))
    other = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-6)
    assert (other.view_as(w) - conv.weight).abs().max() > 1e-3


def test_centring_and_every_conv_rank_and_idempotence():
    net = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Conv3d(4, 2, 2), nn.ConvTranspose2d(2, 2, 2),
                        nn.Sequential(nn.Conv2d(2, 3, 1)))
    originals = {name: m.weight.detach().clone() for name, m in net.named_modules()
                 if isinstance(m, nn.modules.conv._ConvNd)}
    kn.standardize_conv_weights(net, mode="center")
    kn.standardize_conv_weights(net, mode="standardize")  # already parametrized: unchanged
    for name, w in originals.items():
        m = net.get_submodule(name)
        if isinstance(m, nn.ConvTranspose2d):  # not a Conv1d/2d/3d: left alone
            assert not parametrize.is_parametrized(m)
            continue
        assert len(m.parametrizations.weight) == 1
        mean = w.flatten(1).mean(1).view(-1, *([1] * (w.dim() - 1)))
        torch.testing.assert_close(m.weight, w - mean)
    assert len(originals) == 4


def test_conv_weight_errors_name_the_way_out():
    with pytest.raises(ValueError, match=r"mode must be one of \('standardize', 'center'\)"):
        kn.standardize_conv_weights(nn.Conv2d(2, 2, 1), mode="whiten")
    with pytest.raises(ValueError, match="'1' has one weight per output channel.*submodules"):
        kn.standardize_conv_weights(nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 1, groups=4)))
    with pytest.raises(TypeError, match="nn.Module"):
        kn.standardize_conv_weights(torch.zeros(3))


def test_resnet18_gets_every_conv_parametrized_and_still_saves_and_deploys():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    kn.standardize_conv_weights(model)
    assert len(convs) == 20 and all(parametrize.is_parametrized(m, "weight") for m in convs)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    # A state dict (the only serialization of a parametrized model) restores it exactly.
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    twin = kn.standardize_conv_weights(torchvision.models.resnet18(num_classes=10)).eval()
    twin.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    torch.testing.assert_close(twin(x), y, rtol=0, atol=0)
    # BKN on top, then deployed: to_batchnorm's copy keeps the parametrization.
    deployed = kn.to_batchnorm(kn.convert_batchnorm(copy.deepcopy(model)))
    torch.testing.assert_close(deployed.eval()(x), y)
    # Folded: plain convolutions with the standardized weights, a plain state dict, pickles.
    folded = kn.fold_conv_weights(copy.deepcopy(model))
    assert not any(parametrize.is_parametrized(m) for m in folded.modules())
    torch.testing.assert_close(folded(x), y)
    plain = torchvision.models.resnet18(num_classes=10).eval()
    plain.load_state_dict(folded.state_dict())
    torch.save(folded, io.BytesIO())
    torch.testing.assert_close(plain(x), y)


def test_registry_declares_conv_weights_and_build_model_applies_them():
    assert kn.get_norm_layer("groupnorm_ws").conv_weights == "standardize"
    layer = kn.get_norm_layer("groupnorm_ws", num_groups=4)
    assert layer.conv_weights == "standardize" and layer(8).num_groups == 4
    assert kn.get_norm_layer("mabn", micro_batch=2).conv_weights == "center"
    assert kn.get_norm_layer(kn.MovingAverageBatchNorm2d, window=4).conv_weights == "center"
    assert getattr(kn.get_norm_layer("groupnorm", num_groups=4), "conv_weights", None) is None
    # A user's declaration on a partial survives binding more options, as any attribute does.
    mine = functools.partial(kn.GroupNorm)
    mine.conv_weights, mine.note = "center", "kept"
    bound = kn.get_norm_layer(mine, num_groups=2)
    assert (bound.conv_weights, bound.note, bound(4).num_groups) == ("center", "kept", 2)

    for name, kw, mode in [("groupnorm_ws", {"num_groups": 4}, "standardize"),
                           ("mabn", {"micro_batch": 2}, "center")]:
        model = build_model("preact_resnet20", 10, kn.get_norm_layer(name, **kw))
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(m.parametrizations.weight[0].mode == mode for m in convs)
    model = build_model("resnet18", 10, "mabn", width=8, stem="cifar")
    assert all(parametrize.is_parametrized(m) for m in model.modules() if isinstance(m, nn.Conv2d))
    model = build_model("preact_resnet20", 10, kn.get_norm_layer("groupnorm", num_groups=4))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


# --- MABN -----------------------------------------------------------------------------------

def _mabn_reference(steps, m, weight, bias, running_var, *, window, eps, momentum, warmup_iters,
                    r_warmup_iters, r_max):
    """MABN's equations, float64, one group at a time; the buffers from group 0 only."""
    chis, psis, rv = [], [], running_var.clone()
    out = []
    w, b = weight.view(1, -1, 1, 1), bias.view(1, -1, 1, 1)
    for t, (x, dy) in enumerate(steps):
        average = t >= max(warmup_iters, window - 1)
        past_chi = sum(chis[len(chis) - window + 1:]) if window > 1 else 0
        past_psi = sum(psis[len(psis) - window + 1:]) if window > 1 else 0
        ys, dxs, dw, db, group0 = [], [], 0, 0, None
        for s in range(x.shape[0] // m):
            xs, dys = x[s * m:(s + 1) * m], dy[s * m:(s + 1) * m]
            chi = xs.square().mean((0, 2, 3))
            xi = (past_chi + chi) / window if average else chi
            r = (xi + eps).sqrt() / (rv + eps).sqrt()
            r = r.clamp(1 / r_max, r_max) if t >= r_warmup_iters else torch.ones_like(r)
            r4, std4 = r.view(1, -1, 1, 1), (xi + eps).sqrt().view(1, -1, 1, 1)
            z = xs / std4
            ys.append(w * r4 * z + b)
            g = w * r4 * dys
            psi = (g * z).mean((0, 2, 3))
            big_psi = (past_psi + psi) / window if average else psi
            dxs.append((g - z * big_psi.view(1, -1, 1, 1)) / std4)
            dw = dw + (dys * r4 * z).sum((0, 2, 3))
            db = db + dys.sum((0, 2, 3))
            if s == 0:
                group0 = (chi, psi, xi)
        chis.append(group0[0])
        psis.append(group0[1])
        rv = (1 - momentum) * rv + momentum * group0[2]
        out.append((torch.cat(ys), torch.cat(dxs), dw, db, rv.clone()))
    return out


def test_mabn_forward_and_backward_equal_the_equations_over_steps():
    gen = torch.Generator().manual_seed(2)
    opts = dict(window=3, eps=1e-3, momentum=0.3, warmup_iters=3, r_warmup_iters=4, r_max=1.3)
    layer = kn.MovingAverageBatchNorm2d(4, micro_batch=2, dtype=torch.float64, **opts)
    _randomize(layer, gen, ("weight", "bias"))
    with torch.no_grad():
        layer.running_var.copy_(torch.rand(4, generator=gen, dtype=torch.float64) + 0.2)
    steps = [(torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64)
              * torch.rand(1, 4, 1, 1, generator=gen, dtype=torch.float64) * 3,
              torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64)) for _ in range(6)]
    reference = functools.partial(_mabn_reference, steps, 2, layer.weight.detach(),
                                  layer.bias.detach(), layer.running_var.clone())
    expected = reference(**opts)
    # These steps see the window and the clip of r: without either the results differ.
    for change in ({"window": 1}, {"r_max": 100.0}, {"warmup_iters": 0}):
        other = reference(**{**opts, **change})
        for i in (0, 1):  # outputs, input gradients
            assert not torch.allclose(torch.cat([step[i] for step in other]),
                                      torch.cat([step[i] for step in expected]))
    for (x, dy), (y_ref, dx_ref, dw_ref, db_ref, rv_ref) in zip(steps, expected):
        layer.weight.grad = layer.bias.grad = None
        y, dx, db, dw = _outputs_and_grads(layer, x, dy)
        for a, b in [(y, y_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref),
                     (layer.running_var, rv_ref)]:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert int(layer.num_batches_tracked) == 6


def _mabn_released_sequential(steps, m, weight, bias, running_var, *, eps, momentum,
                              r_warmup_iters, r_max):
    """The released ImageNet code's MABN (``megvii-model/MABN``, ``cls/networks/MABN.py``) as a
    matrix: with S groups and a window of S, group i's statistic is row i of ``sta_matrix @
    [last step's S values; this step's S values]``, ``sta_matrix[i, j] = 1 / S`` for
    ``i < j <= S + i``, else 0; the first step uses the current values alone. Float64."""
    groups = steps[0][0].shape[0] // m
    sta = torch.full((groups, 2 * groups), 1 / groups, dtype=torch.float64)
    for i in range(groups):
        sta[i, :i + 1] = 0
        sta[i, groups + i + 1:] = 0
    pre_chi = pre_psi = None
    rv, out = running_var.clone(), []
    w, b = weight.view(1, 1, -1, 1, 1), bias.view(1, 1, -1, 1, 1)
    for t, (x, dy) in enumerate(steps):
        xs, dys = x.view(groups, m, *x.shape[1:]), dy.view(groups, m, *x.shape[1:])
        chi = xs.square().mean((1, 3, 4))  # [S, C]
        var = chi if pre_chi is None else sta @ torch.cat([pre_chi, chi])
        v = var.view(groups, 1, -1, 1, 1)
        z = xs / (v + eps).sqrt()
        r = (v + eps).sqrt() / (rv.view(1, 1, -1, 1, 1) + eps).sqrt()
        r = r.clamp(1 / r_max, r_max) if t >= r_warmup_iters else torch.ones_like(r)
        y = w * r * z + b
        g = dys * w * r
        psi = (g * z).mean((1, 3, 4))
        mean_psi = psi if pre_psi is None else sta @ torch.cat([pre_psi, psi])
        dx = (g - z * mean_psi.view(groups, 1, -1, 1, 1)) / (v + eps).sqrt()
        rv = (1 - momentum) * rv + momentum * var.mean(0)
        pre_chi, pre_psi = chi, psi
        out.append((y.reshape(x.shape), dx.reshape(x.shape), (dys * r * z).sum((0, 1, 3, 4)),
                    dys.sum((0, 1, 3, 4)), rv.clone()))
    return out


def test_mabn_sequential_layout_is_the_released_imagenet_codes_window():
    gen = torch.Generator().manual_seed(12)
    opts = dict(eps=1e-3, momentum=0.3, r_warmup_iters=2, r_max=1.3)
    layer = kn.MovingAverageBatchNorm2d(4, micro_batch=2, window=3, warmup_iters=0,
                                        group_layout="sequential", dtype=torch.float64, **opts)
    _randomize(layer, gen, ("weight", "bias"))
    with torch.no_grad():
        layer.running_var.copy_(torch.rand(4, generator=gen, dtype=torch.float64) + 0.2)
    steps = [(torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64)
              * torch.rand(1, 4, 1, 1, generator=gen, dtype=torch.float64) * 3,
              torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64)) for _ in range(5)]
    expected = _mabn_released_sequential(steps, 2, layer.weight.detach(), layer.bias.detach(),
                                         layer.running_var.clone(), **opts)
    devices = kn.MovingAverageBatchNorm2d(4, micro_batch=2, window=3, warmup_iters=0,
                                          dtype=torch.float64, **opts)
    devices.load_state_dict(layer.state_dict())
    for t, ((x, dy), (y_ref, dx_ref, dw_ref, db_ref, rv_ref)) in enumerate(zip(steps, expected)):
        layer.weight.grad = layer.bias.grad = None
        y, dx, db, dw = _outputs_and_grads(layer, x, dy)
        for a, b in [(y, y_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref),
                     (layer.running_var, rv_ref)]:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        y_dev, dx_dev = _outputs_and_grads(devices, x, dy)[:2]
        if t >= 2:  # both windows full: the layouts differ
            assert not torch.allclose(y_dev, y) and not torch.allclose(dx_dev, dx)


def test_mabn_sequential_layout_equals_real_gradient_accumulation():
    # One forward of S groups in the sequential layout against the same rows run as S forwards
    # of m rows each (micro_batch=None), each followed by its backward, as gradient accumulation
    # runs them: the windows, outputs and gradients agree. r stays 1 (it reads running_var,
    # which accumulation updates once per forward).
    gen = torch.Generator().manual_seed(14)
    opts = dict(window=5, warmup_iters=0, r_warmup_iters=10**9, dtype=torch.float64)
    one = kn.MovingAverageBatchNorm2d(3, micro_batch=2, group_layout="sequential", **opts)
    _randomize(one, gen, ("weight", "bias"))
    accumulating = kn.MovingAverageBatchNorm2d(3, **opts)
    accumulating.load_state_dict(one.state_dict())
    for step in range(3):
        x = torch.randn(8, 3, 2, 2, generator=gen, dtype=torch.float64) * 2
        dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        one.weight.grad = one.bias.grad = None
        y, dx, db, dw = _outputs_and_grads(one, x, dy)
        accumulating.weight.grad = accumulating.bias.grad = None
        parts = [_outputs_and_grads(accumulating, x[i:i + 2], dy[i:i + 2])[:2]
                 for i in range(0, 8, 2)]
        if step == 0:  # the windows fill after ceil(4 / 4) = 1 step against 4 forwards
            continue
        torch.testing.assert_close(y, torch.cat([p[0] for p in parts]))
        torch.testing.assert_close(dx, torch.cat([p[1] for p in parts]))
        torch.testing.assert_close(dw, accumulating.weight.grad)
        torch.testing.assert_close(db, accumulating.bias.grad)
        torch.testing.assert_close(one.chi_history, accumulating.chi_history)
        torch.testing.assert_close(one.psi_history, accumulating.psi_history)


@pytest.mark.parametrize("others", ["random", "zeros"])
def test_mabn_sequential_group_never_reads_a_later_group(others):
    gen = torch.Generator().manual_seed(13)
    # r = 1 throughout: an unclipped r cancels the window in the forward (r * z = x / running)
    layer = kn.MovingAverageBatchNorm2d(8, micro_batch=2, window=4, warmup_iters=0,
                                        r_warmup_iters=10**9, group_layout="sequential")
    for _ in range(2):  # fill the history
        x = torch.randn(8, 8, 3, 3, generator=gen) * 2
        _outputs_and_grads(layer, x, torch.randn(x.shape, generator=gen))
    twin, third = copy.deepcopy(layer), copy.deepcopy(layer)
    x, dy = torch.randn(8, 8, 3, 3, generator=gen) * 2, torch.randn(8, 8, 3, 3, generator=gen)
    x2, dy2 = _other_rows(x, dy, 4, others, gen)  # groups 2 and 3 (rows 4..7) change
    y, dx = _outputs_and_grads(layer, x, dy)[:2]
    y2, dx2 = _outputs_and_grads(twin, x2, dy2)[:2]
    assert torch.equal(y[:4], y2[:4]) and torch.equal(dx[:4], dx2[:4])
    assert not torch.equal(y[4:], y2[4:])
    # while an earlier group is in a later one's window: group 0 changes group 1's output
    x3 = x.clone()
    x3[:2] *= 3
    y3 = third(x3)
    assert not torch.allclose(y3[2:4], y[2:4])


def test_mabn_with_window_one_has_the_true_gradient():
    # k = 1, r = 1: y = weight * x / sqrt(mean_group(x^2) + eps) + bias, exactly differentiated.
    layer = kn.MovingAverageBatchNorm2d(3, window=1, warmup_iters=0, r_warmup_iters=10**9,
                                        micro_batch=2, eps=1e-2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))

    # k = 1 with r active: the true gradient with r held constant (stop-gradient).
    layer = kn.MovingAverageBatchNorm2d(3, window=1, warmup_iters=0, r_warmup_iters=0,
                                        micro_batch=2, eps=1e-2, dtype=torch.float64)
    with torch.no_grad():
        layer.running_var.fill_(0.3)
    x2 = x.detach().clone().requires_grad_()
    rows = x2.view(2, 2, 3, 6)
    std = (rows.square().mean((1, 3)) + 1e-2).sqrt()  # [S, C], with gradient
    r = (std.detach() / (0.3 + 1e-2) ** 0.5).clamp(1 / 5, 5)
    y_ref = (rows / std[:, None, :, None] * r[:, None, :, None]).view_as(x)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    (dx_ref,) = torch.autograd.grad(y_ref, x2, dy)
    y, dx = _outputs_and_grads(layer, x.detach(), dy)[:2]
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    assert not torch.allclose(r, torch.ones_like(r))


FAITHFUL = [("frn", {}), ("evonorm_s0", {}), ("groupnorm_ws", {}),
            ("mabn", dict(micro_batch=2, window=2, warmup_iters=0, r_warmup_iters=0, r_max=1.5)),
            ("mabn", dict(micro_batch=2, window=3, warmup_iters=1, r_warmup_iters=2))]


@pytest.mark.parametrize("name, kw", FAITHFUL)
@pytest.mark.parametrize("others", ["random", "zeros"])
def test_group0_is_bitwise_independent_of_the_other_groups_rows(name, kw, others):
    gen = torch.Generator().manual_seed(4)
    layer = kn.get_norm_layer(name, **kw)(32)
    twin = copy.deepcopy(layer)
    for _ in range(4):  # MABN: the history and r come into play
        x = torch.randn(6, 32, 3, 3, generator=gen) * 2
        dy = torch.randn(x.shape, generator=gen)
        x2, dy2 = _other_rows(x, dy, 2, others, gen)
        y, dx = _outputs_and_grads(layer, x, dy)[:2]
        y2, dx2 = _outputs_and_grads(twin, x2, dy2)[:2]
        assert torch.equal(y[:2], y2[:2]) and torch.equal(dx[:2], dx2[:2])
        assert not torch.equal(y[2:], y2[2:])
        for (key, a), b in zip(layer.state_dict().items(), twin.state_dict().values()):
            assert torch.equal(a, b), key


def test_mabn_eval_is_batchnorm_with_zero_mean_and_loads_into_batchnorm():
    gen = torch.Generator().manual_seed(5)
    layer = kn.MovingAverageBatchNorm2d(4, micro_batch=2, window=2, warmup_iters=0)
    _randomize(layer, gen, ("weight", "bias"))
    for _ in range(3):
        layer(torch.randn(4, 4, 3, 3, generator=gen) * 3)
    assert torch.equal(layer.running_mean, torch.zeros(4))
    assert not torch.allclose(layer.running_var, torch.ones(4))
    x = torch.randn(5, 4, 3, 3, generator=gen)
    expected = (layer.weight.view(1, -1, 1, 1) * x / (layer.running_var.view(1, -1, 1, 1)
                                                      + layer.eps).sqrt()
                + layer.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(layer.eval()(x), expected)
    bn = nn.BatchNorm2d(4)
    missing, unexpected = bn.load_state_dict(layer.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == ["chi_history", "psi_history"]
    torch.testing.assert_close(bn.eval()(x), layer(x), rtol=0, atol=0)


def test_mabn_running_var_tracks_the_mean_square_of_group0():
    layer = kn.MovingAverageBatchNorm2d(2, momentum=0.5, micro_batch=1, window=1)
    x = torch.tensor([[[[3.0]], [[1.0]]], [[[100.0]], [[100.0]]]])  # group 1 is ignored
    layer(x)
    torch.testing.assert_close(layer.running_var, torch.tensor([5.0, 1.0]))  # 0.5*1 + 0.5*x0^2


@pytest.mark.parametrize("name, kw", [("frn", {}), ("evonorm_s0", {}), ("groupnorm_ws", {}),
                                      ("mabn", {"micro_batch": 2})])
def test_bfloat16_input_and_autocast(name, kw):
    gen = torch.Generator().manual_seed(6)
    layer = kn.get_norm_layer(name, **kw)(32)
    x = torch.randn(4, 32, 4, 4, generator=gen)
    y32 = copy.deepcopy(layer)(x)
    x16 = x.bfloat16().requires_grad_()
    y16 = copy.deepcopy(layer)(x16)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.05)
    y16.float().sum().backward()
    assert x16.grad.dtype == torch.bfloat16 and torch.isfinite(x16.grad).all()
    net = nn.Sequential(nn.Conv2d(3, 32, 3), layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(4, 3, 6, 6, generator=gen))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()


def test_bad_options_and_inputs_name_the_way_out():
    with pytest.raises(ValueError, match="do not split into num_groups=32; pass a num_groups"):
        kn.EvoNormS0(16)
    for make in (kn.EvoNormS0, kn.GroupNorm):  # "False" would read as true: refused
        with pytest.raises(ValueError, match="cap_groups must be a bool .*cap_groups=true"):
            make(16, cap_groups="False")
        assert make(16, cap_groups=True).num_groups == 16 and make(48, num_groups=32,
                                                                    cap_groups=True).num_groups == 24
    with pytest.raises(ValueError, match="num_channels must be a positive int"):
        kn.FilterResponseNorm2d(0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        kn.FilterResponseNorm2d(4, eps=-1.0)
    for kw, match in [({"window": 0}, "window must be an int >= 1"),
                      ({"warmup_iters": -1}, "warmup_iters must be an int >= 0"),
                      ({"momentum": None}, "momentum must be a number in"),
                      ({"r_max": 0.5}, "r_max must be >= 1"),
                      ({"group_layout": "ranks"}, "group_layout must be one of .*gradient "
                                                  "accumulation"),
                      ({"micro_batch": 0}, "micro_batch must be a positive int")]:
        with pytest.raises(ValueError, match=match):
            kn.MovingAverageBatchNorm2d(4, **kw)
    for layer in (kn.FilterResponseNorm2d(4), kn.EvoNormS0(4, num_groups=2),
                  kn.MovingAverageBatchNorm2d(4)):
        with pytest.raises(ValueError, match="4D input"):
            layer(torch.randn(2, 4, 3))
        with pytest.raises(ValueError, match="with 4 channels"):
            layer(torch.randn(2, 3, 2, 2))
        with pytest.raises(TypeError, match=r"floating-point.*x.float\(\)"):
            layer(torch.ones(2, 4, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="micro_batch=2; use a batch size that is a multiple"):
        kn.MovingAverageBatchNorm2d(4, micro_batch=2)(torch.randn(3, 4, 2, 2))


def test_mabn_empty_batch_and_reset():
    layer = kn.MovingAverageBatchNorm2d(3, window=2, warmup_iters=0)
    assert layer(torch.randn(0, 3, 2, 2)).shape == (0, 3, 2, 2)
    assert int(layer.num_batches_tracked) == 0
    layer(torch.randn(2, 3, 2, 2)).sum().backward()
    assert layer.chi_history.abs().sum() > 0 and layer.psi_history.abs().sum() > 0
    layer.reset_running_stats()
    assert not layer.chi_history.any() and not layer.psi_history.any()
    assert int(layer.num_batches_tracked) == 0 and torch.equal(layer.running_var, torch.ones(3))
