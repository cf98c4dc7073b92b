"""Pure-torch stand-ins for torchvision's compiled ops, when the installed wheel's do not load.

Not imported by ``import kalmannorm``. Use: ``import kalmannorm.torchvision_ops as tvo;
tvo.install()`` before the first ``import torchvision`` (or ``import timm``); it does nothing
when torchvision's own ops load, and says whether the stand-ins are in use.

The torchvision wheel that matches the CPU torch pin on PyPI is a CUDA build whose C++ ops
(``torchvision::nms`` ...) do not load against the CPU torch; without them ``import torchvision``
fails (it registers fake kernels for ``nms``), and so does ``import timm``. :func:`install`
defines the two ops that import needs, implements ``nms`` greedily in torch and points
``torchvision.ops`` at it. ``roi_align`` needs nothing: torchvision falls back to its own Python
version when its ops are missing. Other compiled ops (``deform_conv2d``, ``ps_roi_align``...)
stay missing and raise when called.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch
from torch import Tensor

_LIBRARY = None  # the torch.library.Library that owns the stand-ins; kept alive here


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression, as ``torchvision.ops.nms``: indices of kept boxes,
    in decreasing score order."""
    order = scores.argsort(descending=True)
    boxes = boxes[order].float()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    iou = inter / (area[:, None] + area[None, :] - inter)
    keep = torch.ones(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1:] &= iou[i, i + 1:] <= iou_threshold
    return order[keep]


def _compiled_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    path = os.path.join(os.path.dirname(spec.origin), "_C.so")
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError):
        return False
    return True


def install() -> bool:
    """Make torchvision importable with a working ``nms``; return whether stand-ins are used."""
    global _LIBRARY
    if _LIBRARY is not None:
        return True
    if "torchvision" in sys.modules or _compiled_ops_load():
        return False
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.impl("nms", nms, "CPU")
    import torchvision.ops
    import torchvision.ops.boxes

    def ops_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
        return torch.ops.torchvision.nms(boxes, scores, iou_threshold)

    torchvision.ops.nms = torchvision.ops.boxes.nms = ops_nms
    return True
