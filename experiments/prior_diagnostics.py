"""Why the sampled prior hurts early (issue 9, "Do" 1): per-layer ``var_prior / var_obs`` and
the guard's decision over the first training steps.

For each model and BKN configuration, trains a few SGD steps at micro-batch 2 and records, for
every BKN layer and step, what the layer receives: the guard's statistic
``mean(var_prior / var_obs)``, the median and the spread of the per-(group, channel) log ratio,
the standardized mean error ``(mean_obs - mean_prior)^2 / var_obs``, whether the guard would use
the prior, the spatial positions behind the prior (``K * H * W``), whether the layer is the first
of the pass and whether the conv before it is depthwise. Read off the layer's input by a forward
pre-hook (the library is not modified to be observed).

    PYTHONPATH=src python experiments/prior_diagnostics.py            # all cases, resumable
    PYTHONPATH=src python experiments/prior_diagnostics.py --write    # write-up only

Records: ``docs/results/prior/diagnostics/<case>.json``; write-up:
``docs/results/prior/diagnostics.md``.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

import kalmannorm as kn
from kalmannorm import functional as KF

from prior_common import (ROOT, build, git_commit, load_digits_tensors, load_subset_tensors, rel,
                          versions, write_json)

OUT = os.path.join(ROOT, "docs", "results", "prior", "diagnostics")

# model, data, batch, BKN options, predictor options
CASES: Dict[str, Dict[str, Any]] = {}
# torchvision's nets reduce 32 px to 1x1, where any per-group BatchNorm at micro-batch 2 (BKN at
# gain 0 included) diverges within 3 steps (measured); at 64 px the last maps are 2x2.
for _arch, _data, _batch, _size in (("preact_resnet20", "digits", 64, None),
                                    ("preact_resnet20", "cifar_subset", 32, None),
                                    ("mobilenet_v2_w050", "cifar_subset", 32, 64),
                                    ("efficientnet_b0", "cifar_subset", 16, 64)):
    for _tag, _opts, _pred in (("released", {"propagate": "raw"}, {}),
                               ("normalized", {"propagate": "normalized"}, {}),
                               ("released-auto_rows", {"propagate": "raw"},
                                {"rows_per_group": "auto"}),
                               ("normalized-auto_rows", {"propagate": "normalized"},
                                {"rows_per_group": "auto"}),
                               ("gain0", {"gain": 0.0}, {}),
                               ("normalized-kalman", {"propagate": "normalized",
                                                      "gain_rule": "kalman"}, {})):
        if ("auto" in _tag and _arch.startswith("preact")) or (
                _tag in ("gain0", "normalized-kalman") and "cifar" in _data
                and _arch.startswith("preact")):
            continue
        CASES[f"{_arch}-{_data}-{_tag}"] = dict(arch=_arch, data=_data, batch=_batch,
                                                image_size=_size, options=_opts, predictor=_pred)


class Probe:
    """Forward hooks that read each BKN layer's prior and observed statistics."""

    def __init__(self, model: nn.Module) -> None:
        self.layers: List[Dict[str, Any]] = []
        self.step_rows: List[Dict[str, Any]] = []
        self._last_conv = None
        self._index = {}
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(self._conv_hook)
            if isinstance(m, kn.BatchKalmanNorm2d):
                self._index[m] = len(self.layers)
                self.layers.append({"name": name})
                m.register_forward_pre_hook(self._norm_hook)

    def _conv_hook(self, conv, inputs, output) -> None:
        self._last_conv = conv

    def _norm_hook(self, layer, inputs) -> None:
        sb = layer._shadow_batch
        if sb is None or not sb.active:
            return
        x = inputs[0]
        info = self.layers[self._index[layer]]
        conv = self._last_conv
        info.update(channels=x.shape[1], positions=math.prod(x.shape[2:]),
                    depthwise=bool(conv is not None and conv.groups > 1
                                   and conv.groups == conv.in_channels),
                    conv_kernel=None if conv is None else list(conv.kernel_size))
        row = {"layer": self._index[layer], "has_prior": bool(sb.has_predecessor)}
        if sb.has_predecessor:
            with torch.no_grad():
                real_rows, groups = sb.split(x, layer)
                real, shadow = x[:real_rows], x[real_rows:]
                mo, vo = KF.group_moments(real, groups)
                mp, vp = KF.group_moments(shadow, groups)
                info["prior_values"] = math.prod(shadow.shape[2:]) * shadow.shape[0] // groups
                ratio = vp / vo
                log_ratio = torch.log(vp.clamp_min(1e-30) / vo.clamp_min(1e-30))
                finite = torch.isfinite(ratio)
                guard = ratio.mean()
                row.update(
                    guard_stat=float(guard),
                    used=bool((vp != 0).any() and torch.isfinite(guard) and guard < 100),
                    zero_prior=bool((vp == 0).all()),
                    median_ratio=float(ratio[finite].median()) if finite.any() else None,
                    log_ratio_mean=float(log_ratio.mean()),
                    log_ratio_rms=float(log_ratio.square().mean().sqrt()),
                    mean_err=float(((mo - mp).square() / vo.clamp_min(1e-12)).mean()),
                )
        self.step_rows.append(row)


def run_case(name: str, case: Dict[str, Any], steps: int, seed: int) -> Dict[str, Any]:
    torch.manual_seed(seed)
    if case["data"] == "digits":
        xtr, ytr, _, _ = load_digits_tensors()
    else:
        xtr, ytr, _, _ = load_subset_tensors()
    options = {"gain": 0.9, **case["options"]}
    norm_layer = kn.get_norm_layer("bkn", micro_batch=2, **options)
    model = build(case["arch"], 10, xtr.shape[1], norm_layer)
    net = kn.KalmanPredictor(model, generator=torch.Generator().manual_seed(seed),
                             **case["predictor"])
    probe = Probe(model)
    net.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))
    record = {"name": name, "case": case, "steps": steps, "seed": seed, "commit": git_commit(),
              "versions": versions(), "optimizer": "SGD lr 0.05 momentum 0.9", "micro_batch": 2,
              "gain": 0.9, "per_step": [], "losses": []}
    for step in range(steps):
        idx = order[step * case["batch"]:(step + 1) * case["batch"]]
        probe.step_rows = []
        x = xtr[idx]
        if case.get("image_size"):
            x = F.interpolate(x, size=case["image_size"], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(net(x), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        record["losses"].append(loss.item())
        record["per_step"].append(probe.step_rows)
    record["layers"] = probe.layers
    return record


# ------------------------------------------------------------------------------------ write-up
def _median(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else float("nan")


def summarize(record: Dict[str, Any]) -> Dict[str, Any]:
    layers = record["layers"]
    rows = [r for step in record["per_step"] for r in step if r["has_prior"]]
    first_steps = [r for step in record["per_step"][:3] for r in step if r["has_prior"]]

    def group(pred):
        sel = [r for r in rows if pred(layers[r["layer"]])]
        return {"n": len(sel), "median_ratio": _median([r["median_ratio"] for r in sel]),
                "log_rms": _median([r["log_ratio_rms"] for r in sel]),
                "used": sum(r["used"] for r in sel) / max(len(sel), 1)}

    return {
        "name": record["name"],
        "layers": len(layers),
        "all": group(lambda l: True),
        "first3": {"median_ratio": _median([r["median_ratio"] for r in first_steps]),
                   "used": sum(r["used"] for r in first_steps) / max(len(first_steps), 1)},
        "small": group(lambda l: l.get("prior_values", 99) <= 16),
        "large": group(lambda l: l.get("prior_values", 0) > 16),
        "depthwise": group(lambda l: l.get("depthwise", False)),
        "zero_prior": sum(r["zero_prior"] for r in rows),
        "guard_underestimates": sum(1 for r in rows if r["guard_stat"] < 0.1),
        "guard_rejects": sum(1 for r in rows if not r["used"]),
        "priors": len(rows),
        "loss_first": record["losses"][0], "loss_last": record["losses"][-1],
    }


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3g}"


def _findings(records: List[Dict[str, Any]]) -> List[str]:
    """The write-up's conclusions, each number read from the records."""
    by = {r["name"]: summarize(r) for r in records}
    out = []

    def pair(prefix):
        return by.get(prefix + "-released"), by.get(prefix + "-normalized")

    rel_, norm_ = pair("preact_resnet20-digits")
    if rel_ and norm_:
        out.append(
            f"1. **Raw propagation puts every prior on the wrong scale.** The released code's "
            "shadow rows carry samples of a layer's *input* statistics, not of its normalized "
            "output, while the real rows continue normalized; every later prior inherits the "
            "scale of the raw activations. In the demo's model (digits) the per-layer median "
            f"ratio is spread over {_fmt(_range(records, 'preact_resnet20-digits-released')[0])}"
            f"-{_fmt(_range(records, 'preact_resnet20-digits-released')[1])} at step 0 (log-ratio "
            f"RMS {_fmt(rel_['all']['log_rms'])}) and the loss stays at chance "
            f"({rel_['loss_first']:.2f} -> {rel_['loss_last']:.2f} in {records[0]['steps']} "
            f"steps); sampling the normalized output instead ('propagate=\"normalized\"') "
            f"brings the RMS to {_fmt(norm_['all']['log_rms'])} and the loss to "
            f"{norm_['loss_last']:.2f}.")
    rel_, norm_ = pair("mobilenet_v2_w050-cifar_subset")
    if rel_ and norm_:
        out.append(
            "2. **Inverted residuals make it worse.** In MobileNetV2 (random weights, CIFAR "
            f"subset at 64 px) the released prior's log-ratio RMS is {_fmt(rel_['all']['log_rms'])}"
            f"; {rel_['guard_underestimates']} of {rel_['priors']} layer-steps under-estimate the "
            "variance more than 10x (the expansion 1x1 conv after a linear bottleneck gets "
            "0.00-0.01), which the one-sided guard never rejects; the loss goes from "
            f"{rel_['loss_first']:.2f} to a peak of {max(_losses(records, rel_['name'])):.1f} "
            f"(per-group BatchNorm, gain 0: peak {max(_losses(records, rel_['name'].replace('released', 'gain0'))):.1f}). "
            "Normalized propagation "
            f"cuts the RMS to {_fmt(norm_['all']['log_rms'])} but still under-estimates deep "
            f"layers (median ratio {_fmt(norm_['all']['median_ratio'])}), plausibly because the "
            "samples are independent across positions and channels while real activations are "
            "correlated (not isolated here).")
    auto_ = by.get("mobilenet_v2_w050-cifar_subset-normalized-auto_rows")
    if auto_ and norm_:
        out.append(
            "3. **Small maps make each prior noisy.** With one shadow row per group a 2x2 map "
            "gives a prior from 4 values; choosing the shadow rows from the smallest map of the "
            "first pass (`rows_per_group=\"auto\"`, >= 16 values) lowers the log-ratio RMS from "
            f"{_fmt(norm_['all']['log_rms'])} to {_fmt(auto_['all']['log_rms'])} (normalized "
            f"propagation) and the loss after {records[0]['steps']} steps from "
            f"{norm_['loss_last']:.2f} to {auto_['loss_last']:.2f}, at the price of more rows.")
    eff_r, eff_n = pair("efficientnet_b0-cifar_subset")
    if eff_r and eff_n:
        out.append(
            f"4. **EfficientNet-B0** (SiLU, squeeze-excitation): released median ratio "
            f"{_fmt(eff_r['all']['median_ratio'])} (log-ratio RMS {_fmt(eff_r['all']['log_rms'])}), "
            f"normalized {_fmt(eff_n['all']['median_ratio'])} ({_fmt(eff_n['all']['log_rms'])}); "
            f"first-step loss {eff_r['loss_first']:.1f} (released) and {eff_n['loss_first']:.1f} "
            f"(normalized) against {_losses(records, 'efficientnet_b0-cifar_subset-gain0')[0]:.1f} "
            "for per-group BatchNorm: the prior is used from the first step, when it is worst.")
    out.append(
        "5. **A fixed gain of 0.9 trusts any accepted prior nine times more than the "
        "observation**, however far off it is; the guard is all-or-nothing and one-sided. The "
        "first layer of a pass has no prior by design (not a cause). The fix options measured "
        "in `ablation.md`: normalized propagation, a gain measured per layer and step "
        "(`gain_rule=\"kalman\"`), a two-sided guard, a gain warm-up, more shadow rows. The "
        "library now defaults to the first two. The records here were taken when `raw` "
        "propagation was the default: their `released` cases are raw, fixed gain 0.9.")
    chosen = []
    for prefix in ("preact_resnet20-digits", "mobilenet_v2_w050-cifar_subset",
                   "efficientnet_b0-cifar_subset"):
        k, g = by.get(prefix + "-normalized-kalman"), by.get(prefix + "-gain0")
        if k and g:
            chosen.append(f"{prefix}: loss {k['loss_first']:.2f} -> {k['loss_last']:.2f} (peak "
                          f"{max(_losses(records, k['name'])):.1f}), per-group BatchNorm "
                          f"{g['loss_first']:.2f} -> {g['loss_last']:.2f} (peak "
                          f"{max(_losses(records, g['name'])):.1f})")
    if chosen:
        out.append("6. **The new defaults** (normalized propagation, measured gain) over the "
                   "same steps: " + "; ".join(chosen) + ".")
    return out


def _losses(records, name):
    rec = next((r for r in records if r["name"] == name), None)
    return [v for v in rec["losses"] if math.isfinite(v)] if rec else [float("nan")]


def _range(records, name):
    rec = next((r for r in records if r["name"] == name), None)
    vals = [r["median_ratio"] for r in rec["per_step"][0] if r.get("median_ratio") is not None]
    return (min(vals), max(vals)) if vals else (float("nan"), float("nan"))


def write_doc(paths: List[str]) -> str:
    import json

    records = [json.load(open(p)) for p in paths]
    lines = [
        "# Why the sampled prior hurts early: per-layer diagnostics",
        "",
        "Generated by `experiments/prior_diagnostics.py --write` from the records in "
        "`docs/results/prior/diagnostics/`. Each case trains the model from random weights for "
        f"{records[0]['steps']} SGD steps (lr 0.05, momentum 0.9) with BKN at gain 0.9 and "
        "micro-batch 2, and reads every BKN layer's input: `ratio = var_prior / var_obs` per "
        "(group, channel). Columns: median of the per-layer median ratio over all layer-steps, "
        "the same for layers whose prior comes from at most 16 values (`K * H * W`, small maps) "
        "and for layers after a depthwise conv; the median RMS of `log(ratio)` (0 is a perfect "
        "variance prediction; sampling noise alone is ~0.2-0.5 here); how often the released "
        "guard (mean ratio < 100) used the prior; layer-steps whose prior mean ratio was below 0.1 "
        "(a 10x under-estimate the one-sided guard never rejects); and priors of zero variance "
        "(no prior at all).",
        "",
        "| case | layers | median ratio | small maps | depthwise | log-ratio RMS | guard used | "
        "ratio < 0.1 | zero prior | loss step 0 -> last |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for rec in records:
        s = summarize(rec)
        lines.append(
            f"| {s['name']} | {s['layers']} | {_fmt(s['all']['median_ratio'])} | "
            f"{_fmt(s['small']['median_ratio'])} ({s['small']['n']}) | "
            f"{_fmt(s['depthwise']['median_ratio'])} ({s['depthwise']['n']}) | "
            f"{_fmt(s['all']['log_rms'])} | {s['all']['used']:.0%} | "
            f"{s['guard_underestimates']}/{s['priors']} | {s['zero_prior']} | "
            f"{s['loss_first']:.2f} -> {s['loss_last']:.2f} |"
        )
    lines += ["", "## Findings", ""] + _findings(records)
    lines += ["", "## Per layer (released configuration vs normalized propagation, step 0)", ""]
    by_name = {r["name"]: r for r in records}
    for rec in records:
        if not rec["name"].endswith("-released"):
            continue
        other = by_name.get(rec["name"].replace("-released", "-normalized"))
        lines += [f"### {rec['case']['arch']} on {rec['case']['data']}", "",
                  "| # | layer | positions | prior values | depthwise | ratio (raw) | "
                  "ratio (normalized) |", "| ---: | --- | ---: | ---: | --- | ---: | ---: |"]
        step0 = {r["layer"]: r for r in rec["per_step"][0]}
        step0n = {r["layer"]: r for r in other["per_step"][0]} if other else {}
        for i, layer in enumerate(rec["layers"]):
            a, b = step0.get(i, {}), step0n.get(i, {})
            lines.append(
                f"| {i} | {layer['name']} | {layer.get('positions')} | "
                f"{layer.get('prior_values', 'first')} | {'yes' if layer.get('depthwise') else ''} | "
                f"{_fmt(a.get('median_ratio'))} | {_fmt(b.get('median_ratio'))} |"
            )
        lines.append("")
    path = os.path.join(ROOT, "docs", "results", "prior", "diagnostics.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", nargs="*", default=list(CASES))
    p.add_argument("--write", action="store_true", help="only regenerate the write-up")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.write:
        for name in args.cases:
            path = os.path.join(OUT, f"{name}.json")
            if os.path.exists(path):
                continue  # resumable: one record per case
            t = time.time()
            record = run_case(name, CASES[name], args.steps, args.seed)
            record["wall_s"] = time.time() - t
            write_json(path, record)
            print(f"{name}: {record['wall_s']:.0f}s -> {rel(path)}", flush=True)
    paths = [os.path.join(OUT, f"{n}.json") for n in CASES if os.path.exists(os.path.join(OUT, f"{n}.json"))]
    print(write_doc(paths))


if __name__ == "__main__":
    main()
