"""The device check and its report: the committed record regenerates docs/gpu.md's measured part,
and the check's code paths run on the CPU (Triton interpreter, tiny shapes)."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_report, host_path

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
RECORD = "docs/perf/gpu-check-h200-20261127.json"
FOLLOWUP = "docs/perf/gpu-check-h100-20261127-followup.json"
HOST_PATH = "docs/perf/host-path-cpu-20261127.json"


@pytest.mark.parametrize("path,begin,end,render", [
    (RECORD, gpu_report.BEGIN, gpu_report.END, gpu_report.render),
    (FOLLOWUP, gpu_report.FOLLOWUP_BEGIN, gpu_report.FOLLOWUP_END, gpu_report.render_followup),
    (HOST_PATH, host_path.BEGIN, host_path.END, host_path.render),
])
def test_committed_records_regenerate_the_doc(path, begin, end, render):
    with open(os.path.join(ROOT, path)) as f:
        record = json.load(f)
    with open(os.path.join(ROOT, "docs", "gpu.md")) as f:
        doc = f.read()
    measured = doc.split(begin)[1].split(end)[0].strip()
    assert measured == render(record, path).strip()


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


def test_host_path_benchmark_writes_a_record_and_its_table(tmp_path):
    pytest.importorskip("triton")
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{host_path.BEGIN}\nold\n{host_path.END}\nafter\n")
    out = tmp_path / "host.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "host_path.py"), "--repeats", "2",
         "--inner", "2", "--out", str(out), "--doc", str(doc)],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"batchnorm", "bkn_prior", "bkn_prior_fixed_gain",
                                      "bkn_shadow", "ghost_bn", "batch_renorm"}
    assert all(r["median_us"] > 0 for r in record["results"].values())
    text = doc.read_text()
    assert "old" not in text and text.startswith("before") and text.endswith("after\n")
    assert "| bkn_prior |" in text


def test_without_launches_skips_every_kernel_and_restores(monkeypatch):
    pytest.importorskip("triton")
    import torch

    import kalmannorm as kn
    from kalmannorm.functional import triton_ops

    calls = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(grid)

    for name in ("stats_kernel", "apply_kernel", "buffers_kernel"):
        monkeypatch.setattr(triton_ops.K, name, Spy())
    layer = kn.BatchKalmanNorm2d(3, micro_batch=2)
    x = torch.randn(4, 3, 2, 2)
    with kn.use_backend("triton"):
        with triton_ops.without_launches():
            layer.forward_with_prior(x, None, 2)
        assert calls == []
        layer.forward_with_prior(x, None, 2)
    assert len(calls) == 3  # stats, apply, buffers
