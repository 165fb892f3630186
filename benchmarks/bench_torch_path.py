"""The pure-PyTorch KW op against the released formulation and a static conv, on the KW1x ResNet layer shapes.

    python benchmarks/bench_torch_path.py                 # ~5 min on 2 cores: both nets, batch 1 and 8, 1 and 2 threads
    python benchmarks/bench_torch_path.py --nets resnet18 --threads 1 --batches 8

Providers (float32, CPU):
    static    F.conv2d with the layer's static weight [O, I, k, k]
    released  the released code's formulation, reimplemented here: one mixing mm for all samples, the
              permuted copy into [B*O, I, k, k], one conv with groups = B; autograd keeps W for backward
    kw_ops    kw_ops.ops.kw_conv (torch backend; formulation chosen per shape; hand-written backward)
Modes: inference (no_grad forward) and train (forward + backward to x, attention and weights).
Layer shapes and warehouses come from the authors' plans (tests/fixtures/kw1x_resnet{18,50}.json) at 224x224
input; network totals weight each distinct shape by how often it occurs. With kw_ops.models present, whole
networks (static / KW with the released formulation patched in / KW) are timed as well.

Time: median of torch.utils.benchmark blocked_autorange. Peak memory: the peak of the running sum of the CPU
allocator's allocations minus frees during one call, from torch.profiler(profile_memory=True) memory events
(bytes above what was allocated before the call; oneDNN's internal scratch buffers are not seen).
Results: a markdown table on stdout and benchmarks/results/torch_path.csv (one row per measurement).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import kw_ops
from kw_ops.benchmarking.measure import allocator_peak_mb
from kw_ops.benchmarking.released import released_kw_conv
from kw_ops.ops import kw_conv

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
RESULTS = ROOT / "benchmarks" / "results"
STEM_OUTPUT = 56          # feature map entering layer1 at 224x224 input
MIN_RUN_TIME = 0.15       # seconds per timing (blocked_autorange)
PROVIDERS = ("static", "released", "kw_ops")


# -- layer shapes -----------------------------------------------------------------------------
def layer_shapes(net: str) -> Counter:
    """Counter of (C_in, C_out, k, stride, padding, HW_in, warehouse shape) over the KW layers of the preset."""
    plan = json.loads((FIXTURES / f"kw1x_{net}.json").read_text())
    cells = {w["index"]: tuple(w["shape"]) for w in plan["warehouses"]}
    shapes = Counter()
    for layer in plan["kw_layers"]:
        stage, block = (int(v) for v in layer["path"].split(".")[0][5:] + layer["path"].split(".")[1])
        resolution = STEM_OUTPUT >> (stage - 1)
        first_of_stage = block == 0 and stage > 1
        if first_of_stage and (layer["stride"][0] == 2 or layer["path"].endswith(("conv1", "downsample.0"))):
            resolution *= 2  # this conv still sees the previous stage's feature map
        shapes[(layer["in"], layer["out"], layer["kernel"][0], layer["stride"][0], layer["padding"][0], resolution,
                cells[layer["warehouse"]])] += 1
    return shapes


def label(shape) -> str:
    c_in, c_out, k, stride, _, hw, cells = shape
    return f"{c_in}->{c_out} k{k} s{stride} @{hw} n{cells[0]}"


# -- providers --------------------------------------------------------------------------------
def released_conv(x, attn, warehouse, out_channels, kernel, stride, padding):
    """The released formulation: mixing mm, permuted copy into [B*O, I, k, k], conv with groups = B."""
    return released_kw_conv(x, attn, warehouse.view(*warehouse.shape[:3], 1, 1), None, out_channels,
                            (kernel, kernel), (stride, stride), (padding, padding), (1, 1), 1)


def make_case(shape, batch, provider, train):
    """(callable running one step, description) for one layer shape."""
    c_in, c_out, k, stride, padding, hw, cells = shape
    n, cell_out, cell_in = cells[:3]
    m = k * k * (c_out // cell_out) * (c_in // cell_in)
    x = torch.randn(batch, c_in, hw, hw, requires_grad=train)
    if provider == "static":
        weight = torch.randn(c_out, c_in, k, k, requires_grad=train) * 0.05
        params = (x, weight)
        forward = lambda: F.conv2d(x, weight, None, stride, padding)
    else:
        attn = (torch.randn(batch, m, n) / n).requires_grad_(train)
        warehouse = (torch.randn(*cells[:3], 1, 1) * 0.05).requires_grad_(train)
        params = (x, attn, warehouse)
        if provider == "released":
            forward = lambda: released_conv(x, attn, warehouse, c_out, k, stride, padding)
        else:
            forward = lambda: kw_conv(x, attn, warehouse, None, out_channels=c_out, kernel_size=k, stride=stride,
                                      padding=padding)
    if not train:
        def step():
            with torch.no_grad():
                return forward()
        return step
    grad = torch.randn_like(forward().detach())

    def step():
        y = forward()
        return torch.autograd.grad(y, params, grad)
    return step


# -- measuring --------------------------------------------------------------------------------
def median_ms(fn) -> float:
    fn()  # warm-up (allocator, oneDNN primitive cache)
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=MIN_RUN_TIME).median * 1e3


def peak_mb(fn) -> float:
    """Peak bytes allocated above the starting point during one call (CPU allocator events), after a warm-up."""
    fn()
    return allocator_peak_mb(fn)


def network_case(net, provider, batch, train):
    """Whole-network step with kw_ops.models; None when the presets are not there."""
    try:
        from kw_ops import models
        name = net if provider == "static" else f"{net}_kw1x"
        model = models.create(name)
    except Exception as error:  # noqa: BLE001 - recorded as the reason the row is skipped
        return None, f"kw_ops.models.create unavailable: {error}"
    model.train(train)
    if not train:
        model.eval()
    x = torch.randn(batch, 3, 224, 224)
    if provider == "released":
        import kw_ops.nn.layers as layers_module

        def patched(x, attn, cells, bias, *, out_channels, kernel_size, stride, padding, dilation, groups,
                    backend=None):
            return released_conv(x, attn, cells.reshape(*cells.shape[:3]), out_channels, kernel_size[0], stride,
                                 padding)
        original = layers_module.kw_conv

        def run(fn):
            layers_module.kw_conv = patched
            try:
                return fn()
            finally:
                layers_module.kw_conv = original
    else:
        run = lambda fn: fn()
    if not train:
        def step():
            with torch.no_grad():
                return run(lambda: model(x))
        return step, ""

    def step():
        model.zero_grad(set_to_none=True)
        run(lambda: model(x).logsumexp(dim=1).mean().backward())
    if batch == 1:  # BatchNorm in train mode needs more than one value per channel
        return None, "train at batch 1: BatchNorm needs batch > 1"
    return step, ""


# -- report -----------------------------------------------------------------------------------
def environment() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kw_ops"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        sha += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": f"CPU {cpu} ({os.cpu_count()} cores)", "torch": torch.__version__,
            "kw_ops": kw_ops.__version__, "python": platform.python_version(), "git": sha}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--no-network", action="store_true", help="skip whole-network rows")
    parser.add_argument("--out", default=str(RESULTS / "torch_path.csv"))
    args = parser.parse_args(argv)
    env = environment()
    started = time.time()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for net in args.nets:
            shapes = layer_shapes(net)
            for batch in args.batches:
                for train in (False, True):
                    mode = "train" if train else "inference"
                    for shape, count in shapes.items():
                        for provider in PROVIDERS:
                            torch.manual_seed(0)
                            step = make_case(shape, batch, provider, train)
                            row = {"net": net, "layer": label(shape), "count": count, "threads": threads,
                                   "batch": batch, "mode": mode, "provider": provider, "ms": median_ms(step),
                                   "peak_mb": "", "skipped": ""}
                            if threads == args.threads[0] and not args.no_memory:
                                row["peak_mb"] = round(peak_mb(step), 2)
                            row["ms"] = round(row["ms"], 3)
                            rows.append(row)
                    if args.no_network:
                        continue
                    for provider in PROVIDERS:
                        step, reason = network_case(net, provider, batch, train)
                        row = {"net": net, "layer": "whole network", "count": 1, "threads": threads, "batch": batch,
                               "mode": mode, "provider": provider, "ms": "", "peak_mb": "", "skipped": reason}
                        if step is not None:
                            row["ms"] = round(median_ms(step), 3)
                            if threads == args.threads[0] and not args.no_memory:
                                row["peak_mb"] = round(peak_mb(step), 2)
                        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*env, *rows[0]])
        writer.writeheader()
        for row in rows:
            writer.writerow({**env, **row})
    print_tables(rows, env, time.time() - started, out)


def _by(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def print_tables(rows, env, seconds, out) -> None:
    print("# KW op, pure-PyTorch path vs released formulation vs static conv (float32)\n")
    print(" | ".join(f"{k}: {v}" for k, v in env.items()) + f" | run: {seconds:.0f} s | csv: {out.name}\n")
    print("## Sum over the KW layers of each network (each distinct shape weighted by its count)\n")
    print("| net | threads | batch | mode | static ms | released ms | kw_ops ms | kw_ops / static | "
          "released / kw_ops | peak MB static / released / kw_ops (sum of layer peaks) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["net"], r["threads"], r["batch"], r["mode"]) for r in rows})
    for net, threads, batch, mode in keys:
        layer_rows = [r for r in _by(rows, net=net, threads=threads, batch=batch, mode=mode)
                      if r["layer"] != "whole network"]
        total = {p: sum(r["ms"] * r["count"] for r in layer_rows if r["provider"] == p) for p in PROVIDERS}
        mem = {p: [r["peak_mb"] * r["count"] for r in layer_rows if r["provider"] == p and r["peak_mb"] != ""]
               for p in PROVIDERS}
        mem_text = " / ".join(f"{sum(v):.0f}" for v in mem.values()) if all(mem.values()) else "-"
        print(f"| {net} | {threads} | {batch} | {mode} | {total['static']:.1f} | {total['released']:.1f} | "
              f"{total['kw_ops']:.1f} | {total['kw_ops'] / total['static']:.2f} | "
              f"{total['released'] / total['kw_ops']:.2f} | {mem_text} |")
    network = [r for r in rows if r["layer"] == "whole network"]
    if network:
        print("\n## Whole networks (kw_ops.models presets, 224x224)\n")
        print("| net | threads | batch | mode | static ms | released ms | kw_ops ms | kw_ops / static | "
              "released / kw_ops | peak MB static / released / kw_ops |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for net, threads, batch, mode in keys:
            found = {r["provider"]: r for r in _by(network, net=net, threads=threads, batch=batch, mode=mode)}
            if not found:
                continue
            if any(r["skipped"] for r in found.values()):
                reason = next(r["skipped"] for r in found.values() if r["skipped"])
                print(f"| {net} | {threads} | {batch} | {mode} | skipped: {reason} | | | | | |")
                continue
            s, r_, k = (found[p]["ms"] for p in PROVIDERS)
            mem = " / ".join(str(found[p]["peak_mb"]) for p in PROVIDERS) if found["kw_ops"]["peak_mb"] != "" else "-"
            print(f"| {net} | {threads} | {batch} | {mode} | {s:.1f} | {r_:.1f} | {k:.1f} | {k / s:.2f} | "
                  f"{r_ / k:.2f} | {mem} |")
    first_threads = min(r["threads"] for r in rows)
    batch = max(r["batch"] for r in rows)
    print(f"\n## Per layer shape, {first_threads} thread(s), batch {batch} (ms; peak MB)\n")
    print("| net | layer | count | mode | static | released | kw_ops | kw_ops / static | released / kw_ops |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["threads"] != first_threads or r["batch"] != batch or r["provider"] != "kw_ops" or \
                r["layer"] == "whole network":
            continue
        group = {q["provider"]: q for q in _by(rows, net=r["net"], layer=r["layer"], threads=first_threads,
                                                batch=batch, mode=r["mode"])}
        cell = lambda q: f"{q['ms']:.2f}" + (f"; {q['peak_mb']}" if q["peak_mb"] != "" else "")
        print(f"| {r['net']} | {r['layer']} | {r['count']} | {r['mode']} | {cell(group['static'])} | "
              f"{cell(group['released'])} | {cell(r)} | {r['ms'] / group['static']['ms']:.2f} | "
              f"{group['released']['ms'] / r['ms']:.2f} |")


if __name__ == "__main__":
    main()
