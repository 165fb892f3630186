"""Compile report of the Triton KW kernels for sm_90 from the launches the launchers really make, on a CPU.

    PYTHONPATH=. python benchmarks/triton_compile_check.py            # -> benchmarks/results/triton_sm90_compile.md
    KW_OPS_TRITON_FP32_PRECISION=ieee ... --dtypes fp32 --out ...    # the launches as that setting makes them

1. Layer shapes of the KW presets (kw_ops.benchmarking.layer_shapes, 224x224), deduplicated across presets.
2. The backend's forward and backward launchers run on meta tensors for every shape, batch, dtype and memory
   format with every kernel launch intercepted (kw_ops.benchmarking.triton_capture): the specialisations Triton
   would compile (signature with i32 / i64 integers, integers equal to 1 made constant, 16-divisibility and
   alignment attributes, constexprs, num_warps / num_stages of each autotune config). Nothing executes.
3. Specialisations that share kernel, dtype, config and switches (constexpr flags, dtypes, precision: they
   differ in which integers are 1 or divisible by 16) are compiled once, the one most calls request (--all:
   every one), for sm_90 with Triton's compiler and ptxas; cuobjdump reads registers and stack frame, Triton
   the shared memory; occupancy from the compute capability 9.0 limits.
Exit status 1 when a compile fails, a config cannot launch (shared memory), or a bf16/fp16 kernel spills.
--budget-s stops compiling at a time limit (2-byte dtypes first); the report then says it is partial.
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # the real compiler's JIT functions, not the interpreter's
os.environ.setdefault("KW_OPS_TRITON_AUTOTUNE", "1")  # every config a tuning run may pick: all must compile

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kw_ops.benchmarking import triton_capture  # noqa: E402
from kw_ops.benchmarking.layer_shapes import kw_layer_shapes  # noqa: E402
from kw_ops.benchmarking.model_bench import _environment  # noqa: E402
from kw_ops.models.registry import list_models  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HALF = ("bf16", "fp16")
GEOMETRY = ("channels", "out", "size", "kernel", "stride", "padding", "dilation", "groups", "bias", "n", "cell", "m")


def distinct_specs(models) -> list[tuple[str, dict]]:
    """(label, spec) per distinct layer geometry over the models; the label names every model using it."""
    found = {}
    for model in models:
        for spec in kw_layer_shapes(model):
            key = tuple(spec[k] for k in GEOMETRY)
            found.setdefault(key, (spec, []))[1].append(model)
    return [(",".join(models), spec) for spec, models in found.values()]


# integer constexprs that select code (the others are the config's tiles, or integers equal to 1 made constant)
INT_SWITCHES = ("CHANNEL_MAP",)


def switches(launch) -> tuple:
    """The constexprs that select code (flags, dtypes, precision, INT_SWITCHES): everything but the integers that
    are tiles or specialisations."""
    return tuple((k, str(v)) for k, v in launch.constexprs if type(v) is not int or k in INT_SWITCHES)


def group(launches: dict, every: bool) -> dict:
    """(kernel, dtype, config, switches) -> [(Launch, calls)], most requested first; with `every`, one group
    per specialisation."""
    groups = collections.defaultdict(list)
    for launch, calls in launches.items():
        key = (launch.kernel, launch.dtype, launch.config, switches(launch))
        groups[key + ((launch.signature, launch.constexprs, launch.attrs),) if every else key].append((launch, calls))
    return {key: sorted(members, key=lambda m: -len(m[1])) for key, members in groups.items()}


def compile_all(groups: dict, arch: int, deadline: float) -> tuple[list[dict], int]:
    """Compile the most requested specialisation of each group, 2-byte dtypes first, until time.time() passes
    `deadline`. -> (rows, groups left uncompiled)."""
    rows = []
    order = {dtype: i for i, dtype in enumerate(("bf16", "fp16"))}
    todo = sorted(groups.items(), key=lambda kv: (order.get(kv[0][1], len(order)), str(kv[0])))
    for i, (key, members) in enumerate(todo):
        if time.time() > deadline:
            print(file=sys.stderr)
            return rows, len(todo) - i
        kernel, dtype, config, flags = key[:4]
        launch = members[0][0]
        row = {"kernel": kernel, "dtype": dtype, "config": config, "switches": flags, "launch": launch,
               "specialisations": len(members), "calls": sum(len(c) for _, c in members)}
        try:
            row["resources"] = triton_capture.compile_launch(launch, arch)
        except Exception as exc:  # every failing compile is reported, then the exit status is 1
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        rows.append(row)
        print(f"\r[{i + 1}/{len(todo)}] {kernel} {dtype} {config}" + " " * 20, end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return rows, 0


def markdown(rows, left, launches, skipped, env, args, seconds) -> tuple[str, list[str]]:
    problems = []
    partial = (f"**PARTIAL RUN**: stopped at its {args.budget_s:.0f} s budget with {left} of {len(rows) + left} "
               f"groups not compiled (the table lists the {len(rows)} compiled; 2-byte dtypes go first).")
    lines = [f"# Triton KW kernels compiled for sm_{args.arch} from real launches", "",
             *([partial, ""] if left else []),
             f"git {env['git_sha']}, torch {env['torch']}, triton {env['triton']}, {env['date']} UTC, compiled on "
             f"{platform.machine()} (no GPU; Triton's compiler and ptxas), {seconds:.0f} s", "",
             f"Calls: the forward and backward launchers on every distinct KW layer of {len(args.models)} presets "
             f"({', '.join(args.models)}) at batch {', '.join(map(str, args.batches))}, "
             f"{', '.join(args.dtypes)}, {'NCHW and channels_last' if args.channels_last else 'NCHW'} inputs: "
             f"{len(launches)} distinct specialisations requested. "
             + ("Every specialisation compiled." if args.all else
                "Compiled: per kernel × dtype × config × switches (constexpr flags, dtypes, precision), the "
                "specialisation most calls request; the others differ in which integers are 1 (constants) or "
                "divisible by 16 (count in 'specs')."), "",
             "Registers per thread, stack frame bytes (spills: the kernels keep no local arrays), dynamic shared "
             "memory, resident programs per SM and what limits them (compute capability 9.0: 64K registers, "
             "64 warps, 32 blocks, 228 KB shared per SM, 227 KB per block), dot instructions in the PTX.", "",
             "| kernel | dtype | config | switches | specs | calls | registers | stack B | shared KB | "
             "programs/SM (limit) | dots | compile s |", "|" + "---|" * 12]
    for row in rows:
        kernel, dtype, config = row["kernel"], row["dtype"], row["config"]
        flags = " ".join(f"{k}={v}" for k, v in row["switches"])
        head = f"| {kernel} | {dtype} | {config} | {flags} | {row['specialisations']} | {row['calls']} |"
        if "error" in row:
            problems.append(f"{kernel} {dtype} {config} {flags}: compile failed: {row['error']}")
            lines.append(f"{head} FAILED | | | | | |")
            continue
        res = row["resources"]
        programs, limit = triton_capture.occupancy(res, dict(row["launch"].options)["num_warps"])
        if programs == 0:
            problems.append(f"{kernel} {dtype} {config} {flags}: cannot launch ({res.shared_bytes} B shared memory)")
        if res.stack_bytes and dtype in HALF:
            problems.append(f"{kernel} {dtype} {config} {flags}: {res.stack_bytes} B stack frame (spills)")
        lines.append(f"{head} {res.registers} | {res.stack_bytes} | {res.shared_bytes / 1024:.1f} | {programs} "
                     f"({limit}) | {res.mma} | {res.seconds:.1f} |")
    lines += ["", "## Problems", ""] + ([f"- {p}" for p in problems] or ["none"])
    lines += ["", "## Specialisations requested (per kernel and dtype: the integer pattern and how many calls "
              "request it; '=1' constant, ':16' divisible by 16, ':i64' 64-bit)", ""]
    patterns = collections.defaultdict(collections.Counter)
    for launch, calls in launches.items():
        patterns[(launch.kernel, launch.dtype)][launch.specialisation()] += len(calls)
    for (kernel, dtype), counter in sorted(patterns.items()):
        lines.append(f"- **{kernel} {dtype}**: {len(counter)} patterns")
        lines += [f"  - {count}× `{pattern}`" for pattern, count in counter.most_common()]
    reasons = collections.Counter(r for rs in skipped.values() for r in rs)
    lines += ["", f"## Calls the Triton backend does not take ({len(skipped)}; they run the torch path)", ""]
    lines += [f"- {count}× {reason}" for reason, count in reasons.most_common()] or ["none"]
    return "\n".join(lines) + "\n", problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--models", nargs="+", default=list_models("*_kw*"))
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16", "fp32"])
    parser.add_argument("--channels-last", action="store_true", help="also channels_last inputs")
    parser.add_argument("--all", action="store_true",
                        help="compile every specialisation, not one per kernel, dtype, config and switches")
    parser.add_argument("--budget-s", type=float, default=math.inf,
                        help="stop compiling after this many seconds; the report then says it is partial")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "triton_sm90_compile.md"))
    args = parser.parse_args(argv)
    start = time.time()
    env = _environment()
    print(f"triton_compile_check: git {env['git_sha']}, torch {env['torch']}, triton {env['triton']}, "
          f"device: none (sm_{args.arch} compile on {platform.machine()})", flush=True)
    specs = distinct_specs(args.models)
    print(f"{len(specs)} distinct layer shapes ({time.time() - start:.0f} s)", flush=True)
    calls = triton_capture.layer_calls(specs, args.batches, [DTYPES[d] for d in args.dtypes],
                                       (False, True) if args.channels_last else (False,))
    launches, skipped = triton_capture.capture(calls, args.arch)
    groups = group(launches, args.all)
    print(f"{len(launches)} specialisations, {len(groups)} to compile, "
          f"{len(skipped)} calls not taken ({time.time() - start:.0f} s)", flush=True)
    rows, left = compile_all(groups, args.arch, start + args.budget_s)
    report, problems = markdown(rows, left, launches, skipped, env, args, time.time() - start)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)
    print(f"triton_compile_check: wrote {args.out}; {len(problems)} problems", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
