"""Issue 8, items 2-8: what real models need from the surgery, the predictor and the layers.

BatchNorm subclasses, SyncBatchNorm ranks, atomic conversion, finding the batch, two or nested
predictors, shared layers, integer and empty inputs, TorchScript, model-level state dicts.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kalmannorm as kn


def snapshot(model):
    """Everything a failed conversion must leave as it was."""
    return ([(name, type(m)) for name, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            [id(p) for p in model.parameters()])


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], v) for k, v in before[1].items())


def conv_bn(c_in, c_out, norm=nn.BatchNorm2d):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), norm(c_out), nn.ReLU())


# -- item 2: subclasses -------------------------------------------------------------------------

def test_timm_batchnorm_act_keeps_activation_and_drop_and_deploys_back():
    norm_act = pytest.importorskip("timm.layers.norm_act")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                        norm_act.BatchNormAct2d(4, act_layer=nn.Hardswish),
                        nn.Conv2d(4, 4, 3, padding=1),
                        norm_act.BatchNormAct2d(4, act_layer=nn.SiLU, drop_layer=nn.Dropout))
    reference = copy.deepcopy(net)
    keys = net.state_dict().keys()
    model = kn.convert_batchnorm(net, gain=0.0, micro_batch=2)
    layer = net[1]
    assert isinstance(layer, kn.BatchKalmanNormAct2d) and isinstance(layer.act, nn.Hardswish)
    assert isinstance(net[3].drop, nn.Dropout) and net[3]._then == ("drop", "act")
    assert model.state_dict().keys() == keys
    x = torch.randn(4, 3, 6, 6)
    net[3].drop.p = reference[3].drop.p = 0.0
    # gain 0 with micro_batch=2 is per-group BatchNorm followed by the activation
    expected = torch.cat([reference(x[:2]), reference(x[2:])])
    torch.testing.assert_close(model(x), expected)
    model.eval(), reference.eval()
    deployed = kn.to_batchnorm(model)
    assert type(deployed[1]) is norm_act.BatchNormAct2d
    assert isinstance(deployed[1].act, nn.Hardswish)
    assert torch.equal(deployed(x), model(x))
    assert deployed.state_dict().keys() == keys
    # the activation is applied to the shadow rows too: with gain > 0 the second layer's prior
    # comes from SiLU(samples) through the conv, and training still works
    model = kn.convert_batchnorm(copy.deepcopy(reference).train(), micro_batch=2)
    model(x).sum().backward()
    assert kn.guard_report(model)["priors"] == 2  # 2 groups


def test_frozen_batchnorm_stays_frozen():
    class FrozenBatchNorm2d(nn.Module):  # torchvision's and timm's shape: fixed buffers
        def __init__(self, c):
            super().__init__()
            for name, value in (("weight", torch.rand(c) + 0.5), ("bias", torch.randn(c)),
                                ("running_mean", torch.randn(c)),
                                ("running_var", torch.rand(c) + 0.5)):
                self.register_buffer(name, value)

        def forward(self, x):
            scale = self.weight * (self.running_var + 1e-5).rsqrt()
            return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]

    net = nn.Sequential(conv_bn(3, 4, FrozenBatchNorm2d), conv_bn(4, 4))
    keys = net.state_dict().keys()
    model = kn.convert_batchnorm(net, micro_batch=2)
    assert type(net[0][1]) is FrozenBatchNorm2d and isinstance(net[1][1], kn.BatchKalmanNorm2d)
    assert model.state_dict().keys() == keys
    before = net[0][1].running_mean.clone()
    model(torch.randn(4, 3, 5, 5)).sum().backward()
    assert torch.equal(net[0][1].running_mean, before)


class ClampedBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x).clamp(max=1.0)


class InitOnlyBN(nn.BatchNorm2d):
    def __init__(self, c):
        super().__init__(c, eps=1e-3)


def test_subclasses_convert_by_registry_or_are_refused_by_name():
    net = nn.Sequential(conv_bn(3, 4, InitOnlyBN))  # no own forward: converts as its base
    kn.convert_batchnorm(net, micro_batch=2)
    assert isinstance(net[0][1], kn.BatchKalmanNorm2d) and net[0][1].eps == 1e-3

    net = nn.Sequential(conv_bn(3, 4), conv_bn(4, 4, ClampedBN))
    before = snapshot(net)
    with pytest.raises(TypeError, match=r"cannot convert .*ClampedBN: .*register_converter"):
        kn.convert_batchnorm(net, micro_batch=2)
    assert_unchanged(net, before)

    class ClampedBKN(kn.BatchKalmanNorm2d):
        def forward(self, x):
            return super().forward(x).clamp(max=1.0)

    def to_clamped(layer, options):
        new = ClampedBKN(layer.num_features, layer.eps, layer.momentum, **options)
        new.load_state_dict(layer.state_dict())
        return new

    kn.register_converter(ClampedBN, to_clamped)
    try:
        model = kn.convert_batchnorm(net, micro_batch=2)
        assert type(net[1][1]) is ClampedBKN
        assert model(torch.randn(4, 3, 5, 5)).shape == (4, 4, 5, 5)
        kn.register_converter(ClampedBN, None)  # "leave it": a training BatchNorm is refused
        with pytest.raises(ValueError, match="compute statistics over the batch"):
            kn.convert_batchnorm(nn.Sequential(conv_bn(3, 4), conv_bn(4, 4, ClampedBN)))
    finally:
        del kn.convert.CONVERTERS[ClampedBN]
    with pytest.raises(TypeError, match="BatchNorm subclass"):
        kn.register_converter(nn.Linear, to_clamped)


# -- item 4: atomic conversion ------------------------------------------------------------------

class BatchCoupled(nn.modules.batchnorm._NormBase):
    """A training-mode layer with batch statistics that no converter knows."""

    def forward(self, x):
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


@pytest.mark.parametrize("case", ["unsupported layer last", "bad option", "rows_per_group=0",
                                  "batch-coupled layer", "analytic refused"])
def test_failed_conversion_leaves_the_model_as_it_was(case):
    layers = [conv_bn(3, 4), nn.MaxPool2d(2), conv_bn(4, 4), conv_bn(4, 4)]
    options = {"micro_batch": 2}
    if case == "unsupported layer last":
        layers.append(conv_bn(4, 4, ClampedBN))
    elif case == "bad option":
        options["gain"] = 1.5
    elif case == "rows_per_group=0":
        options["rows_per_group"] = 0
    elif case == "batch-coupled layer":
        layers.append(BatchCoupled(4))
    else:
        options["prediction"] = "analytic"
        layers.insert(2, nn.Softmax(dim=1))  # an op without a moment rule
    net = nn.Sequential(*layers)
    shared = nn.Sequential(net, net[0])  # a layer under two names, to restore both
    before = snapshot(shared)
    with pytest.raises((TypeError, ValueError, NotImplementedError)):
        kn.convert_batchnorm(shared, **options)
    assert_unchanged(shared, before)
    assert shared[1] is net[0]


# -- item 5: finding the batch ------------------------------------------------------------------

class WithConstants(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 4), conv_bn(4, 4))

    def forward(self, consts, x):
        return self.body(x) + consts.sum()


def test_ambiguous_batch_is_refused_and_batch_input_resolves_it():
    x, consts = torch.randn(4, 3, 5, 5), torch.randn(2, 3)
    net = WithConstants()
    model = kn.convert_batchnorm(net, micro_batch=2)
    with pytest.raises(ValueError,
                       match=r"tensors with \[2, 4\] rows; name the input .*batch_input"):
        model(consts, x)
    for hint in (1, "x", -1, ("x",)):
        kn.configure(model, batch_input=hint)
        rows = []
        handle = net.body[1][1].register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
        out = model(consts, x)
        handle.remove()
        assert out.shape == (4, 4, 5, 5) and rows == [4 + 2]
    # the shadow rows do not touch the constants and do not leak into the real rows
    gain0 = kn.convert_batchnorm(WithConstants(), gain=0.0, micro_batch=2, batch_input="x")
    reference = copy.deepcopy(gain0)
    kn.predictor_of(reference).detach()
    torch.testing.assert_close(gain0(consts, x), reference(consts, x))
    with pytest.raises(ValueError, match="batch_input='y' names no input"):
        kn.configure(net, batch_input="y")(consts, x)
    with pytest.raises(TypeError, match="batch_input must be"):
        kn.configure(net, batch_input=1.0)


def test_list_of_images_is_refused_with_the_detection_recipe():
    model = kn.convert_batchnorm(nn.Sequential(conv_bn(3, 4), conv_bn(4, 4)), micro_batch=2)
    images = [torch.randn(3, 5, 5), torch.randn(3, 5, 5)]
    with pytest.raises(ValueError, match=r"list of separate tensors.*model.backbone"):
        model(images)


# -- item 7: two predictors, nested predictors, shared layers, integer, empty, jit ------------

def test_two_predictors_on_one_model_each_get_their_own_shadow_rows():
    torch.manual_seed(0)
    net = nn.Sequential(conv_bn(3, 4), conv_bn(4, 4))
    first = kn.convert_batchnorm(net, micro_batch=2, generator=torch.Generator().manual_seed(1))
    # a second predictor around the same layers (a feature extractor's shape)
    second = kn.KalmanPredictor(nn.Sequential(*net), generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 3, 5, 5)
    state = copy.deepcopy(net.state_dict())
    y_second = second(x)
    net.load_state_dict(state)
    y_first = first(x)  # the first predictor used to see layers claimed by the second
    assert torch.equal(y_first, y_second)
    assert kn.guard_report(net)["priors"] == 2 * 2  # 2 passes, 2 groups


def test_nested_predictor_is_refused_by_name():
    inner = kn.convert_batchnorm(nn.Sequential(conv_bn(3, 4), conv_bn(4, 4)), micro_batch=2)
    outer = nn.Sequential(inner, conv_bn(4, 4))
    with pytest.raises(ValueError, match=r"already holds a KalmanPredictor at \['0'\]"):
        kn.convert_batchnorm(outer, micro_batch=2)
    assert isinstance(outer[1][1], nn.BatchNorm2d)
    with pytest.raises(ValueError, match=r"already holds a KalmanPredictor at \[''\]"):
        kn.KalmanPredictor(inner)


def test_batchnorm_shared_under_two_names_becomes_one_layer():
    block = conv_bn(4, 4)
    net = nn.Sequential(conv_bn(3, 4), block, block)
    net.alias = block[1]
    model = kn.convert_batchnorm(net, micro_batch=2)
    assert net[1][1] is net[2][1] is net.alias and isinstance(net.alias, kn.BatchKalmanNorm2d)
    model(torch.randn(4, 3, 5, 5)).sum().backward()
    # Sequential runs the alias too: the shared layer ran three times, each with a prior, in
    # 2 groups
    assert kn.guard_report(model)["priors"] == 3 * 2
    deployed = kn.to_batchnorm(model)
    assert deployed[1][1] is deployed[2][1] is deployed.alias
    assert type(deployed.alias) is nn.BatchNorm2d


def test_integer_input_is_refused():
    for layer in (kn.BatchKalmanNorm2d(3), kn.BatchRenorm2d(3)):
        with pytest.raises(TypeError, match="expected a floating-point input"):
            layer(torch.ones(4, 3, 2, 2, dtype=torch.long))


@pytest.mark.parametrize("kernel", ["fused", "composite"])
def test_empty_batch_returns_empty_like_batchnorm(kernel, monkeypatch):
    if kernel == "composite":
        monkeypatch.setenv("KALMANNORM_FUSED", "0")
    layer = kn.BatchKalmanNorm2d(3, micro_batch=2)
    x = torch.zeros(0, 3, 4, 4, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape == nn.BatchNorm2d(3)(x).shape
    y.sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(3))
    assert int(layer.num_batches_tracked) == 0
    model = kn.convert_batchnorm(nn.Sequential(conv_bn(3, 4), conv_bn(4, 4)), micro_batch=2)
    assert model(torch.zeros(0, 3, 5, 5)).shape == (0, 4, 5, 5)
    analytic = kn.convert_batchnorm(nn.Sequential(conv_bn(3, 4), conv_bn(4, 4)), micro_batch=2,
                                    prediction="analytic")
    assert analytic(torch.zeros(0, 3, 5, 5)).shape == (0, 4, 5, 5)


def test_torchscript_names_the_deployable_copy():
    model = kn.convert_batchnorm(nn.Sequential(conv_bn(3, 4), conv_bn(4, 4)), micro_batch=2)
    for obj in (model, model[0][1]):
        with pytest.raises(TypeError, match=r"torch.jit.script\(kalmannorm.to_batchnorm"):
            torch.jit.script(obj)
    scripted = torch.jit.script(kn.to_batchnorm(model).eval())
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(scripted(x), model.eval()(x))


# -- item 8: state dict keys at model level -----------------------------------------------------

class Detector(nn.Module):
    """A predictor inside a larger model (the detection recipe's shape)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(conv_bn(3, 4), conv_bn(4, 4))
        self.head = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))


@pytest.mark.parametrize("nested", [False, True])
def test_state_dict_keys_are_the_original_models_both_ways(nested):
    torch.manual_seed(0)
    original = Detector() if nested else nn.Sequential(conv_bn(3, 4), conv_bn(4, 4))
    for m in original.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
    checkpoint = copy.deepcopy(original.state_dict())
    converted = copy.deepcopy(original)
    if nested:
        converted.backbone = kn.convert_batchnorm(converted.backbone, micro_batch=2)
    else:
        converted = kn.convert_batchnorm(converted, micro_batch=2)
    assert list(converted.state_dict()) == list(checkpoint)
    (converted.backbone if nested else converted)(torch.randn(4, 3, 5, 5))
    # BatchNorm checkpoint -> converted model, strict, values restored
    result = converted.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in converted.state_dict().items():
        assert torch.equal(value, checkpoint[key]), key
    # converted model's checkpoint -> fresh BatchNorm model, strict
    fresh = Detector() if nested else nn.Sequential(conv_bn(3, 4), conv_bn(4, 4))
    fresh.load_state_dict(converted.state_dict(), strict=True)
    # old checkpoints written with the "module." level still load
    prefixed = {("backbone.module." + k[len("backbone."):]) if nested and k.startswith("backbone.")
                else k if nested else "module." + k: v for k, v in checkpoint.items()}
    converted.load_state_dict(prefixed, strict=True)
    # BatchNorm versioning survives (metadata keys follow the renamed keys)
    metadata = converted.state_dict()._metadata
    bn_key = "backbone.0.1" if nested else "0.1"
    assert metadata[bn_key]["version"] == 2


class Versioned(nn.Module):
    """Checks its state dict version on load, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 4), conv_bn(4, 4))

    def forward(self, x):
        return self.body(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2 (got {local_metadata.get('version')})")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_module_versions_survive_the_predictor_both_ways():
    original = Versioned()
    converted = kn.convert_batchnorm(copy.deepcopy(original), micro_batch=2)
    converted.load_state_dict(original.state_dict())  # BatchNorm checkpoint -> converted
    converted.load_state_dict(converted.state_dict())  # converted -> converted
    original.load_state_dict(converted.state_dict())  # converted -> BatchNorm model
