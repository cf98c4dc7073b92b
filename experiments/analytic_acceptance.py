"""Which real models the analytic prediction follows: a JSON record and docs/analytic.md.

For each torchvision / timm model (random weights) this converts every BatchNorm layer with
``convert_batchnorm(..., prediction="analytic")`` and, when the conversion is accepted, takes
one training step (batch 4 = 2 groups of 2) and checks that the loss and gradients are finite
and that the priors were used. A refusal is recorded with the op the analytic prediction has no
rule for. Detection models are measured on their backbone (the part a user converts, see the
README's detection recipe); timm's ``BatchNormAct2d`` is split into BatchNorm + drop + act
before the conversion (``split_norm_act``), as in the committed records: the analytic
prediction now follows the converted norm+act layer itself, with the same rules.
Needs torchvision and timm (``pip install torchvision timm`` with torch pinned); where the
torchvision wheel's C++ ops do not load, ``register_nms`` defines a pure-torch ``nms``.

    python experiments/analytic_acceptance.py --label after          # all models -> record
    python experiments/analytic_acceptance.py --only resnet18 --label x --no-write
    python experiments/analytic_acceptance.py --render docs/records/analytic-acceptance-before.json docs/records/analytic-acceptance-after.json

The record stores the configuration, the git commit, the versions and per model: accepted,
the refusal (op and message), the step's outcome, the moment rules used and the time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

import kalmannorm
from kalmannorm import convert_batchnorm, guard_counts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = os.path.join("docs", "records")
PAGE = os.path.join("docs", "analytic.md")
SCHEMA = "kalmannorm.analytic-acceptance/1"


# ------------------------------------------------------------------------------ the models

def register_nms() -> None:
    """Define ``torchvision::nms`` in pure torch if torchvision's C++ ops do not load.

    The torchvision wheel installed beside the CPU torch here is a CUDA build whose ops fail to
    load, and ``import torchvision`` then fails on its ``nms`` fake registration. Detection
    backbones never call it; the greedy version below is correct but slow.
    """
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for module in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
        del sys.modules[module]  # the failed, partial import
    lib = torch.library.Library("torchvision", "DEF")
    register_nms.lib = lib  # keep the definitions alive
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

    def nms(dets, scores, iou_threshold):
        import torchvision.ops.boxes as boxes

        order = scores.argsort(descending=True)
        keep = []
        while order.numel():
            i = order[0]
            keep.append(i)
            iou = boxes.box_iou(dets[i].unsqueeze(0), dets[order[1:]])[0]
            order = order[1:][iou <= iou_threshold]
        return torch.stack(keep) if keep else order

    for op in ("nms", "qnms"):
        lib.impl(op, nms, "CompositeExplicitAutograd")
    import torchvision  # noqa: F401,F811


def _tv(name: str, **kw) -> Callable[[], nn.Module]:
    def build():
        import torchvision

        return torchvision.models.get_model(name, weights=None, **kw)
    return build


def _tv_seg(name: str) -> Callable[[], nn.Module]:
    def build():
        import torchvision

        model = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                             num_classes=5, aux_loss=None)
        return _OutKey(model)
    return build


def _tv_det_backbone(name: str) -> Callable[[], nn.Module]:
    def build():
        import torchvision

        model = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                             num_classes=5)
        return _DictToTuple(model.backbone)
    return build


def _timm(name: str, **kw) -> Callable[[], nn.Module]:
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kw)
    return build


class _OutKey(nn.Module):
    """A segmentation model's ``out`` map (the training loss reads it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


class _DictToTuple(nn.Module):
    """A detection backbone's feature maps, as a tuple."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return tuple(self.backbone(x).values())


class _MLP(nn.Module):
    """A BatchNorm1d MLP on ``[N, C]``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * 8 * 8, 64), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Dropout(0.1), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.GELU(), nn.Linear(64, 10),
        )

    def forward(self, x):
        return self.net(x)


# name -> (builder, input shape of one row)
IMAGE = (3, 64, 64)
MODELS: Dict[str, tuple] = {
    "tv/resnet18": (_tv("resnet18"), IMAGE),
    "tv/resnet50": (_tv("resnet50"), IMAGE),
    "tv/resnext50_32x4d": (_tv("resnext50_32x4d"), IMAGE),
    "tv/wide_resnet50_2": (_tv("wide_resnet50_2"), IMAGE),
    "tv/mobilenet_v2": (_tv("mobilenet_v2"), IMAGE),
    "tv/mobilenet_v3_small": (_tv("mobilenet_v3_small"), IMAGE),
    "tv/mobilenet_v3_large": (_tv("mobilenet_v3_large"), IMAGE),
    "tv/efficientnet_b0": (_tv("efficientnet_b0"), IMAGE),
    "tv/efficientnet_v2_s": (_tv("efficientnet_v2_s"), IMAGE),
    "tv/regnet_y_400mf": (_tv("regnet_y_400mf"), IMAGE),
    "tv/regnet_x_400mf": (_tv("regnet_x_400mf"), IMAGE),
    "tv/shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), IMAGE),
    "tv/mnasnet0_5": (_tv("mnasnet0_5"), IMAGE),
    "tv/densenet121": (_tv("densenet121"), IMAGE),
    "tv/googlenet": (_tv("googlenet", aux_logits=False, init_weights=False), IMAGE),
    "tv/inception_v3": (_tv("inception_v3", aux_logits=False, init_weights=False), (3, 96, 96)),
    "tv/deeplabv3_mobilenet_v3_large": (_tv_seg("deeplabv3_mobilenet_v3_large"), IMAGE),
    "tv/fcn_resnet50": (_tv_seg("fcn_resnet50"), IMAGE),
    "tv/lraspp_mobilenet_v3_large": (_tv_seg("lraspp_mobilenet_v3_large"), IMAGE),
    "tv/fasterrcnn_mobilenet_v3_large_fpn (backbone)":
        (_tv_det_backbone("fasterrcnn_mobilenet_v3_large_fpn"), IMAGE),
    "tv/retinanet_resnet50_fpn (backbone)": (_tv_det_backbone("retinanet_resnet50_fpn"), IMAGE),
    "tv/r3d_18": (_tv("r3d_18"), (3, 4, 32, 32)),
    "mlp (BatchNorm1d)": (_MLP, (3, 8, 8)),
    "timm/resnet18": (_timm("resnet18"), IMAGE),
    "timm/efficientnet_b0": (_timm("efficientnet_b0"), IMAGE),
    "timm/mobilenetv3_large_100": (_timm("mobilenetv3_large_100"), IMAGE),
    "timm/regnety_002": (_timm("regnety_002"), IMAGE),
    "timm/cspresnet50": (_timm("cspresnet50"), IMAGE),
    "timm/rexnet_100": (_timm("rexnet_100"), IMAGE),
    "timm/ghostnet_100": (_timm("ghostnet_100"), IMAGE),
    "timm/dpn68": (_timm("dpn68"), IMAGE),
    "timm/hrnet_w18_small": (_timm("hrnet_w18_small"), IMAGE),
    "timm/levit_128s": (_timm("levit_128s"), (3, 224, 224)),
    "timm/densenet121": (_timm("densenet121"), IMAGE),
    "timm/mixnet_s": (_timm("mixnet_s"), IMAGE),
    "timm/dla34": (_timm("dla34"), IMAGE),
    "timm/res2net50_14w_8s": (_timm("res2net50_14w_8s"), IMAGE),
    "timm/resnest14d": (_timm("resnest14d"), IMAGE),
    "timm/ese_vovnet19b_dw": (_timm("ese_vovnet19b_dw"), IMAGE),
    "timm/lcnet_050": (_timm("lcnet_050"), IMAGE),
}


def split_norm_act(model: nn.Module) -> int:
    """Replace timm's ``BatchNormAct2d`` by ``Sequential(BatchNorm2d, drop, act)`` in place.

    What ``convert_batchnorm`` now follows itself (a ``BatchKalmanNormAct2d``): the same
    function, the same parameters and buffers. Returns the number of layers replaced.
    """
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:
        return 0
    count = 0
    for name, child in list(model.named_children()):
        if type(child) is BatchNormAct2d:
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(model, name, nn.Sequential(bn, child.drop, child.act))
            count += 1
        else:
            count += split_norm_act(child)
    return count


# ------------------------------------------------------------------------ the measurement

def _rules_used(model: nn.Module) -> Dict[str, int]:
    """How often each moment rule runs in the rewritten graph (helper function names)."""
    traced = getattr(model, "_traced", None)
    counts: Dict[str, int] = collections.Counter()
    if traced is None:
        return {}
    for node in traced.graph.nodes:
        name = getattr(node.target, "__name__", "")
        if node.op == "call_function" and name.startswith("_m_"):
            counts[name[3:]] += 1
    return dict(sorted(counts.items()))


def _loss(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().square().mean()
    return sum(_loss(o) for o in out)


def measure(name: str, builder: Callable, shape: tuple, seed: int) -> Dict[str, Any]:
    torch.manual_seed(seed)
    result: Dict[str, Any] = {"model": name, "input": [4, *shape]}
    try:
        model = builder()
    except Exception as err:  # the model itself does not build here
        result.update(status="build failed", error=f"{type(err).__name__}: {err}")
        return result
    result["norm_act_split"] = split_norm_act(model)
    result["batchnorm_layers"] = sum(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                     for m in model.modules())
    model.train()
    start = time.perf_counter()
    try:
        wrapped = convert_batchnorm(model, gain=0.9, micro_batch=2, prediction="analytic")
    except (NotImplementedError, TypeError, ValueError) as err:
        message = str(err).split("; supported:")[0]
        result.update(accepted=False, status="refused", error=f"{type(err).__name__}: {message}")
        return result
    result["accepted"] = True
    result["convert_s"] = round(time.perf_counter() - start, 3)
    result["rules"] = _rules_used(wrapped)
    x = torch.randn(4, *shape)
    try:
        start = time.perf_counter()
        loss = _loss(wrapped(x))
        loss.backward()
        result["step_s"] = round(time.perf_counter() - start, 3)
        grads = [p.grad for p in wrapped.parameters() if p.grad is not None]
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
        counts = guard_counts(wrapped)
        result.update(status="trains" if finite else "non-finite step", finite=finite,
                      priors=int(counts["priors"]), fallbacks=int(counts["fallbacks"]))
    except Exception as err:  # a rule refusing at run time, or a model bug
        result.update(status="step failed", error=f"{type(err).__name__}: {err}",
                      where=traceback.format_exc(limit=-2).strip().splitlines()[-3:])
    return result


def _git() -> Dict[str, Any]:
    def run(*args: str) -> str:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True).stdout
    return {"commit": run("rev-parse", "HEAD").strip(),
            "dirty": bool(run("status", "--porcelain", "--untracked-files=no").strip())}


def _versions() -> Dict[str, str]:
    out = {"kalmannorm": kalmannorm.__version__, "torch": torch.__version__,
           "python": platform.python_version()}
    for package in ("torchvision", "timm"):
        try:
            out[package] = __import__(package).__version__
        except ImportError:
            pass
    return out


# ------------------------------------------------------------------------------- the page

def render(records: List[Dict[str, Any]]) -> str:
    """docs/analytic.md from acceptance records (one column per record, in label order)."""
    records = sorted(records, key=lambda r: r["label"] != "before")
    names = list(dict.fromkeys(m["model"] for r in records for m in r["models"]))
    lines = [
        "# The analytic prediction on real models",
        "",
        "Generated by `experiments/analytic_acceptance.py` from "
        + ", ".join(f"`{r['path']}`" for r in records) + "; do not edit by hand.",
        "",
        "Each model (random weights) is converted with `convert_batchnorm(model, gain=0.9, "
        "micro_batch=2, prediction=\"analytic\")` and, when accepted, takes one training step "
        "on a batch of 4 (2 groups of 2). *trains*: finite loss and gradients. Detection models: "
        "their backbone (what a user converts). timm's `BatchNormAct2d` is split into "
        "BatchNorm + act first.",
        "",
        "The rules are in `src/kalmannorm/analytic/` (module docstrings). Exact under the "
        "prediction's assumptions (a Gaussian input, independent over positions): conv, linear, "
        "pooling averages, ReLU-family and clamp-family activations, hardswish/hardsigmoid, "
        "interpolation. Quadrature (error < 1e-6): SiLU, GELU, sigmoid, tanh, Mish, softplus, ELU. "
        "Approximations: max pooling with overlapping windows leaves neighbouring outputs "
        "correlated, which the next rule ignores; a product `x * gate` takes the factors as "
        "independent (a squeeze-excitation gate depends on `x` through its spatial mean); and a "
        "nonlinearity after another one without a BKN layer between sees a non-Gaussian input, "
        "which every rule takes as Gaussian with the same moments (moment matching). The sampled "
        "prediction has none of these approximations.",
        "",
    ]
    for r in records:
        ok = sum(m.get("status") == "trains" for m in r["models"])
        accepted = sum(bool(m.get("accepted")) for m in r["models"])
        lines.append(f"- **{r['label']}** (commit `{r['git']['commit'][:10]}`"
                     f"{', dirty' if r['git']['dirty'] else ''}): accepted {accepted} of "
                     f"{len(r['models'])}, trains {ok} of {len(r['models'])}.")
    lines += ["", "| model | " + " | ".join(r["label"] for r in records)
              + " | nonlinear rules used (last record) |",
              "|---|" + "---|" * len(records) + "---|"]
    linear = ("conv", "linear", "add", "identity", "eval_norm", "flatten", "reshape", "cat",
              "avg_pool", "adaptive_pool", "mean", "dropout", "getitem", "select", "split",
              "pad", "neg", "detach", "chunk", "transpose", "permute", "sum")
    for name in names:
        cells, rules = [], ""
        for r in records:
            m = next((m for m in r["models"] if m["model"] == name), None)
            if m is None:
                cells.append("")
                continue
            cell = m.get("status", "")
            if m.get("error"):
                cell += ": " + m["error"].split("(node")[0].strip()[:110].replace("|", "/")
            cells.append(cell)
            if m.get("rules"):
                rules = ", ".join(k.replace("_module", "") for k in m["rules"]
                                  if not k.replace("_module", "").startswith(linear))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {rules} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="after", help="record label (e.g. before, after)")
    parser.add_argument("--only", nargs="*", help="model names (substring match)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print, write no record")
    parser.add_argument("--render", nargs="*", help="only regenerate the page from records")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if args.render is not None:
        paths = args.render or sorted(glob.glob(os.path.join(RECORDS, "analytic-acceptance-*.json")))
        records = []
        for path in paths:
            with open(path) as f:
                records.append(dict(json.load(f), path=os.path.relpath(path, ROOT)))
        with open(PAGE, "w") as f:
            f.write(render(records))
        print(f"wrote {PAGE}")
        return
    torch.set_num_threads(1)
    register_nms()
    chosen = {n: v for n, v in MODELS.items()
              if not args.only or any(o in n for o in args.only)}
    results = []
    for name, (builder, shape) in chosen.items():
        result = measure(name, builder, shape, args.seed)
        results.append(result)
        print(f"{name:50s} {result.get('status')}  {result.get('error', '')[:150]}", flush=True)
    record = {
        "schema": SCHEMA, "label": args.label,
        "config": {"gain": 0.9, "micro_batch": 2, "batch": 4, "seed": args.seed},
        "git": _git(), "versions": _versions(), "models": results,
    }
    if args.no_write:
        return
    path = os.path.join(RECORDS, f"analytic-acceptance-{args.label}.json")
    os.makedirs(RECORDS, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
