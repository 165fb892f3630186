"""GPU check of the Triton KW kernels in one call: GPU tests, measured peaks, per-layer timings vs the roofline.

Run from the repository root on a CUDA machine, no install needed:

    PYTHONPATH=. python benchmarks/gpu_check.py                  # writes under $OUT or benchmarks/results/
    PYTHONPATH=. python benchmarks/gpu_check.py --skip-tests --models resnet50_kw1x --batch 32

Steps (each bounded by the time budget; what does not fit is recorded as skipped, with the reason):
1. `pytest -m gpu tests/test_triton.py` with TRITON_INTERPRET=0 (log in gpu_tests.log).
2. Peaks on this device: memory bandwidth (a large device copy, bytes read + written) and the bf16 matmul
   rate (torch.matmul 8192^3): the two ceilings of the roofline.
3. Every distinct KW layer shape of the models (shapes recorded by hooks on a batch-1 forward at 224x224),
   at --batch in --dtype: forward and backward median times (triton.testing.do_bench) of
   cudnn_static (F.conv2d / aten.convolution_backward with the static weight), torch_path (kw_conv_torch /
   kw_conv_backward_torch), triton_fused, triton_two_phase and triton_auto (the launcher's choice);
   the roofline floor per layer (DESIGN.md cost model: conv 2·B·HW'·P, mixing 2·B·n·P FLOPs; bytes of
   x, y, E, attn; backward 2x conv + 3x mixing FLOPs), time / floor, peak memory and the relative error
   of the Triton output against the torch path.
Writes gpu_check.csv (one row per layer, provider and mode, with device, versions and git sha),
gpu_check.md (tables: per layer, per model totals) and env.json.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels; tests/conftest.py defaults to the interpreter

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kw_ops.benchmarking.layer_shapes import kw_layer_shapes as layer_shapes  # noqa: E402
from kw_ops.benchmarking.layer_shapes import out_size, shape_text  # noqa: E402
from kw_ops.ops.torch_impl import kw_conv_backward_torch, kw_conv_torch  # noqa: E402
from kw_ops.ops.triton import not_supported_reasons  # noqa: E402

PROVIDERS = ("cudnn_static", "torch_path", "triton_fused", "triton_two_phase", "triton_auto")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CSV_FIELDS = ["device", "torch", "triton", "cuda", "git_sha", "model", "layer", "count", "shape", "batch", "dtype",
              "provider", "mode", "status", "median_ms", "tflops", "roofline_ms", "ratio_to_roofline", "peak_mb",
              "rel_err_vs_torch", "note"]


# -- environment -------------------------------------------------------------------------------------------
def environment() -> dict:
    import triton

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        sha += "+dirty"
    props = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "sm_count": props.multi_processor_count,
            "memory_gb": round(props.total_memory / 2**30, 1), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda or "", "python": platform.python_version(), "git_sha": sha,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# -- step 1: tests -----------------------------------------------------------------------------------------
def run_tests(out: Path, budget_s: float) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_triton.py", "-q", "-p", "no:cacheprovider",
           "--maxfail=25", "-rf"]
    start = time.time()
    try:
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget_s)
        log, status = result.stdout + result.stderr, f"exit {result.returncode}"
    except subprocess.TimeoutExpired as exc:
        log = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        status = f"timed out after {budget_s:.0f} s (raise --tests-budget-s)"
    (out / "gpu_tests.log").write_text(log)
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else "(no output)"
    return f"{status}, {time.time() - start:.0f} s: {summary}"


# -- step 2: peaks -----------------------------------------------------------------------------------------
def bench_ms(fn, warmup=10, rep=50) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def measure_peaks() -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate."""
    buffers = [torch.randn(256 << 20, device="cuda"), torch.empty(256 << 20, device="cuda")]  # 1 GiB each
    copy_ms = bench_ms(lambda: buffers[1].copy_(buffers[0]))
    bandwidth = 2 * buffers[0].numel() * buffers[0].element_size() / (copy_ms * 1e-3)
    buffers.clear()
    size = 8192
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench_ms(lambda: a @ b)
    flops = 2 * size**3 / (mm_ms * 1e-3)
    return {"bandwidth_gbs": bandwidth / 1e9, "bf16_tflops": flops / 1e12}


# -- step 3: layers ----------------------------------------------------------------------------------------
def roofline(spec, batch, elem, kw: bool, mode: str, peaks) -> tuple[float, float]:
    """(FLOPs, floor ms) of one layer call by the DESIGN.md cost model."""
    oh, ow = out_size(spec)
    positions = oh * ow
    weight = spec["out"] * spec["channels"] // spec["groups"] * math.prod(spec["kernel"])
    x_bytes = batch * spec["channels"] * math.prod(spec["size"]) * elem
    y_bytes = batch * spec["out"] * positions * elem
    params = (spec["n"] * math.prod(spec["cell"]) + batch * spec["m"] * spec["n"]) if kw else weight
    conv, mix = 2 * batch * positions * weight, 2 * batch * spec["n"] * weight
    if mode == "forward":
        flops = conv + (mix if kw else 0)
        moved = x_bytes + y_bytes + params * elem
    else:
        flops = 2 * conv + (3 * mix if kw else 0)
        moved = 2 * x_bytes + y_bytes + 2 * params * elem
    floor = max(flops / (peaks["bf16_tflops"] * 1e12), moved / (peaks["bandwidth_gbs"] * 1e9))
    return flops, floor * 1e3


def make_inputs(spec, batch, dtype, channels_last):
    x = torch.randn(batch, spec["channels"], *spec["size"], device="cuda", dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    attn = (torch.rand(batch, spec["m"], spec["n"], device="cuda") * 2 - 1) / spec["n"]
    warehouse = torch.randn(spec["n"], *spec["cell"], device="cuda") * 0.05
    weight = torch.randn(spec["out"], spec["channels"] // spec["groups"], *spec["kernel"], device="cuda") * 0.05
    bias = torch.randn(spec["out"], device="cuda") if spec["bias"] else None
    cast = lambda t: None if t is None else t.to(dtype)
    return x, cast(attn), cast(warehouse), cast(weight), cast(bias)


def providers(spec, x, attn, warehouse, weight, bias):
    """provider -> (forward fn, backward fn) or a skip reason (str)."""
    from kw_ops.ops.triton import launch

    args = (spec["out"], spec["kernel"], spec["stride"], spec["padding"], spec["dilation"], spec["groups"])
    dy = torch.randn(x.shape[0], spec["out"], *out_size(spec), device="cuda", dtype=x.dtype)
    has_bias = bias is not None
    table = {
        "cudnn_static": (
            lambda: F.conv2d(x, weight, bias, spec["stride"], spec["padding"], spec["dilation"], spec["groups"]),
            lambda: torch.ops.aten.convolution_backward(
                dy, x, weight, [spec["out"]] if has_bias else None, list(spec["stride"]), list(spec["padding"]),
                list(spec["dilation"]), False, [0, 0], spec["groups"], [True, True, has_bias])),
        "torch_path": (lambda: kw_conv_torch(x, attn, warehouse, bias, *args),
                       lambda: kw_conv_backward_torch(dy, x, attn, warehouse, has_bias, *args,
                                                      (True, True, True, has_bias))),
    }
    reasons = not_supported_reasons(x, attn, warehouse, bias, *args)
    for name, mode in (("triton_fused", "fused"), ("triton_two_phase", "two_phase"), ("triton_auto", None)):
        if reasons:
            table[name] = "; ".join(reasons)
            continue
        table[name] = (
            lambda mode=mode: launch.kw_conv_triton_forward(x, attn, warehouse, bias, *args, mode=mode),
            lambda mode=mode: launch.kw_conv_triton_backward(dy, x, attn, warehouse, has_bias, *args, mode=mode))
    return table


def peak_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def relative_error(got, ref) -> float:
    got, ref = got.float(), ref.float()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def bench_layer(model, spec, batch, dtype, peaks, env, channels_last) -> list[dict]:
    from kw_ops.ops.triton import launch

    x, attn, warehouse, weight, bias = make_inputs(spec, batch, dtype, channels_last)
    elem = x.element_size()
    rows = []
    reference = kw_conv_torch(x, attn, warehouse, bias, spec["out"], spec["kernel"], spec["stride"], spec["padding"],
                              spec["dilation"], spec["groups"])
    auto = launch.choose_mode(math.prod(out_size(spec)), spec["n"], elem)
    for provider, entry in providers(spec, x, attn, warehouse, weight, bias).items():
        for mode, index in (("forward", 0), ("backward", 1)):
            row = {**{k: env[k] for k in ("device", "torch", "triton", "cuda", "git_sha")}, "model": model,
                   "layer": spec["layer"], "count": spec["count"], "shape": shape_text(spec), "batch": batch,
                   "dtype": str(dtype)[6:],
                   "provider": provider, "mode": mode}
            if isinstance(entry, str):
                rows.append({**row, "status": "skipped", "note": entry})
                continue
            fn = entry[index]
            try:
                ms = bench_ms(fn)
                memory = peak_mb(fn)
                err = ""
                if provider.startswith("triton") and mode == "forward":
                    err = f"{relative_error(fn(), reference):.2e}"
            except Exception as exc:  # recorded, never turned into a number
                rows.append({**row, "status": "error", "note": f"{type(exc).__name__}: {str(exc)[:200]}"})
                torch.cuda.empty_cache()
                continue
            flops, floor = roofline(spec, batch, elem, provider != "cudnn_static", mode, peaks)
            rows.append({**row, "status": "ok", "median_ms": f"{ms:.4f}", "tflops": f"{flops / ms / 1e9:.1f}",
                         "roofline_ms": f"{floor:.4f}", "ratio_to_roofline": f"{ms / floor:.2f}",
                         "peak_mb": f"{memory:.1f}", "rel_err_vs_torch": err,
                         "note": f"auto={auto}" if provider == "triton_auto" else ""})
    del x, attn, warehouse, weight, bias, reference
    torch.cuda.empty_cache()
    return rows


# -- report ------------------------------------------------------------------------------------------------
def markdown(rows, env, peaks, tests, args) -> str:
    lines = [f"# Triton KW kernels on {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, git {env['git_sha']}, {env['date']}",
             f"batch {args.batch}, {args.dtype}, {'channels_last' if args.channels_last else 'NCHW'} inputs", "",
             f"- GPU tests: {tests}",
             f"- measured peaks: copy bandwidth {peaks.get('bandwidth_gbs', float('nan')):.0f} GB/s, "
             f"bf16 matmul {peaks.get('bf16_tflops', float('nan')):.0f} TFLOP/s", "",
             "Median ms (ratio to the roofline floor); torch_path and triton include mixing; `-`: skipped, see CSV.",
             ""]
    by_layer, counts = {}, {}
    for r in rows:
        counts[(r["model"], r["layer"])] = int(r.get("count") or 1)
        by_layer.setdefault((r["model"], r["layer"], r["shape"]), {})[(r["provider"], r["mode"])] = r
    header = "| model | layer | shape | " + " | ".join(f"{p} fwd | {p} bwd" for p in PROVIDERS) + " |"
    lines += [header, "|" + "---|" * (3 + 2 * len(PROVIDERS))]

    def cell(r):
        if not r or r.get("status") != "ok":
            return "-" if not r or r.get("status") == "skipped" else "error"
        return f"{float(r['median_ms']):.3f} ({r['ratio_to_roofline']}x)"

    totals = {}
    for (model, layer, shape), cells in by_layer.items():
        lines.append(f"| {model} | {layer} | {shape} | " + " | ".join(
            f"{cell(cells.get((p, 'forward')))} | {cell(cells.get((p, 'backward')))}" for p in PROVIDERS) + " |")
        for (provider, mode), r in cells.items():
            slot = totals.setdefault((model, provider, mode), [0.0, 0])
            fallback = cells.get(("torch_path", mode))
            use = r if r.get("status") == "ok" else fallback  # triton falls back to the torch path
            if use and use.get("status") == "ok":
                slot[0] += float(use["median_ms"]) * counts[(model, layer)]
                slot[1] += (r.get("status") != "ok") * counts[(model, layer)]
    lines += ["", "## Model totals: each distinct layer shape times the number of layers with it", "",
              "| model | provider | forward ms | backward ms | layers on the torch fallback |", "|---|---|---|---|---|"]
    for model in dict.fromkeys(m for m, _, _ in totals):
        for provider in PROVIDERS:
            fwd = totals.get((model, provider, "forward"), [0.0, 0])
            bwd = totals.get((model, provider, "backward"), [0.0, 0])
            lines.append(f"| {model} | {provider} | {fwd[0]:.2f} | {bwd[0]:.2f} | {fwd[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--models", nargs="+", default=["resnet50_kw1x", "mobilenetv2_100_kw1x"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--tests-budget-s", type=float, default=200)
    parser.add_argument("--budget-s", type=float, default=540, help="whole run (tests included); later layers skip")
    args = parser.parse_args(argv)
    start = time.time()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to do", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out / "env.json").write_text(json.dumps(env, indent=1))
    print(json.dumps(env), flush=True)
    tests = "skipped (--skip-tests)" if args.skip_tests else run_tests(out, min(args.tests_budget_s, args.budget_s / 2))
    print("tests:", tests, flush=True)
    peaks = measure_peaks()
    print("peaks:", peaks, flush=True)
    dtype = DTYPES[args.dtype]
    rows = []
    for model in args.models:
        for spec in layer_shapes(model):
            if time.time() - start > args.budget_s:
                rows.append({**{k: env[k] for k in ("device", "torch", "triton", "cuda", "git_sha")}, "model": model,
                             "layer": spec["layer"], "shape": shape_text(spec), "batch": args.batch,
                             "dtype": args.dtype, "provider": "all", "mode": "both", "status": "skipped",
                             "note": f"time budget {args.budget_s:.0f} s spent"})
                continue
            layer_rows = bench_layer(model, spec, args.batch, dtype, peaks, env, args.channels_last)
            rows += layer_rows
            summary = ", ".join(f"{r['provider']}/{r['mode'][0]}={r.get('median_ms', r['status'])}"
                                for r in layer_rows)
            print(f"{model} {spec['layer']} [{shape_text(spec)}]: {summary}", flush=True)
    with open(out / "gpu_check.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in CSV_FIELDS} for r in rows)
    report = markdown(rows, env, peaks, tests, args)
    (out / "gpu_check.md").write_text(report)
    print(report)
    print(f"gpu_check: wrote {out / 'gpu_check.md'} and gpu_check.csv in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
