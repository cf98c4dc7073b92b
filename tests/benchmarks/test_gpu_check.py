"""The device check and its report: the committed record regenerates docs/gpu.md's measured part,
and the check's code paths run on the CPU (Triton interpreter, tiny shapes)."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_report

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
RECORD = "docs/perf/gpu-check-h200-20261127.json"


def test_committed_record_regenerates_the_doc():
    with open(os.path.join(ROOT, RECORD)) as f:
        record = json.load(f)
    with open(os.path.join(ROOT, "docs", "gpu.md")) as f:
        doc = f.read()
    measured = doc.split(gpu_report.BEGIN)[1].split(gpu_report.END)[0].strip()
    assert measured == gpu_report.render(record, RECORD).strip()


def test_cpu_smoke_run_writes_a_record(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--cpu-smoke",
         "--out", str(out), "--skip", "correctness", "layers", "model_resnet20",
         "model_resnet50", "compile"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["sections"]["repeatability"]["result"]["bitwise_equal"] is True
    assert record["sections"]["bandwidth"]["result"]["copy_bytes_per_s"] > 0
    assert record["sections"]["compile"] == {"skipped": "asked"}
