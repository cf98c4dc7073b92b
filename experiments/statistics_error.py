"""Does BKN's premise hold? How close each layer's statistics come to the whole batch's, for the
group's own statistics (per-group BN) and for BKN's estimate (docs/results/statistics-error.md).

For each weights (a family's random initialization, or a trained checkpoint of the screening or
the study: per-group BN or BKN at m = 2) and each prediction (BKN's defaults with one sampled
shadow row per group, four rows per group, the analytic prediction), the model is converted to
BKN at m = 2 and :func:`kalmannorm.statistics_error` measures it on batches of 128 CIFAR-10 test
images (no augmentation), one record per (weights, prediction). ``--write`` generates the page
from the records.

    # every checkpoint found under the screening's and the study's run folders
    python experiments/statistics_error.py --data-dir data --write
    # the page, from the committed records
    python experiments/statistics_error.py --no-run --write
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from typing import Any, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import kalmannorm as kn  # noqa: E402
from kalmannorm.harness.data import load_dataset  # noqa: E402
from kalmannorm.harness.diagnose import (average_statistics_error, closer,  # noqa: E402
                                         model_from_run, with_prediction)
from kalmannorm.harness.models import build_model  # noqa: E402
from kalmannorm.harness.records import (git_info, now, read_record, repo_relative,  # noqa: E402
                                        versions, write_json)

RECORDS = os.path.join("docs", "results", "statistics_error", "records")
PAGE = os.path.join("docs", "results", "statistics-error.md")
# family -> (architecture, model options, width): the study's families (experiments/study.py)
FAMILIES = {"resnet": ("preact_resnet20", {}, 8),
            "mobilenet_s1": ("mobilenet_v2_w050", {"stem_stride": 1}, None)}
# prediction -> (label, convert_batchnorm options)
PREDICTIONS = {
    "sampled": ("defaults (1 sampled shadow row per group)", {}),
    "rows4": ("defaults, 4 shadow rows per group", {"rows_per_group": 4}),
    "analytic": ("defaults, analytic prediction", {"prediction": "analytic"}),
}
# where the trained checkpoints are, and the rows whose weights are measured (named on the page
# by what trained them)
RUN_FOLDERS = [("runs/screening", "screening (3 epochs)"), ("runs/study-cpu", "study (15 epochs)")]
ROWS = {"bn-m2": "per-group BN, m=2", "bkn-default": "BKN defaults, m=2"}
MICRO_BATCH, BATCH, BATCHES = 2, 128, 8


def checkpoints() -> List[Tuple[str, str, str, str, int]]:
    """``(run dir, source, family, row, seed)`` of every complete checkpoint to measure."""
    found = []
    for folder, source in RUN_FOLDERS:
        for family in FAMILIES:
            base = os.path.join(ROOT, folder, family)
            names = sorted(os.listdir(base)) if os.path.isdir(base) else []
            for row in ROWS:
                prefix = f"{row}-seed"
                for name in names:
                    run = os.path.join(base, name)
                    record = os.path.join(run, "record.json")
                    if (name.startswith(prefix) and name[len(prefix):].isdigit()
                            and os.path.isfile(os.path.join(run, "checkpoint.pt"))
                            and os.path.isfile(record)
                            and read_record(record).get("status") == "complete"):
                        found.append((run, source, family, row, int(name[len(prefix):])))
    return found


def initial_model(family: str, seed: int) -> nn.Module:
    """The family's model at its random initialization (seed ``seed``), BatchNorm layers."""
    arch, options, width = FAMILIES[family]
    torch.manual_seed(seed)
    return build_model(arch, 10, kn.get_norm_layer("batchnorm"), width=width, **options)


def measure(data, family: str, weights: Dict[str, Any], model: nn.Module, prediction: str,
            seed: int) -> Dict[str, Any]:
    """One record: ``model`` converted to BKN at m=2 with ``prediction``, measured on the test
    batches (order and shadow-row samples from ``seed``)."""
    start = time.perf_counter()
    options = dict(micro_batch=MICRO_BATCH, **PREDICTIONS[prediction][1])
    net = kn.convert_batchnorm(copy.deepcopy(model), **options)
    layers = average_statistics_error(net, data, BATCHES, BATCH, seed)
    commit, dirty = git_info(ROOT)
    return dict(kind="statistics_error", family=family, arch=FAMILIES[family][0],
                weights=weights, prediction=prediction,
                prediction_label=PREDICTIONS[prediction][0], convert_options=options,
                data=dict(dataset="cifar10", split="test", batch=BATCH, batches=BATCHES,
                          augment=False),
                seed=seed, git_commit=commit, git_dirty=dirty, versions=versions(),
                created=now(), wall_time=time.perf_counter() - start, layers=layers)


def run(data_dir: str, records: str) -> None:
    torch.set_num_threads(1)
    data = load_dataset("cifar10", data_dir)
    jobs = [(None, "initialization", family, "init", 0) for family in FAMILIES]
    jobs += checkpoints()
    for run_dir, source, family, row, seed in jobs:
        weights = dict(source=source, row=row, seed=seed)
        if run_dir is None:
            model = initial_model(family, seed)
        else:
            model = model_from_run(run_dir, data_dir)[2]
            trained = read_record(os.path.join(run_dir, "record.json"))
            weights.update(run_dir=repo_relative(run_dir), epochs=len(trained["history"]),
                           test_error=trained["history"][-1].get("test_error"))
        for prediction in PREDICTIONS:
            name = f"{family}-{source.split()[0]}-{row}-seed{seed}-{prediction}.json"
            path = os.path.join(records, name)
            if os.path.isfile(path):
                continue
            record = measure(data, family, weights, model, prediction, seed)
            os.makedirs(records, exist_ok=True)
            write_json(path, record)
            print(f"{name}: {record['wall_time']:.0f} s", flush=True)


# ---------------------------------------------------------------------------- the page
def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else float("nan")


def summary_rows(records: List[Dict[str, Any]]):
    groups: Dict[tuple, List[Dict[str, Any]]] = defaultdict(list)
    for r in records:
        w = r["weights"]
        groups[(r["family"], w["source"], w["row"], r["prediction"])].append(r)
    for key in sorted(groups, key=lambda k: (list(FAMILIES).index(k[0]), k[1] != "initialization",
                                             k[1], k[2], list(PREDICTIONS).index(k[3]))):
        rs = groups[key]
        layers = [layer for r in rs for layer in with_prediction(r["layers"])]
        yield key, rs, layers, closer(layers)


def write_page(records_dir: str, page: str) -> str:
    records = []
    if os.path.isdir(records_dir):
        for name in sorted(os.listdir(records_dir)):
            if name.endswith(".json"):
                with open(os.path.join(records_dir, name)) as f:
                    records.append(json.load(f))
    commits = sorted({r.get("git_commit") or "none" for r in records})
    lines = [
        "# Does BKN's estimate come closer to the batch's statistics than the group's own?",
        "",
        f"Generated by `python experiments/statistics_error.py --write` from the {len(records)} "
        "records in [`statistics_error/records/`](statistics_error/records/); nothing here is "
        "typed by hand.",
        "",
        "BKN's premise: with statistics groups of m = 2 rows, the prediction from the layer "
        "below, combined with the group's own statistics, estimates the statistics a large "
        "batch would see better than the group's own statistics do. "
        "`kalmannorm.statistics_error` measures that directly, in one forward pass: per BKN "
        "layer and group, the distance of the group's own statistics (*observed*: what "
        "per-group BN normalizes with) and of BKN's estimate (*estimate*) from the statistics "
        "of the whole batch of 128 rows at that layer.",
        "",
        "## Protocol",
        "",
        f"- **Data:** {BATCHES} batches of {BATCH} CIFAR-10 test images (no augmentation; the "
        "batches and the shadow rows' samples drawn with the weights' seed), from the copy "
        "made from lossy JPEGs, normalized as in training.",
        "- **Weights:** each family's random initialization (seed 0), and the trained "
        "checkpoints of [the screening](screening.md) (3 epochs, seeds 10 and 11) and of "
        "[the study](study.md) (15 epochs, seeds 0 and 1) for per-group BN and BKN at m = 2. "
        "Each is converted to BKN at m = 2 with the library's defaults (measured gain, "
        "normalized propagation, per-group decisions) and the prediction named in the row.",
        "- **Errors** (means over layers with a prediction, the first layer has none; over "
        "groups, channels and batches): *log-var error* is the mean of log(var / batch var)², "
        "*bias* the mean of log(var / batch var) (below 0: variance underestimated, outputs "
        "too large); *mean error* the mean of (mean − batch mean)² / batch var. "
        "*Closer* counts the layers where the estimate's log-var error is below the "
        "observation's. *Prediction alone*: the same distances for the prediction from the "
        "layer below before the update combines it with the observation; *running "
        "statistics*: the layer's running averages from training (what evaluation uses; "
        "fresh, 0 and 1, at initialization), the source of a prior over time.",
        f"- **Code:** commits {', '.join(c[:10] for c in commits)}.",
        "",
    ]
    for family, (arch, options, width) in FAMILIES.items():
        rows = [s for s in summary_rows(records) if s[0][0] == family]
        if not rows:
            continue
        lines += [f"## {arch}" + (f", width {width}" if width else "")
                  + (", stem stride 1" if options.get("stem_stride") == 1 else ""), "",
                  "| Weights | Prediction | Seeds | Closer | Log-var error, observed → estimate "
                  "| Bias, observed → estimate | Mean error, observed → estimate "
                  "| Prediction alone: log-var error, bias | Running statistics: log-var error, "
                  "bias |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (fam, source, row, prediction), rs, layers, n_closer in rows:
            who = "random initialization" if row == "init" else f"{ROWS[row]}, {source}"
            seeds = ", ".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
            lines.append(
                f"| {who} | {PREDICTIONS[prediction][0]} | {seeds} | {n_closer} of {len(layers)} | "
                f"{_mean(la['observed_log_var_error'] for la in layers):.3f} → "
                f"{_mean(la['estimate_log_var_error'] for la in layers):.3f} | "
                f"{_mean(la['observed_log_var_bias'] for la in layers):+.3f} → "
                f"{_mean(la['estimate_log_var_bias'] for la in layers):+.3f} | "
                f"{_mean(la['observed_mean_error'] for la in layers):.4f} → "
                f"{_mean(la['estimate_mean_error'] for la in layers):.4f} | "
                f"{_mean(la['prediction_log_var_error'] for la in layers):.3f}, "
                f"{_mean(la['prediction_log_var_bias'] for la in layers):+.3f} | "
                f"{_mean(la['running_log_var_error'] for la in layers):.3f}, "
                f"{_mean(la['running_log_var_bias'] for la in layers):+.3f} |")
        lines += ["", "By the module that runs before the layer (the defaults' sampled "
                  "prediction, every trained checkpoint of the family):", "",
                  "| Layer after | Layers | Closer | Log-var error, observed → estimate "
                  "| Bias, observed → estimate | Prediction alone: log-var error, bias |",
                  "|---|---|---|---|---|---|"]
        by_kind: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
        for r in records:
            if r["family"] == family and r["prediction"] == "sampled" and \
                    r["weights"]["row"] != "init":
                for la in with_prediction(r["layers"]):
                    by_kind[la["after"] or "(input)"].append(la)
        for kind, layers in sorted(by_kind.items()):
            lines.append(
                f"| {kind} | {len(layers)} | {closer(layers)} | "
                f"{_mean(la['observed_log_var_error'] for la in layers):.3f} → "
                f"{_mean(la['estimate_log_var_error'] for la in layers):.3f} | "
                f"{_mean(la['observed_log_var_bias'] for la in layers):+.3f} → "
                f"{_mean(la['estimate_log_var_bias'] for la in layers):+.3f} | "
                f"{_mean(la['prediction_log_var_error'] for la in layers):.3f}, "
                f"{_mean(la['prediction_log_var_bias'] for la in layers):+.3f} |")
        lines.append("")
    text = "\n".join(lines)
    with open(page, "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data", help="CIFAR-10 in the official format")
    p.add_argument("--records", default=os.path.join(ROOT, RECORDS))
    p.add_argument("--page", default=os.path.join(ROOT, PAGE))
    p.add_argument("--no-run", action="store_true", help="only generate the page")
    p.add_argument("--write", action="store_true", help="generate the page from the records")
    args = p.parse_args(argv)
    if not args.no_run:
        run(args.data_dir, args.records)
    if args.write:
        write_page(args.records, args.page)
        print(args.page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
