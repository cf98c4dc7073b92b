"""Is training in the channels-last layout faster, row by row of the study? (docs/results/memory-format.md)

For each study row of a family, one training step (forward, cross-entropy, backward, SGD step)
of the model exactly as ``kalmannorm train`` builds it for the study (``experiments/study.py``'s
arguments, the harness's own builder), once with contiguous and once with channels-last weights
and activations (``--channels-last``), timed round-robin in one process: every round times each
(row, layout) pair once, the order rotating, after warm-up rounds. Each row's figure is the median
of its per-round ratio channels-last / contiguous, so load from other processes, which moves
whole rounds, cancels out. The two layouts compute the same up to rounding
(``tests/harness/test_train.py``).

    python experiments/memory_format_speed.py --family mobilenet_s1 --write
    python experiments/memory_format_speed.py --no-run --write    # the page from the records
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import types
from typing import Any, Callable, Dict, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, ROOT)  # benchmarks/

import torch  # noqa: E402

import study  # noqa: E402
from benchmarks.measure import machine, quartiles, round_robin  # noqa: E402
from benchmarks.model import train_step as bench_train_step  # noqa: E402
from kalmannorm.harness.cli import add_train_arguments, config_from_args  # noqa: E402
from kalmannorm.harness.records import git_info, now, versions, write_json  # noqa: E402
from kalmannorm.harness.train import _build  # noqa: E402

RECORDS = os.path.join("docs", "results", "memory-format")
PAGE = os.path.join("docs", "results", "memory-format.md")
LAYOUTS = ("contiguous", "channels_last")


def train_step(family: str, row: str, width: int, channels_last: bool, batch: int,
               device: torch.device) -> Callable[[], Any]:
    """One SGD step of the row's model as the study trains it (the harness's builder; the
    input batch contiguous, as the harness's data gives it), on a fixed random batch."""
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    argv = study.model_arguments(family, row, width) + ["--batch-size", str(batch)]
    if channels_last:
        argv.append("--channels-last")
    config = config_from_args(parser.parse_args(argv))[0]
    _, net = _build(config, types.SimpleNamespace(num_classes=10, in_channels=3), device)
    return bench_train_step(net.train(), batch, 32, device, "float32", "contiguous")


def measure(family: str, rows: Sequence[str], width: int, batch: int, rounds: int, warmup: int,
            threads: int, device: torch.device) -> Dict[str, Any]:
    commit, dirty = git_info(ROOT)  # before the clock runs: the code that is timed
    if device.type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    fns = {f"{row}|{layout}": train_step(family, row, width, layout == "channels_last", batch,
                                         device)
           for row in rows for layout in LAYOUTS}
    times = round_robin(fns, device, warmup=warmup, repeats=rounds)
    results = []
    for row in rows:
        base, last = times[f"{row}|contiguous"], times[f"{row}|channels_last"]
        q1, ratio, q3 = quartiles([b / a for a, b in zip(base, last)])
        results.append(dict(row=row, label=study.ROWS[row][0], contiguous_ms=base,
                            channels_last_ms=last, median_contiguous_ms=quartiles(base)[1],
                            median_channels_last_ms=quartiles(last)[1], ratio=ratio,
                            ratio_half_iqr=(q3 - q1) / 2))
    return dict(schema="kalmannorm.memory-format/1", created_at=now(), git_commit=commit,
                git_dirty=dirty, versions=versions(), machine=machine(device),
                device=str(device), config=dict(family=family, arch=study.FAMILIES[family],
                                                model_arguments={r: study.model_arguments(
                                                    family, r, width) for r in rows},
                                                width=width, batch=batch, rounds=rounds,
                                                warmup=warmup, threads=threads),
                results=results)


def write_page(records_dir: str, page: str) -> str:
    """The page from the newest record of each (family, device)."""
    newest: Dict[tuple, Dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(records_dir, "*.json"))):
        with open(path) as f:
            record = json.load(f)
        record["_file"] = os.path.basename(path)
        key = (record["config"]["family"], record["device"])
        if key not in newest or record["created_at"] > newest[key]["created_at"]:
            newest[key] = record
    lines = ["# Channels-last training: speed per study row", "",
             "Generated by `python experiments/memory_format_speed.py --write` from the records "
             "in [`memory-format/`](memory-format/); nothing here is typed by hand.", "",
             "One training step (forward, cross-entropy, backward, SGD step) of each study row's "
             "model, built by the harness exactly as the study trains it, with contiguous and "
             "with channels-last weights and activations (`kalmannorm train --channels-last`), "
             "timed round-robin in one process after warm-up rounds. *Ratio* is the median of the "
             "per-round ratio channels-last / contiguous (± half its interquartile range): below "
             "1 the channels-last layout is faster. The two layouts compute the same up to "
             "rounding (tested in `tests/harness/test_train.py`). Absolute times on a shared "
             "machine move between runs; the ratios, taken within rounds, are the result."]
    if not newest:
        lines += ["", "No records yet."]
    for (family, device), record in sorted(newest.items()):
        c, m = record["config"], record["machine"]
        lines += ["", f"## {study.FAMILY_SPECS[family][2]} on {device}", "",
                  f"Record `{record['_file']}`: batch {c['batch']}, {c['rounds']} rounds after "
                  f"{c['warmup']} warm-up, {c['threads']} torch thread(s); {m.get('gpu') or m['cpu']}; "
                  f"commit {str(record['git_commit'])[:10]}"
                  f"{' (dirty tree)' if record['git_dirty'] else ''}.", "",
                  "| Row | Contiguous (ms / step) | Channels-last (ms / step) | Ratio |",
                  "|---|---|---|---|"]
        for r in record["results"]:
            lines.append(f"| {r['label']} | {r['median_contiguous_ms']:.0f} | "
                         f"{r['median_channels_last_ms']:.0f} | {r['ratio']:.2f} ± "
                         f"{r['ratio_half_iqr']:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(page, "w") as f:
        f.write(text)
    return page


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="mobilenet_s1", choices=list(study.FAMILIES))
    p.add_argument("--rows", nargs="+", choices=list(study.ROWS),
                   help="default: the rows the verdicts rest on")
    p.add_argument("--width", type=int, default=8, help="pre-activation ResNet base width")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--records", default=RECORDS)
    p.add_argument("--page", default=PAGE)
    p.add_argument("--write", action="store_true", help="write the page from --records")
    p.add_argument("--no-run", action="store_true", help="only --write")
    args = p.parse_args(argv)
    if not args.no_run:
        record = measure(args.family, args.rows or study.VERDICT_ROWS, args.width, args.batch,
                         args.rounds, args.warmup, args.threads, torch.device(args.device))
        stamp = record["created_at"].replace(":", "").replace("-", "")[:15]
        path = os.path.join(args.records, f"{args.family}-{record['device']}-{stamp}.json")
        write_json(path, record)
        for r in record["results"]:
            print(f"{r['row']:14s} {r['median_contiguous_ms']:8.0f} ms "
                  f"{r['median_channels_last_ms']:8.0f} ms  ratio {r['ratio']:.2f}", flush=True)
        print(f"wrote {path}", flush=True)
    if args.write:
        print(write_page(args.records, args.page), flush=True)


if __name__ == "__main__":
    main()
