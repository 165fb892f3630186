"""The compiled CPU kernel (cpp backend) against the torch path, the released formulation and a static conv.

    python benchmarks/bench_cpp.py layers  [--presets resnet18_kw1x ...] [--rounds 3]
    python benchmarks/bench_cpp.py network --authors /path/to/KernelWarehouse [--rounds 5]

float32, batch 8, 224x224, one thread (torch.set_num_threads(1)).

layers   every distinct KW layer call of the presets (ResNet18/50 and MobileNetV2 KW1x, KW4x), recorded by
         hooks (kw_ops.benchmarking.layer_shapes). Providers: static (F.conv2d with the layer's static
         weight), torch (kw_conv, torch backend), cpp (kw_conv, cpp backend), released (the released code's
         formulation, kw_ops.benchmarking.released). Modes: inference (no_grad forward) and train (forward +
         backward to every input). Roofline per call: max(FLOPs / peak GEMM rate, bytes / peak copy
         bandwidth), both peaks measured at the start of the run on one thread (1024^3 mm; 64 MiB copy).
         FLOPs: conv 2·B·HW'·P (+ mixing 2·B·n·P for KW); train: 3x conv, 4x mixing (forward, recompute,
         dattn, dE). Bytes (fused floor): x + y + weights (E + attn for KW); train 2x plus dx and dW.
network  KW1x ResNet18, whole network: static ResNet18, kw_ops (automatic backend choice), kw_ops forced to
         the torch path, our model in the released formulation, and the authors' own model (their code,
         given by --authors, imported with stub timm decorators; never vendored). Inference, training step
         (forward, cross-entropy, backward, SGD step) and the peak RSS growth of one training step, each
         measured in a fresh subprocess (VmHWM reset through /proc/self/clear_refs before the step).

Timing: the machine is shared, so methods are interleaved in rounds and each timing is the process CPU
time of the call (time.process_time; one thread) next to its wall time; reported: median over rounds and
the spread (min-max). Results: benchmarks/results/cpp_{layers,network}.{csv,md}.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PRESETS = ("resnet18_kw1x", "resnet18_kw4x", "mobilenetv2_100_kw1x", "mobilenetv2_100_kw4x", "resnet50_kw1x",
           "resnet50_kw4x")
PROVIDERS = ("static", "torch", "cpp", "released")
BATCH = 8
RESOLUTION = 224
MIN_SECONDS = 0.05      # a timing repeats the call until this much CPU time is spent (at least once)
NETWORK_METHODS = ("static", "kw_ops", "kw_ops torch path", "released formulation", "authors")


def environment() -> dict:
    import kw_ops

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "kw_ops": kw_ops.__version__,
            "git": sha or "unknown", "python": platform.python_version(), "load_at_start": round(load, 1)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def timed(step) -> tuple[float, float]:
    """(CPU ms, wall ms) per call: repeats until MIN_SECONDS of CPU time, after one warm-up call."""
    step()
    calls, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    while True:
        step()
        calls += 1
        if time.process_time() - cpu0 >= MIN_SECONDS:
            break
    return (time.process_time() - cpu0) * 1e3 / calls, (time.perf_counter() - wall0) * 1e3 / calls


def measure_peaks() -> dict:
    """Peak one-thread GEMM rate (GFLOP/s) and copy bandwidth (GB/s), best of a few tries."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    out = torch.empty(1024, 1024)
    src, dst = torch.randn(16 << 20), torch.empty(16 << 20)
    gemm = max(2 * 1024 ** 3 / (timed(lambda: torch.mm(a, b, out=out))[0] * 1e6) for _ in range(5))
    copy = max(2 * src.numel() * 4 / (timed(lambda: dst.copy_(src))[0] * 1e6) for _ in range(5))
    return {"gemm_gflops": round(gemm, 1), "copy_gbs": round(copy, 1)}


# -- layers -----------------------------------------------------------------------------------
def layer_step(spec: dict, provider: str, train: bool):
    from kw_ops.benchmarking.released import released_kw_conv
    from kw_ops.ops import kw_conv

    torch.manual_seed(0)
    x = torch.randn(BATCH, spec["channels"], *spec["size"], requires_grad=train)
    geometry = dict(out_channels=spec["out"], kernel_size=spec["kernel"], stride=spec["stride"],
                    padding=spec["padding"], dilation=spec["dilation"], groups=spec["groups"])
    bias = torch.zeros(spec["out"], requires_grad=train) if spec["bias"] else None
    if provider == "static":
        weight = (torch.randn(spec["out"], spec["channels"] // spec["groups"], *spec["kernel"]) * 0.05)
        weight.requires_grad_(train)
        inputs = [t for t in (x, weight, bias) if t is not None]
        forward = lambda: F.conv2d(x, weight, bias, spec["stride"], spec["padding"], spec["dilation"],  # noqa: E731
                                   spec["groups"])
    else:
        attn = (torch.randn(BATCH, spec["m"], spec["n"]) / spec["n"]).requires_grad_(train)
        cells = (torch.randn(spec["n"], *spec["cell"]) * 0.05).requires_grad_(train)
        inputs = [t for t in (x, attn, cells, bias) if t is not None]
        if provider == "released":
            forward = lambda: released_kw_conv(x, attn, cells, bias, **geometry)  # noqa: E731
        else:
            forward = lambda: kw_conv(x, attn, cells, bias, backend=provider, **geometry)  # noqa: E731
    if not train:
        def step():
            with torch.no_grad():
                forward()
        return step
    grad = torch.randn_like(forward().detach())
    return lambda: torch.autograd.grad(forward(), inputs, grad)


def roofline_ms(spec: dict, provider: str, train: bool, peaks: dict) -> float:
    positions = math.prod(out_size(spec))
    weights = spec["out"] * spec["channels"] // spec["groups"] * math.prod(spec["kernel"])
    conv = 2 * BATCH * positions * weights
    x_bytes = BATCH * spec["channels"] * math.prod(spec["size"]) * 4
    y_bytes = BATCH * spec["out"] * positions * 4
    if provider == "static":
        flops, w_bytes, mix = conv, weights * 4, 0
    else:
        mix = 2 * BATCH * spec["n"] * weights
        flops, w_bytes = conv + mix, spec["n"] * math.prod(spec["cell"]) * 4 + BATCH * spec["m"] * spec["n"] * 4
    bytes_ = x_bytes + y_bytes + w_bytes
    if train:
        flops, bytes_ = 3 * conv + 4 * mix, 2 * bytes_ + x_bytes + w_bytes
    return max(flops / (peaks["gemm_gflops"] * 1e6), bytes_ / (peaks["copy_gbs"] * 1e6))


def out_size(spec):
    from kw_ops.benchmarking.layer_shapes import out_size as size

    return size(spec)


def run_layers(args) -> None:
    from kw_ops.benchmarking.layer_shapes import kw_layer_shapes, shape_text
    from kw_ops.ops import dispatch

    torch.set_num_threads(1)
    env, peaks = environment(), measure_peaks()
    print(f"# peaks on one thread: {peaks}", flush=True)
    specs = {preset: kw_layer_shapes(preset, RESOLUTION) for preset in args.presets}
    times: dict[tuple, list] = {}
    started = time.time()
    for round_ in range(args.rounds):
        for preset, layers in specs.items():
            if round_ >= args.rounds_for.get(preset.split("_")[0], args.rounds):
                continue
            for spec in layers:
                for train in (False, True):
                    for provider in PROVIDERS:
                        cpu_ms, wall_ms = timed(layer_step(spec, provider, train))
                        times.setdefault((preset, shape_text(spec), train, provider), []).append((cpu_ms, wall_ms))
            print(f"round {round_ + 1}: {preset} done ({time.time() - started:.0f} s)", flush=True)
    rows = []
    for preset, layers in specs.items():
        for spec in layers:
            path = dispatch.backend_formulation(  # the cpp path the dispatcher runs for the shape (no compute)
                "cpp", torch.empty(BATCH, spec["channels"], *spec["size"]), torch.empty(BATCH, spec["m"], spec["n"]),
                torch.empty(spec["n"], *spec["cell"]), spec["out"], spec["kernel"], spec["stride"], spec["padding"],
                spec["dilation"], spec["groups"])
            for train in (False, True):
                for provider in PROVIDERS:
                    samples = times[(preset, shape_text(spec), train, provider)]
                    cpu = [c for c, _ in samples]
                    rows.append({**env, **peaks, "preset": preset, "layer": shape_text(spec), "count": spec["count"],
                                 "mode": "train" if train else "inference", "provider": provider,
                                 "cpp_path": path, "rounds": len(samples),
                                 "cpu_ms": round(statistics.median(cpu), 3), "cpu_ms_min": round(min(cpu), 3),
                                 "cpu_ms_max": round(max(cpu), 3),
                                 "wall_ms": round(statistics.median(w for _, w in samples), 3),
                                 "roofline_ms": round(roofline_ms(spec, provider, train, peaks), 3)})
    write(rows, RESULTS / "cpp_layers.csv")
    (RESULTS / "cpp_layers.md").write_text(layers_markdown(rows, env, peaks, time.time() - started))
    print((RESULTS / "cpp_layers.md").read_text())


def layers_markdown(rows, env, peaks, seconds) -> str:
    lines = ["# KW op per layer: static conv, torch path, compiled cpp kernel, released formulation", "",
             f"`python benchmarks/bench_cpp.py layers`: batch {BATCH}, {RESOLUTION}², fp32, 1 thread, "
             f"{seconds:.0f} s. "
             + " · ".join(f"{k}: {v}" for k, v in env.items()),
             f"Peaks measured in the run (1 thread): GEMM {peaks['gemm_gflops']} GFLOP/s, "
             f"copy {peaks['copy_gbs']} GB/s.",
             "**The machine was shared (2 cores, about 8 other jobs; see load_at_start)**: times are the process CPU "
             "time per call, median over the rounds, [min-max] spread; wall times are in the CSV. "
             "x roof = time / roofline (module docstring).", ""]
    index = {(r["preset"], r["layer"], r["mode"], r["provider"]): r for r in rows}
    for preset in dict.fromkeys(r["preset"] for r in rows):
        for mode in ("inference", "train"):
            lines += [f"## {preset}, {mode}", "",
                      "| layer | count | cpp path | static ms | torch ms | cpp ms | released ms | cpp x roof | "
                      "cpp / torch | cpp / static |", "|---|---|---|---|---|---|---|---|---|---|"]
            totals = dict.fromkeys(PROVIDERS, 0.0)
            for layer in dict.fromkeys(r["layer"] for r in rows if r["preset"] == preset):
                got = {p: index[(preset, layer, mode, p)] for p in PROVIDERS}
                for p in PROVIDERS:
                    totals[p] += got[p]["cpu_ms"] * got[p]["count"]
                cell = lambda r: f"{r['cpu_ms']:.2f} [{r['cpu_ms_min']:.1f}-{r['cpu_ms_max']:.1f}]"  # noqa: E731
                c = got["cpp"]
                lines.append(f"| {layer} | {c['count']} | {c['cpp_path']} | {cell(got['static'])} | "
                             f"{cell(got['torch'])} | {cell(c)} | {cell(got['released'])} | "
                             f"{c['cpu_ms'] / c['roofline_ms']:.1f} | {c['cpu_ms'] / got['torch']['cpu_ms']:.2f} | "
                             f"{c['cpu_ms'] / got['static']['cpu_ms']:.2f} |")
            lines.append(f"| **sum (x count)** | | | {totals['static']:.1f} | {totals['torch']:.1f} | "
                         f"{totals['cpp']:.1f} | {totals['released']:.1f} | | "
                         f"{totals['cpp'] / totals['torch']:.2f} | {totals['cpp'] / totals['static']:.2f} |")
            lines.append("")
    return "\n".join(lines)


def write(rows, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# -- whole network ----------------------------------------------------------------------------
def build(method: str, authors: str | None):
    from kw_ops import models

    if method == "static":
        return models.create("resnet18")
    if method == "authors":
        if not authors:
            raise RuntimeError("no --authors path to their code (fetch github.com/OSVAI/KernelWarehouse)")
        import types

        stub_layers = types.ModuleType("timm.models.layers")
        stub_layers.DropPath = lambda p: torch.nn.Identity()
        stub_registry = types.ModuleType("timm.models.registry")
        stub_registry.register_model = lambda f: f
        for name, module in (("timm", types.ModuleType("timm")), ("timm.models", types.ModuleType("timm.models")),
                             ("timm.models.layers", stub_layers), ("timm.models.registry", stub_registry)):
            sys.modules.setdefault(name, module)
        sys.path.insert(0, authors)
        import importlib.util

        spec = importlib.util.spec_from_file_location("kw_resnet_authors", Path(authors) / "models" / "kw_resnet.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.kw_resnet18(dropout=0.0)
    return models.create("resnet18_kw1x")


def network_child(method: str, mode: str, authors: str | None) -> dict:
    """One measurement in this (fresh) process: CPU / wall ms per call, or the RSS growth of one train step."""
    import contextlib

    from kw_ops.benchmarking.released import released_formulation
    from kw_ops.ops import use_backend

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(method, authors)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x, y = torch.randn(BATCH, 3, RESOLUTION, RESOLUTION), torch.randint(0, 1000, (BATCH,))
    context = {"kw_ops torch path": lambda: use_backend("torch"),
               "released formulation": lambda: released_formulation(model)}.get(method, contextlib.nullcontext)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def infer():
        with torch.no_grad():
            model(x)

    with context():
        if mode == "rss":
            model.train()
            import gc

            gc.collect()
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
            before = _status_kb("VmRSS")
            train_step()
            return {"params": params, "rss_growth_mb": round((_status_kb("VmHWM") - before) / 1024, 1)}
        model.train(mode == "train")
        step = train_step if mode == "train" else infer
        step()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        step()
        return {"params": params, "cpu_ms": round((time.process_time() - cpu0) * 1e3, 1),
                "wall_ms": round((time.perf_counter() - wall0) * 1e3, 1)}


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def run_network(args) -> None:
    env = environment()
    results: dict[tuple, list] = {}
    started = time.time()
    for round_ in range(args.rounds):
        for mode in ("inference", "train", "rss"):
            if mode == "rss" and round_ >= args.rss_rounds:
                continue
            for method in NETWORK_METHODS:
                command = [sys.executable, __file__, "_child", method, mode] + (["--authors", args.authors]
                                                                                 if args.authors else [])
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    results.setdefault((method, mode), []).append({"error": done.stderr.strip().splitlines()[-1]})
                else:
                    results.setdefault((method, mode), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"round {round_ + 1} done ({time.time() - started:.0f} s)", flush=True)
    rows = []
    for (method, mode), samples in results.items():
        good = [s for s in samples if "error" not in s]
        row = {**env, "method": method, "mode": mode, "rounds": len(good),
               "error": next((s["error"] for s in samples if "error" in s), "")}
        for key in ("cpu_ms", "wall_ms", "rss_growth_mb"):
            values = [s[key] for s in good if key in s]
            if values:
                row[key] = statistics.median(values)
                row[key + "_min"], row[key + "_max"] = min(values), max(values)
        row["params"] = good[0]["params"] if good else ""
        rows.append(row)
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in env, k))
    for r in rows:
        for k in fields:
            r.setdefault(k, "")
    write(rows, RESULTS / "cpp_network.csv")
    (RESULTS / "cpp_network.md").write_text(network_markdown(rows, env, time.time() - started))
    print((RESULTS / "cpp_network.md").read_text())


def network_markdown(rows, env, seconds) -> str:
    get = {(r["method"], r["mode"]): r for r in rows}

    def value(method, mode, key):
        r = get.get((method, mode))
        return r[key] if r and r.get(key, "") != "" else None

    lines = ["# KW1x ResNet18, whole network: static vs kw_ops (cpp) vs torch path vs released formulation vs the "
             "authors' model", "",
             f"`python benchmarks/bench_cpp.py network`: batch {BATCH}, {RESOLUTION}², fp32, 1 thread, each "
             f"measurement in a fresh subprocess, methods interleaved in rounds, {seconds:.0f} s. "
             + " · ".join(f"{k}: {v}" for k, v in env.items()),
             "**The machine was shared (2 cores, about 8 other jobs)**: times are process CPU time of one call "
             "after a warm-up call, median over rounds [min-max]; RSS growth: peak RSS of one training step "
             "(forward, loss, backward, SGD step) above the RSS before it, first step of a fresh process.", "",
             "| method | params | inference ms | train step ms | train RSS growth MB | error |",
             "|---|---|---|---|---|---|"]
    for method in NETWORK_METHODS:
        cells = []
        for mode, key in (("inference", "cpu_ms"), ("train", "cpu_ms"), ("rss", "rss_growth_mb")):
            r = get.get((method, mode))
            cells.append(f"{r[key]} [{r[key + '_min']}-{r[key + '_max']}]" if r and r.get(key, "") != "" else "-")
        errors = "; ".join(filter(None, (get.get((method, m), {}).get("error", "") for m in ("inference", "train",
                                                                                              "rss"))))
        params = next((get[(method, m)]["params"] for m in ("inference", "train", "rss") if (method, m) in get), "")
        lines.append(f"| {method} | {params} | {' | '.join(cells)} | {errors} |")
    lines += ["", "Ratios (medians):", ""]
    s_inf, k_inf, a_inf = (value(m, "inference", "cpu_ms") for m in ("static", "kw_ops", "authors"))
    s_tr, k_tr, a_tr = (value(m, "train", "cpu_ms") for m in ("static", "kw_ops", "authors"))
    s_rss, k_rss, a_rss = (value(m, "rss", "rss_growth_mb") for m in ("static", "kw_ops", "authors"))
    for text, a, b, target in (("kw_ops inference / static", k_inf, s_inf, "<= 1.3"),
                               ("authors inference / kw_ops", a_inf, k_inf, ">= 2.2"),
                               ("authors train step / kw_ops", a_tr, k_tr, ">= 1.8"),
                               ("kw_ops train step / static", k_tr, s_tr, "-"),
                               ("kw_ops train RSS growth / static", k_rss, s_rss, "<= 1.15"),
                               ("authors train RSS growth / static", a_rss, s_rss, "-")):
        lines.append(f"- {text}: {a / b:.2f} (target {target})" if a and b else f"- {text}: not measured")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    layers = sub.add_parser("layers")
    layers.add_argument("--presets", nargs="+", default=list(PRESETS))
    layers.add_argument("--rounds", type=int, default=3)
    layers.add_argument("--rounds-for", type=json.loads, default={},
                        help='fewer rounds for some nets, e.g. \'{"resnet50": 1}\'')
    network = sub.add_parser("network")
    network.add_argument("--authors", help="a checkout of github.com/OSVAI/KernelWarehouse (not vendored)")
    network.add_argument("--rounds", type=int, default=5)
    network.add_argument("--rss-rounds", type=int, default=3)
    child = sub.add_parser("_child")
    child.add_argument("method")
    child.add_argument("mode")
    child.add_argument("--authors")
    args = parser.parse_args(argv)
    if args.command == "layers":
        run_layers(args)
    elif args.command == "network":
        run_network(args)
    else:
        print(json.dumps(network_child(args.method, args.mode, args.authors)))


if __name__ == "__main__":
    main()
