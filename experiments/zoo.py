"""The model zoo: torchvision and timm models with random weights, and the checks BKN must pass
on each (issue 8). Used by ``tests/zoo`` and ``experiments/model_zoo.py``.

Per model, at batch 4 = 2 statistics groups of 2 and small inputs (32 px; detection 64 px;
video 2 frames of 16 px), so that the whole zoo runs on a CPU:

- ``converts``: :func:`kalmannorm.convert_batchnorm` (detection models: their backbone, the
  README's recipe) succeeds;
- ``trains``: one SGD step through the model's own training API gives a finite loss and finite
  gradients;
- ``fused_equals_composite``: the step's gradients with the fused CPU kernel equal the composite
  form's (float64, relative difference < 1e-6);
- ``groups_independent``: changing group 1's input leaves group 0's outputs bitwise unchanged,
  at the layers' defaults (guard and measured gain decided per group);
- ``deploy_equal``: :func:`kalmannorm.to_batchnorm` of the eval-mode model gives identical
  outputs;
- ``analytic``: ``"accepted"`` (and a finite step) or the refusal's first line;
- step times of BatchNorm and BKN training steps (median of a few, CPU; only when timing).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List

import torch
from torch import Tensor, nn

import torchvision_ops

import kalmannorm as kn

torchvision_ops.install()

BATCH, MICRO_BATCH = 4, 2


@dataclass
class Spec:
    """One zoo model: how to build it and what it eats."""

    name: str
    source: str  # "torchvision" or "timm"
    kind: str  # classification, segmentation, detection, video
    build: Callable[[], nn.Module]
    input_shape: tuple = (BATCH, 3, 32, 32)
    fast: bool = False  # in the CI subset
    family: str = ""
    kwargs: Dict[str, Any] = field(default_factory=dict)


def _tv(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm
        return tvm.get_model(name, weights=None, **kwargs)
    return build


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return build


_DET = dict(weights_backbone=None, num_classes=3, min_size=64, max_size=64)
# Region-based detectors: fewer proposals and sampled regions, for CPU time (the backbone is the
# same).
_RCNN = dict(_DET, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
             rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64,
             box_batch_size_per_image=64, box_detections_per_img=20)

SPECS: List[Spec] = [
    # torchvision classification
    Spec("resnet18", "torchvision", "classification", _tv("resnet18", num_classes=10), fast=True),
    Spec("resnet50", "torchvision", "classification", _tv("resnet50", num_classes=10)),
    Spec("resnext50_32x4d", "torchvision", "classification", _tv("resnext50_32x4d", num_classes=10)),
    Spec("wide_resnet50_2", "torchvision", "classification", _tv("wide_resnet50_2", num_classes=10)),
    Spec("mobilenet_v2", "torchvision", "classification", _tv("mobilenet_v2", num_classes=10)),
    Spec("mobilenet_v3_small", "torchvision", "classification",
         _tv("mobilenet_v3_small", num_classes=10)),
    Spec("mobilenet_v3_large", "torchvision", "classification",
         _tv("mobilenet_v3_large", num_classes=10)),
    Spec("efficientnet_b0", "torchvision", "classification", _tv("efficientnet_b0", num_classes=10)),
    Spec("regnet_y_400mf", "torchvision", "classification", _tv("regnet_y_400mf", num_classes=10)),
    Spec("shufflenet_v2_x0_5", "torchvision", "classification",
         _tv("shufflenet_v2_x0_5", num_classes=10)),
    Spec("mnasnet0_5", "torchvision", "classification", _tv("mnasnet0_5", num_classes=10)),
    Spec("densenet121", "torchvision", "classification", _tv("densenet121", num_classes=10)),
    Spec("googlenet", "torchvision", "classification",
         _tv("googlenet", num_classes=10, aux_logits=True, init_weights=True)),
    Spec("inception_v3", "torchvision", "classification",
         _tv("inception_v3", num_classes=10, aux_logits=False, init_weights=True),
         input_shape=(BATCH, 3, 80, 80)),
    Spec("vgg11_bn", "torchvision", "classification", _tv("vgg11_bn", num_classes=10)),
    # torchvision segmentation
    Spec("deeplabv3_mobilenet_v3_large", "torchvision", "segmentation",
         _tv("deeplabv3_mobilenet_v3_large", weights_backbone=None, num_classes=3), fast=True),
    Spec("deeplabv3_resnet50", "torchvision", "segmentation",
         _tv("deeplabv3_resnet50", weights_backbone=None, num_classes=3, aux_loss=True)),
    Spec("fcn_resnet50", "torchvision", "segmentation",
         _tv("fcn_resnet50", weights_backbone=None, num_classes=3)),
    Spec("lraspp_mobilenet_v3_large", "torchvision", "segmentation",
         _tv("lraspp_mobilenet_v3_large", weights_backbone=None, num_classes=3)),
    # torchvision detection (backbone converted)
    Spec("fasterrcnn_mobilenet_v3_large_fpn", "torchvision", "detection",
         _tv("fasterrcnn_mobilenet_v3_large_fpn", **_RCNN), fast=True),
    Spec("fasterrcnn_resnet50_fpn_v2", "torchvision", "detection",
         _tv("fasterrcnn_resnet50_fpn_v2", **_RCNN)),
    Spec("retinanet_resnet50_fpn", "torchvision", "detection", _tv("retinanet_resnet50_fpn", **_DET)),
    Spec("fcos_resnet50_fpn", "torchvision", "detection", _tv("fcos_resnet50_fpn", **_DET)),
    Spec("maskrcnn_resnet50_fpn", "torchvision", "detection", _tv("maskrcnn_resnet50_fpn", **_RCNN)),
    Spec("ssdlite320_mobilenet_v3_large", "torchvision", "detection",
         _tv("ssdlite320_mobilenet_v3_large", weights_backbone=None, num_classes=3)),
    # torchvision video (BatchNorm3d)
    Spec("r3d_18", "torchvision", "video", _tv("r3d_18", num_classes=10),
         input_shape=(BATCH, 3, 2, 16, 16), fast=True),
    Spec("r2plus1d_18", "torchvision", "video", _tv("r2plus1d_18", num_classes=10),
         input_shape=(BATCH, 3, 2, 16, 16)),
    # timm, one or two per family
    Spec("timm/resnet10t", "timm", "classification", _timm("resnet10t"), family="resnet"),
    Spec("timm/efficientnet_b0", "timm", "classification", _timm("efficientnet_b0"),
         family="efficientnet"),
    Spec("timm/mobilenetv3_small_050", "timm", "classification", _timm("mobilenetv3_small_050"),
         family="mobilenetv3", fast=True),
    Spec("timm/regnety_002", "timm", "classification", _timm("regnety_002"), family="regnet"),
    Spec("timm/cspresnet50", "timm", "classification", _timm("cspresnet50"), family="cspnet"),
    Spec("timm/rexnet_100", "timm", "classification", _timm("rexnet_100"), family="rexnet"),
    Spec("timm/ghostnet_100", "timm", "classification", _timm("ghostnet_100"), family="ghostnet"),
    Spec("timm/levit_128s", "timm", "classification", _timm("levit_128s", img_size=32),
         family="levit"),
    Spec("timm/densenet121", "timm", "classification", _timm("densenet121"), family="densenet"),
    Spec("timm/dpn68", "timm", "classification", _timm("dpn68"), family="dpn"),
    Spec("timm/hrnet_w18_small", "timm", "classification", _timm("hrnet_w18_small"),
         family="hrnet"),
    Spec("timm/mixnet_s", "timm", "classification", _timm("mixnet_s"), family="efficientnet"),
    Spec("timm/lcnet_050", "timm", "classification", _timm("lcnet_050"), family="mobilenetv3"),
    Spec("timm/dla34", "timm", "classification", _timm("dla34"), family="dla"),
    Spec("timm/ese_vovnet19b_dw", "timm", "classification", _timm("ese_vovnet19b_dw"),
         family="vovnet"),
    Spec("timm/selecsls42b", "timm", "classification", _timm("selecsls42b"), family="selecsls"),
    Spec("timm/resnest14d", "timm", "classification", _timm("resnest14d"), family="resnest"),
]

SPEC_BY_NAME = {spec.name: spec for spec in SPECS}


@contextlib.contextmanager
def backend(name: str):
    """The BKN kernel: ``kn.use_backend`` where the library has it, else the environment switch."""
    if hasattr(kn, "use_backend"):
        with kn.use_backend(name):
            yield
        return
    old = os.environ.get("KALMANNORM_FUSED")
    os.environ["KALMANNORM_FUSED"] = "0" if name == "composite" else "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["KALMANNORM_FUSED"]
        else:
            os.environ["KALMANNORM_FUSED"] = old


def _no_dropout(model: nn.Module) -> nn.Module:
    """Dropout and stochastic depth off, so that two runs of a step are comparable."""
    for m in model.modules():
        if isinstance(m, nn.Dropout) or type(m).__name__ in ("DropPath", "StochasticDepth"):
            m.p = 0.0
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0
    return model


def make_inputs(spec: Spec, seed: int = 0):
    """``(args, targets)`` for one training call of the model."""
    g = torch.Generator().manual_seed(seed)
    if spec.kind == "detection":
        x = torch.randn((BATCH, 3, 64, 64), generator=g)
    else:
        x = torch.randn(spec.input_shape, generator=g)
    if spec.kind != "detection":
        return x, None
    images = list(x)
    targets = []
    for _ in images:
        corner = torch.rand(2, 2, generator=g) * 32
        boxes = torch.cat([corner[:, :2], corner[:, :2] + 16 + torch.rand(2, 2, generator=g) * 16], 1)
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]),
                        "masks": torch.zeros(2, 64, 64, dtype=torch.uint8)})
    return images, targets


def _tensors(obj) -> List[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def loss_of(spec: Spec, model: nn.Module, inputs, targets) -> Tensor:
    if spec.kind == "detection":
        return sum(model(inputs, targets).values())
    return sum(t.float().square().mean() for t in _tensors(model(inputs))
               if t.is_floating_point())


def convert(spec: Spec, model: nn.Module, **options) -> nn.Module:
    """The zoo's conversion: the whole model, or a detection model's backbone (README recipe)."""
    options.setdefault("micro_batch", MICRO_BATCH)
    options.setdefault("generator", torch.Generator().manual_seed(1))
    if spec.kind == "detection":
        model.backbone = kn.convert_batchnorm(model.backbone, **options)
        return model
    return kn.convert_batchnorm(model, **options)


def build(spec: Spec, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _no_dropout(spec.build()).train()


def grads_after_step(spec: Spec, model: nn.Module, inputs, targets, seed: int = 2):
    """Loss and gradients of one training step, with the shadow-row samples reseeded."""
    for m in model.modules():
        predictor = kn.predictor_of(m)
        if predictor is not None and predictor.shadow_batch.generator is not None:
            predictor.shadow_batch.generator.manual_seed(seed)
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = loss_of(spec, model, inputs, targets)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def relative_difference(a: Dict[str, Tensor], b: Dict[str, Tensor]) -> float:
    """``|a - b| / |b|`` over all parameters' gradients together (a per-parameter ratio is
    noise on parameters whose gradient is zero up to rounding, e.g. a bias before a norm)."""
    diff = sum((a[name] - gb).double().square().sum() for name, gb in b.items())
    norm = sum(gb.double().square().sum() for gb in b.values())
    return float((diff / norm).sqrt()) if norm > 0 else float(diff.sqrt())


def backbone_of(spec: Spec, model: nn.Module) -> nn.Module:
    return model.backbone if spec.kind == "detection" else model


def groups_independent(spec: Spec, model: nn.Module, inputs) -> Dict[str, bool]:
    """Whether group 0's outputs stay bitwise unchanged when group 1's input changes (training
    mode, the layers' defaults: every decision per group)."""
    part = backbone_of(spec, model)
    x = torch.stack(inputs) if spec.kind == "detection" else inputs
    if spec.kind == "detection":  # the backbone sees the transformed, batched images
        x = model.transform(list(x))[0].tensors
    y = x.clone()
    y[MICRO_BATCH:] = torch.randn(y[MICRO_BATCH:].shape, generator=torch.Generator().manual_seed(4))
    outputs = []
    for z in (x, y):
        for m in part.modules():
            if kn.predictor_of(m) is not None:
                kn.predictor_of(m).shadow_batch.generator.manual_seed(3)
        torch.manual_seed(3)
        with torch.no_grad():
            outputs.append([t[:MICRO_BATCH] for t in _tensors(part(z)) if t.dim() > 0
                            and t.shape[0] == BATCH])
    return {"groups_independent": bool(outputs[0]) and all(
        _bitwise_equal(a, b) for a, b in zip(*outputs))}


def deploy_equal(spec: Spec, model: nn.Module, inputs) -> bool:
    model.eval()
    deployed = kn.to_batchnorm(model)
    if any(isinstance(m, (kn.KalmanPredictor, kn.modules._BatchKalmanNorm))
           for m in deployed.modules()):
        return False
    with torch.no_grad():
        a, b = _tensors(model(inputs)), _tensors(deployed(inputs))
    model.train()
    return len(a) == len(b) and all(_bitwise_equal(s, t) for s, t in zip(a, b))


def _bitwise_equal(a: Tensor, b: Tensor) -> bool:
    """Equal values, NaN where the other has NaN (an untrained deep net in eval mode can
    overflow: its running statistics have seen one step)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def has_one_value_rows(model: nn.Module, spec: Spec, inputs, targets) -> bool:
    """Whether some BKN layer gets one value per channel per row (issue 8 defect 1's case)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0][0, 0].numel() == 1))
             for m in model.modules() if isinstance(m, kn.modules._BatchKalmanNorm)]
    try:
        with torch.no_grad():
            loss_of(spec, model, inputs, targets)
    finally:
        for h in hooks:
            h.remove()
    return any(seen)


def analytic_status(spec: Spec, inputs, targets) -> str:
    """``"accepted"`` when the analytic prediction converts the model and steps, else the
    refusal's first line."""
    model = build(spec)
    try:
        if spec.kind == "detection":
            model.backbone = kn.convert_batchnorm(model.backbone, micro_batch=MICRO_BATCH,
                                                  prediction="analytic")
        else:
            model = kn.convert_batchnorm(model, micro_batch=MICRO_BATCH, prediction="analytic")
        loss = loss_of(spec, model, inputs, targets)
        loss.backward()
    except (NotImplementedError, TypeError, ValueError) as err:
        return f"refused: {type(err).__name__}: {str(err).splitlines()[0].split('; supported')[0]}"
    return "accepted" if torch.isfinite(loss) else "accepted, non-finite loss"


def step_time(spec: Spec, model: nn.Module, inputs, targets, repeats: int = 1) -> float:
    """Median seconds of a training step (forward, backward), after one warm-up."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss_of(spec, model, inputs, targets).backward()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def check(spec: Spec, *, timing: bool = False, analytic: bool = True) -> Dict[str, Any]:
    """Run every zoo check on one model; return the results (see the module docstring)."""
    inputs, targets = make_inputs(spec)
    result: Dict[str, Any] = {"model": spec.name, "source": spec.source, "kind": spec.kind,
                              "family": spec.family or spec.name.split("_")[0],
                              "input_shape": [len(inputs), *inputs[0].shape]}
    if timing:
        result["bn_step_s"] = step_time(spec, build(spec), inputs, targets)
    model = build(spec)
    result["batchnorm_layers"] = sum(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                     for m in model.modules())
    try:
        model = convert(spec, model)
    except Exception as err:  # reported, not raised: the record lists what failed
        result.update(converts=False, error=f"{type(err).__name__}: {err}")
        return result
    result["converts"] = True
    result["bkn_layers"] = sum(isinstance(m, kn.modules._BatchKalmanNorm)
                               for m in model.modules())
    # The fused CPU kernel against the composite form, from the same state, in float64: in
    # float32 the two differ by rounding, which layers with two values per channel and group
    # (1x1 maps at micro-batch 2) amplify without bound.
    # Detection: the backbone (the part converted), on the transformed, batched images.
    wide_spec, wide, wide_inputs = spec, copy.deepcopy(model).double(), inputs
    if spec.kind == "detection":
        wide_spec = dataclasses.replace(spec, kind="backbone")
        wide, wide_inputs = wide.backbone, model.transform(list(inputs))[0].tensors
    wide_inputs = wide_inputs.double()
    start = copy.deepcopy(wide.state_dict())
    with backend("composite"):
        _, composite = grads_after_step(wide_spec, wide, wide_inputs, None)
    wide.load_state_dict(start)
    with backend("cpu_fused"):
        _, fused = grads_after_step(wide_spec, wide, wide_inputs, None)
    result["fused_vs_composite_rel_diff"] = relative_difference(fused, composite)
    result["fused_equals_composite"] = result["fused_vs_composite_rel_diff"] < 1e-6
    del wide, composite, fused
    with backend("composite"):  # the step the model keeps
        loss, grads = grads_after_step(spec, model, inputs, targets)
    result["loss"] = loss.item()
    result["trains"] = bool(torch.isfinite(loss)) and all(
        bool(torch.isfinite(g).all()) for g in grads.values())
    with backend("composite"):
        result["one_value_rows"] = has_one_value_rows(model, spec, inputs, targets)
        result.update(groups_independent(spec, model, inputs))
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    result["deploy_equal"] = deploy_equal(spec, model, inputs)
    with torch.no_grad():
        result["eval_finite"] = all(bool(torch.isfinite(t).all()) for t in
                                    _tensors(model.eval()(inputs)) if t.is_floating_point())
    model.train()
    if timing:  # last: the timed steps update the running statistics
        result["bkn_step_s"] = step_time(spec, model, inputs, targets)
        result["step_time_ratio"] = result["bkn_step_s"] / result["bn_step_s"]
    if analytic:
        result["analytic"] = analytic_status(spec, inputs, targets)
    return result
