"""Reports from run records: a markdown table and a plot of test error against epoch.

Every number in a report comes from the records (:mod:`kalmannorm.harness.records`); nothing is typed.
Runs are grouped by their whole configuration (:func:`configuration`: every option that changes
what a run computes, the norm layers' resolved options included), never by label alone; a
group's final test error is summarised by mean, sample standard deviation and range over seeds,
and seeds run twice are flagged.
"""
from __future__ import annotations

import glob
import json
import math
import os
import statistics
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .config import RUNTIME_FIELDS, config_defaults
from .extras import require
from .records import SCHEMA, normalization_with_defaults, read_record

__all__ = ["collect_records", "configuration", "group_runs", "summarize", "markdown_table",
           "plot_test_error", "write_report"]


def _is_run_record(path: str) -> bool:
    """Whether a JSON file holds a run record (any name; ``record.json`` always counts, so that
    a damaged one is reported rather than skipped)."""
    if os.path.basename(path) == "record.json":
        return True
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("schema") == SCHEMA


def collect_records(paths: Iterable[str]) -> List[Dict[str, Any]]:
    """Load records from files and directories: a directory is searched recursively for run
    records, a run's ``record.json`` or a copy under another name (``docs/results/*/records``);
    other JSON files there are skipped."""
    files: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = [f for f in sorted(glob.glob(os.path.join(path, "**", "*.json"), recursive=True))
                     if _is_run_record(f)]
            if not found:
                raise FileNotFoundError(f"no run record (a run's record.json, or JSON with schema "
                                        f"{SCHEMA!r}) under {path!r}")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"record {path!r} does not exist")
    records = []
    for f in dict.fromkeys(files):  # keep order, drop duplicates
        record = read_record(f)
        record["_path"] = f
        records.append(record)
    if not records:
        raise ValueError("no records given")
    return records


# Record fields that do not change what a run computes: left out of the configuration key.
_RUN_ONLY = ("seed", *RUNTIME_FIELDS)


def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, dict):
        out: Dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(value, sort_keys=True)}


def configuration(record: Dict[str, Any]) -> Dict[str, str]:
    """What a run computed, flattened to ``{"config.norm": ..., "normalization.layers": ...}``:
    the config without the seed and the fields that only say where and how it ran, the resolved
    recipe, the data (name and sizes), the world size, and every resolved option of the norm
    layers. A record from before the options were stored is keyed by its code commit too, since
    its defaults cannot be recovered otherwise. A config field or layer option the recording
    code did not have ran as its default, and reads so."""
    config = {k: v for k, v in {**config_defaults(), **record["config"]}.items()
              if k not in _RUN_ONLY}
    key: Dict[str, Any] = dict(config=config, recipe=record.get("recipe"),
                               dataset=record["dataset"], world_size=record.get("world_size"))
    if record.get("normalization") is not None:
        key["normalization"] = normalization_with_defaults(record["normalization"])
    else:
        key["git_commit"] = record.get("git_commit")
    return _flatten(key)


def group_runs(records: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """Runs grouped by their whole :func:`configuration`, in order of appearance, keyed by a
    label: the records' label, followed by what sets the group apart (``[config.epochs=5]``)
    where different configurations carry the same label. Runs of different configurations are
    never merged."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    keys: Dict[str, Dict[str, str]] = {}
    for r in records:
        conf = configuration(r)
        ident = json.dumps(conf, sort_keys=True)
        groups.setdefault(ident, []).append(r)
        keys[ident] = conf
    by_label: Dict[str, List[str]] = {}
    for ident, runs in groups.items():
        by_label.setdefault(runs[0]["label"], []).append(ident)
    labelled: Dict[str, List[Dict[str, Any]]] = {}
    for ident, runs in groups.items():
        label = runs[0]["label"]
        same = by_label[label]
        if len(same) > 1:
            fields = sorted({f for other in same for f in keys[other]
                             if any(keys[o].get(f) != keys[other].get(f) for o in same)})
            label += " [" + ", ".join(f"{f}={keys[ident].get(f, 'absent')}" for f in fields) + "]"
        labelled[label] = runs
    return labelled


def summarize(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per configuration (:func:`group_runs`), in order of appearance.

    Row fields: ``label, arch, dataset, seeds, runs, duplicate_seeds, epochs, complete,
    test_error_mean, test_error_std, test_error_min, test_error_max, train_loss_mean,
    guard_fallback_rate`` (errors as fractions; ``std`` is the sample standard deviation,
    ``None`` with a single run; ``duplicate_seeds`` lists seeds run more than once).
    """
    rows = []
    for label, runs in group_runs(records).items():
        errors = [r["final"]["test_error"] for r in runs if r["final"].get("test_error") is not None]
        losses = [r["final"]["train_loss"] for r in runs if r["final"].get("train_loss") is not None]
        fallbacks = sum(e["guard_fallbacks"] for r in runs for e in r["history"])
        priors = sum(e["guard_priors"] for r in runs for e in r["history"])
        seeds = [r["seed"] for r in runs]
        rows.append(dict(
            label=label, arch=runs[0]["config"]["arch"], dataset=runs[0]["dataset"]["name"],
            seeds=len(set(seeds)), runs=len(runs),
            duplicate_seeds=sorted({s for s in seeds if seeds.count(s) > 1}),
            epochs=sorted({r["epochs_done"] for r in runs}),
            complete=sum(bool(r["complete"]) for r in runs),
            test_error_mean=statistics.fmean(errors) if errors else None,
            test_error_std=statistics.stdev(errors) if len(errors) > 1 else None,
            test_error_min=min(errors) if errors else None,
            test_error_max=max(errors) if errors else None,
            train_loss_mean=statistics.fmean(losses) if losses else None,
            guard_fallback_rate=(fallbacks / priors) if priors else None,
        ))
    return rows


def _fmt_pct(x: Optional[float]) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Markdown table of :func:`summarize` rows (test error in percent)."""
    header = ["Method", "Arch", "Dataset", "Seeds", "Epochs", "Test error % (mean ± std)",
              "Min–max %", "Final train loss", "Guard fallbacks"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in rows:
        spread = "" if row["test_error_std"] is None else f" ± {100 * row['test_error_std']:.2f}"
        epochs = "/".join(str(e) for e in row["epochs"])
        if row["complete"] < row["runs"]:
            epochs += f" ({row['runs'] - row['complete']} incomplete)"
        guard = "n/a" if row["guard_fallback_rate"] is None else f"{100 * row['guard_fallback_rate']:.1f}%"
        seeds = str(row["seeds"])
        if row.get("duplicate_seeds"):
            seeds += f" ({row['runs']} runs; seed {', '.join(map(str, row['duplicate_seeds']))} repeated)"
        cells = [
            row["label"], row["arch"], row["dataset"], seeds, epochs,
            _fmt_pct(row["test_error_mean"]) + spread,
            f"{_fmt_pct(row['test_error_min'])}–{_fmt_pct(row['test_error_max'])}",
            "n/a" if row["train_loss_mean"] is None else f"{row['train_loss_mean']:.4f}", guard,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_test_error(records: Sequence[Dict[str, Any]], path: str, title: Optional[str] = None) -> str:
    """PNG of test error (%) against epoch: mean over seeds per method, min–max band."""
    matplotlib = require("matplotlib", "the test-error plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, runs in group_runs(records).items():
        by_epoch: Dict[int, List[float]] = {}
        for r in runs:
            for e in r["history"]:
                if e.get("test_error") is not None:
                    by_epoch.setdefault(e["epoch"] + 1, []).append(100 * e["test_error"])
        if not by_epoch:
            continue
        epochs = sorted(by_epoch)
        mean = [statistics.fmean(by_epoch[e]) for e in epochs]
        line, = ax.plot(epochs, mean, label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(epochs, [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%)")
    ax.set_title(title or "Test error")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(paths: Iterable[str], out_dir: str, title: Optional[str] = None) -> Dict[str, str]:
    """Write ``report.md`` and ``test_error.png`` into ``out_dir`` from the given records.

    Returns ``{"markdown": table text, "report": path of report.md, "plot": path of the PNG}``.
    """
    records = collect_records(paths)
    rows = summarize(records)
    table = markdown_table(rows)
    plot = plot_test_error(records, os.path.join(out_dir, "test_error.png"), title)
    versions = sorted({(r["git_commit"] or "no git", r["versions"]["kalmannorm"], r["versions"]["torch"],
                        r.get("device_name", r["device"])) for r in records})
    sources = "\n".join(f"- commit `{c}`, kalmannorm {k}, torch {t}, {d}" for c, k, t, d in versions)
    text = (f"# {title or 'Results'}\n\nFinal test error per method over seeds, from "
            f"{len(records)} run records.\n\n{table}\n![test error]({os.path.basename(plot)})\n\n"
            f"Produced by:\n{sources}\n")
    report = os.path.join(out_dir, "report.md")
    with open(report, "w") as f:
        f.write(text)
    return dict(markdown=table, report=report, plot=plot)
