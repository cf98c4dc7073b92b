"""kalmannorm.statistics_error: closed forms, the estimate against the observation, a model left
as it was, and bad input."""
import copy
import math

import pytest
import torch
from torch import nn

import kalmannorm as kn
from kalmannorm.harness.models import build_model


def _buffers(model):
    return [b.clone() for b in model.buffers()]


def test_closed_form_of_one_layer_without_a_prior():
    # groups (0, 2) and (4, 6): means 1 and 5, variances 1; the batch: mean 3, variance 5
    net = kn.convert_batchnorm(nn.Sequential(nn.BatchNorm2d(1)), micro_batch=2)
    x = torch.tensor([0.0, 2.0, 4.0, 6.0]).reshape(4, 1, 1, 1)
    (row,) = kn.statistics_error(net, x)
    eps = 1e-5
    assert (row.layer, row.after, row.channels, row.groups, row.values_per_group) == \
        ("0", "", 1, 2, 2)
    assert row.prior_used == 0.0
    assert row.observed_mean_error == pytest.approx(4 / (5 + eps), rel=1e-6)
    log_ratio = math.log((1 + eps) / (5 + eps))
    assert row.observed_log_var_error == pytest.approx(log_ratio ** 2, rel=1e-6)
    assert row.observed_log_var_bias == pytest.approx(log_ratio, rel=1e-6)
    assert all(math.isnan(v) for v in (row.prediction_mean_error, row.prediction_log_var_error,
                                       row.prediction_log_var_bias))
    # fresh running statistics (0, 1) against the batch's (3, 5)
    assert row.running_mean_error == pytest.approx(9 / (5 + eps), rel=1e-6)
    assert row.running_log_var_bias == pytest.approx(math.log((1 + eps) / (5 + eps)), rel=1e-6)
    # no prior: BKN's estimate is the group's own statistics
    assert row.estimate_mean_error == pytest.approx(row.observed_mean_error, rel=1e-6)
    assert row.estimate_log_var_error == pytest.approx(row.observed_log_var_error, rel=1e-6)


def test_gain_zero_estimates_are_the_observations_and_the_default_gain_moves_them():
    torch.manual_seed(0)
    base = build_model("preact_resnet20", 10, width=8)
    x = torch.randn(32, 3, 16, 16)
    rows0 = kn.statistics_error(kn.convert_batchnorm(copy.deepcopy(base), micro_batch=2,
                                                     gain=0.0), x)
    rows = kn.statistics_error(kn.convert_batchnorm(copy.deepcopy(base), micro_batch=2), x)
    assert [r.layer for r in rows0] == [r.layer for r in rows] and len(rows) == 19
    for r in rows0:
        assert r.estimate_mean_error == pytest.approx(r.observed_mean_error, rel=1e-4, abs=1e-9)
        assert r.estimate_log_var_error == pytest.approx(r.observed_log_var_error, rel=1e-4)
    # the observations do not depend on the gain of this layer, only on its input: the first
    # layer's input is the same in both models
    assert rows[0].observed_log_var_error == pytest.approx(rows0[0].observed_log_var_error)
    assert rows[0].prior_used == 0.0 and all(r.prior_used > 0 for r in rows[1:])
    assert any(abs(r.estimate_log_var_error - r.observed_log_var_error) > 1e-3 for r in rows[1:])
    assert {r.after for r in rows} >= {"Conv2d 3x3"}


@pytest.mark.parametrize("prediction", ["sampled", "analytic"])
def test_a_fully_trusted_prediction_is_the_estimate(prediction):
    # a fixed gain of 1 that the guard never rejects puts all weight on the prediction
    torch.manual_seed(0)
    net = kn.convert_batchnorm(build_model("preact_resnet20", 10, width=8), micro_batch=2,
                               gain=1.0, gain_rule="fixed", guard_threshold=1e30,
                               prediction=prediction)
    rows = kn.statistics_error(net, torch.randn(16, 3, 16, 16))
    assert math.isnan(rows[0].prediction_log_var_error)
    for r in rows[1:]:
        assert r.prior_used == 1.0
        assert r.estimate_mean_error == pytest.approx(r.prediction_mean_error, rel=1e-4, abs=1e-9)
        assert r.estimate_log_var_error == pytest.approx(r.prediction_log_var_error, rel=1e-4)
        assert r.estimate_log_var_bias == pytest.approx(r.prediction_log_var_bias, rel=1e-4,
                                                        abs=1e-7)


def test_the_analytic_prediction_is_measured_too():
    torch.manual_seed(0)
    net = kn.convert_batchnorm(build_model("preact_resnet20", 10, width=8), micro_batch=2,
                               prediction="analytic")
    rows = kn.statistics_error(net, torch.randn(16, 3, 16, 16))
    assert len(rows) == 19 and all(r.prior_used > 0 for r in rows[1:])
    assert all(math.isfinite(r.estimate_log_var_error) for r in rows)
    # named as in the model the predictor wraps, after the conv whose output they normalize
    assert (rows[0].layer, rows[1].layer, rows[1].after) == ("norm0", "blocks.0.norm2",
                                                             "Conv2d 3x3")


def test_the_model_is_left_as_it_was_and_trains_on_unchanged():
    torch.manual_seed(0)
    net = kn.convert_batchnorm(build_model("preact_resnet20", 10, width=8), micro_batch=2,
                               generator=torch.Generator().manual_seed(1))
    twin = copy.deepcopy(net)
    net.eval()
    before = _buffers(net)
    kn.statistics_error(net, torch.randn(16, 3, 16, 16))
    assert not net.training and not any(m.training for m in net.modules())
    assert all(torch.equal(a, b) for a, b in zip(before, _buffers(net)))
    assert all("_step_observer" not in m.__dict__ for m in net.modules())
    # the same next training step, shadow-row samples included, as a copy never measured
    net.train()
    x = torch.randn(16, 3, 16, 16)
    torch.manual_seed(5)
    y = net(x)
    torch.manual_seed(5)
    assert torch.equal(y, twin.train()(x))
    assert all(torch.equal(a, b) for a, b in zip(_buffers(net), _buffers(twin)))


def test_a_torchvision_mobilenet_names_its_depthwise_convs():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = kn.convert_batchnorm(torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25),
                               micro_batch=2)
    rows = kn.statistics_error(net, torch.randn(8, 3, 64, 64))
    depthwise = [r for r in rows if r.after == "Conv2d 3x3 depthwise"]
    assert len(depthwise) == 17 and all(r.layer.endswith("conv.1.1") or r.layer.endswith(
        "conv.0.1") for r in depthwise)


def test_bad_input_names_the_problem_and_leaves_the_model_as_it_was():
    with pytest.raises(ValueError, match="convert it first"):
        kn.statistics_error(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
                            torch.randn(4, 3, 8, 8))
    whole = kn.convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="micro_batch=None"):
        kn.statistics_error(whole, torch.randn(4, 3, 8, 8))
    net = kn.convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                                             nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)),
                               micro_batch=2)
    before = _buffers(net)
    with pytest.raises(ValueError, match="pass a larger batch"):
        kn.statistics_error(net, torch.randn(2, 3, 8, 8))
    assert all(torch.equal(a, b) for a, b in zip(before, _buffers(net)))
    assert all("_step_observer" not in m.__dict__ for m in net.modules())
