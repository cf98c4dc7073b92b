"""The tables of ``docs/performance.md``, generated from the benchmark records (none typed).

:func:`write_doc` replaces the text between the generated-table markers of the document with the
tables of :func:`render_tables` (per device kind: the targets, the layer, model and compile
suites, each configuration from the newest record that measured it) and of
:func:`render_comparison` (before/after records side by side); the prose around them stays.

    python -m benchmarks --doc-only --doc docs/performance.md --records docs/perf
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from kalmannorm.harness.records import atomic_path

from .run import LAYER_SHAPES, load_records

__all__ = ["render_tables", "render_comparison", "write_doc", "DOC_BEGIN", "DOC_END"]

DOC_BEGIN = "<!-- BEGIN GENERATED TABLES (benchmarks/doc.py; do not edit by hand) -->"
OLD_DOC_BEGIN = ("<!-- BEGIN GENERATED TABLES (kalmannorm.bench.write_doc; do not edit by hand) -->",)
DOC_END = "<!-- END GENERATED TABLES -->"


def _fmt_ratio(entry: Dict[str, Any], key: str = "ratio") -> str:
    if key not in entry:
        return ""
    iqr = entry.get(f"{key}_iqr")
    return f"{entry[key]:.2f}" + (f" ±{iqr / 2:.2f}" if iqr is not None else "")


def _target_mark(value: float, limit: float) -> str:
    if value <= limit:
        return "ok"
    if limit == 0:
        return f"**missed ({value})**"
    return f"**missed by {100 * (value / limit - 1):.0f}%**"


def _micro(name: str) -> Optional[int]:
    return int(name.split("@")[1]) if "@" in name else None


def _record_header(record: Dict[str, Any]) -> List[str]:
    machine, versions, cfg = record["machine"], record["versions"], record["config"]
    where = machine.get("gpu") or machine.get("cpu")
    commit = (record.get("git_commit") or "unknown")[:10] + (
        " (dirty)" if record.get("git_dirty") else "")
    return [
        f"Record `{os.path.basename(record.get('path', ''))}`: {where}, "
        f"{machine.get('torch_threads')} torch thread(s), torch {versions['torch']}, "
        f"Python {versions['python']}, kalmannorm {versions['kalmannorm']} at commit {commit}, "
        f"{'quick' if cfg['quick'] else 'full'} mode, {cfg['repeats']} rounds after "
        f"{cfg['warmup']} warm-up (models: {cfg['model_repeats']} rounds), "
        f"{record.get('wall_s', 0):.0f} s in all, started {record['started_at']}.",
        "",
    ] + _verify_line(record)


def _verify_line(record: Dict[str, Any]) -> List[str]:
    check = record.get("verify")
    if not check:
        return []
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in check.get("max_rel_diff", {}).items())
    # Records before the backends say nothing of them: their default was the fused kernel.
    kernels = f"The default kernels (`{check['backend']}`)" if check.get("backend") else "Fused kernel"
    if check.get("ok"):
        return [f"{kernels} checked against the composite form on this device (largest "
                f"relative differences: {diffs}).", ""]
    failed = kernels if check.get("backend") else "The fused kernel"
    return [f"**{failed} failed its check on this device ({check.get('error') or diffs});"
            f" every BKN number below is the composite form's.**", ""]


def _layer_tables(record: Dict[str, Any]) -> List[str]:
    lines = []
    rows = [r for r in record["results"] if r["suite"] == "layer" and "methods" in r]
    if not rows:
        return lines
    lines += ["Layer forward + backward: median ms, ratio to BatchNorm in the same round "
              "(median ± half the IQR), and the BKN targets (`bkn` <= 1.3x BN; `bkn_shadow`, "
              "which also carries the S shadow rows, <= (1 + 1/m) x 1.3x BN; at the largest "
              "shape `bkn` <= 2x the copy floor).", ""]
    if any("copy_bandwidth" in r for r in rows):
        lines += ["`x floor`: the median time over the method's bytes floor (its least memory "
                  "traffic, \"The bytes floor\" above, at the copy bandwidth measured in the same "
                  "run); `launches`: CUDA kernels per step (`torch.profiler`; n/a on the CPU). "
                  "Tensors that fit in the caches can beat their floor.", ""]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        floor = "copy_bandwidth" in r  # records before the bytes floor lack these columns
        lines.append(f"**[{shape}] {r['dtype']}, {r['memory_format']}, {r['mode']}**")
        lines.append("")
        if floor:
            lines.append(f"Copy bandwidth {r['copy_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s "
                         f"(clone of {r['copy_bandwidth']['bytes'] // 2**20} MiB).")
            lines.append("")
        extra = " x floor | launches |" if floor else ""
        lines.append("| method | ms | x BN | x copy |" + extra + " target |")
        lines.append("|---|---:|---:|---:|" + ("---:|---:|" if floor else "") + "---|")
        largest = r["shape"] == max((x["shape"] for x in rows),
                                    key=lambda s: math.prod(s))
        for name, entry in r["methods"].items():
            m = _micro(name)
            target = ""
            if name.startswith("bkn@"):
                target = "x BN " + _target_mark(entry["ratio"], 1.3)
                if largest:
                    target += "; x copy " + _target_mark(entry["vs_copy"], 2.0)
            elif name.startswith("bkn_shadow@") and m:
                target = "x BN " + _target_mark(entry["ratio"], (1 + 1 / m) * 1.3)
            cells = ""
            if floor:
                launches = entry.get("launches")
                cells = f" {entry['x_floor']:.2f} | {'n/a' if launches is None else launches} |"
            lines.append(f"| {name} | {entry['median_ms']:.2f} ±{entry['iqr_ms'] / 2:.2f} | "
                         f"{_fmt_ratio(entry)} | {entry['vs_copy']:.2f} |{cells} {target} |")
        for name, error in r.get("errors", {}).items():
            lines.append(f"| {name} | not run: {error} | | |" + (" | |" if floor else "") + " |")
        lines.append("")
    return lines


def _model_tables(record: Dict[str, Any]) -> List[str]:
    lines = []
    rows = [r for r in record["results"] if r["suite"] == "model" and "methods" in r]
    if not rows:
        return lines
    lines += ["Model: one SGD step (ms, ratio to BatchNorm in the same round) and memory "
              "(autograd-saved bytes; on CUDA also the step's peak allocation above its start), "
              "with the BKN targets: time <= (1 + 1/m) x 1.05 BN, memory <= (1 + 1/m) x 1.1 BN.",
              ""]
    for r in rows:
        lines.append(f"**{r['arch']}, batch {r['batch']}, {r['image_size']}px, {r['dtype']}, "
                     f"{r['memory_format']}**")
        lines.append("")
        lines.append("| method | ms/step | x BN | saved MiB | x BN | peak MiB | x BN | "
                     "target (time; memory) |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for name, e in r["methods"].items():
            m = _micro(name)
            target = ""
            if name.startswith("bkn") and m:
                mem = e.get("peak_ratio", e["saved_ratio"])
                target = (_target_mark(e["ratio"], (1 + 1 / m) * 1.05) + "; "
                          + _target_mark(mem, (1 + 1 / m) * 1.1))
            peak = "" if e.get("peak_bytes") is None else f"{e['peak_bytes'] / 2**20:.1f}"
            peak_ratio = f"{e['peak_ratio']:.2f}" if "peak_ratio" in e else ""
            lines.append(
                f"| {name} | {e['median_ms']:.1f} ±{e['iqr_ms'] / 2:.1f} | {_fmt_ratio(e)} | "
                f"{e['saved_bytes'] / 2**20:.1f} | {e['saved_ratio']:.2f} | {peak} | "
                f"{peak_ratio} | {target} |")
        for name, error in r.get("errors", {}).items():
            lines.append(f"| {name} | not run: {error} | | | | | | |")
        lines.append("")
    return lines


def _compile_tables(record: Dict[str, Any]) -> List[str]:
    lines = []
    for r in record["results"]:
        if r["suite"] != "compile":
            continue
        if r.get("kind") == "explain" and r.get("graph_breaks") is None:
            lines += [f"`torch._dynamo.explain` failed: {r.get('error')}", ""]
        elif r.get("kind") == "explain":
            reasons = "; ".join(r["reasons"]) or "none"
            lines += [f"`torch._dynamo.explain` of a converted {r['arch']} (BKN, micro-batch 2, "
                      f"training forward): {r['graphs']} graph(s), {r['graph_breaks']} graph "
                      f"break(s) (target 0: {_target_mark(r['graph_breaks'], 0)}); reasons: "
                      f"{reasons}.", ""]
        elif "methods" in r:
            lines += [f"**Compiled training step, {r['arch']}, batch {r['batch']}, "
                      f"{r['image_size']}px, float32**", "",
                      "| method | ms/step | x eager BN | first two steps (s) |",
                      "|---|---:|---:|---:|"]
            for name, e in r["methods"].items():
                lines.append(f"| {name} | {e['median_ms']:.1f} ±{e['iqr_ms'] / 2:.1f} | "
                             f"{_fmt_ratio(e)} | {e['first_two_steps_s']:.1f} |")
            for name, error in r.get("errors", {}).items():
                lines.append(f"| {name} | not run: {error} | | |")
            lines.append("")
    return lines


def _targets_table(record: Dict[str, Any]) -> List[str]:
    """One line per target of the issue: the measured worst case over the configurations."""
    rows: List[Tuple[str, str, str, str]] = []
    for r in record["results"]:
        if "methods" not in r:
            continue
        where = (f"{r['dtype']}, {r['memory_format']}, {r.get('mode', 'eager')}")
        if r["suite"] == "layer":
            shape = "x".join(map(str, r["shape"]))
            largest = r["shape"] == list(LAYER_SHAPES[-1])
            for name, e in r["methods"].items():
                m = _micro(name)
                if name.startswith("bkn@"):
                    rows.append((f"layer fwd+bwd [{shape}] m={m}", "<= 1.30x BN",
                                 f"{e['ratio']:.2f}x ({where})", _target_mark(e["ratio"], 1.3)))
                    if largest:
                        rows.append((f"layer vs copy [{shape}] m={m}", "<= 2.00x copy",
                                     f"{e['vs_copy']:.2f}x ({where})",
                                     _target_mark(e["vs_copy"], 2.0)))
        elif r["suite"] == "model":
            for name, e in r["methods"].items():
                m = _micro(name)
                if name.startswith("bkn") and m:
                    limit = (1 + 1 / m) * 1.05
                    rows.append((f"{r['arch']} step, {name}", f"<= {limit:.2f}x BN",
                                 f"{e['ratio']:.2f}x ({where})", _target_mark(e["ratio"], limit)))
                    mem = e.get("peak_ratio", e["saved_ratio"])
                    kind = "peak" if "peak_ratio" in e else "saved"
                    limit = (1 + 1 / m) * 1.1
                    rows.append((f"{r['arch']} memory ({kind}), {name}", f"<= {limit:.2f}x BN",
                                 f"{mem:.2f}x ({where})", _target_mark(mem, limit)))
    for r in record["results"]:
        if r["suite"] == "compile" and r.get("kind") == "explain" \
                and r.get("graph_breaks") is not None:
            rows.append(("graph breaks, converted " + r["arch"], "0", str(r["graph_breaks"]),
                         _target_mark(r["graph_breaks"], 0)))
    if not rows:
        return []
    lines = ["Targets of the issue, one row per measured configuration:", "",
             "| target | limit | measured | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return lines + [""]


def _result_key(result: Dict[str, Any]) -> Tuple:
    return (result["suite"], result.get("kind"), str(result.get("shape")), result.get("arch"),
            result.get("dtype"), result.get("memory_format"), result.get("mode"))


def _merge(records: Sequence[Dict[str, Any]]) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """One record made of the newest measured result of each configuration, and the records
    that contributed (a partial rerun replaces only what it measured)."""
    merged: Dict[Tuple, Dict[str, Any]] = {}
    source: Dict[Tuple, int] = {}
    for i, record in enumerate(records):
        for result in record["results"]:
            if "methods" in result or result.get("kind") == "explain" or \
                    _result_key(result) not in merged:
                merged[_result_key(result)] = result
                source[_result_key(result)] = i
    used = sorted(set(source.values()))
    return dict(records[-1], results=list(merged.values())), [records[i] for i in used]


def render_tables(records: Sequence[Dict[str, Any]]) -> str:
    """Markdown tables per device kind (CPU, then GPU) from its full records (else its quick
    ones), each configuration from the newest record that measured it."""
    lines: List[str] = []
    for device, title in (("cpu", "CPU"), ("cuda", "GPU")):
        mine = [r for r in records if r.get("device") == device]
        if not mine:
            lines += [f"### {title}", "", f"No {title} record yet.", ""]
            continue
        full = [r for r in mine if not r["config"]["quick"]]
        record, used = _merge(full or mine)
        lines += [f"### {title}", ""]
        for source in used:
            lines += _record_header(source)
        lines += _targets_table(record)
        lines += _layer_tables(record) + _model_tables(record) + _compile_tables(record)
    return "\n".join(lines).rstrip() + "\n"


def render_comparison(records: Sequence[Dict[str, Any]]) -> str:
    """Layer ratios to BatchNorm of several labelled records side by side (before/after)."""
    records = [r for r in records if any(x["suite"] == "layer" and "methods" in x
                                         for x in r["results"])]
    if not records:
        return ""
    lines = ["| shape | method | " + " | ".join(
        f"{r['label'] or 'unlabelled'} (commit {(r.get('git_commit') or '?')[:7]})"
        for r in records) + " |", "|---|---|" + "---:|" * len(records)]
    keys: List[Tuple[str, str]] = []
    tables: List[Dict[Tuple[str, str], Dict[str, Any]]] = []
    for r in records:
        table = {}
        for x in r["results"]:
            if x["suite"] != "layer" or "methods" not in x or x["mode"] != "eager" \
                    or x["dtype"] != "float32" or x["memory_format"] != "contiguous":
                continue
            shape = "x".join(map(str, x["shape"]))
            for name, e in x["methods"].items():
                if name in ("copy", "batchnorm"):
                    continue
                table[(shape, name)] = e
                if (shape, name) not in keys:
                    keys.append((shape, name))
        tables.append(table)
    for key in keys:
        cells = []
        for table in tables:
            e = table.get(key)
            cells.append("" if e is None else f"{_fmt_ratio(e)}x")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    header = ["Ratio to BatchNorm in the same round (float32, contiguous, eager, one CPU thread);"
              " each column is one record of `docs/perf/before-after/`:", ""]
    for r in records:
        header += _record_header(r)
    return "\n".join(header + lines) + "\n"


def write_doc(doc_path: str, records_dir: str) -> str:
    """Regenerate the tables of ``doc_path`` from the records in ``records_dir``.

    Only the text between the generated-table markers changes; the prose around them stays. A
    document without the markers gets them appended. Returns the new text.
    """
    tables = render_tables(load_records(records_dir))
    comparison_dir = os.path.join(records_dir, "before-after")
    if os.path.isdir(comparison_dir):
        comparison = render_comparison(load_records(comparison_dir))
        if comparison:
            tables += "\n### Before and after the fused kernel (CPU)\n\n" + comparison
    block = f"{DOC_BEGIN}\n\n{tables}\n{DOC_END}"
    text = ""
    if os.path.exists(doc_path):
        with open(doc_path) as f:
            text = f.read()
    begin = next((m for m in (DOC_BEGIN,) + OLD_DOC_BEGIN if m in text), None)
    if begin is not None and DOC_END in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(DOC_END, 1)[1]
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text else "# Performance\n\n") + block + "\n"
    with atomic_path(doc_path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return text

