"""`python -m kw_ops bench-op`: the KW op per layer shape against a static conv and the released formulation,
timed and set against the roofline of docs/design.md §5, with the peaks measured on this device in this run.

Shapes: every distinct KW layer call of the models (kw_ops.benchmarking.layer_shapes, hooks on a batch-1
forward at --size). Providers:
    static    F.conv2d with the layer's static weight [O, I/g, k, k] (cuDNN on CUDA, oneDNN on CPU)
    released  released_kw_conv: the authors' formulation (one mixing mm, permuted copy, conv with groups = B)
    torch     kw_conv(..., backend='torch'): the pure-PyTorch op with its hand-written backward
    cpp       kw_conv(..., backend='cpp'): the compiled CPU kernel (kw_ops._C; skipped where it is not built)
    triton    kw_conv(..., backend='triton'): the Triton kernels (CUDA only; the interpreter is not timed)
    auto      kw_conv(...) with the dispatcher's choice, labelled with what it picked for the shape and mode:
              'auto (released)', 'auto (op:cpp:gemm)', ...
A provider that cannot run a shape is a 'skipped' row with the reasons of kw_ops.ops.not_supported_reasons;
one that fails is an 'error' row with the exception; no row carries NaN.
Modes: forward (no_grad), backward (autograd.grad of a retained graph: the op's backward alone), both (the two).

Cost model (docs/design.md §5; P = the layer's static weight count, HW' = output positions, KW providers only: mixing):
    forward   FLOPs = 2·B·HW'·P + 2·B·n·P                bytes = x + y + E + attn (static: x + y + W)
    backward  FLOPs = 2·(2·B·HW'·P) + 3·(2·B·n·P)        bytes = x + dy + dx + 2·(E + attn) (read + gradient)
              (dx and dW are each a conv's worth; mixing is recomputed, then dattn = dW·Eᵀ and dE = attnᵀ·dW)
    both      the sum of the two
Bytes are the fused floor for every KW provider (W_b never leaves the chip), so the ratio of the released
and two-phase formulations includes the B·P kernels they move. floor = max(FLOPs / peak FLOP/s,
bytes / peak bandwidth); peaks: a large tensor copy (bytes read + written) and a large matmul in the
benchmark dtype. Operands that stay in cache can beat the copy bandwidth on small layers.
Time: median of torch.utils.benchmark.Timer.blocked_autorange (triton.testing.do_bench on CUDA), after
warm-up, rotating between ROTATE input sets.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..ops import kw_conv, not_supported_reasons
from ..ops import dispatch
from .layer_shapes import kw_layer_shapes, out_size, shape_text
from .model_bench import _environment, device_name
from .released import released_kw_conv

PROVIDERS = ("static", "released", "torch", "cpp", "triton", "auto")
KW_PROVIDERS = ("released", "torch", "cpp", "triton", "auto")
MODES = ("forward", "backward", "both")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MODELS = ("resnet18_kw1x", "resnet50_kw1x")
ROTATE = 3                 # input sets cycled through while timing
WARMUP = 1                 # untimed calls before timing (allocator, oneDNN / cuDNN / autotuner caches)
CPU_MIN_RUN_S = 0.05       # blocked_autorange's minimum measuring time per case on CPU
PEAK_MIN_RUN_S = 0.3       # ... and for the peak measurements
CSV_FIELDS = ("date", "git_sha", "device", "torch", "triton", "threads", "model", "layer", "count", "shape", "batch",
              "size", "dtype", "provider", "mode", "status", "reason", "median_ms", "tflops", "gflop", "mbytes",
              "floor_ms", "ratio_to_floor", "peak_tflops", "peak_bandwidth_gbs")


@dataclasses.dataclass
class Settings:
    device: str
    models: tuple[str, ...]
    batch: int
    size: int
    dtype: str
    modes: tuple[str, ...]
    providers: tuple[str, ...]
    full: bool = False


def default_settings(device: str, full: bool = False) -> Settings:
    """Quick: about 1-2 min on a 2-core CPU (batch 8 at 112x112, fp32, forward and backward). Full: 128 at 224."""
    cuda = device.startswith("cuda")
    batch, size = (128, 224) if full else ((32, 224) if cuda else (8, 112))
    modes = MODES if full or cuda else ("forward", "backward")
    return Settings(device, DEFAULT_MODELS, batch, size, "bf16" if cuda else "fp32", modes, PROVIDERS, full)


# -- timing ------------------------------------------------------------------------------------------------
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, min_run_s: float = CPU_MIN_RUN_S) -> float:
    """Median milliseconds of fn() after WARMUP calls: do_bench on CUDA (with triton), else Timer.blocked_autorange."""
    for _ in range(WARMUP):
        fn()
    _sync(device)
    if torch.device(device).type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            pass
        else:
            return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
    from torch.utils.benchmark import Timer

    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_s).median * 1e3


def measure_peaks(device: str, dtype: torch.dtype) -> dict:
    """Copy bandwidth (GB/s, bytes read + written) and matmul rate (TFLOP/s in `dtype`) of this device."""
    cuda = torch.device(device).type == "cuda"
    elements = (256 << 20) if cuda else (64 << 20)          # 1 GiB / 256 MiB of float32 per buffer
    buffers = [torch.randn(elements, device=device), torch.empty(elements, device=device)]
    copy_ms = median_ms(lambda: buffers[1].copy_(buffers[0]), device, PEAK_MIN_RUN_S)
    bandwidth = 2 * elements * buffers[0].element_size() / (copy_ms * 1e-3)
    buffers.clear()
    size = 8192 if cuda else 2048
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    mm_ms = median_ms(lambda: a @ b, device, PEAK_MIN_RUN_S)
    return {"bandwidth_gbs": bandwidth / 1e9, "tflops": 2 * size**3 / (mm_ms * 1e-3) / 1e12,
            "copy_mib": elements * 4 / 2**20, "matmul": size}


# -- cost model --------------------------------------------------------------------------------------------
def cost(spec: dict, batch: int, elem: int, kw: bool, mode: str) -> tuple[float, float]:
    """(FLOPs, bytes) of one call by the module docstring's cost model."""
    if mode == "both":
        flops_f, bytes_f = cost(spec, batch, elem, kw, "forward")
        flops_b, bytes_b = cost(spec, batch, elem, kw, "backward")
        return flops_f + flops_b, bytes_f + bytes_b
    positions = math.prod(out_size(spec))
    weight = spec["out"] * spec["channels"] // spec["groups"] * math.prod(spec["kernel"])
    conv, mix = 2 * batch * positions * weight, (2 * batch * spec["n"] * weight if kw else 0)
    x_bytes = batch * spec["channels"] * math.prod(spec["size"]) * elem
    y_bytes = batch * spec["out"] * positions * elem
    params = (spec["n"] * math.prod(spec["cell"]) + batch * spec["m"] * spec["n"]) if kw else weight
    if mode == "forward":
        return conv + mix, x_bytes + y_bytes + params * elem
    return 2 * conv + 3 * mix, 2 * x_bytes + y_bytes + 2 * params * elem


# -- cases -------------------------------------------------------------------------------------------------
def _operands(spec, provider, batch, dtype, device, grad):
    """One input set: the tensors a provider differentiates (x first), the bias, and dy."""
    make = lambda *shape, scale=1.0: (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(grad)
    x = make(batch, spec["channels"], *spec["size"])
    bias = make(spec["out"]) if spec["bias"] else None
    dy = torch.randn(batch, spec["out"], *out_size(spec), device=device).to(dtype)
    if provider == "static":
        return [x, make(spec["out"], spec["channels"] // spec["groups"], *spec["kernel"], scale=0.05)], bias, dy
    attn = make(batch, spec["m"], spec["n"], scale=1.0 / spec["n"])
    return [x, attn, make(spec["n"], *spec["cell"], scale=0.05)], bias, dy


def _forward(spec, provider):
    geometry = (spec["out"], spec["kernel"], spec["stride"], spec["padding"], spec["dilation"], spec["groups"])
    if provider == "static":
        return lambda x, w, bias: F.conv2d(x, w, bias, spec["stride"], spec["padding"], spec["dilation"],
                                           spec["groups"])
    if provider == "released":
        return lambda x, attn, wh, bias: released_kw_conv(x, attn, wh, bias, *geometry)
    return lambda x, attn, wh, bias: kw_conv(
        x, attn, wh, bias, out_channels=spec["out"], kernel_size=spec["kernel"], stride=spec["stride"],
        padding=spec["padding"], dilation=spec["dilation"], groups=spec["groups"], backend=provider)


def _geometry(spec) -> dict:
    return {"out_channels": spec["out"], "kernel_size": spec["kernel"], "stride": spec["stride"],
            "padding": spec["padding"], "dilation": spec["dilation"], "groups": spec["groups"]}


def automatic_choice(spec, batch, dtype, device, grad: bool = False) -> str:
    """The formulation the dispatcher runs for this shape, batch, dtype and device ('released', 'op:cpp:gemm', ...),
    in inference or (grad) a training step."""
    tensors, bias, _ = _operands(spec, "auto", batch, dtype, device, grad)
    call = dispatch.Call.of(*tensors, **_geometry(spec))
    return dispatch.decide(call, "auto", None, (*tensors, bias, _geometry(spec))).formulation


def skip_reasons(spec, provider, batch, dtype, device) -> list[str]:
    """Why `provider` cannot run this shape here (empty: it can; the automatic choice always runs one)."""
    if provider in ("static", "released", "auto"):
        return []
    tensors, bias, _ = _operands(spec, provider, batch, dtype, device, False)
    reasons = not_supported_reasons(provider, *tensors, bias, _geometry(spec))
    if provider == "triton" and not reasons and torch.device(device).type != "cuda":
        reasons = ["Triton kernels on CPU run in the interpreter (TRITON_INTERPRET=1): not worth timing"]
    return reasons


def make_case(spec, provider, mode, batch, dtype, device):
    """A no-argument callable running one call of `mode`, cycling through ROTATE input sets."""
    forward = _forward(spec, provider)
    grad = mode != "forward"
    sets = [_operands(spec, provider, batch, dtype, device, grad) for _ in range(ROTATE)]
    if mode == "backward":  # the graph is built once per input set and kept: backward alone is timed
        sets = [(tensors, bias, dy, forward(*tensors, bias)) for tensors, bias, dy in sets]
    counter = iter(range(sys.maxsize))

    def step():
        tensors, bias, dy, *graph = sets[next(counter) % ROTATE]
        wrt = tensors + ([bias] if bias is not None else [])
        if mode == "forward":
            with torch.no_grad():
                return forward(*tensors, bias)
        if mode == "backward":
            return torch.autograd.grad(graph[0], wrt, dy, retain_graph=True)
        return torch.autograd.grad(forward(*tensors, bias), wrt, dy)

    return step


# -- running -----------------------------------------------------------------------------------------------
def _progress(done: int, total: int, text: str) -> None:
    print(f"\r[{done}/{total}] {text:<60}", end="", file=sys.stderr, flush=True)


def run(settings: Settings, peaks: dict | None = None) -> tuple[list[dict], dict, dict]:
    """Every (model, shape, mode, provider) case: (CSV rows, peaks, environment)."""
    dtype = DTYPES[settings.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    peaks = peaks or measure_peaks(settings.device, dtype)
    env = {**_environment(), "device": device_name(torch.device(settings.device).type),
           "threads": torch.get_num_threads()}
    plan = [(model, spec) for model in settings.models for spec in kw_layer_shapes(model, settings.size)]
    rows = []
    for index, (model, spec) in enumerate(plan):
        _progress(index, len(plan), f"{model} {spec['layer']}")
        reasons = {p: skip_reasons(spec, p, settings.batch, dtype, settings.device) for p in settings.providers}
        for mode in settings.modes:
            labels = {p: f"auto ({automatic_choice(spec, settings.batch, dtype, settings.device, mode != 'forward')})"
                      if p == "auto" else p for p in settings.providers}
            for provider in settings.providers:
                row = {**env, "model": model, "layer": spec["layer"], "count": spec["count"],
                       "shape": shape_text(spec), "batch": settings.batch, "size": settings.size,
                       "dtype": settings.dtype, "provider": labels[provider], "mode": mode,
                       "peak_tflops": f"{peaks['tflops']:.4g}", "peak_bandwidth_gbs": f"{peaks['bandwidth_gbs']:.4g}"}
                if reasons[provider]:
                    rows.append({**row, "status": "skipped", "reason": "; ".join(reasons[provider])})
                    continue
                try:
                    ms = median_ms(make_case(spec, provider, mode, settings.batch, dtype, settings.device),
                                   settings.device)
                except Exception as error:  # noqa: BLE001 - recorded as the row's reason, never a number
                    rows.append({**row, "status": "error", "reason": f"{type(error).__name__}: {str(error)[:200]}"})
                    if torch.device(settings.device).type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                flops, moved = cost(spec, settings.batch, elem, provider in KW_PROVIDERS, mode)
                floor_ms = max(flops / (peaks["tflops"] * 1e12), moved / (peaks["bandwidth_gbs"] * 1e9)) * 1e3
                rows.append({**row, "status": "ok", "reason": "", "median_ms": f"{ms:.4f}",
                             "tflops": f"{flops / (ms * 1e-3) / 1e12:.4g}", "gflop": f"{flops / 1e9:.4g}",
                             "mbytes": f"{moved / 1e6:.4g}", "floor_ms": f"{floor_ms:.4f}",
                             "ratio_to_floor": f"{ms / floor_ms:.3g}"})
    _progress(len(plan), len(plan), "done")
    print(file=sys.stderr)
    return rows, peaks, env


# -- report ------------------------------------------------------------------------------------------------
def _column(label: str) -> str:
    """The provider of a row's label: 'auto (cpp)' -> 'auto'."""
    return label.split(" (")[0]


def header(settings: Settings, peaks: dict, env: dict, seconds: float | None = None) -> str:
    dtype = settings.dtype
    lines = [f"# KW op per layer shape on {env['device']}", "",
             f"torch {env['torch']} · triton {env['triton']} · git {env['git_sha']} · {env['date']} UTC"
             + (f" · {seconds:.0f} s" if seconds is not None else ""),
             f"settings: models {', '.join(settings.models)}; batch {settings.batch} at {settings.size}x{settings.size}"
             f" (KW layer shapes recorded there); {dtype}; modes {', '.join(settings.modes)}; providers "
             f"{', '.join(settings.providers)}; {env['threads']} threads; median of Timer.blocked_autorange / "
             f"do_bench after {WARMUP} warm-up calls, {ROTATE} input sets rotated"
             + ("" if settings.full else " (quick settings; --full for batch 128 at 224x224)"),
             f"measured peaks: copy {peaks['bandwidth_gbs']:.1f} GB/s (read + write, {peaks['copy_mib']:.0f} MiB), "
             f"{dtype} matmul {peaks['tflops']:.3g} TFLOP/s ({peaks['matmul']}^3)",
             "cost model: forward 2·B·HW'·P conv + 2·B·n·P mixing FLOPs (KW providers); backward 2x the conv + 3x "
             "the mixing; bytes fused x + y + E + attn (static: W), backward x + dy + dx + 2·(E + attn); "
             "floor = max(FLOPs / peak, bytes / bandwidth)", ""]
    return "\n".join(lines)


def markdown(rows: list[dict], settings: Settings, peaks: dict, env: dict, seconds: float | None = None) -> str:
    """Header, then per layer and mode: ms, TFLOP/s and time / floor per provider; model totals; skip reasons.
    The auto column's cells name the backend the automatic choice ran, as in '(cpp) 1.234 ms · ...'."""
    providers = list(settings.providers)
    cells, counts = {}, {}
    for r in rows:
        key = (r["model"], r["layer"], r["shape"], r["mode"])
        cells.setdefault(key, {})[_column(r["provider"])] = r
        counts[key] = int(r["count"])

    def cell(r):
        if r is None:
            return ""
        if r["status"] != "ok":
            return r["status"]
        picked = r["provider"][len(_column(r["provider"])):].strip()
        return (f"{picked + ' ' if picked else ''}{float(r['median_ms']):.3f} ms · {float(r['tflops']):.3g} TF/s · "
                f"{float(r['ratio_to_floor']):.3g}x")

    lines = [header(settings, peaks, env, seconds),
             "Per cell: median ms · achieved TFLOP/s (cost model) · time / roofline floor; auto: the automatic "
             "choice, with the backend it ran for the shape.", "",
             "| model | layer | shape | × | mode | " + " | ".join(providers) + " |",
             "|---|---|---|---|---|" + "---|" * len(providers)]
    totals = {}
    for (model, layer, shape, mode), by_provider in cells.items():
        lines.append(f"| {model} | {layer} | {shape} | {counts[(model, layer, shape, mode)]} | {mode} | "
                     + " | ".join(cell(by_provider.get(p)) for p in providers) + " |")
        for p, r in by_provider.items():
            slot = totals.setdefault((model, mode, p), [0.0, 0.0, True])
            if r["status"] == "ok":
                slot[0] += float(r["median_ms"]) * int(r["count"])
                slot[1] += float(r["floor_ms"]) * int(r["count"])
            else:
                slot[2] = False
    lines += ["", "Model totals (each distinct shape × its number of layers): ms (ratio to static · time / floor)", "",
              "| model | mode | " + " | ".join(providers) + " |", "|---|---|" + "---|" * len(providers)]
    for model in dict.fromkeys(k[0] for k in totals):
        for mode in settings.modes:
            static = totals.get((model, mode, "static"))
            out = []
            for p in providers:
                total = totals.get((model, mode, p))
                if total is None or not total[2]:
                    out.append("skipped" if total else "")
                    continue
                vs = f"{total[0] / static[0]:.2f}x static · " if static and static[2] and static[0] else ""
                out.append(f"{total[0]:.2f} ({vs}{total[0] / total[1]:.3g}x floor)")
            lines.append(f"| {model} | {mode} | " + " | ".join(out) + " |")
    reasons = dict.fromkeys(f"{r['provider']}: {r['reason']}" for r in rows if r["status"] != "ok")
    if reasons:
        lines += ["", "Skipped or failed:", ""] + [f"- {text}" for text in reasons]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    """Append rows to `path` (header written when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore", restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _choices(text: str, known, what: str, parser) -> tuple[str, ...]:
    chosen = tuple(v for v in text.split(",") if v)
    unknown = [v for v in chosen if v not in known]
    if unknown or not chosen:
        parser.error(f"unknown {what} {unknown}; choose from {', '.join(known)}")
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kw_ops bench-op", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--models", help=f"comma-separated presets (default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="batch 128 at 224x224, every mode (meant for a GPU)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--size", type=int, help="input resolution the layer shapes are recorded at")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--modes", help=f"comma-separated from {','.join(MODES)}")
    parser.add_argument("--providers", help=f"comma-separated from {','.join(PROVIDERS)}")
    parser.add_argument("--out", default="benchmarks/results", help="folder of bench_op_<device>.csv")
    parser.add_argument("--markdown", help="also write the printed report to this file")
    args = parser.parse_args(argv)
    settings = default_settings(args.device, args.full)
    if args.models:
        from ..models import list_models

        settings.models = _choices(args.models, list_models(), "model", parser)
    settings.batch = args.batch or settings.batch
    settings.size = args.size or settings.size
    settings.dtype = args.dtype or settings.dtype
    if args.modes:
        settings.modes = _choices(args.modes, MODES, "mode", parser)
    if args.providers:
        settings.providers = _choices(args.providers, PROVIDERS, "provider", parser)
    started = time.time()
    rows, peaks, env = run(settings)
    csv_path = Path(args.out) / f"bench_op_{torch.device(settings.device).type}.csv"
    write_csv(rows, csv_path)
    report = markdown(rows, settings, peaks, env, time.time() - started)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(report)
    print(report)
    print(f"csv: {csv_path} ({len(rows)} rows appended)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
