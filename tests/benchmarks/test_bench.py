"""The benchmarks: measurement helpers, a tiny run end to end, and the generated doc tables."""
import json
import math
import os
import shutil
from types import SimpleNamespace

import torch

import kalmannorm as kn
from benchmarks.doc import DOC_BEGIN, DOC_END, write_doc
from benchmarks.layer import floor_bytes
from benchmarks.measure import (composite_backend, count_launches, kernel_launches, quartiles,
                                round_robin, summarize)
from benchmarks.run import BenchConfig, load_records, run_bench, write_record

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_floor_bytes_match_the_table_of_the_bytes_floor():
    shape, e = (32, 256, 56, 56), 32 * 256 * 56 * 56 * 4  # E = 103 MB in float32
    assert floor_bytes("copy", shape, 4) == 4 * e
    for name in ("batchnorm", "groupnorm", "ghost_batchnorm@2", "batchrenorm@4"):
        assert floor_bytes(name, shape, 4) == 8 * e
    assert floor_bytes("bkn@2", shape, 4) == floor_bytes("bkn_composite@2", shape, 4) == 6 * e
    assert floor_bytes("bkn_shadow@2", shape, 4) == 8.5 * e  # 6E + 5E/2
    assert floor_bytes("bkn_shadow@8", shape, 2) == (6 + 5 / 8) * e / 2  # bfloat16


def test_summary_ratios_are_per_round():
    times = {"batchnorm": [1.0, 2.0, 4.0], "x": [2.0, 4.0, 8.0]}  # a round-wide slowdown
    s = summarize(times, "batchnorm")
    assert s["x"]["ratio"] == 2.0 and s["x"]["ratio_iqr"] == 0.0
    assert s["x"]["median_ms"] == 4.0 and quartiles([3.0]) == (3.0, 3.0, 3.0)


def test_round_robin_rotates_and_drops_warmup():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = round_robin(fns, torch.device("cpu"), warmup=1, repeats=2)
    assert calls == list("abc") + list("bca") + list("cab")
    assert all(len(v) == 2 for v in times.values())


def test_launch_count_from_profiler_events():
    cuda = torch.autograd.DeviceType.CUDA
    cpu = torch.autograd.DeviceType.CPU
    ev = lambda name, device=cpu: SimpleNamespace(name=name, device_type=device)  # noqa: E731
    events = [ev("aten::add"), ev("cudaLaunchKernel"), ev("cuLaunchKernel"), ev("vectorized_add", cuda)]
    assert count_launches(events) == 2  # the launch calls, not the device side again
    events = [ev("aten::add"), ev("vectorized_add", cuda), ev("reduce", cuda), ev("Memcpy HtoD", cuda)]
    assert count_launches(events) == 2  # no launch call recorded: kernels seen on the device
    assert kernel_launches(lambda: None, torch.device("cpu")) is None  # not applicable on CPU


def _bkn_step_node(x):
    layer = kn.BatchKalmanNorm2d(4, micro_batch=2).train()
    prior = (torch.zeros(2, 4), torch.ones(2, 4))
    return type(layer.forward_with_prior(x, prior, 2)[0].grad_fn).__name__


def test_composite_backend_switches_the_kernel_and_restores_it():
    x = torch.randn(4, 4, 3, 3, requires_grad=True)
    before = (_bkn_step_node(x), os.environ.get("KALMANNORM_FUSED"))
    with composite_backend():
        inside = _bkn_step_node(x)
    assert inside != before[0]  # one fused autograd node by default on the CPU, torch ops inside
    assert (_bkn_step_node(x), os.environ.get("KALMANNORM_FUSED")) == before


def test_tiny_layer_run_records_floors_and_renders(tmp_path):
    config = BenchConfig(quick=True, suites=("layer",), repeats=1, warmup=0,
                         layer_shapes=((8, 4, 4, 4),), layer_micro_batches=(2,),
                         dtypes=("float32",), memory_formats=("contiguous",),
                         bandwidth_bytes=2**20, threads=1)
    record = run_bench(config, str(tmp_path))
    assert record["verify"]["ok"], record["verify"]
    assert record["verify"]["backend"] == "cpu_fused"  # what auto picks for float32 on the CPU
    (result,) = record["results"]
    bandwidth = result["copy_bandwidth"]["bytes_per_s"]
    assert bandwidth > 0 and set(result["methods"]) >= {"copy", "batchnorm", "bkn@2", "bkn_shadow@2"}
    for name, entry in result["methods"].items():
        assert entry["floor_bytes"] == floor_bytes(name, (8, 4, 4, 4), 4)
        assert math.isclose(entry["floor_ms"], entry["floor_bytes"] / bandwidth * 1e3)
        assert math.isclose(entry["x_floor"], entry["median_ms"] / entry["floor_ms"])
        assert entry["launches"] is None
    (loaded,) = load_records(str(tmp_path))
    assert loaded["path"] == record["path"] and loaded["results"] == record["results"]
    doc = tmp_path / "perf.md"
    doc.write_text("# Speed\n\nprose stays\n")
    text = write_doc(str(doc), str(tmp_path))
    assert text.startswith("# Speed\n\nprose stays\n") and DOC_BEGIN in text and DOC_END in text
    assert "The default kernels (`cpu_fused`) checked against the composite form" in text
    row = next(line for line in text.splitlines() if line.startswith("| bkn_shadow@2 |"))
    assert f"| {result['methods']['bkn_shadow@2']['x_floor']:.2f} | n/a |" in row
    assert write_doc(str(doc), str(tmp_path)) == text  # idempotent


def test_tiny_model_run_times_every_norm_against_batchnorm(tmp_path):
    config = BenchConfig(quick=True, suites=("model",), warmup=0, model_repeats=1,
                         models=(("preact_resnet20", 4, 8),), model_micro_batches=(2,),
                         dtypes=("float32",), memory_formats=("contiguous",), threads=1)
    record = run_bench(config, str(tmp_path))
    (result,) = record["results"]
    assert result["errors"] == {}
    methods = result["methods"]
    assert set(methods) == {"batchnorm", "groupnorm", "groupnorm_ws", "frn", "evonorm_s0",
                            "ghost_batchnorm@2", "batchrenorm@2", "mabn@2", "bkn@2"}
    assert methods["batchnorm"]["ratio"] == 1.0 and methods["batchnorm"]["saved_ratio"] == 1.0
    for name, entry in methods.items():
        assert entry["median_ms"] > 0 and entry["saved_bytes"] > 0, name


def test_model_benchmark_builds_the_norms_as_training_does():
    from benchmarks.model import build_bench_model

    cpu = torch.device("cpu")
    spec = dict(norm="groupnorm_ws", num_groups=32, cap_groups=True)
    model = build_bench_model("preact_resnet20", spec, cpu, "contiguous")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and {m.num_groups for m in norms} == {16, 32}  # 16-channel layers: 16 groups
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(torch.nn.utils.parametrize.is_parametrized(c, "weight") for c in convs)
    mabn = build_bench_model("preact_resnet20", dict(norm="mabn", micro_batch=2), cpu, "contiguous")
    assert all(torch.nn.utils.parametrize.is_parametrized(c, "weight")
               for c in mabn.modules() if isinstance(c, torch.nn.Conv2d))


def test_committed_doc_tables_regenerate_from_the_committed_records(tmp_path):
    doc = os.path.join(REPO, "docs", "performance.md")
    copy = tmp_path / "performance.md"
    shutil.copy(doc, copy)
    write_doc(str(copy), os.path.join(REPO, "docs", "perf"))
    with open(doc) as f:
        assert copy.read_text() == f.read(), "docs/performance.md differs from its records: " \
            "python -m benchmarks --doc-only --doc docs/performance.md --records docs/perf"


def test_write_record_is_named_by_device_mode_and_start(tmp_path):
    record = dict(started_at="2026-01-02T03:04:05+00:00", config=dict(quick=False), device="cpu",
                  label="x", path="ignored", results=[])
    path = write_record(record, str(tmp_path))
    assert os.path.basename(path) == "bench-cpu-full-20260102T030405-x.json"
    with open(path) as f:
        assert "path" not in json.load(f)
