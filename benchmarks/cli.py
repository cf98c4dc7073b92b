"""Speed and memory of kalmannorm's normalization layers, as ratios to BatchNorm.

Batch Kalman Normalization (Wang et al., arXiv 1802.03133) adds one pseudo-image per statistics
group through every layer, so its cost is compared with BatchNorm's in the same process and the
same rounds (:mod:`benchmarks.measure`). Three suites: ``layer`` (one layer forward + backward,
also against its bytes floor; :mod:`benchmarks.layer`), ``model`` and ``compile`` (an SGD step of
a whole network, eager and compiled; :mod:`benchmarks.model`). Every suite runs for float32 and
bfloat16 autocast, contiguous and channels-last. Results go to a JSON record
(:mod:`benchmarks.run`) in ``--out``; :mod:`benchmarks.doc` turns all records of a folder into
the tables of ``docs/performance.md``.

Usage, from the repository root (``make bench`` runs the first)::

    python -m benchmarks --quick                       # < 2 minutes on a CPU
    python -m benchmarks --out docs/perf               # the full CPU suite
    python -m benchmarks --device cuda --out DIR       # the full GPU suite (~3 minutes)
    python -m benchmarks --doc docs/performance.md --records docs/perf --doc-only  # tables only
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Tuple

from .doc import write_doc
from .run import BenchConfig, resolve, run_bench

__all__ = ["add_arguments", "main"]

log = logging.getLogger("benchmarks")


def _ints(text: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _strs(text: str) -> Tuple[str, ...]:
    return tuple(v for v in text.split(",") if v)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``python -m benchmarks`` (and ``kalmannorm bench``); each maps to a
    :class:`~benchmarks.run.BenchConfig` field, and the defaults shown are that class's (and
    those :func:`~benchmarks.run.resolve` fills in per device)."""
    default, cpu, cuda = BenchConfig(), resolve(BenchConfig()), resolve(BenchConfig(device="cuda"))

    def per_device(name: str) -> str:
        shown = ["none" if v is None else f"{v:g}" for v in (getattr(cpu, name), getattr(cuda, name))]
        return f"default {shown[0]} on CPU, {shown[1]} on CUDA"

    p.add_argument("--device", default=default.device, help="cpu, cuda, cuda:1, ... (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="small shapes, few rounds (< 2 min CPU)")
    p.add_argument("--suites", type=_strs, default=default.suites,
                   help=f"comma list of layer, model, compile (default {','.join(default.suites)})")
    p.add_argument("--repeats", type=int, help="measured rounds (layer suite)")
    p.add_argument("--model-repeats", type=int, help="measured rounds (model and compile suites)")
    p.add_argument("--warmup", type=int, help="warm-up rounds")
    p.add_argument("--threads", type=int, help=f"torch CPU threads ({per_device('threads')})")
    p.add_argument("--dtypes", type=_strs, help="comma list: float32,bfloat16")
    p.add_argument("--memory-formats", type=_strs, help="comma list: contiguous,channels_last")
    p.add_argument("--layer-micro-batches", type=_ints, help="e.g. 2,4,8,32")
    p.add_argument("--model-micro-batches", type=_ints, help="e.g. 2,4,8")
    p.add_argument("--prediction", type=_strs, default=default.prediction,
                   help="BKN prediction(s) for the model suite: sampled, analytic "
                        f"(default {','.join(default.prediction)})")
    p.add_argument("--budget-s", type=float,
                   help=f"skip the remaining measurements after this many seconds "
                        f"({per_device('budget_s')})")
    p.add_argument("--bandwidth-bytes", type=int,
                   help="clone size for the copy bandwidth of the bytes floor (default 1 GiB on "
                        "CUDA, 256 MiB on the CPU)")
    p.add_argument("--label", default=default.label, help="added to the record's file name")
    p.add_argument("--out", default=None,
                   help="folder for the JSON record (default docs/perf when run from the repo)")
    p.add_argument("--doc", default=None,
                   help="regenerate this markdown file's tables from the records in --records")
    p.add_argument("--records", default=None, help="records folder for --doc (default --out)")
    p.add_argument("--doc-only", action="store_true", help="only regenerate --doc")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or "docs/perf"
    if not args.doc_only:
        fields = {f.name for f in dataclasses.fields(BenchConfig)}
        values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
        record = run_bench(BenchConfig(**values), out)
        log.info("record written to %s (%.0f s)", record.get("path"), record["wall_s"])
    if args.doc:
        write_doc(args.doc, args.records or out)
        log.info("tables of %s regenerated from %s", args.doc, args.records or out)
    return 0
