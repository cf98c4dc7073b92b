"""Compile every Triton kernel of kalmannorm for sm_90 without a GPU (used by
test_triton_kernels.py in a subprocess without TRITON_INTERPRET).

    python triton_compile_check.py PRIOR DTYPE FLAGS   # e.g. 1 bf16 1010 (W, B, normalized, noise)

Exit status 0: compiled; 3: cannot check here (no triton or no ptxas); else the error.
"""
import inspect
import os
import sys

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    print("triton is not installed")
    sys.exit(3)

_POINTERS = {"FLAGS": "*i1", "USED": "*i1", "AVAIL": "*i1", "PVALID": "*i1", "SEED": "*i64",
             "NBT": "*i64", "GUARD": "*i64"}
_FLOATS = {"gain", "eps", "guard_threshold", "momentum", "unbias", "single_group_noise",
           "rmax", "dmax"}


def compile_for_hopper(kernel, dtype="fp32", **constexprs):
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _POINTERS:
            signature[name] = _POINTERS[name]
        elif name in ("X", "Y", "DY", "DX"):
            signature[name] = f"*{dtype}"
        elif name.isupper() and name not in ("S", "C", "L", "K"):
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name in _FLOATS else "i32"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32))


def main(prior: int, dtype: str, flags: str) -> None:
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "ptxas")):
        print("triton's ptxas is not installed")
        sys.exit(3)
    from kalmannorm.functional import triton_kernels as K

    has_w, has_b, normalized, noise = (c == "1" for c in flags)
    tile = dict(BC=4, BL=128)
    # decisions for the layer; with a prior also per group with the measured gain (the rows'
    # spread, the guard reduced per group, the gains and flags per group)
    scopes = [dict(GROUP=False, MEASURE=False, ROWS=False, TWO_SIDED=normalized)]
    if prior:
        scopes.append(dict(GROUP=True, MEASURE=True, ROWS=True, TWO_SIDED=noise))
    for scope in scopes:
        group = scope.pop("GROUP")
        compile_for_hopper(K.stats_kernel, dtype, PRIOR=prior, HAS_PVALID=noise, **scope,
                           **tile)
        compile_for_hopper(K.apply_kernel, dtype, PRIOR=prior, HAS_W=has_w, HAS_B=has_b,
                           NORMALIZED=normalized, NOISE_FROM_PTR=noise,
                           GAIN_FROM_PTR=has_b and not group, RENORM=prior == 0,
                           LIM_FROM_PTR=noise, GROUP=group, RB=256, **scope, **tile)
        compile_for_hopper(K.backward_kernel, dtype, PRIOR=prior, HAS_W=has_w, HAS_B=has_b,
                           NORMALIZED=normalized, NOISE_FROM_PTR=noise,
                           GAIN_FROM_PTR=has_b or group, PRIOR_GRAD=prior > 0, HAS_GMV=has_w,
                           RENORM=prior == 0, GROUP=group, **tile)
    compile_for_hopper(K.buffers_kernel, TRACK=has_w, GROUP0=normalized, COUNT_GUARD=has_b,
                       BC=64)
    compile_for_hopper(K.gain_kernel, GROUPED=has_w, SB=16 if has_b else 1, BC=256)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
