"""torchvision's and timm's own utilities on a model converted in one call (issue 15): the
converted model is the user's model (class, attributes, methods, state dict keys)."""
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchvision")
pytest.importorskip("timm")

import timm  # noqa: E402
import torchvision  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

import kalmannorm as kn  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BKN_LEAVES = [kn.BatchKalmanNorm1d, kn.BatchKalmanNorm2d, kn.BatchKalmanNorm3d,
              kn.BatchKalmanNormNd, kn.BatchKalmanNormAct2d, kn.BatchKalmanNormActNd]


def train_step(model, optimizer, x, y):
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.zoo
def test_torchvision_resnet18_keeps_its_class_head_and_feature_extraction():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5)
    keys = list(net.state_dict())
    model = kn.convert_batchnorm(net, micro_batch=2)
    assert model is net and type(model) is torchvision.models.ResNet
    assert list(model.state_dict()) == keys
    model.fc = nn.Linear(model.fc.in_features, 3)  # a new head, as in fine-tuning
    optimizer = torch.optim.SGD([  # per-layer learning rates
        {"params": model.layer4.parameters(), "lr": 0.01},
        {"params": model.fc.parameters(), "lr": 0.1},
    ], lr=0.0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    before = model.fc.weight.detach().clone()
    assert torch.isfinite(train_step(model, optimizer, x, y))
    assert not torch.equal(before, model.fc.weight)
    assert kn.guard_report(model)["priors"] > 0
    # feature extraction: the BKN layers as leaves (fx cannot trace their data-dependent
    # control flow); the extractor shares the layers and takes its own prediction
    extractor = create_feature_extractor(model, {"layer3": "mid", "layer4": "out"},
                                         tracer_kwargs={"leaf_modules": BKN_LEAVES})
    extractor = kn.KalmanPredictor.attach(extractor)
    rows = []
    model.layer4[0].bn1.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    features = extractor(x)
    assert features["out"].shape == (4, 512, 1, 1) and rows == [4 + 2]
    # eval: the extractor's outputs are the model's own layers'
    model.eval()
    extractor.eval()
    with torch.no_grad():
        reference = model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))
        assert torch.equal(extractor(x)["out"], reference)


@pytest.mark.zoo
def test_timm_model_keeps_its_api_and_trains_with_timm_optimizer():
    torch.manual_seed(0)
    from timm.optim import create_optimizer_v2

    model = timm.create_model("mobilenetv3_small_050", num_classes=5)
    converted = kn.convert_batchnorm(model, micro_batch=2)
    assert converted is model and model.num_classes == 5
    assert model.pretrained_cfg["architecture"] == "mobilenetv3_small_050"
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model.num_classes == 3
    # timm's per-layer parameter groups (layer decay uses the model's group_matcher)
    optimizer = create_optimizer_v2(model, "sgd", lr=0.05, weight_decay=1e-4, layer_decay=0.7)
    assert len(optimizer.param_groups) > 2
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    assert torch.isfinite(train_step(model, optimizer, x, y))
    assert kn.guard_report(model)["priors"] > 0
    # forward_features does not carry the prediction: per-group BatchNorm, with a warning
    model.eval()
    assert model.forward_features(x).shape[0] == 4
    deployed = kn.to_batchnorm(model)
    assert type(deployed) is type(model)
    with torch.no_grad():
        assert torch.equal(deployed(x), model(x))


@pytest.mark.zoo
def test_timm_norm_layer_builds_bkn_and_attach_keeps_the_class():
    model = timm.create_model("resnet18", num_classes=4,
                              norm_layer=partial(kn.BatchKalmanNorm2d, micro_batch=2))
    assert isinstance(model.bn1, kn.BatchKalmanNorm2d)
    assert kn.KalmanPredictor.attach(model) is model
    model.reset_classifier(2)
    rows = []
    model.layer2[0].bn1.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 2) and rows == [4 + 2]


@pytest.mark.zoo
def test_deployed_model_exports_with_the_default_onnx_exporter(tmp_path):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    model = kn.convert_batchnorm(torchvision.models.resnet18(num_classes=5), micro_batch=2)
    model(torch.randn(4, 3, 32, 32))
    deployed = kn.to_batchnorm(model.eval())
    path = tmp_path / "model.onnx"
    torch.onnx.export(deployed, (torch.randn(2, 3, 32, 32),), str(path))  # torch's default
    graph = onnx.load(str(path)).graph
    assert any(node.op_type in ("BatchNormalization", "Conv") for node in graph.node)


@pytest.mark.zoo
def test_readme_detection_recipe_runs_in_a_fresh_interpreter():
    """The README's detection snippet, as written, in this interpreter's environment (the
    project's .venv under `make test`), without the test suite's set-up."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("**Detection and segmentation.**", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    assert "convert_batchnorm(model.backbone" in code
    result = subprocess.run([sys.executable, "-c", code + "\nprint(sorted(losses))"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loss_classifier" in result.stdout
