"""The micro-batch comparison on CIFAR-10 that docs/results/ reports.

Pre-activation ResNet-20, SGD batch 128, statistics over micro-batches of 2 unless stated, the
harness's ``short`` recipe. Every run is one ``python -m kalmannorm train`` process writing its
own record (``<root>/<name>-seed<seed>/record.json``); runs already complete are skipped and
incomplete ones resume, so the script can be stopped and started again at will.

``--budget SECONDS`` first times one short epoch of every run under the same parallel load
(``--limit-train``), then picks the largest number of epochs (at most ``--epochs``) that fits the
budget, the same for every method, so that no method gets more training than another.

    python experiments/cifar_microbatch.py --data-dir data --epochs 30 --parallel 9 \\
        --device cuda --budget 400
    python -m kalmannorm report runs/cifar/*/record.json --out docs/results
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Tuple

MICRO = ["--micro-batch", "2"]
BATCH2 = ["--batch-size", "2", "--lr", "0.003", "--epochs", "3", "--limit-train", "10000",
          "--limit-test", "2000"]
# The options these records ran with (the code of their time had no other choice): the
# released BKN update and running statistics averaged over the groups. Labels are derived from
# the configuration by the harness.
ALL_GROUPS = ["--norm-option", 'running_stats="all"']
RELEASED = ["--gain", "0.9", "--norm-option", 'propagate="raw"', "--norm-option",
            'gain_rule="fixed"', "--norm-option", 'decisions="layer"', *ALL_GROUPS]
# name -> (train arguments, seeds)
RUNS: Dict[str, Tuple[List[str], List[int]]] = {
    "bn-full": (["--norm", "batchnorm"], [0]),
    "bn-m2": (["--norm", "ghost_batchnorm", *MICRO, *ALL_GROUPS], [0, 1]),
    "brn-m2": (["--norm", "batchrenorm", *MICRO, *ALL_GROUPS], [0]),
    "gn": (["--norm", "groupnorm", "--norm-option", "num_groups=4"], [0]),
    "bkn-m2": (["--norm", "bkn", *MICRO, *RELEASED], [0, 1]),
    "bkn-m2-analytic": (["--norm", "bkn", *MICRO, *RELEASED, "--prediction", "analytic"], [0]),
    # a true SGD batch of 2 (one statistics group): a shorter run on a 10k-image subset, the
    # learning rate scaled linearly from the batch-128 recipe (0.2 * 2 / 128 ~ 0.003)
    "bn-b2": ([*BATCH2, "--norm", "batchnorm"], [0]),
    "bkn-b2": ([*BATCH2, "--norm", "bkn", *RELEASED], [0]),
}
MICRO_RUNS = [name for name in RUNS if not name.endswith("-b2")]


def launch(name: str, seed: int, args: argparse.Namespace, extra: List[str], root: str):
    train_args, _ = RUNS[name]
    run_dir = os.path.join(root, f"{name}-seed{seed}")
    # the run's own arguments come last: they override the common ones (argparse: last wins)
    cmd = [sys.executable, "-m", "kalmannorm", "train", "--dataset", "cifar10",
           "--data-dir", args.data_dir, "--arch", args.arch, "--batch-size", "128",
           "--seed", str(seed), "--device", args.device, "--run-dir", run_dir, "--quiet",
           *extra, *train_args]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if os.path.exists(os.path.join(run_dir, "record.json")):
        cmd.append("--resume")
    os.makedirs(run_dir, exist_ok=True)
    log = open(os.path.join(run_dir, "log.txt"), "a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), run_dir


def run_all(jobs: List[Tuple[str, int]], args, extra: List[str], root: str) -> List[str]:
    """Run ``jobs`` at most ``args.parallel`` at a time; return their run directories."""
    pending, running, dirs = list(jobs), [], []
    while pending or running:
        while pending and len(running) < args.parallel:
            proc, run_dir = launch(*pending.pop(0), args, extra, root)
            running.append((proc, run_dir))
            dirs.append(run_dir)
        time.sleep(2)
        for proc, run_dir in list(running):
            if proc.poll() is not None:
                running.remove((proc, run_dir))
                if proc.returncode:
                    print(f"{run_dir}: exit {proc.returncode} (see log.txt)", flush=True)
    return dirs


def complete(run_dir: str) -> bool:
    path = os.path.join(run_dir, "record.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f).get("status") in ("complete", "diverged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--root", default="runs/cifar")
    parser.add_argument("--arch", default="preact_resnet20")
    parser.add_argument("--epochs", type=int, default=30, help="epochs (the most, with --budget)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--budget", type=float, help="seconds for all runs; picks the epochs")
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS),
                        help="these runs (default: all but the SGD-batch-2 ones, bn-b2 bkn-b2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads per run")
    args = parser.parse_args()

    names = args.only or MICRO_RUNS
    jobs = [(name, seed) for name in names for seed in RUNS[name][1]]
    epochs = args.epochs
    if args.budget:
        start = time.perf_counter()
        calib_root = os.path.join(args.root, "calibration")
        sample = 5120
        # two short epochs (the second one is past start-up and warm-up), a tenth of the test
        # set: ~1/10 of a full epoch, training and evaluation alike
        run_all(jobs, args, ["--epochs", "2", "--limit-train", str(sample), "--limit-test",
                             "1000", "--overwrite"], calib_root)
        per_epoch = []
        for name, seed in jobs:
            with open(os.path.join(calib_root, f"{name}-seed{seed}", "record.json")) as f:
                record = json.load(f)
            per_epoch.append(record["history"][-1]["epoch_time"] * 50000 / sample)
        waves = math.ceil(len(jobs) / args.parallel)
        left = args.budget - (time.perf_counter() - start)
        if left < waves * max(per_epoch):
            print(f"calibration left {left:.0f}s, less than one epoch: nothing run", flush=True)
            return
        epochs = max(1, min(args.epochs, int(0.85 * left / (waves * max(per_epoch)))))
        print(f"calibration: slowest epoch ~{max(per_epoch):.1f}s under load; {waves} wave(s); "
              f"{left:.0f}s left -> {epochs} epochs", flush=True)
        extra = ["--epochs", str(epochs), "--time-limit", f"{left / waves:.0f}"]
    else:
        extra = ["--epochs", str(epochs)]
    todo = [job for job in jobs
            if not complete(os.path.join(args.root, f"{job[0]}-seed{job[1]}"))]
    for run_dir in run_all(todo, args, extra, args.root):
        print(run_dir, "complete" if complete(run_dir) else "incomplete", flush=True)


if __name__ == "__main__":
    main()
