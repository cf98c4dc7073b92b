"""Write docs/results/ from run records: README.md (protocol, table, verdicts), plot, records.

Every number in the generated page comes from the records, except the published figures quoted
from docs/method.md section 6, which are labelled as such.

    python experiments/write_results.py runs/cifar --out docs/results   # copies the records
    python experiments/write_results.py docs/results/records/*.json      # regenerates the page
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
from typing import Dict, List

from kalmannorm.harness.report import collect_records, markdown_table, plot_test_error, summarize

PUBLISHED = """Published (method.md section 6, read from the authors' plots, CIFAR-10, full 400-epoch
schedule): ResNet-32 with statistics over micro-batches of 2: BN ~8.8%, GN ~8.5%, BKN ~7.6%;
ResNet-110 at batch 128: BN ~6.2%, BKN ~5.9%."""

TIE_POINTS = 0.25  # percentage points: a smaller difference is a tie whatever the spread


def spread(row: Dict) -> float:
    """Half the min-max range over seeds, in points (0 for a single seed)."""
    return 50 * (row["test_error_max"] - row["test_error_min"])


def protocol(record: Dict) -> tuple:
    """What must match for two runs to be compared: SGD batch, training images, epochs."""
    return (record["config"]["batch_size"], record["dataset"]["train_size"],
            record["epochs_planned"])


def verdicts(rows: List[Dict], records: List[Dict], reference: str) -> List[str]:
    """``reference`` against every method run under the same protocol."""
    protocols = {r["label"]: protocol(r) for r in records}
    ref = next((r for r in rows if r["label"] == reference), None)
    if ref is None or ref["test_error_mean"] is None:
        return [f"- no record labelled {reference!r}: no verdicts"]
    lines = []
    for row in rows:
        if (row is ref or row["test_error_mean"] is None
                or protocols[row["label"]] != protocols[reference]):
            continue
        diff = 100 * (ref["test_error_mean"] - row["test_error_mean"])
        margin = max(TIE_POINTS, spread(ref) + spread(row))
        word = "ties with" if abs(diff) <= margin else ("beats" if diff < 0 else "loses to")
        lines.append(
            f"- {reference} **{word}** {row['label']}: {100 * ref['test_error_mean']:.2f}% vs "
            f"{100 * row['test_error_mean']:.2f}% ({diff:+.2f} points; tie margin "
            f"{margin:.2f})"
        )
    return lines


def _epoch_times(records: List[Dict]) -> str:
    """Median epoch time per method (indicative: runs shared the device)."""
    times: Dict[tuple, List[float]] = {}
    for r in records:
        key = (r["label"], r.get("device_name", r["device"]))
        times.setdefault(key, []).extend(e["epoch_time"] for e in r["history"][1:])
    lines = ["| Method | Device | Median epoch time (s) |", "|---|---|---|"]
    lines += [f"| {label} | {device} | {statistics.median(t):.1f} |"
              for (label, device), t in times.items() if t]
    return ("## Time per epoch\n\nMedian over epochs 2 onwards, training and evaluation. The runs "
            "on the GPU shared it with up to eight concurrent runs (on the CPU with other work), "
            "so these are indicative only; "
            "see docs/performance.md for controlled timings.\n\n" + "\n".join(lines))


def _protocols(records: List[Dict]) -> str:
    """Per method: what differs between runs (batch, statistics group, data, schedule)."""
    seen: Dict[str, str] = {}
    for r in records:
        c, recipe = r["config"], r["recipe"]
        per_sample = c["norm"] in ("groupnorm", "layernorm", "instancenorm")
        micro = "per sample" if per_sample else (c["micro_batch"] or c["batch_size"])
        prediction = c["prediction"] if c["norm"].startswith("bkn") else "-"
        seen.setdefault(r["label"], (
            f"| {r['label']} | {c['batch_size']} | {micro} | {r['dataset']['train_size']} | "
            f"{r['epochs_planned']} | {recipe['lr']} | {prediction} |"))
    return "\n".join(["| Method | SGD batch | Rows per statistics group | Train images | Epochs "
                      "| Peak lr | Prediction |", "|---|---|---|---|---|---|---|",
                      *seen.values()])


def _incomplete_note(incomplete: List[Dict]) -> str:
    if not incomplete:
        return ""
    runs = "; ".join(
        f"{r['label']} seed {r['seed']} ({r['epochs_done']} of {r['epochs_planned']} epochs, "
        f"{r['stop_reason']})" for r in incomplete)
    return f"Left out of the table, cut short: {runs}.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+", help="record.json files or directories")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--reference", nargs="+",
                        default=["BKN (p=0.9), m=2, propagate=raw, running_stats=all, "
                                 "gain_rule=fixed, decisions=layer",
                                 "BKN (p=0.9), batch 2, propagate=raw, running_stats=all, "
                                 "gain_rule=fixed, decisions=layer"],
                        help="labels each compared with the methods of the same protocol")
    args = parser.parse_args()

    records = [r for r in collect_records(args.records) if r["dataset"]["name"] == "cifar10"]
    os.makedirs(os.path.join(args.out, "records"), exist_ok=True)
    for r in records:  # keep the records beside the page they produce
        path = r["_path"]
        name = (os.path.basename(os.path.dirname(path)) + ".json"
                if os.path.basename(path) == "record.json" else os.path.basename(path))
        if os.path.abspath(path) != os.path.abspath(os.path.join(args.out, "records", name)):
            shutil.copyfile(path, os.path.join(args.out, "records", name))
    incomplete = [r for r in records if not r["complete"]]
    records = [r for r in records if r["complete"]]  # a cut-short run is not comparable
    rows = summarize(records)
    plot_test_error(records, os.path.join(args.out, "test_error.png"),
                    "CIFAR-10 (JPEG copy), pre-activation ResNet-20, SGD batch 128")
    first = records[0]
    epochs = sorted({r["epochs_planned"] for r in records})
    devices = sorted({r.get("device_name", r["device"]) for r in records})
    commits = sorted({str(r["git_commit"]) for r in records})
    recipe = first["config"]["recipe"]
    text = f"""# Results: micro-batch comparison on CIFAR-10

Generated by `experiments/write_results.py` from the {len(records)} run records in
[`records/`](records/); nothing on this page is typed by hand except the published figures.

These are the project's first, short runs, with layer-wide decisions that read every group. The
current evidence is on the other pages here: [the micro-batch study](study.md) (faithful groups,
15 epochs, every normalizer a user would pick instead), [the screening of BKN's
configurations](screening.md), [why BKN's estimate falls short, layer by
layer](statistics-error.md), [example weighing at evaluation](example-weighing.md) and [the
speed of channels-last training](memory-format.md).

## Protocol

- Data: CIFAR-10 from `../shared/data`, a copy made from **lossy JPEGs** (quality 75, ~30 dB
  PSNR against the originals), so numbers are close to, not identical with, CIFAR-10 results.
  50,000 train / 10,000 test images; the released code's augmentation (per-pixel mean
  subtraction, /128, 4-pixel pad + random 32x32 crop, horizontal flip).
- Model: pre-activation ResNet-20 of the released code (channel-padding shortcuts).
- SGD batch 128 unless stated; "m=2" means statistics over 64 groups of 2 rows inside each
  batch, the paper's protocol for "batch size 2"; "full batch" means statistics over all 128
  rows; "SGD batch 2" is a true batch of 2 (one group), a shorter run on a fixed 10,000-image
  subset with the learning rate scaled linearly.
- Schedule: the harness's `{recipe}` recipe, {' or '.join(map(str, epochs))} epochs (linear
  warm-up, cosine decay, Nesterov momentum 0.9, weight decay 5e-4 on conv/linear weights), much
  shorter than the paper's 400 epochs. Errors are final-epoch test errors.
- Devices: {', '.join(devices)}; code commits: {', '.join(commits)}.

{_protocols(records)}

## Table

{markdown_table(rows)}
{_incomplete_note(incomplete)}
![test error against epoch](test_error.png)

## Where BKN wins, ties or loses

Each BKN configuration against every method run under the same protocol (SGD batch, training
images, epochs). Rule: a difference of mean final test error within the sum of the two methods'
half-ranges over seeds (at least {TIE_POINTS} points) is a tie; one seed has no spread, so such
a verdict is weak.

{chr(10).join(line for ref in args.reference for line in verdicts(rows, records, ref))}

{_epoch_times(records)}

## Against the published numbers

{PUBLISHED}

These runs use a shorter schedule and a shallower network, so only the ordering of the methods,
not the absolute errors, can be compared. Caveats: with so few epochs, methods that converge more
slowly (GroupNorm in particular, which the paper finds close to BatchNorm after the full
schedule) are penalised; Batch Renormalization's r/d correction is still ramping up during most
of such a run; and the seeds give few samples per method.
"""
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(text)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
