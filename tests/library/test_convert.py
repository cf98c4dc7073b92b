"""convert_batchnorm / to_batchnorm: surgery, round trips, deployment."""
import copy
import io

import pytest
import torch
from torch import nn

import kalmannorm as kn


def make_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Identity(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.BatchNorm1d(8),
        nn.Linear(8, 3),
    )
    for m in net.modules():  # non-trivial buffers and affine parameters
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.normal_()
    return net


def test_convert_replaces_every_batchnorm_sharing_parameters_and_buffers():
    net = make_net()
    bns = {name: m for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net[5].eval()
    model = kn.convert_batchnorm(net, gain=0.5, micro_batch=2, guard_threshold=10.0)
    # the model itself, with the prediction attached (as convert_sync_batchnorm returns it)
    assert model is net and isinstance(kn.predictor_of(net), kn.KalmanPredictor)
    assert isinstance(net[1], kn.BatchKalmanNorm2d) and isinstance(net[10], kn.BatchKalmanNorm1d)
    assert net[1].weight is bns["1"].weight and net[1].running_var is bns["1"].running_var
    assert net[1].training and not net[5].training
    assert (net[1].gain, net[1].micro_batch, net[1].guard_threshold) == (0.5, 2, 10.0)
    # the optimizer built before the conversion still updates the layers' parameters
    net[5].train()
    out = model(torch.randn(4, 3, 8, 8))
    # weighted: a plain sum of normalized outputs can be constant in earlier layers' affines
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    before = net[1].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, net[1].weight)


def test_round_trip_preserves_eval_outputs_and_state_dict():
    net = make_net().eval()
    x = torch.randn(5, 3, 8, 8)
    expected = net(x)
    keys = set(net.state_dict())
    model = kn.convert_batchnorm(net, micro_batch=2)
    assert set(model.state_dict()) == keys
    assert torch.equal(model(x), expected)
    deployed = kn.to_batchnorm(model)
    assert not any(isinstance(m, (kn.KalmanPredictor, kn.BatchKalmanNorm2d))
                   for m in deployed.modules())
    assert isinstance(deployed[1], nn.BatchNorm2d) and isinstance(deployed[10], nn.BatchNorm1d)
    assert set(deployed.state_dict()) == keys
    assert torch.equal(deployed(x), expected)
    # to_batchnorm leaves the model it was given untouched
    assert isinstance(model[1], kn.BatchKalmanNorm2d) and kn.predictor_of(model) is not None


def test_trained_model_deploys_bit_for_bit():
    model = kn.convert_batchnorm(make_net(), micro_batch=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 3, 8, 8)).square().mean().backward()
        opt.step()
    model.eval()
    deployed = kn.to_batchnorm(model)
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(deployed(x), model(x))
    assert deployed.training is False and deployed[1].training is False


def test_deployed_model_exports_and_folds():
    model = kn.convert_batchnorm(make_net(), micro_batch=2)
    model(torch.randn(4, 3, 8, 8))
    deployed = kn.to_batchnorm(model).eval()
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(deployed, (x,))
    torch.testing.assert_close(exported.module()(x), deployed(x))
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(deployed[0], deployed[1])
    torch.testing.assert_close(fused(x), deployed[1](deployed[0](x)), rtol=1e-5, atol=1e-5)


def test_deployed_model_exports_to_onnx():
    pytest.importorskip("onnx")
    import onnx

    model = kn.convert_batchnorm(make_net(), micro_batch=2).eval()
    buffer = io.BytesIO()
    torch.onnx.export(kn.to_batchnorm(model), (torch.randn(2, 3, 8, 8),), buffer, dynamo=False)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    ops = {node.op_type for node in graph.node}
    assert "BatchNormalization" in ops or "Conv" in ops  # BN may be folded into the conv


@pytest.mark.parametrize("shape, bn", [((4, 6), nn.BatchNorm1d), ((4, 6, 5), nn.BatchNorm1d),
                                       ((4, 6, 3, 3), nn.BatchNorm2d),
                                       ((4, 6, 2, 3, 3), nn.BatchNorm3d)])
def test_sync_batchnorm_takes_the_rank_of_its_input(shape, bn):
    # issue 8 item 3: SyncBatchNorm used to become BatchKalmanNorm2d whatever its input
    torch.manual_seed(0)
    net = nn.Sequential(nn.SyncBatchNorm(6), nn.ReLU(), nn.SyncBatchNorm(6))
    reference = copy.deepcopy(net)
    for m in reference.modules():
        if isinstance(m, nn.SyncBatchNorm):
            reference._modules[next(k for k, v in reference._modules.items() if v is m)] = _bn_like(m, bn)
    model = kn.convert_batchnorm(net, gain=0.0, micro_batch=None, rows_per_group=2)
    assert isinstance(net[0], kn.BatchKalmanNormNd)
    x = torch.randn(shape)
    torch.testing.assert_close(model(x), reference(x))  # gain 0: BatchNorm in training
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x))
    deployed = kn.to_batchnorm(model)
    assert type(deployed[0]) is bn and torch.equal(deployed(x), model(x))


def _bn_like(sync: nn.SyncBatchNorm, cls: type) -> nn.Module:
    bn = cls(sync.num_features)
    bn.load_state_dict(sync.state_dict())
    return bn


def test_convert_errors():
    with pytest.raises(ValueError, match="found no BatchNorm layer to convert in Sequential"):
        kn.convert_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2)))
    model = kn.convert_batchnorm(make_net())
    with pytest.raises(TypeError, match=r"already converted; change its options with "
                                        r"kalmannorm.configure"):
        kn.convert_batchnorm(model)
    with pytest.raises(ValueError, match="gain must be in"):
        kn.convert_batchnorm(make_net(), gain=2.0)


def test_checkpoint_of_batchnorm_model_loads_into_converted_model():
    trained = make_net()
    model = kn.convert_batchnorm(copy.deepcopy(make_net()).apply(
        lambda m: m.reset_parameters() if isinstance(m, nn.BatchNorm2d) else None))
    model.load_state_dict(trained.state_dict())
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), trained.eval()(x))
