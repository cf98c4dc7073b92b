#!/usr/bin/env bash
# The micro-batch study on one GPU inside one short device window (experiments/study.py).
#
# Width-16 pre-activation ResNet-20 (every row, seed 0) and MobileNetV2 at width 0.5 (the
# verdict rows, seeds 0 and 1), all runs at once, each step's forward and backward replayed as a
# CUDA graph (under MPS where the machine allows it, so the small kernels of different runs
# share the GPU). The driver first times two short epochs of every run, then trains as many
# epochs as fit the deadline (at most 30), and every run stops cleanly before it.
#
#   OUT=out DEADLINE=450 DATA=.gpu/data bash experiments/study_gpu.sh   # on the GPU machine
#   SMOKE=1 OUT=/tmp/out bash experiments/study_gpu.sh                  # the same path on a CPU
#
# DATA holds cifar-10-batches-py, or is made from the JPEG archive by
# .gpu/tools/make_cifar10.py (copies of ../shared/tools/make_cifar10.py and
# ../shared/data/cifar10-jpeg.tar.gz, carried to the machine). The finished records come back as
# $OUT/records.tgz; every run's record and log (incomplete ones too) as $OUT/runs.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a directory for the results}
DEADLINE=${DEADLINE:-450}
DATA=${DATA:-.gpu/data}
ROOT=${ROOT:-runs/study-gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$ROOT"
export PYTHONUNBUFFERED=1

if [ -n "${SMOKE:-}" ]; then
    "$PY" experiments/study.py --smoke --families resnet mobilenet_s1 --rows bn-m2 bkn-default \
        --seeds 0 --parallel 2 --root "$ROOT" --records "$ROOT/records" --page "$OUT/study.md" \
        --write
else
    if [ ! -d "$DATA/cifar-10-batches-py" ]; then
        "$PY" .gpu/tools/make_cifar10.py "$DATA" || exit 1
    fi
    nvidia-smi -L
    # The Triton kernels against the composite form on this GPU (group decisions, shadow rows,
    # measured gain; same noise): any doubt and every run takes the composite form.
    if ! "$PY" - <<'CHECK'
import torch, kalmannorm as kn
from kalmannorm.functional import triton_ops
from kalmannorm.harness.models import build_model

def step(backend):
    torch.manual_seed(0)
    model = build_model("preact_resnet20", 10, torch.nn.BatchNorm2d, width=8)
    model = kn.convert_batchnorm(model, micro_batch=2).cuda()
    x = torch.randn(16, 3, 32, 32, device="cuda", requires_grad=True)
    with kn.use_backend(backend), triton_ops.torch_noise():
        y = model(x)
        y.square().sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in model.parameters()]

err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
          for a, b in zip(step("triton"), step("composite")))
print(f"triton vs composite (group decisions): largest relative error {err:.2e}")
assert err < 1e-3
CHECK
    then
        export KALMANNORM_BACKEND=composite
        echo "Triton check failed: every run uses the composite form"
    fi
    # MPS lets kernels of different processes run side by side; keep it only if CUDA works.
    if nvidia-cuda-mps-control -d 2>/dev/null; then
        if "$PY" -c "import torch; torch.zeros(1, device='cuda').sum().item()"; then
            echo "MPS on"
        else
            echo quit | nvidia-cuda-mps-control; echo "MPS off (CUDA failed under it)"
        fi
    else
        echo "MPS not available"
    fi
    "$PY" experiments/study.py --data-dir "$DATA" --device cuda --width 16 --epochs 30 \
        --families resnet mobilenet_s1 --seeds 0 --family-seeds mobilenet_s1=0,1 --verdict-seeds \
        --parallel 40 \
        --cuda-graphs --threads 0 --deadline "$DEADLINE" --calibrate --root "$ROOT" \
        --records "$ROOT/records"
fi
tar czf "$OUT/records.tgz" -C "$ROOT" records 2>/dev/null
tar czf "$OUT/runs.tgz" --exclude='*.pt' --exclude='*.tmp*' "$ROOT" 2>/dev/null
ls -la "$OUT"
