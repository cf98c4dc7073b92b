"""The README's detection recipe (issue 8 item 6): convert a torchvision detection model's
backbone and train through the model's own API (images + targets -> loss dict)."""
import copy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

import zoo  # noqa: E402  (installs the nms stand-in before torchvision is used)
import kalmannorm as kn  # noqa: E402


@pytest.mark.zoo
def test_detection_backbone_recipe_trains_through_the_loss_dict():
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_fpn(weights=None, **zoo._RCNN)  # small, for the CPU
    keys = list(model.state_dict())
    original = copy.deepcopy(model)
    # a list of images is refused by name, pointing at the recipe
    with pytest.raises(ValueError, match="model.backbone"):
        kn.convert_batchnorm(copy.deepcopy(model), micro_batch=2)(*zoo.make_inputs(
            zoo.SPEC_BY_NAME["fasterrcnn_mobilenet_v3_large_fpn"]))
    model.backbone = kn.convert_batchnorm(model.backbone, micro_batch=2)  # the recipe
    assert list(model.state_dict()) == keys
    images, targets = zoo.make_inputs(zoo.SPEC_BY_NAME["fasterrcnn_mobilenet_v3_large_fpn"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                           "loss_rpn_box_reg"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    counts = kn.guard_report(model)
    assert counts["priors"] > 0  # every BKN layer after the first received a prediction
    # the trained weights load strictly into the original BatchNorm model; eval outputs match
    model.eval()
    original.load_state_dict(model.state_dict(), strict=True)
    original.eval()
    with torch.no_grad():
        mine, theirs = model(images), original(images)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(mine, theirs) for k in a)
