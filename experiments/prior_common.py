"""Shared pieces of the prior study (issue 9): data, models and JSON records.

Uses the library's public API only (``kalmannorm.convert_batchnorm``, ``get_norm_layer``) and
the harness's model builder; the data sets are scikit-learn's digits (8x8, offline) and the
bundled CIFAR-10 subset (``datasets/cifar10-subset``, real 32x32 photographs).
"""
from __future__ import annotations

import io
import json
import os
import platform
import subprocess
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSET = os.path.join(ROOT, "datasets", "cifar10-subset", "cifar10_subset.npz")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> Dict[str, str]:
    import kalmannorm

    v = {"python": platform.python_version(), "torch": torch.__version__,
         "kalmannorm": kalmannorm.__version__, "numpy": np.__version__}
    try:
        v["torchvision"] = import_torchvision().__version__
    except (ImportError, RuntimeError):
        pass
    return v


_TV_OPS = (  # torchvision's C++ ops, declared so that its Python side imports without them
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
)
_TV_LIB = None


def import_torchvision():
    """``import torchvision``; the wheel here is a CUDA build whose C++ ops do not load against
    the CPU torch, so their schemas are declared first (classifiers never call them)."""
    global _TV_LIB
    try:
        import torchvision
        return torchvision
    except RuntimeError:
        pass
    import sys

    for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[key]
    if _TV_LIB is None:
        _TV_LIB = torch.library.Library("torchvision", "DEF")
        for schema in _TV_OPS:
            _TV_LIB.define(schema)
    import torchvision
    return torchvision


def write_json(path: str, record: Dict[str, Any]) -> None:
    """Write ``record`` atomically (a stopped run never leaves half a file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


# ----------------------------------------------------------------------------------------- data
def load_digits_tensors() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits 8x8, standardized with the training mean/std; fixed 80/20 split (seed 0)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32))[:, None]  # [N, 1, 8, 8]
    y = torch.from_numpy(bunch.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    tr, te = perm[:cut], perm[cut:]
    mean, std = x[tr].mean(), x[tr].std()
    return (x[tr] - mean) / std, y[tr], (x[te] - mean) / std, y[te]


def load_subset_tensors(path: str = SUBSET):
    """The bundled CIFAR-10 subset decoded to float tensors, per-channel standardized."""
    from PIL import Image

    with np.load(path) as z:
        out = []
        for split in ("train", "test"):
            data, offsets = z[f"{split}_jpeg"], z[f"{split}_offsets"]
            images = np.stack([
                np.asarray(Image.open(io.BytesIO(data[a:b].tobytes())).convert("RGB"))
                for a, b in zip(offsets[:-1], offsets[1:])
            ])
            out += [torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0,
                    torch.from_numpy(z[f"{split}_labels"].astype(np.int64))]
    xtr, ytr, xte, yte = out
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True)
    return (xtr - mean) / std, ytr, (xte - mean) / std, yte


# --------------------------------------------------------------------------------------- models
def build(arch: str, num_classes: int, in_channels: int, norm_layer,
          width: Optional[int] = None) -> nn.Module:
    """``preact_resnet*`` from the harness, or a torchvision classifier with random weights.

    ``mobilenet_v2_w050``: torchvision's MobileNetV2 at width 0.5 (inverted residuals,
    depthwise convs, ReLU6); ``efficientnet_b0`` (SiLU, squeeze-excitation). Their BatchNorms
    are built from ``norm_layer`` where the constructor takes one, else converted afterwards.
    """
    if arch.startswith("preact_resnet"):
        try:
            from kalmannorm.harness.models import build_model
        except ImportError:
            from kalmannorm.models import build_model
        width = width or (8 if in_channels == 1 else 16)
        return build_model(arch, num_classes, norm_layer, in_channels, width=width)
    torchvision = import_torchvision()
    if arch == "mobilenet_v2_w050":
        net = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=0.5,
                                              norm_layer=norm_layer)
    elif arch == "efficientnet_b0":
        net = torchvision.models.efficientnet_b0(num_classes=num_classes, norm_layer=norm_layer)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    if in_channels != 3:
        raise ValueError("torchvision models here take RGB input")
    return net
