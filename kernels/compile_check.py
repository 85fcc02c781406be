"""Compile the Triton kernels for a GPU architecture on a machine without a GPU.

    python -m kernels.compile_check            # sm_90 (Hopper); exit 1 on any failure

Triton's interpreter (how the tests run the kernels on a CPU) accepts code the compiler rejects; this
lowers every kernel (selective scan and SSD), with its optional features all on and all off, through
TTIR -> PTX -> cubin.
Must run without TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
import sys


def main(arch: int = 90) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .selective_scan import triton_scan
    from .ssd import triton_ssd

    scan_flags = ("VAR_B", "VAR_C", "HAS_D", "HAS_Z", "HAS_BIAS", "HAS_SEQ", "SOFTPLUS")
    jobs = []
    for fn in (triton_scan._selective_scan_fwd_kernel, triton_scan._selective_scan_bwd_kernel):
        for on in (True, False):
            jobs.append((fn, on, dict(CHUNK=triton_scan.CHUNK, BLOCK_D=32, BLOCK_N=16, **{k: on for k in scan_flags})))
    for fn in (triton_ssd._ssd_chunk_state_fwd, triton_ssd._ssd_chunk_scan_fwd, triton_ssd._ssd_dhin_bwd,
               triton_ssd._ssd_chunk_bwd):
        for on in (True, False):
            jobs.append((fn, on, dict(Q=triton_ssd.Q_CHUNK, BP=64, BN=128, HAS_SEQ=on, PREC="tf32")))
    for fn, flag in ((triton_ssd._ssd_state_passing_fwd, "HAS_H0"), (triton_ssd._ssd_state_passing_bwd, "HAS_DFINAL")):
        for on in (True, False):
            jobs.append((fn, on, {"BLOCK": 1024, flag: on}))
    failures = 0
    for fn, on, const in jobs:
        sig = {a: ("constexpr" if a in const else "*i32" if a == "seq_ptr" else "*fp32" if a.endswith("_ptr")
                   else "i32") for a in fn.arg_names}
        try:
            k = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", arch, 32))
            ok = "cubin" in k.asm
            print(f"{fn.__name__} features={'on' if on else 'off'}: {'ok' if ok else 'no cubin'}")
            failures += not ok
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            print(f"{fn.__name__} features={'on' if on else 'off'}: FAILED {type(e).__name__}: {e}")
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
