"""Device check of the Triton backend (docs/gpu.md section 9), one prepared run on a CUDA machine.

    python benchmarks/gpu_check.py --out RECORD.json [--budget 420]   # committed under docs/perf/

Sections, each written into the JSON record as soon as it finishes (a cut run keeps what it did):

1. ``correctness``: the Triton kernels against the composite form natively, at the layer shapes
   of the targets, micro-batch 2 and 8, float32 and bfloat16, NCHW and channels-last: the step
   with a supplied prior and the shadow-row step (noise injected from ``torch.randn`` so both
   draw the same samples); max relative error of outputs, gradients and statistics.
2. ``repeatability``: the same shadow-row step repeated; outputs and gradients bitwise equal.
   ``correctness_measured_gain``: the same with ``gain_rule="kalman"`` (float32, m = 2).
   ``one_position_rows``: rows with one value per channel, Triton and composite (float32)
   against composite float64 over 20 draws.
3. ``layers``: forward + backward per layer (BKN with a supplied prior, measured and fixed gain,
   and with shadow rows; ghost BatchNorm; Batch Renormalization past its warm-up; each by the
   composite form and the kernels), medians of interleaved rounds (CUDA events), as
   ratios to ``nn.BatchNorm2d`` (cuDNN) and to a copy kernel in the same run, and to the bytes
   floor of docs/gpu.md section 5 at the copy bandwidth measured here; kernel launches per step
   from ``torch.profiler``.
4. ``models``: training steps (forward, backward, SGD) of preact ResNet-20 (batch 128) and
   ResNet-50 (batch 32, 224 px) at micro-batch 2, BatchNorm vs BKN, eager and CUDA-graphed;
   activation memory of one forward.
5. ``compile``: graph breaks of the converted ResNet-20 under ``torch._dynamo.explain`` and a
   compiled step's time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(_ROOT, "src"), _ROOT]
import kalmannorm as kn  # noqa: E402
from benchmarks.measure import CopyFloor  # noqa: E402
from kalmannorm import functional as KF  # noqa: E402
from kalmannorm.functional import triton_ops  # noqa: E402

try:
    from kalmannorm.harness.models import build_model
except ImportError:  # before the harness moved into kalmannorm.harness
    from kalmannorm.models import build_model

DEV = torch.device("cuda")
RECORD: Dict = {}
SMOKE = {"on": False}  # --cpu-smoke: every code path at tiny shapes on the CPU (interpreter)


def save(path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(RECORD, f, indent=1)
    os.replace(tmp, path)


def rel_err(a, b) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0))


# --------------------------------------------------------------------------- 1. correctness
def _functional(backend, x, prior, w, b, groups, gain_rule):
    for t in [x, w, b] + list(prior):
        t.grad = None
    y, mean, var, used = KF.batch_kalman_norm(x, prior, w, b, groups=groups, gain=0.9,
                                              backend=backend, gain_rule=gain_rule)
    g = torch.randn(y.shape, generator=torch.Generator(DEV).manual_seed(1), device=DEV)
    ((y.float() * g).sum() + mean.sum() + var.sum()).backward()
    return [y, mean, var, x.grad, w.grad, b.grad, prior[0].grad, prior[1].grad]


def _shadow(backend, x, w, b, groups, real_rows, normalized, gain_rule):
    x.grad = w.grad = b.grad = None
    options = KF.StepOptions(real_rows=real_rows, groups=groups, gain=0.9,
                             shadow_rows=(x.shape[0] - real_rows) // groups, shadow_prior=True,
                             normalized=normalized, gain_rule=gain_rule)
    with triton_ops.torch_noise():
        r = KF.training_step(x, w, b, options, generator=torch.Generator(DEV).manual_seed(3),
                             backend=backend)
    g = torch.randn(r.y.shape, generator=torch.Generator(DEV).manual_seed(1), device=DEV)
    (r.y.float() * g).sum().backward()
    return [r.y, r.mean, r.var, x.grad, w.grad, b.grad], bool(r.used)


def correctness(shapes, ms=(2, 8), dtypes=(torch.float32, torch.bfloat16),
                gain_rule="fixed") -> List[Dict]:
    """``gain_rule="kalman"``: the measured gain, the layers' default since issue 9."""
    rows = []
    for shape in shapes:
        for m in ms:
            for dtype in dtypes:
                for cl in (False, True):
                    if dtype == torch.bfloat16 and cl and shape[-1] < 56:
                        continue
                    torch.manual_seed(0)
                    n, c = shape[0], shape[1]
                    groups = n // m
                    fmt = torch.channels_last if cl else torch.contiguous_format
                    x = (torch.randn(shape, device=DEV) * 2 + 1).to(dtype).contiguous(
                        memory_format=fmt).requires_grad_()
                    w = torch.rand(c, device=DEV).add_(0.5).requires_grad_()
                    b = torch.randn(c, device=DEV).requires_grad_()
                    prior = (torch.randn(groups, c, device=DEV).requires_grad_(),
                             torch.rand(groups, c, device=DEV).add_(0.5).requires_grad_())
                    ref = _functional("composite", x, prior, w, b, groups, gain_rule)
                    got = _functional("triton", x, prior, w, b, groups, gain_rule)
                    err_prior = max(rel_err(a, r) for a, r in zip(got, ref))
                    # shadow step: N real rows + one shadow row per group
                    xs = torch.cat([x.detach(), (torch.randn((groups,) + shape[1:], device=DEV)
                                                 * 2 + 1).to(dtype)]).contiguous(
                        memory_format=fmt).requires_grad_()
                    errs = []
                    for normalized in (False, True):
                        ref_s, used_ref = _shadow("composite", xs, w, b, groups, n, normalized,
                                                  gain_rule)
                        got_s, used = _shadow("triton", xs, w, b, groups, n, normalized,
                                              gain_rule)
                        assert used == used_ref
                        errs.append(max(rel_err(a, r) for a, r in zip(got_s, ref_s)))
                    row = dict(shape=list(shape), m=m, dtype=str(dtype).split(".")[-1],
                               gain_rule=gain_rule,
                               channels_last=cl, prior_max_rel_err=err_prior,
                               shadow_max_rel_err=max(errs))
                    tol = 1e-4 if dtype == torch.float32 else 3e-2
                    row["ok"] = err_prior < tol and max(errs) < tol
                    rows.append(row)
                    print("correctness", row, flush=True)
    return rows


def one_position_rows(shapes, seeds) -> List[Dict]:
    """Rows with one value per channel (``[N, C]``, ``[N, C, 1, 1]``), which the dispatch keeps
    on the composite form: the Triton step (called directly) and the composite step, both in
    float32, against the composite step in float64, over ``seeds`` random draws at m = 2."""
    from kalmannorm.functional import composite

    rows = []
    for shape in shapes:
        n, c = shape[0], shape[1]
        groups = n // 2
        for gain_rule in ("fixed", "kalman"):
            options = KF.StepOptions(real_rows=n, groups=groups, gain=0.9, gain_rule=gain_rule)
            worst = {"triton": 0.0, "composite_float32": 0.0}
            decisions_differ = 0
            for seed in range(seeds):
                gen = torch.Generator(DEV).manual_seed(seed)
                draw = lambda *size: torch.randn(size, generator=gen, device=DEV,  # noqa: E731
                                                 dtype=torch.float64)
                leaves64 = [draw(*shape) * 2 + 1, draw(c).abs() + 0.5, draw(c),
                            draw(groups, c), draw(groups, c).abs() + 0.5]
                grad64 = draw(*shape)

                def run(step, dtype):
                    x, w, b, mp, vp = [t.to(dtype).requires_grad_() for t in leaves64]
                    r = step(x, w, b, options, prior=(mp, vp))
                    loss = (r.y * grad64.to(dtype)).sum() + r.mean.sum() + r.var.sum()
                    grads = torch.autograd.grad(loss, [x, w, b, mp, vp])
                    return [r.y, r.mean, r.var, *grads], bool(r.used)

                ref, used_ref = run(composite.training_step, torch.float64)
                for name, step in (("triton", triton_ops.training_step),
                                   ("composite_float32", composite.training_step)):
                    got, used = run(step, torch.float32)
                    decisions_differ += used != used_ref
                    worst[name] = max(worst[name], max(rel_err(a, r) for a, r in zip(got, ref)))
            row = dict(shape=list(shape), gain_rule=gain_rule, seeds=seeds,
                       triton_max_rel_err=worst["triton"],
                       composite_float32_max_rel_err=worst["composite_float32"],
                       guard_decisions_differ=decisions_differ)
            rows.append(row)
            print("one_position", row, flush=True)
    return rows


# --------------------------------------------------------------------------- 2. repeatability
def repeatability(shape, calls) -> Dict:
    torch.manual_seed(0)
    layer = kn.BatchKalmanNorm2d(shape[1], micro_batch=2).to(DEV)
    groups = shape[0] // 2
    x = torch.randn((shape[0] + groups,) + tuple(shape[1:]), device=DEV).requires_grad_()
    g = torch.randn_like(x)

    def step():
        x.grad = None
        layer.weight.grad = None
        torch.manual_seed(5)
        y = layer._step(x, shape[0], groups, shadow_rows=1, shadow_prior=True).y
        y.backward(g)
        return [y.detach().clone(), x.grad.clone(), layer.weight.grad.clone()]

    first = step()
    same = all(all(torch.equal(a, b) for a, b in zip(step(), first)) for _ in range(calls - 1))
    return dict(shape=list(shape), calls=calls, bitwise_equal=same)


# --------------------------------------------------------------------------- 3. layers
def cuda_time(fn: Callable, iters: int) -> float:
    """Milliseconds per call, CUDA events around ``iters`` calls."""
    if SMOKE["on"]:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def interleaved(fns: Dict[str, Callable], rounds=7, iters=20, warmup=3) -> Dict[str, Dict]:
    if SMOKE["on"]:
        rounds, iters, warmup = 2, 1, 1
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(cuda_time(fn, iters))
    out = {}
    for k, v in samples.items():
        q = statistics.quantiles(v, n=4)
        out[k] = dict(median_ms=statistics.median(v), iqr_ms=q[2] - q[0])
    return out


def launches(fn: Callable) -> int:
    """Kernels launched by one call of ``fn`` (device-side kernel events of torch.profiler)."""
    if SMOKE["on"]:
        return -1
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name
               and "Memset" not in e.name)


def copy_bandwidth() -> float:
    """Bytes per second of a device-local clone of 1 GiB (read + write counted)."""
    x = torch.empty(1 << (20 if SMOKE["on"] else 28), device=DEV)  # 1 GiB float32
    ms = statistics.median(cuda_time(lambda: x.clone(), 5) for _ in range(5))
    return 2 * x.numel() * 4 / (ms / 1e3)


def layer_suite(configs, bandwidth) -> List[Dict]:
    rows = []
    for shape, dtype, cl in configs:
        n, c = shape[0], shape[1]
        fmt = torch.channels_last if cl else torch.contiguous_format
        m = 2
        groups = n // m
        x = torch.randn(shape, device=DEV).to(dtype).contiguous(memory_format=fmt)
        x.requires_grad_()
        xs = torch.cat([x.detach(), torch.randn((groups,) + tuple(shape[1:]), device=DEV)
                        .to(dtype)]).contiguous(memory_format=fmt).requires_grad_()
        g, gs = torch.randn_like(x), torch.randn_like(xs)
        bn = nn.BatchNorm2d(c).to(DEV, memory_format=fmt)
        bkn = kn.BatchKalmanNorm2d(c, micro_batch=m).to(DEV)  # measured gain (default)
        bkn_fixed = kn.BatchKalmanNorm2d(c, micro_batch=m, gain_rule="fixed").to(DEV)
        brn = kn.BatchRenorm2d(c, micro_batch=m, warmup_steps=0, ramp_steps=0).to(DEV)
        prior = (torch.randn(groups, c, device=DEV), torch.rand(groups, c, device=DEV) + 0.5)

        def fb(fn, inp, grad):
            def run():
                out = fn(inp)
                torch.autograd.grad(out, [inp], grad)
            return run

        def with_backend(name, fn):
            def run():
                with kn.use_backend(name):
                    fn()
            return run

        prior_step = lambda t: bkn.forward_with_prior(t, prior, groups)[0]  # noqa: E731
        prior_fixed = lambda t: bkn_fixed.forward_with_prior(t, prior, groups)[0]  # noqa: E731
        shadow_step = lambda t: bkn._step(t, n, groups, shadow_rows=1,  # noqa: E731
                                          shadow_prior=True).y
        fns = {
            "copy": fb(CopyFloor.apply, x, g),
            "batchnorm": fb(bn, x, g),  # float32 parameters for any input dtype, as BKN
            "bkn_prior_composite": with_backend("composite", fb(prior_step, x, g)),
            "bkn_prior_triton": with_backend("triton", fb(prior_step, x, g)),
            "bkn_prior_triton_fixed_gain": with_backend("triton", fb(prior_fixed, x, g)),
            "bkn_shadow_composite": with_backend("composite", fb(shadow_step, xs, gs)),
            "bkn_shadow_triton": with_backend("triton", fb(shadow_step, xs, gs)),
            "ghost_bn_triton": with_backend("triton", fb(
                lambda t: bkn.forward_with_prior(t, None, groups)[0], x, g)),
            "batch_renorm_composite": with_backend("composite", fb(brn, x, g)),
            "batch_renorm_triton": with_backend("triton", fb(brn, x, g)),
        }
        times = interleaved(fns)
        e = x.numel() * x.element_size()
        floor_bytes = {"copy": 4 * e, "batchnorm": 8 * e, "bkn_prior_composite": 6 * e,
                       "bkn_prior_triton": 6 * e, "bkn_prior_triton_fixed_gain": 6 * e,
                       "bkn_shadow_composite": 6 * e + 5 * e / m,
                       "bkn_shadow_triton": 6 * e + 5 * e / m, "ghost_bn_triton": 6 * e,
                       "batch_renorm_composite": 6 * e, "batch_renorm_triton": 6 * e}
        bn_ms, copy_ms = times["batchnorm"]["median_ms"], times["copy"]["median_ms"]
        for name, t in times.items():
            floor_ms = floor_bytes[name] / bandwidth * 1e3
            row = dict(shape=list(shape), dtype=str(dtype).split(".")[-1], channels_last=cl,
                       method=name, **t, x_bn=t["median_ms"] / bn_ms,
                       x_copy=t["median_ms"] / copy_ms, floor_ms=floor_ms,
                       x_floor=t["median_ms"] / floor_ms)
            if name in ("batchnorm", "bkn_prior_triton", "bkn_prior_triton_fixed_gain",
                        "bkn_shadow_triton", "bkn_prior_composite"):
                row["launches"] = launches(fns[name])
            rows.append(row)
            print("layer", row, flush=True)
    return rows


# --------------------------------------------------------------------------- 4. models
def _step_fn(model, x, y, opt):
    def step():
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def _graphed(step):
    if SMOKE["on"]:
        return step
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _activation_mb(model, x) -> float:
    if SMOKE["on"]:
        return 1.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = model(x)
    used = torch.cuda.memory_allocated() - base
    del out
    return used / 2 ** 20


def model_suite(arch, batch, size, graphs=True) -> Dict:
    res = {"arch": arch, "batch": batch, "size": size, "micro_batch": 2}
    fns, memory = {}, {}
    for name in ("batchnorm", "bkn_triton", "bkn_composite"):
        torch.manual_seed(0)
        if arch.startswith("preact"):
            net = build_model(arch, 10, kn.get_norm_layer("batchnorm"))
        else:
            import torchvision
            net = torchvision.models.resnet50(num_classes=10)
        model = net if name == "batchnorm" else kn.convert_batchnorm(net, gain=0.9,
                                                                     micro_batch=2)
        model = model.to(DEV)
        x = torch.randn(batch, 3, size, size, device=DEV)
        y = torch.randint(0, 10, (batch,), device=DEV)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        backend = "composite" if name == "bkn_composite" else "auto"
        step = _step_fn(model, x, y, opt)
        with kn.use_backend(backend):
            fns[name] = (lambda s=step, b=backend: _with(b, s))
            memory[name] = _activation_mb(model, x)
            if graphs and name != "bkn_composite":
                try:
                    with kn.use_backend(backend):
                        fns[name + "_graphed"] = _graphed(step)
                except Exception as exc:  # report, do not stop the run
                    res[name + "_graph_error"] = repr(exc)[:300]
    times = interleaved(fns, rounds=5, iters=5 if arch == "resnet50" else 10, warmup=2)
    base = times["batchnorm"]["median_ms"]
    res["times"] = {k: dict(v, x_bn=v["median_ms"] / base) for k, v in times.items()}
    if "batchnorm_graphed" in times and "bkn_triton_graphed" in times:
        res["graphed_ratio"] = times["bkn_triton_graphed"]["median_ms"] / \
            times["batchnorm_graphed"]["median_ms"]
    res["activation_mb"] = memory
    res["activation_ratio"] = memory["bkn_triton"] / memory["batchnorm"]
    print("model", json.dumps(res), flush=True)
    return res


def _with(backend, step):
    with kn.use_backend(backend):
        step()


# --------------------------------------------------------------------------- 5. compile
def compile_check() -> Dict:
    torch.manual_seed(0)
    net = build_model("preact_resnet20", 10, kn.get_norm_layer("batchnorm"))
    model = kn.convert_batchnorm(net, gain=0.9, micro_batch=2).to(DEV)
    batch, size = (4, 8) if SMOKE["on"] else (128, 32)
    x = torch.randn(batch, 3, size, size, device=DEV)
    explain = torch._dynamo.explain(model)(x)
    res = dict(graphs=explain.graph_count, graph_breaks=explain.graph_break_count,
               reasons=[str(r.reason)[:200] for r in explain.break_reasons][:5])
    torch._dynamo.reset()
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    out = compiled(x)
    out.square().mean().backward()
    torch.cuda.synchronize()
    res["first_step_s"] = time.perf_counter() - t0
    res["finite"] = bool(torch.isfinite(out).all())
    y = torch.randint(0, 10, (batch,), device=DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    times = interleaved({"compiled": _step_fn(compiled, x, y, opt),
                         "eager": _step_fn(model, x, y, opt)}, rounds=5, iters=10, warmup=2)
    res["times"] = times
    print("compile", res, flush=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="where to write the JSON record")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all sections")
    parser.add_argument("--skip", nargs="*", default=[], help="sections to skip")
    parser.add_argument("--only", nargs="*", help="run only these sections")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every section at tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.cpu_smoke:
        global DEV
        DEV = torch.device("cpu")
        SMOKE["on"] = True
        torch.cuda.synchronize = lambda: None
        props = argparse.Namespace(name="cpu (smoke)", multi_processor_count=0)
    else:
        props = torch.cuda.get_device_properties(0)
    commit = os.environ.get("KALMANNORM_GIT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    RECORD.update(kind="gpu-check", commit=commit, device=props.name,
                  multiprocessors=props.multi_processor_count,
                  versions=dict(torch=torch.__version__, triton=_triton_version(),
                                python=platform.python_version(), kalmannorm=kn.__version__),
                  sections={})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    large = (8, 6, 5, 7) if SMOKE["on"] else (32, 256, 56, 56)
    cifar, deep = ((8, 3, 4, 4), (8, 5, 2, 2)) if SMOKE["on"] else \
        ((128, 16, 32, 32), (128, 64, 8, 8))
    sections = [
        ("correctness", lambda: correctness([cifar, deep, large])),
        ("correctness_measured_gain", lambda: correctness(
            [cifar, deep], ms=(2,), dtypes=(torch.float32,), gain_rule="kalman")),
        ("one_position_rows", lambda: one_position_rows(
            [(6, 5), (64, 256), (64, 256, 1, 1), (16, 1024, 1, 1)], 3 if SMOKE["on"] else 20)),
        ("repeatability", lambda: repeatability(cifar, 3 if SMOKE["on"] else 200)),
        ("bandwidth", lambda: {"copy_bytes_per_s": copy_bandwidth()}),
        ("layers", lambda: layer_suite(
            [(cifar, torch.float32, False), (deep, torch.float32, False),
             (large, torch.float32, False), (large, torch.float32, True),
             (large, torch.bfloat16, False)],
            RECORD["sections"]["bandwidth"]["result"]["copy_bytes_per_s"])),
        ("model_resnet20", lambda: model_suite("preact_resnet20", *((4, 8) if SMOKE["on"]
                                                                     else (128, 32)))),
        ("model_resnet50", lambda: model_suite("resnet50", *((4, 32) if SMOKE["on"]
                                                              else (32, 224)))),
        ("compile", compile_check),
    ]
    for name, fn in sections:
        elapsed = time.perf_counter() - start
        asked_off = name in args.skip or (args.only is not None and name not in args.only)
        if asked_off or elapsed > args.budget:
            RECORD["sections"][name] = {"skipped": "asked" if asked_off else
                                        f"budget spent ({elapsed:.0f} s)"}
            continue
        t0 = time.perf_counter()
        try:
            RECORD["sections"][name] = {"result": fn()}
        except Exception as exc:  # keep going: a failed section is data too
            RECORD["sections"][name] = {"error": repr(exc)[-2000:]}
            print("section", name, "failed:", repr(exc)[-2000:], flush=True)
        RECORD["sections"][name]["seconds"] = time.perf_counter() - t0
        save(args.out)
    RECORD["seconds"] = time.perf_counter() - start
    save(args.out)


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "absent"


if __name__ == "__main__":
    main()
