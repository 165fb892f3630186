"""Compile every Triton KW kernel and autotune config for a GPU target on a machine without a GPU.

Triton compiles to PTX and cubin with its bundled ptxas without a device: this catches compile-only errors
(that the interpreter does not) and prints registers, stack (spills) and whether tensor-core instructions
(wgmma on sm_90, mma.sync before) were emitted, per kernel, dtype and config.

    PYTHONPATH=. python benchmarks/triton_compile_check.py [--arch 90] [--dtypes bf16 fp16 fp32]
Exit status 1 when a config fails to compile.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # the real compiler, not the interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kw_ops.ops.triton import conv_kernels, gemm_kernels  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _jit(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # through @triton.autotune
    return kernel


def _resources(cubin: bytes) -> str:
    if not CUOBJDUMP.exists():
        return "(no cuobjdump)"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = [line.split(":", 1)[-1].strip() for line in out.splitlines() if "REG:" in line]
    return " ".join(usage[0].split()[:2]) if usage else "(no resource usage)"


def kernels(dtype: str):
    """(label, autotuned kernel, pointer arg -> type, fixed constexprs) for one operand dtype."""
    p = "*" + dtype
    common = {"ACC_DTYPE": tl.float32, "INPUT_PRECISION": "tf32"}
    rows = []
    for mix in (True, False):
        rows.append((f"fwd mix={mix}", conv_kernels.kw_conv_fwd_kernel,
                     dict.fromkeys(["x_ptr", "attn_ptr", "e_ptr", "w_ptr", "bias_ptr", "y_ptr"], p),
                     {**common, "HAS_BIAS": True, "MIX": mix}))
        rows.append((f"dx mix={mix}", conv_kernels.kw_conv_dx_kernel,
                     dict.fromkeys(["dy_ptr", "attn_ptr", "e_ptr", "w_ptr", "dx_ptr"], p), {**common, "MIX": mix}))
    rows.append(("wgrad", conv_kernels.kw_conv_wgrad_kernel, dict.fromkeys(["x_ptr", "dy_ptr", "dw_ptr"], p), common))
    rows.append(("mix", gemm_kernels.kw_mix_kernel, dict.fromkeys(["attn_ptr", "e_ptr", "w_ptr"], p), common))
    rows.append(("matmul", gemm_kernels.kw_matmul_kernel, {"a_ptr": p, "b_ptr": p, "c_ptr": "*fp32"}, common))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"])
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for dtype in args.dtypes:
        for label, kernel, pointers, fixed in kernels(dtype):
            jit = _jit(kernel)
            for config in kernel.configs:
                constexprs = {**fixed, **config.kwargs}
                signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32")
                             for name in jit.arg_names}
                tiles = "x".join(str(v) for v in config.kwargs.values())
                name = f"{label:14s} {dtype:5s} {tiles:11s} w{config.num_warps} s{config.num_stages}"
                try:
                    compiled = triton.compile(ASTSource(jit, signature, constexprs), target=target,
                                              options={"num_warps": config.num_warps,
                                                       "num_stages": config.num_stages})
                except Exception as exc:  # report every failing config, then fail
                    failures += 1
                    print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:500]}")
                    continue
                ptx = compiled.asm.get("ptx", "")
                mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "fma"
                print(f"ok   {name}: {_resources(compiled.asm['cubin'])} {mma}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
