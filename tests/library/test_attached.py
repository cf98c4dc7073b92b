"""The prediction attached to the user's model (issue 15): convert_batchnorm returns the model
itself; configure() changes its options; the silent cases warn or raise with the way out."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kalmannorm as kn


def conv_bn(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 4), conv_bn(4, 4))
        self.head = nn.Linear(4, 3)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class WithLoss(Net):
    def forward(self, x, labels):
        return F.cross_entropy(super().forward(x), labels)


class SeqFirst(Net):
    def forward(self, x):
        return super().forward(x).t()  # [classes, batch]: the batch is not the first dimension


def rows_seen(layer):
    rows = []
    layer.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    return rows


def test_the_converted_model_is_the_users_model():
    torch.manual_seed(0)
    net = Net()
    keys = list(net.state_dict())
    model = kn.convert_batchnorm(net, micro_batch=2)
    assert model is net and type(model) is Net and model.head is net.head
    assert list(model.state_dict()) == keys
    rows = rows_seen(net.body[1][1])
    out = model(torch.randn(4, 3, 5, 5))
    assert out.shape == (4, 3) and rows == [4 + 2]  # shadow rows inside, stripped outside
    assert kn.guard_report(model)["priors"] == 2  # one layer with a prior, 2 groups
    # the eval model adds nothing and deploys bit for bit, without the hooks
    model.eval()
    x = torch.randn(3, 3, 5, 5)
    deployed = kn.to_batchnorm(model)
    assert kn.predictor_of(deployed) is None and kn.predictor_of(model) is not None
    assert not deployed._forward_pre_hooks and not deployed._forward_hooks
    assert torch.equal(deployed(x), model(x))


def test_another_method_than_forward_trains_without_prediction_and_warns():
    model = kn.convert_batchnorm(Net(), micro_batch=2)
    rows = rows_seen(model.body[1][1])
    with pytest.warns(UserWarning, match="outside a KalmanPredictor"):
        model.features(torch.randn(4, 3, 5, 5))
    assert rows == [4]


def test_a_forward_that_raises_closes_the_pass():
    model = kn.convert_batchnorm(Net(), micro_batch=2)
    with pytest.raises(RuntimeError):
        model(torch.randn(4, 5, 5, 5))  # 5 channels for a 3-channel conv
    assert not kn.predictor_of(model).shadow_batch.active
    assert model(torch.randn(4, 3, 5, 5)).shape == (4, 3)


def test_deepcopy_carries_its_own_predictor():
    model = kn.convert_batchnorm(Net(), micro_batch=2)
    clone = copy.deepcopy(model)
    assert kn.predictor_of(clone) is not kn.predictor_of(model)
    assert kn.predictor_of(clone).module is clone
    rows = rows_seen(clone.body[1][1])
    clone(torch.randn(4, 3, 5, 5))
    assert rows == [6]


def test_configure_changes_options_and_refuses_bad_ones_without_change():
    model = kn.convert_batchnorm(Net(), micro_batch=2)
    with pytest.raises(TypeError, match=r"already converted; change its options with "
                                        r"kalmannorm.configure"):
        kn.convert_batchnorm(model, gain=0.5)
    layers = [m for m in model.modules() if isinstance(m, kn.BatchKalmanNorm2d)]
    kn.configure(model, gain=0.5, micro_batch=4, rows_per_group=2)
    assert all(m.gain == 0.5 and m.micro_batch == 4 for m in layers)
    rows = rows_seen(layers[1])
    model(torch.randn(8, 3, 5, 5))
    assert rows == [8 + 2 * 2]  # 2 groups of 4, 2 shadow rows each
    for bad, error in ((dict(gain=2.0), ValueError), (dict(rows_per_group=0), ValueError),
                       (dict(micro_batch=0), ValueError), (dict(prediction="analytic"), TypeError),
                       (dict(gain=0.1, batch_input=1.5), TypeError)):
        with pytest.raises(error):
            kn.configure(model, **bad)
        assert all(m.gain == 0.5 and m.micro_batch == 4 for m in layers)
        assert kn.predictor_of(model).rows_per_group == 2
    with pytest.raises(ValueError, match="convert it first"):
        kn.configure(Net())


def test_ragged_last_batch_names_drop_last():
    model = kn.convert_batchnorm(Net(), micro_batch=2)
    with pytest.raises(ValueError, match=r"7 rows .*micro_batch=2.*drop_last=True"):
        model(torch.randn(7, 3, 5, 5))
    assert not kn.predictor_of(model).shadow_batch.active
    assert model(torch.randn(6, 3, 5, 5)).shape == (6, 3)


def test_labels_given_to_forward_warn_and_batch_input_is_the_remedy():
    torch.manual_seed(0)
    x, labels = torch.randn(4, 3, 5, 5), torch.tensor([0, 1, 2, 1])
    model = kn.convert_batchnorm(WithLoss(), micro_batch=2)
    with pytest.warns(UserWarning) as record:
        model(x, labels)
    messages = " ".join(str(w.message) for w in record)
    assert "positional input 0, positional input 1 all have 4 rows" in messages
    assert "batch_input=" in messages
    assert "scalar computed from the batch" in messages  # the loss includes the shadow rows
    # naming the batch input leaves the labels alone: the loss inside forward now sees
    # logits with shadow rows against 4 labels and fails loudly instead of silently
    kn.configure(model, batch_input="x")
    with pytest.raises(ValueError, match="batch_size"):
        model(x, labels)
    # several inputs that do carry the batch: a tuple silences the warning
    kn.configure(model, gain=0.0)  # no prediction: the loss is right, nothing to warn about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference = F.cross_entropy(Net.forward(model, x), labels)
        torch.testing.assert_close(model(x, labels), reference)


def test_output_with_the_batch_not_first_warns():
    model = kn.convert_batchnorm(SeqFirst(), micro_batch=2)
    with pytest.warns(UserWarning, match=r"shape \(3, 6\) has the batch .* other than the first"):
        out = model(torch.randn(4, 3, 5, 5))
    assert out.shape == (3, 6)  # documented: returned as is


def test_wrapper_reads_and_sets_the_models_attributes():
    inner = Net()
    inner.body = nn.Sequential(  # a model built with BKN layers, wrapped the old way
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), kn.BatchKalmanNorm2d(4, micro_batch=2)),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), kn.BatchKalmanNorm2d(4, micro_batch=2)))
    model = kn.KalmanPredictor(inner)
    assert model.head is inner.head and model.features.__self__ is inner
    new_head = nn.Linear(4, 5)
    model.head = new_head
    assert inner.head is new_head and "head" not in model._modules
    assert model(torch.randn(4, 3, 5, 5)).shape == (4, 5)
    with pytest.raises(AttributeError):
        model.no_such_attribute


def test_attach_keeps_a_bkn_built_model_and_refuses_a_second_predictor():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), kn.BatchKalmanNorm2d(4, micro_batch=2), nn.ReLU(),
                        nn.Conv2d(4, 4, 3), kn.BatchKalmanNorm2d(4, micro_batch=2))
    assert kn.KalmanPredictor.attach(net) is net
    with pytest.raises(ValueError, match="already has the prediction attached"):
        kn.KalmanPredictor.attach(net)
    with pytest.raises(ValueError, match=r"already holds a KalmanPredictor at \[''\]"):
        kn.KalmanPredictor(net)
    with pytest.raises(ValueError, match="found no BatchNorm layer .* holds BKN layers"):
        kn.convert_batchnorm(nn.Sequential(*net))
    kn.predictor_of(net).detach()
    assert kn.predictor_of(net) is None and not net._forward_pre_hooks
