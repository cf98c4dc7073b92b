"""The micro-batch study: does BKN beat what a user would pick instead? (docs/results/study.md)

Every run is one ``python -m kalmannorm train`` process writing its own record; the driver runs
a grid of (family, row, seed), at most ``--parallel`` at a time, skips complete runs, resumes
incomplete ones and copies each finished record into ``--records`` (committed as it lands), so
the grid can be built up over several sessions or machines. ``--write`` generates the page from
the records.

Protocol (the paper's "batch size 2" on CIFAR): SGD batch 128 with statistics over groups of
m = 2 rows (64 groups, each standing for a device), the released augmentation, the harness's
``short`` recipe (linear warm-up, then cosine decay of the learning rate to zero), CIFAR-10's
full training set. Families: the pre-activation ResNet-20 of the released code (``--width``)
and torchvision's MobileNetV2 at width 0.5 (the harness's copy of it) with its first convolution
at stride 1 (``mobilenet_s1``; in torchvision's layout, ``mobilenet``, the last maps are 1x1 on
CIFAR and every norm with statistics over 2 rows diverged). ``--screen`` runs the screening of
BKN's configurations instead (docs/results/screening.md).

    # CPU (2 cores): width 8, two runs at a time, one thread each
    python experiments/study.py --data-dir data --device cpu --width 8 --epochs 15 --parallel 2
    # one GPU: width 16, CUDA graphs, many runs at once, stopping cleanly before a deadline
    python experiments/study.py --data-dir data --device cuda --width 16 --epochs 30 \\
        --parallel 16 --cuda-graphs --deadline 480 --root runs/study-gpu
    # the page, from every committed record (and the screening's, which reads them too)
    python experiments/study.py --write
    # CPU smoke test of the whole pipeline (bundled subset, tiny runs; what the tests run)
    python experiments/study.py --smoke --root /tmp/smoke --records /tmp/smoke/records --write
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))  # the page reads records with this checkout's code
RECORDS = os.path.join("docs", "results", "study", "records")
PAGE = os.path.join("docs", "results", "study.md")
SCREEN_RECORDS = os.path.join("docs", "results", "screening", "records")
SCREEN_PAGE = os.path.join("docs", "results", "screening.md")
SCREEN_EPOCHS, SCREEN_SEEDS = 3, [10, 11]

M2 = ["--micro-batch", "2"]
# The released code's gain and propagation; its layer-wide guard (decisions="layer") reads every
# group, which separate devices cannot, so the study runs the per-group guard (the default).
RELEASED = ["--gain", "0.9", "--norm-option", 'gain_rule="fixed"', "--norm-option",
            'propagate="raw"']
TIME_PRIOR = ["--norm-option", "time_prior=true"]
# MABN's smoothing of the backward pass, over the window of the study's MABN row (its default)
SMOOTH_BACKWARD = ["--norm-option", "backward_window=16"]
# row -> (label, train arguments); labels name the configuration, the records hold all of it
ROWS: Dict[str, Tuple[str, List[str]]] = {
    "bn-full": ("BN, full batch", ["--norm", "batchnorm"]),
    "bn-m2": ("BN, m=2", ["--norm", "ghost_batchnorm", *M2]),
    "gn4": ("GN, 4 groups", ["--norm", "groupnorm", "--norm-option", "num_groups=4"]),
    "gn32": ("GN, 32 groups (fewer where C < 32)",
             ["--norm", "groupnorm", "--norm-option", "num_groups=32",
              "--norm-option", "cap_groups=true"]),
    "brn-m2": ("BRN, m=2", ["--norm", "batchrenorm", *M2]),
    "bkn-released": ("BKN, released gain and propagation (fixed 0.9, raw), m=2",
                     ["--norm", "bkn", *M2, *RELEASED]),
    "bkn-default": ("BKN, defaults, m=2", ["--norm", "bkn", *M2]),
    "bkn-time": ("BKN, defaults + prior over time, m=2", ["--norm", "bkn", *M2, *TIME_PRIOR]),
    "bkn-analytic": ("BKN, defaults, analytic prediction, m=2",
                     ["--norm", "bkn", *M2, "--prediction", "analytic"]),
    "bkn-rows4": ("BKN, defaults, 4 shadow rows per group, m=2",
                  ["--norm", "bkn", *M2, "--prediction-option", "rows_per_group=4"]),
    "bkn-detached": ("BKN, defaults, detached prior, m=2",
                     ["--norm", "bkn", *M2, "--norm-option", "detach_prior=true"]),
    "bkn-smooth": ("BKN, defaults + smoothed backward (16 steps), m=2",
                   ["--norm", "bkn", *M2, *SMOOTH_BACKWARD]),
    "bkn-time-smooth": ("BKN, defaults + prior over time + smoothed backward (16 steps), m=2",
                        ["--norm", "bkn", *M2, *TIME_PRIOR, *SMOOTH_BACKWARD]),
    "frn": ("FRN + TLU", ["--norm", "frn"]),
    "evonorm-s0": ("EvoNorm-S0, 32 groups (fewer where C < 32)",
                   ["--norm", "evonorm_s0", "--norm-option", "cap_groups=true"]),
    "gn-ws": ("GN + WS, 32 groups (fewer where C < 32)",
              ["--norm", "groupnorm_ws", "--norm-option", "num_groups=32",
               "--norm-option", "cap_groups=true"]),
    "mabn-m2": ("MABN, m=2", ["--norm", "mabn", *M2]),
    # MABN's window of 16: without it (each group's own statistics, no moving average), and as
    # the released ImageNet code simulates it, over the earlier groups of the same batch
    "mabn-m2-w1": ("MABN, window 1 (no moving average), m=2",
                   ["--norm", "mabn", *M2, "--norm-option", "window=1"]),
    "mabn-m2-seq": ("MABN, m=2, groups as one device's successive micro-batches (not separate "
                    "devices: the released ImageNet code's window)",
                    ["--norm", "mabn", *M2, "--norm-option", 'group_layout="sequential"']),
}
# The study's grid: every normalizer a user would pick instead, and BKN's configurations.
STUDY_ROWS = ["bn-full", "bn-m2", "gn4", "gn32", "brn-m2", "bkn-released", "bkn-default",
              "bkn-analytic", "frn", "evonorm-s0", "gn-ws", "mabn-m2", "mabn-m2-w1",
              "mabn-m2-seq"]
# Screening of BKN's configurations (issue 14): shorter runs, other seeds, both families.
# The prediction's noise (issue 14, item 3): one shadow row per group (the defaults) against
# four, the analytic prediction (none) and a prior the gradient does not flow through.
# Whether the backward pass should use smoothed statistics too (item 2): with and without the
# prior over time.
SCREEN_ROWS = ["bn-m2", "bkn-default", "bkn-released", "bkn-time", "bkn-rows4", "bkn-analytic",
               "bkn-detached", "bkn-smooth", "bkn-time-smooth"]
REFERENCE, MICRO_BN, GROUPNORM = "bn-full", "bn-m2", "gn4"
# The rows the verdicts rest on, run on the second family too, and with a third seed.
SEEDS, VERDICT_SEEDS = [0, 1], [2]
VERDICT_ROWS = ["bn-full", "bn-m2", "gn4", "brn-m2", "bkn-released", "bkn-default", "mabn-m2",
                "mabn-m2-seq"]
# family -> (architecture, its train arguments, how the page names it)
FAMILY_SPECS: Dict[str, Tuple[str, List[str], str]] = {
    "resnet": ("preact_resnet20", [], "preact_resnet20"),
    "mobilenet_s1": ("mobilenet_v2_w050", ["--model-option", "stem_stride=1"],
                     "mobilenet_v2_w050, stem stride 1 (last maps 2x2 on 32 px)"),
    # torchvision's layout ends in 1x1 maps on 32 px: 2 values per channel and group at m=2,
    # where per-group BN and BKN diverged in the first epoch. Kept to show those records.
    "mobilenet": ("mobilenet_v2_w050", [], "mobilenet_v2_w050, torchvision's layout (last "
                  "maps 1x1 on 32 px)"),
}
FAMILIES = {name: spec[0] for name, spec in FAMILY_SPECS.items()}
PLANNED_FAMILIES = ["resnet", "mobilenet_s1"]  # what the grids run
# Trained channels-last (the ResNet family ran contiguous before the option existed)
CHANNELS_LAST = ["mobilenet_s1"]


def grid(families: Sequence[str], rows: Optional[Sequence[str]], seeds: Sequence[int],
         family_seeds: Optional[Dict[str, List[int]]] = None,
         verdict_seeds: Sequence[int] = ()):
    """``(family, row, seed)`` jobs: every row on the ResNet, the verdict rows on MobileNet;
    ``family_seeds`` overrides ``seeds`` for a family; ``verdict_seeds`` run only the rows the
    verdicts rest on (of ``rows``, when given)."""
    family_seeds = family_seeds or {}
    jobs = []
    for seed in sorted({s for f in families for s in family_seeds.get(f, seeds)}
                       | set(verdict_seeds)):
        for family in families:  # seed-major: a grid cut short still has every row once
            wanted = rows or (STUDY_ROWS if family == "resnet" else VERDICT_ROWS)
            if seed not in family_seeds.get(family, seeds):
                if seed not in verdict_seeds:
                    continue
                wanted = [row for row in wanted if row in VERDICT_ROWS]
            jobs += [(family, row, seed) for row in wanted]
    return jobs


def _job(text: str) -> Tuple[str, str, int]:
    try:
        family, row, seed = text.split("/")
        if family in FAMILIES and row in ROWS:
            return family, row, int(seed)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected FAMILY/ROW/SEED with FAMILY in {list(FAMILIES)} "
                                     f"and ROW in {list(ROWS)} (got {text!r})")


def _family_seeds(text: str) -> Tuple[str, List[int]]:
    family, _, seeds = text.partition("=")
    if family not in FAMILIES or not seeds:
        raise argparse.ArgumentTypeError(f"expected FAMILY=SEED,SEED with FAMILY one of "
                                         f"{list(FAMILIES)} (got {text!r})")
    return family, [int(s) for s in seeds.split(",")]


def run_dir(root: str, job: Tuple[str, str, int]) -> str:
    family, row, seed = job
    return os.path.join(root, family, f"{row}-seed{seed}")


def record_name(job: Tuple[str, str, int]) -> str:
    family, row, seed = job
    return f"{family}-{row}-seed{seed}.json"


def job_of(name: str) -> Tuple[str, str, int]:
    """The ``(family, row, seed)`` of a record named by :func:`record_name`."""
    family, rest = os.path.basename(name).split("-", 1)
    row, seed = rest[:-len(".json")].rsplit("-seed", 1)
    return family, row, int(seed)


def model_arguments(family: str, row: str, width: int) -> List[str]:
    """The ``train`` arguments that say what a (family, row) trains: the network and its norm."""
    width_args = ["--width", str(width)] if family == "resnet" else []
    return ["--arch", FAMILIES[family], *FAMILY_SPECS[family][1], *width_args, "--batch-size",
            "128", *ROWS[row][1]]


def command(job, args) -> List[str]:
    family, row, seed = job
    cmd = [sys.executable, "-m", "kalmannorm", "train", "--dataset", args.dataset,
           *model_arguments(family, row, args.width), "--recipe", "short",
           "--epochs", str(args.epochs), "--seed", str(seed), "--device", args.device,
           "--run-dir", _relative(os.path.abspath(run_dir(args.root, job))), "--quiet",
           "--label", ROWS[row][0]]
    if args.data_dir:
        cmd += ["--data-dir", _relative(os.path.abspath(args.data_dir))]
    if family in args.channels_last:
        cmd.append("--channels-last")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.cuda_graphs:
        cmd.append("--cuda-graphs")
    if args.limit_train:
        cmd += ["--limit-train", str(args.limit_train), "--limit-test", str(args.limit_test)]
    if args.deadline is not None:
        left = args.deadline - (time.monotonic() - args.started)
        cmd += ["--time-limit", f"{max(left, 1):.0f}"]
    if os.path.exists(os.path.join(run_dir(args.root, job), "record.json")):
        cmd.append("--resume")
    return cmd


def status(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return json.load(f).get("status")
    except (OSError, ValueError):
        return None


def _relative(obj: Any) -> Any:
    """``obj`` with every absolute path inside this checkout made relative to it (committed
    records name ``data``, not a machine's folders)."""
    if isinstance(obj, dict):
        return {k: _relative(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative(v) for v in obj]
    if isinstance(obj, str) and os.path.isabs(obj) and \
            os.path.commonpath([os.path.realpath(obj), ROOT]) == ROOT:
        return os.path.relpath(os.path.realpath(obj), ROOT)
    return obj


def collect(job, args) -> None:
    """Copy a finished run's record into the records folder (complete or diverged only), with
    paths inside the checkout made relative."""
    src = os.path.join(run_dir(args.root, job), "record.json")
    if status(src) in ("complete", "diverged"):
        os.makedirs(args.records, exist_ok=True)
        with open(src) as f:
            record = _relative(json.load(f))
        with open(os.path.join(args.records, record_name(job)), "w") as f:
            json.dump(record, f, indent=2, allow_nan=True)
            f.write("\n")


def run_grid(jobs, args) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [args.src or os.path.join(ROOT, "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    for job in jobs:  # runs finished by an earlier driver: their records first
        collect(job, args)
    pending = [j for j in jobs if status(os.path.join(args.records, record_name(j)))
               not in ("complete", "diverged")]
    running: List[Tuple[Any, Tuple[str, str, int]]] = []
    print(f"{len(jobs)} runs, {len(pending)} to do", flush=True)
    while pending or running:
        while pending and len(running) < args.parallel:
            if args.deadline is not None and time.monotonic() - args.started > args.deadline - 30:
                pending = []
                break
            job = pending.pop(0)
            os.makedirs(run_dir(args.root, job), exist_ok=True)
            log = open(os.path.join(run_dir(args.root, job), "log.txt"), "a")
            proc = subprocess.Popen(["nice", "-n", "5", *command(job, args)], stdout=log,
                                    stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            running.append((proc, job))
        time.sleep(1)
        for proc, job in list(running):
            if proc.poll() is not None:
                running.remove((proc, job))
                collect(job, args)
                print(f"{'/'.join(map(str, job))}: exit {proc.returncode}, "
                      f"{status(os.path.join(run_dir(args.root, job), 'record.json'))}",
                      flush=True)


def calibrate(jobs, args) -> int:
    """Epochs that let every job finish by the deadline: times two short epochs (a tenth of the
    data) of every job under the same parallel load, then scales the slowest to a full epoch."""
    sample = 5120
    calib = argparse.Namespace(**{**vars(args), "root": os.path.join(args.root, "calibration"),
                                  "records": os.path.join(args.root, "calibration", "records"),
                                  "limit_train": sample, "limit_test": 1000, "epochs": 2})
    run_grid(jobs, calib)
    per_epoch = []
    for job in jobs:
        try:
            with open(os.path.join(run_dir(calib.root, job), "record.json")) as f:
                per_epoch.append(json.load(f)["history"][-1]["epoch_time"] * 50000 / sample)
        except (OSError, ValueError, IndexError, KeyError):
            print(f"calibration: no timing for {job}", flush=True)
    waves = math.ceil(len(jobs) / args.parallel)
    left = args.deadline - (time.monotonic() - args.started)
    epochs = int(0.85 * left / (waves * max(per_epoch))) if per_epoch else 0
    print(f"calibration: slowest epoch ~{max(per_epoch or [0]):.1f}s under load, {waves} "
          f"wave(s), {left:.0f}s left -> {epochs} epochs (at most {args.epochs})", flush=True)
    return max(0, min(args.epochs, epochs))


# ------------------------------------------------------------------------------------- the page
def load(records_dir: str) -> List[Dict[str, Any]]:
    from kalmannorm.harness.records import read_record

    out = []
    for name in sorted(os.listdir(records_dir)) if os.path.isdir(records_dir) else []:
        if name.endswith(".json"):
            record = read_record(os.path.join(records_dir, name))
            record["_family"], record["_row"], _ = job_of(name)
            out.append(record)
    return out


def verdict(a: Sequence[float], b: Sequence[float]) -> str:
    """The stated rule: ``a`` wins (loses) against ``b`` when its mean test error is lower
    (higher) by more than the sum of the two seed standard deviations; otherwise a tie; with
    fewer than 2 seeds on either side, no verdict."""
    if len(a) < 2 or len(b) < 2:
        return "n/a (<2 seeds)"
    diff = statistics.fmean(b) - statistics.fmean(a)
    margin = statistics.stdev(a) + statistics.stdev(b)
    return "win" if diff > margin else "lose" if -diff > margin else "tie"


def summary(records: List[Dict[str, Any]]):
    """``{(family, row): {...}}`` over complete records, keyed also by the whole configuration
    so that runs of different configurations are never pooled."""
    from kalmannorm.harness.report import configuration

    cells: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for r in records:
        if not r["complete"]:
            continue
        key = (r["_family"], r["_row"])
        conf = json.dumps(configuration(r), sort_keys=True)
        cell = cells.setdefault(key, dict(runs=[], conf=conf))
        if cell["conf"] != conf:
            raise ValueError(f"records of {key} ran different configurations; keep one, or "
                             "give the other its own row name")
        cell["runs"].append(r)
    for cell in cells.values():
        runs = cell["runs"] = sorted(cell["runs"], key=lambda r: r["seed"])
        cell["errors"] = [100 * r["final"]["test_error"] for r in runs]
        cell["seeds"] = [r["seed"] for r in runs]
        cell["epochs"] = sorted({r["epochs_done"] for r in runs})
        cell["epoch_time"] = statistics.median(e["epoch_time"] for r in runs
                                               for e in r["history"][1:] or r["history"])
        mem = [e.get("peak_memory") for r in runs for e in r["history"] if e.get("peak_memory")]
        cell["memory"] = (max(m["bytes"] for m in mem) / 2**20, mem[0]["kind"]) if mem else None
        cell["device"] = runs[0].get("device_name", runs[0]["device"])
        cell["width"] = runs[0]["config"].get("width")
    return cells


def _fmt(errors: Sequence[float]) -> str:
    if not errors:
        return "n/a"
    if len(errors) == 1:
        return f"{errors[0]:.2f}"
    return f"{statistics.fmean(errors):.2f} ± {statistics.stdev(errors):.2f}"


def table(cells, family: str, rows: Sequence[str]) -> List[str]:
    """The family's table over ``rows`` (in that order); the gap and verdict columns against
    the reference rows among them."""
    rows = [row for row in rows if (family, row) in cells]
    if not rows:
        return ["No complete records."]
    ref, micro, gn = (cells.get((family, r)) for r in (REFERENCE, MICRO_BN, GROUPNORM))
    gap = None
    if ref and micro:
        gap = statistics.fmean(micro["errors"]) - statistics.fmean(ref["errors"])
    any_cell = cells[(family, rows[0])]
    columns = ["Row", "Seed: test error %", "Epochs", "Test error % (mean ± sd)"] + \
        (["Gap recovered"] if gap else []) + (["vs BN m=2"] if micro else []) + \
        (["vs GN 4"] if gn else []) + ["s / epoch", "Peak memory (MiB)"]
    lines = [f"Architecture: {FAMILY_SPECS[family][2]}"
             + (f", width {any_cell['width']}" if family == "resnet" else "")
             + f"; device: {any_cell['device']}.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        c = cells[(family, row)]
        mean = statistics.fmean(c["errors"])
        cols = [ROWS[row][0], ", ".join(f"{s}: {e:.2f}" for s, e in zip(c["seeds"], c["errors"])),
                "/".join(map(str, c["epochs"])),
                _fmt(c["errors"])]
        if gap:
            cols.append("n/a" if row in (REFERENCE, MICRO_BN) else
                        f"{100 * (statistics.fmean(micro['errors']) - mean) / gap:.0f} %")
        if micro:
            cols.append(verdict(c["errors"], micro["errors"]) if row != MICRO_BN else "—")
        if gn:
            cols.append(verdict(c["errors"], gn["errors"]) if row != GROUPNORM else "—")
        cols.append(f"{c['epoch_time']:.0f}")
        cols.append("n/a" if c["memory"] is None else
                    f"{c['memory'][0]:.0f} ({'CUDA' if c['memory'][1] == 'cuda_allocated' else 'RSS'})")
        lines.append("| " + " | ".join(cols) + " |")
    if gap is not None:
        lines += ["", f"Micro-batch gap (BN m=2 minus BN full batch): {gap:.2f} points."]
    return lines


def plot(records, family: str, path: str) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in records if r["_family"] == family and r["complete"]]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for row in ROWS:
        curves = [[100 * e["test_error"] for e in r["history"]] for r in runs if r["_row"] == row]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
        ax.plot(range(1, n + 1), mean, label=f"{ROWS[row][0]} (n={len(curves)})",
                linestyle="--" if row.startswith("bkn") else "-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"{FAMILY_SPECS[family][2]}: test error, mean over seeds", fontsize=9)
    ax.set_ylim(top=min(ax.get_ylim()[1], 90))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def decision(screened, confirmed) -> List[str]:
    """The screening's decision by its rule, from the screening's cells and the study's (the
    confirmation: other seeds, the full schedule)."""
    lines = ["## Decision", "",
             "By the rule above, from the records: a BKN configuration *qualifies* when it wins "
             "against BN m=2 in the screening on every family; it is *adopted* as the default "
             "only if it also wins in the confirmation, the study's runs of the same row "
             "(seeds 0 and 1, the full schedule; none of them used here).", "",
             "| Row | " + " | ".join(f"Screening, {f}" for f in PLANNED_FAMILIES) +
             " | Confirmation (study, " + PLANNED_FAMILIES[0] + ") | Outcome |",
             "|---|" + "---|" * (len(PLANNED_FAMILIES) + 2)]
    for row in SCREEN_ROWS:
        if row == MICRO_BN:
            continue
        verdicts = []
        for family in PLANNED_FAMILIES:
            cell, base = screened.get((family, row)), screened.get((family, MICRO_BN))
            verdicts.append(verdict(cell["errors"], base["errors"]) if cell and base
                            else "not run")
        cell = confirmed.get((PLANNED_FAMILIES[0], row))
        base = confirmed.get((PLANNED_FAMILIES[0], MICRO_BN))
        confirm = f"{verdict(cell['errors'], base['errors'])} ({_fmt(cell['errors'])} vs " \
                  f"{_fmt(base['errors'])})" if cell and base else "not run"
        if any(v in ("tie", "lose") for v in verdicts):
            outcome = "does not qualify"
        elif any(v != "win" for v in verdicts):
            outcome = "pending (screening incomplete)"
        else:
            outcome = "adopted" if confirm.startswith("win") else "qualifies, not confirmed"
        lines.append(f"| {ROWS[row][0]} | {' | '.join(verdicts)} | {confirm} | {outcome} |")
    return lines + [""]


# Each screened option against the configuration it changes: (row, the row without it).
OPTION_PAIRS = [("bkn-time", "bkn-default"), ("bkn-rows4", "bkn-default"),
                ("bkn-analytic", "bkn-default"), ("bkn-detached", "bkn-default"),
                ("bkn-smooth", "bkn-default"), ("bkn-time-smooth", "bkn-time")]


def option_effects(screened) -> List[str]:
    """Each option's effect by the same rule: the row against the row without the option."""
    lines = ["## Each option against the configuration it changes", "",
             "The same rule, between two BKN rows of the screening: does the option help the "
             "configuration it is added to?", "",
             "| Row | Against | " + " | ".join(PLANNED_FAMILIES) + " |",
             "|---|---|" + "---|" * len(PLANNED_FAMILIES)]
    for row, base in OPTION_PAIRS:
        cells = []
        for family in PLANNED_FAMILIES:
            a, b = screened.get((family, row)), screened.get((family, base))
            cells.append(f"{verdict(a['errors'], b['errors'])} ({_fmt(a['errors'])} vs "
                         f"{_fmt(b['errors'])})" if a and b else "not run")
        lines.append(f"| {ROWS[row][0]} | {ROWS[base][0]} | {' | '.join(cells)} |")
    return lines + [""]


def write_page(records_dir: str, page: str, screen: bool = False) -> str:
    """The study's page (or with ``screen`` the screening's) from every record in
    ``records_dir``."""
    records = load(records_dir)
    cells = summary(records)
    out_dir = os.path.dirname(os.path.abspath(page))
    stem = os.path.splitext(os.path.basename(page))[0]
    # relative to docs/results, where the pages are committed
    link = os.path.relpath(os.path.abspath(records_dir),
                           os.path.join(ROOT, "docs", "results")).replace(os.sep, "/")
    commits = sorted({c.get("git_commit") or "none" for r in records
                      for c in [r, *r.get("resumed_code", [])]})  # started or resumed with
    rows, seeds = (SCREEN_ROWS, SCREEN_SEEDS) if screen else (STUDY_ROWS, SEEDS)
    verdict_seeds = [] if screen else VERDICT_SEEDS
    lines = [
        "# Screening BKN's configurations" if screen else "# The micro-batch study",
        "",
        f"Generated by `python experiments/study.py {'--screen ' if screen else ''}--write` "
        f"from the {len(records)} run records in [`{link}/`]({link}/); nothing here is typed "
        "by hand. Incomplete runs are left out.",
        "",
    ]
    if screen:
        lines += [
            "Which BKN configuration, if any, beats per-group BN on faithful micro-batches? "
            f"Shorter runs than [the study](study.md) ({SCREEN_EPOCHS} epochs of the same "
            f"protocol, a complete schedule), seeds {', '.join(map(str, SCREEN_SEEDS))} (none "
            "of the study's), both families. **Decision rule:** a configuration becomes the "
            "default only if it wins against BN m=2 (rule below) on both families here and "
            "loses to no configuration it would replace; it is then confirmed on runs that "
            "played no part in the choice (the study's protocol and seeds) before it is "
            "adopted. If none does, the defaults stay and the README says so.",
            "",
        ]
    lines += [
        "## Protocol",
        "",
        "- **Data:** CIFAR-10's 50,000 training and 10,000 test images from the copy in "
        "`../shared/data`, made from **lossy JPEGs** (quality 75), so errors are close to, not "
        "equal to, published CIFAR-10 numbers. The released augmentation (per-pixel mean "
        "subtraction, /128, 4-pixel pad and random crop, horizontal flip).",
        "- **Micro-batches:** SGD batch 128; every row marked m=2 takes its statistics over "
        "64 groups of 2 rows, each group standing for a device: nothing a group computes reads "
        "another group (tested for every norm, `tests/library/test_faithful_groups.py`, and "
        "against real gloo ranks, `tests/library/test_ddp_equivalence.py`), and running "
        "statistics follow group 0, as DDP's buffer broadcast gives every device rank 0's. "
        "BKN's guard and gain are decided per group (`decisions=\"group\"`), also in the "
        "rows with the released gain and propagation: the released code's layer-wide guard "
        "reads every group, which separate devices cannot.",
        "- **Schedule:** the harness's `short` recipe, per step: linear warm-up over the first "
        "15 % of the steps (from 0.04x), then a half cosine of the learning rate down to zero "
        "at the last step; Nesterov momentum 0.9, weight decay 5e-4 on conv and linear weights, "
        "peak rate 0.2. The rate "
        "reaching zero is the convergence criterion: the last epochs train at a vanishing rate, "
        "and the curves below show whether full-batch BN had flattened.",
    ]
    if not screen:
        lines += [
            "- **Rows:** full-batch BN (the reference), per-group BN at m=2, GroupNorm with the "
            "released code's 4 groups and with 32 (capped at the divisors of narrow layers), "
            "Batch Renorm, BKN with the released code's gain and propagation (fixed gain 0.9, "
            "raw propagation), BKN at this library's defaults (measured per-group gain, "
            "normalized propagation), BKN with the analytic prediction, FRN + TLU, EvoNorm-S0, "
            "GN with weight-standardized convs, MABN (its released window of 16 steps, and "
            "with a window of 1). Each record stores every resolved option of every norm "
            "layer.",
            "- **MABN's published protocol is another setting.** The released ImageNet code "
            "(`cls/networks/MABN.py` of `megvii-model/MABN`, DDP with `broadcast_buffers=False`"
            ") splits each GPU's 32 images into 16 groups of 2 and averages each group's "
            "statistics with those of the 15 groups before it in the batch (then the previous "
            "step's): a group reads other groups of the same step, as one device running its "
            "micro-batches one after another under gradient accumulation would, not as "
            "separate devices can (the repository's top-level `MABN.py`, its usage example, "
            "averages over past steps instead, as the rows faithful to devices do). The row "
            "*groups as one device's successive micro-batches* runs that window "
            "(`group_layout=\"sequential\"`, tested against the released "
            "code's `sta_matrix`); it is the only row here not faithful to separate devices, "
            "and it answers a different question: which norm to use when accumulating "
            "micro-batches on one device (there, per-group BN, GroupNorm and BKN at its "
            "defaults normalize each micro-batch as in their rows here; only running "
            "statistics would be updated once per micro-batch instead of once per step).",
            "- **Second family:** the rows the verdicts rest on also run on MobileNetV2 (width "
            "0.5), where defaults chosen on ResNets have failed before, with the first "
            "convolution at stride 1 (`stem_stride=1`, as CIFAR adaptations do): in "
            "torchvision's layout the last maps are 1x1 on 32 px images, 2 values per channel "
            "and group at m=2, and per-group BN and BKN diverged there in the first epoch of "
            "the [screening](screening.md). This family trains with channels-last weights and "
            "activations (`--channels-last`): the same arithmetic up to rounding, and a faster "
            "step for every one of its rows on the CPU ([measured](memory-format.md)).",
            f"- **Seeds:** {' and '.join(map(str, SEEDS))} for every row; "
            f"{', '.join(map(str, VERDICT_SEEDS))} as well for the rows the verdicts rest on "
            f"({', '.join(f'`{row}`' for row in VERDICT_ROWS)}).",
        ]
    else:
        lines += [
            "- **Families:** the pre-activation ResNet-20 and MobileNetV2 (width 0.5) with the "
            "first convolution at stride 1 (`stem_stride=1`): in torchvision's layout its last "
            "maps are 1x1 on 32 px images, 2 values per channel and group at m=2, and per-group "
            "BN and BKN diverged there in the first epoch (records kept below).",
            "- **Rows:** per-group BN at m=2 (the baseline to beat) and BKN at the defaults, "
            "with the released gain and propagation, and with the prior over time "
            "([method, section 8](../method.md)); then the prediction's noise: the defaults "
            "sample one shadow row per group, against four rows per group, the analytic "
            "prediction (no sampling) and a detached prior (no gradient through the "
            "prediction); then MABN's smoothed backward pass (the gradients reaching the "
            "observed statistics averaged over 16 steps, the window of the study's MABN row), "
            "with and without the prior over time. Each record stores every resolved option "
            "of every norm layer and of the predictor.",
            "- **Order:** a row that does not win on the ResNet cannot qualify, so it is not "
            "run on MobileNet (marked *not run* in the decision).",
        ]
    lines += [
        "- **Cost columns:** *s / epoch* is the median time of an epoch (training and "
        "evaluation) as recorded, on the machine named above each table, one torch thread per "
        "run and other runs sharing its cores, so rows compare as rough ratios only; *peak "
        "memory* is the CUDA allocator's peak, or on the CPU the process's peak resident set, "
        "which includes the data set held in memory (about 1 GB for CIFAR-10). Speed measured "
        "properly (one process, every norm against BatchNorm in the same rounds, after "
        "warm-up) is in [the training-step benchmark](../performance.md).",
        "- **Rule:** a row *wins* (*loses*) against another when its mean test error is lower "
        "(higher) by more than the sum of the two rows' seed standard deviations; otherwise it "
        "ties; with fewer than 2 seeds there is no verdict."
        + ("" if screen else " *Gap recovered* is (BN m=2 − row) / (BN m=2 − BN full batch)."),
        f"- **Code:** the commits the runs started or resumed with (a record names the "
        f"resuming commit since `resumed_code` was added): {', '.join(c[:10] for c in commits)}.",
        "",
    ]
    done = {(r["_family"], r["_row"], r["seed"]) for r in records if r["complete"]}
    diverged: Dict[str, List[str]] = {}
    for r in records:
        if r["status"] == "diverged":
            diverged.setdefault(r["_family"], []).append(
                f"{ROWS[r['_row']][0]} (seed {r['seed']}, epoch {len(r['history'])})")
    for family in FAMILY_SPECS:
        if family not in PLANNED_FAMILIES and family not in {r["_family"] for r in records}:
            continue
        planned = grid([family], rows if screen else None, seeds, verdict_seeds=verdict_seeds) \
            if family in PLANNED_FAMILIES else []
        missing = [f"{row} (seed {seed})" for _, row, seed in planned
                   if (family, row, seed) not in done]
        lines += [f"## {FAMILY_SPECS[family][2]}", ""]
        if planned:
            lines += [f"Complete: {len(planned) - len(missing)} of the {len(planned)} planned "
                      f"runs (seeds {' and '.join(map(str, seeds))}"
                      + (f"; {', '.join(map(str, verdict_seeds))} too for the rows the verdicts "
                         "rest on)" if verdict_seeds else ")")
                      + (f"; missing: {', '.join(missing)}." if missing else "."), ""]
        else:
            lines += ["Not in the grid any more; its records are kept.", ""]
        if family in diverged:
            lines += [f"Diverged (non-finite loss; the run stops): {', '.join(diverged[family])}.",
                      ""]
        lines += table(cells, family, rows) + [""]
        png = plot(records, family, os.path.join(out_dir, stem, f"{family}.png"))
        if png:
            lines += [f"![{family} curves]({stem}/{family}.png)", ""]
    if screen:
        lines += decision(cells, summary(load(os.path.join(ROOT, RECORDS))))
        lines += option_effects(cells)
    os.makedirs(out_dir, exist_ok=True)
    with open(page, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return page


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="CIFAR-10 directory (cifar-10-batches-py inside)")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--screen", action="store_true",
                   help=f"the screening of BKN's configurations: rows {SCREEN_ROWS} on every "
                        f"family, {SCREEN_EPOCHS} epochs, seeds {SCREEN_SEEDS} (none of the "
                        f"study's), records in {SCREEN_RECORDS}, page {SCREEN_PAGE}")
    p.add_argument("--root", help="run directories (default: runs/study or runs/screening)")
    p.add_argument("--records", help=f"where finished records are copied (default: {RECORDS})")
    p.add_argument("--page", help=f"default: {PAGE}")
    p.add_argument("--families", nargs="+", default=PLANNED_FAMILIES, choices=list(FAMILIES))
    p.add_argument("--rows", nargs="+", choices=list(ROWS), help="default: the family's rows")
    p.add_argument("--seeds", nargs="+", type=int, help="default: 0 1")
    p.add_argument("--verdict-seeds", nargs="*", type=int,
                   help=f"seeds run only for the verdict rows (default: {VERDICT_SEEDS}; none "
                        "when screening)")
    p.add_argument("--family-seeds", type=_family_seeds, action="append", default=[],
                   metavar="FAMILY=SEEDS", help="seeds of one family, e.g. mobilenet_s1=0,1")
    p.add_argument("--jobs", nargs="+", type=_job, metavar="FAMILY/ROW/SEED",
                   help="these runs, in this order (instead of the grid)")
    p.add_argument("--src", help="the library the runs import (default: this checkout's src), "
                                 "e.g. a worktree frozen at one commit for a long grid")
    p.add_argument("--epochs", type=int, help="default: 15")
    p.add_argument("--width", type=int, default=8, help="pre-activation ResNet base width")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's)")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--channels-last", nargs="*", default=CHANNELS_LAST, choices=list(FAMILIES),
                   metavar="FAMILY", help="families trained with channels-last weights and "
                   "activations (same arithmetic up to rounding; faster: experiments/"
                   f"memory_format_speed.py); default {CHANNELS_LAST}, none without FAMILY")
    p.add_argument("--deadline", type=float, help="seconds from now by which every run stops")
    p.add_argument("--calibrate", action="store_true",
                   help="with --deadline: time short epochs first and run as many epochs (at "
                        "most --epochs) as fit")
    p.add_argument("--limit-train", type=int)
    p.add_argument("--limit-test", type=int, default=10000)
    p.add_argument("--smoke", action="store_true",
                   help="tiny runs on the bundled CIFAR subset: the pipeline, not the result")
    p.add_argument("--write", action="store_true",
                   help="write the page from --records (the study's default page and records: "
                        "the screening's page too, whose confirmation reads them)")
    p.add_argument("--no-run", action="store_true", help="only --write")
    args = p.parse_args(argv)
    args.started = time.monotonic()
    screen = args.screen
    defaults = dict(root=os.path.join("runs", "screening" if screen else "study"),
                    records=SCREEN_RECORDS if screen else RECORDS,
                    page=SCREEN_PAGE if screen else PAGE, seeds=SCREEN_SEEDS if screen else SEEDS,
                    verdict_seeds=[] if screen else VERDICT_SEEDS,
                    epochs=SCREEN_EPOCHS if screen else 15, rows=SCREEN_ROWS if screen else None)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke:
        args.dataset, args.epochs, args.width = "cifar10_subset", 1, 4
        args.limit_train, args.limit_test, args.seeds = 256, 128, args.seeds[:2]
        args.verdict_seeds = []
    if not args.no_run:
        jobs = args.jobs or grid(args.families, args.rows, args.seeds, dict(args.family_seeds),
                                 args.verdict_seeds)
        if args.calibrate:
            if args.deadline is None:
                p.error("--calibrate needs --deadline")
            args.epochs = calibrate(jobs, args)
        if args.epochs >= 1:
            run_grid(jobs, args)
    if args.write:
        print(write_page(args.records, args.page, args.screen), flush=True)
        if not args.screen and args.records == RECORDS and args.page == PAGE:
            # the screening page's confirmation column reads the study's committed records
            print(write_page(SCREEN_RECORDS, SCREEN_PAGE, screen=True), flush=True)


if __name__ == "__main__":
    main()
