"""Inference example weighing on trained micro-batch models (docs/results/example-weighing.md).

Does mixing each example's own statistics into the running statistics at evaluation
(``kalmannorm.weigh_examples``, Summers & Dinneen 2020) lower the test error of models trained
with statistics over groups of 2? No retraining: it evaluates the final checkpoints of finished
study runs (``experiments/study.py``; their checkpoints stay in the run directories the records
name, which are not committed: rerun the study to have them).

Choosing ``alpha`` on the data it is scored on would flatter it, so the test set is split in two
halves (even and odd indices): ``alpha`` is chosen on one half (lowest error; the smaller alpha on
a tie) and scored on the other, both ways; the weighed error is the mean of the two scores, the
plain error that of ``alpha = 0`` on the same halves (the run's own test error).

    python experiments/example_weighing.py --data-dir data             # every study record
    python experiments/example_weighing.py --write --no-run            # the page only
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study  # noqa: E402

RECORDS = os.path.join("docs", "results", "example_weighing", "records")
PAGE = os.path.join("docs", "results", "example-weighing.md")
ALPHAS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


def errors_by_alpha(model, data, alphas: Sequence[float]) -> List[float]:
    import kalmannorm as kn
    from kalmannorm.harness.train import evaluate

    out = []
    for alpha in alphas:
        if alpha == 0:
            out.append(evaluate(model, data)[1])
        else:
            with kn.weigh_examples(model, alpha):
                out.append(evaluate(model, data)[1])
    return out


def cross_fit(halves: Sequence[Sequence[float]], alphas: Sequence[float]) -> Dict[str, Any]:
    """Choose alpha on each half, score it on the other; ``halves`` holds each half's errors by
    alpha."""
    chosen = [alphas[min(range(len(alphas)), key=lambda i: (h[i], alphas[i]))] for h in halves]
    scored = [halves[1 - k][alphas.index(chosen[k])] for k in (0, 1)]
    return dict(chosen=chosen, weighed_error=statistics.fmean(scored),
                plain_error=statistics.fmean(h[alphas.index(0.0)] for h in halves))


@functools.lru_cache(maxsize=None)
def _dataset(name: str, data_dir: Optional[str], image_size: Optional[int]):
    """Each data set read once for all the runs evaluated on it."""
    from kalmannorm.harness.data import load_dataset

    return load_dataset(name, data_dir, image_size=image_size)


def measure(source: str, args) -> Optional[Dict[str, Any]]:
    """The record for one study record ``source``, or None when its checkpoint is absent or its
    model has no layer that evaluates with running statistics (``weigh_examples`` says so)."""
    import torch

    import kalmannorm as kn
    from kalmannorm.harness.records import git_info, versions
    from kalmannorm.harness.train import TrainConfig, _build

    with open(source) as f:
        run = json.load(f)
    checkpoint = os.path.join(run["run_dir"], "checkpoint.pt")
    if not os.path.exists(os.path.join(ROOT, checkpoint)):
        print(f"{source}: no checkpoint at {checkpoint}; skipped", flush=True)
        return None
    ckpt = torch.load(os.path.join(ROOT, checkpoint), map_location="cpu", weights_only=False)
    if ckpt["record"]["final"] != run["final"]:
        raise ValueError(f"{checkpoint} is not the run {source} recorded (final metrics differ)")
    config = TrainConfig.from_dict({**run["config"],
                                    **({"data_dir": args.data_dir} if args.data_dir else {})})
    data = _dataset(config.dataset, config.data_dir, config.image_size)
    model, _ = _build(config, data, torch.device("cpu"))
    model.load_state_dict(ckpt["model"])
    try:
        kn.weigh_examples(model, 0.0).remove()
    except ValueError as err:
        print(f"{source}: {err}; skipped", flush=True)
        return None
    halves = []
    for start in (0, 1):
        index = torch.arange(start, data.test_x.shape[0], 2)
        half = dataclasses.replace(data, test_x=data.test_x[index], test_y=data.test_y[index])
        halves.append(errors_by_alpha(model, half, ALPHAS))
    commit, dirty = git_info()
    result = cross_fit(halves, list(ALPHAS))
    if abs(result["plain_error"] - run["final"]["test_error"]) > 1e-9:
        raise ValueError(f"{source}: plain evaluation gives {result['plain_error']}, the run "
                         f"recorded {run['final']['test_error']}")
    family, row, _ = study.job_of(source)
    return dict(kind="example_weighing", source=os.path.relpath(source, ROOT), label=run["label"],
                family=family, row=row, seed=run["seed"], checkpoint=checkpoint, alphas=list(ALPHAS),
                halves="even and odd test indices", errors_by_half=halves, **result,
                git_commit=commit, git_dirty=dirty, versions=versions())


def write_page(records_dir: str, page: str) -> str:
    records = []
    for name in sorted(os.listdir(records_dir)) if os.path.isdir(records_dir) else []:
        with open(os.path.join(records_dir, name)) as f:
            records.append(json.load(f))
    cells: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in records:
        cells.setdefault((r["family"], r["row"]), []).append(r)
    link = os.path.relpath(os.path.join(ROOT, records_dir),
                           os.path.join(ROOT, "docs", "results")).replace(os.sep, "/")
    lines = [
        "# Inference example weighing on micro-batch models",
        "",
        f"Generated by `python experiments/example_weighing.py --write` from the {len(records)} "
        f"records in [`{link}/`]({link}/). Each evaluates the final checkpoint of a finished "
        "[study](study.md) run with `kalmannorm.weigh_examples(model, alpha)`: every layer "
        "that evaluates with running statistics mixes in the example's own, "
        "`mu = alpha * mu_x + (1 - alpha) * mu_running` (second moments likewise; Summers & "
        "Dinneen 2020). No retraining.",
        "",
        "**Protocol.** The 10,000 test images split into two halves (even and odd indices); "
        f"alpha is chosen from {', '.join(map(str, ALPHAS))} on one half (lowest error) and "
        "scored on the other, both ways. *Weighed* is the mean of the two scores, *plain* the "
        "run's own test error (alpha = 0). *Change* is weighed minus plain per run; the rule: "
        "it helps (hurts) when the mean change is below (above) zero by more than its standard "
        "deviation over seeds, otherwise no effect.",
        "",
        "| Family | Row | Seeds | Plain test error % | Weighed test error % | Change (points) | "
        "Alpha chosen | Effect |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (family, row), runs in sorted(cells.items(), key=lambda kv: (
            list(study.FAMILIES).index(kv[0][0]), list(study.ROWS).index(kv[0][1]))):
        runs.sort(key=lambda r: r["seed"])
        change = [100 * (r["weighed_error"] - r["plain_error"]) for r in runs]
        effect = "n/a (<2 seeds)" if len(change) < 2 else \
            "helps" if -statistics.fmean(change) > statistics.stdev(change) else \
            "hurts" if statistics.fmean(change) > statistics.stdev(change) else "no effect"
        lines.append(
            f"| {study.FAMILIES[family]} | {study.ROWS[row][0]} | "
            f"{', '.join(str(r['seed']) for r in runs)} | "
            f"{study._fmt([100 * r['plain_error'] for r in runs])} | "
            f"{study._fmt([100 * r['weighed_error'] for r in runs])} | {study._fmt(change)} | "
            f"{'; '.join('/'.join(map(str, r['chosen'])) for r in runs)} | {effect} |")
    commits = sorted({r["git_commit"] or "none" for r in records})
    lines += ["", f"Code: commits {', '.join(c[:10] for c in commits)}."]
    os.makedirs(os.path.dirname(os.path.abspath(page)), exist_ok=True)
    with open(page, "w") as f:
        f.write("\n".join(lines) + "\n")
    return page


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="CIFAR-10 directory (cifar-10-batches-py inside)")
    p.add_argument("--sources", nargs="+", help="study records (default: every committed one; "
                                                "models without running statistics are skipped)")
    p.add_argument("--records", default=RECORDS)
    p.add_argument("--page", default=PAGE)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true")
    p.add_argument("--no-run", action="store_true")
    args = p.parse_args(argv)
    args.sources = [os.path.abspath(s) for s in args.sources or []]
    args.records, args.page = os.path.abspath(args.records), os.path.abspath(args.page)
    if args.data_dir:
        args.data_dir = os.path.abspath(args.data_dir)
    os.chdir(ROOT)  # records name run directories and data relative to the checkout
    if not args.no_run:
        import torch

        torch.set_num_threads(args.threads)
        sources = args.sources or [os.path.join(ROOT, study.RECORDS, n)
                                   for n in sorted(os.listdir(os.path.join(ROOT, study.RECORDS)))]
        os.makedirs(args.records, exist_ok=True)
        for source in sources:
            record = measure(os.path.abspath(source), args)
            if record:
                with open(os.path.join(args.records, os.path.basename(source)), "w") as f:
                    json.dump(record, f, indent=2)
                    f.write("\n")
                print(f"{record['source']}: plain {100 * record['plain_error']:.2f} %, weighed "
                      f"{100 * record['weighed_error']:.2f} % (alpha {record['chosen']})",
                      flush=True)
    if args.write:
        print(write_page(args.records, args.page), flush=True)


if __name__ == "__main__":
    main()
