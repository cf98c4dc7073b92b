"""Check BKN on an accelerator before long runs: default kernels == composite form, analytic runs.

Exit status 0 when the default backend (``auto``: Triton on CUDA, the fused kernel on the CPU)
runs and agrees with the composite form on the device; 1 otherwise (then run with
``KALMANNORM_BACKEND=composite``). Prints what it compared.

    python experiments/device_check.py --device cuda
"""
import argparse
import contextlib
import copy
import sys
import traceback

import torch

import kalmannorm as kn
from kalmannorm.harness.models import build_model


def step(model, x, fused: bool):
    """Output and gradients with the default backend (``fused``) or the composite form."""
    with contextlib.nullcontext() if fused else kn.use_backend("composite"):
        torch.manual_seed(1)
        out = model(x)
        grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    return out, grads


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = build_model("preact_resnet20", 10, kn.get_norm_layer("batchnorm")).to(device)
    x = torch.randn(16, 3, 32, 32, device=device)
    ok = True
    for amp in (False, True):
        model_a = kn.convert_batchnorm(copy.deepcopy(net), micro_batch=2)
        model_b = kn.convert_batchnorm(copy.deepcopy(net), micro_batch=2)
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out_f, grads_f = step(model_a, x, fused=True)
                out_c, grads_c = step(model_b, x, fused=False)
            diff = (out_f.float() - out_c.float()).abs().max().item()
            gdiff = max((a.float() - b.float()).abs().max().item() / (b.float().abs().max().item()
                        + 1e-12) for a, b in zip(grads_f, grads_c))
            tol = 5e-2 if amp else 1e-3
            good = diff < tol and gdiff < tol
            print(f"amp={amp}: fused vs composite max |out diff| {diff:.2e}, "
                  f"max relative grad diff {gdiff:.2e}: {'ok' if good else 'MISMATCH'}")
            ok &= good
        except Exception:
            traceback.print_exc()
            ok = False
    try:
        analytic = kn.convert_batchnorm(copy.deepcopy(net), micro_batch=2, prediction="analytic")
        analytic(x).square().mean().backward()
        print("analytic prediction: ok")
    except Exception:
        traceback.print_exc()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
