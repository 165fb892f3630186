"""Predicted time per layer and mode by the cost model (kw_ops/ops/triton/cost_model.py), and the dispatcher's picks.

No GPU needed: every number is a prediction under the peaks named in the header (datasheet figures, or the
peaks gpu_check.py measured: --peaks peaks.json). Layer shapes of the KW presets from
kw_ops.benchmarking.layer_shapes (224x224).

    PYTHONPATH=. python benchmarks/cost_model_table.py [--batches 32 128] [--dtype bf16] [--peaks FILE]
                                                       [--channels-last]
Writes benchmarks/results/cost_model_<dtype>[_nhwc].md and .csv (or under --out).
"""
from __future__ import annotations

import argparse
import csv
import platform
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kw_ops.benchmarking.layer_shapes import kw_layer_shapes, out_size, shape_text  # noqa: E402
from kw_ops.benchmarking.model_bench import _environment  # noqa: E402
from kw_ops.ops import dispatch  # noqa: E402
from kw_ops.ops.triton import cost_model  # noqa: E402

MODELS = ("resnet18_kw1x", "resnet50_kw1x", "resnet50_kw4x", "mobilenetv2_100_kw1x")
# triton: what the Triton candidate runs, per pass the cheaper built mode (launch.choose_mode)
SHOWN = ("static", "released", "torch_op", "triton", *cost_model.KERNEL_MODES, *cost_model.MODELLED_ONLY)
ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
CSV_FIELDS = ("git_sha", "peaks", "model", "layer", "count", "shape", "batch", "dtype", "layout", "pass", "mode",
              "predicted_ms", "gpu_ms", "host_ms", "launches", "bound", "chosen")
DTYPE_NAME = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def dispatcher_pick(spec: dict, batch: int, dtype: str, train: bool, channels_last: bool) -> dispatch.Decision:
    """What kw_ops.ops.dispatch runs for this layer on a CUDA device (decided from the cost model alone)."""
    kernel = tuple(spec["kernel"])
    call = dispatch.Call("cuda", DTYPE_NAME[dtype], batch, spec["channels"], tuple(spec["size"]), spec["out"], kernel,
                         tuple(spec["stride"]), tuple(spec["padding"]), tuple(spec["dilation"]), spec["groups"],
                         spec["n"], tuple(spec["cell"]), backward=train, input_grad=train, channels_last=channels_last)
    return dispatch.decide(call, "auto")


_MODE_OF = {"released": "released", "op:triton": "triton", "op:torch:grouped": "torch_op"}


def _predict(shape, mode: str, direction: str, peaks):
    """One pass in `mode`; 'triton': the mode the launcher runs (cost_model.triton_prediction)."""
    if mode != "triton":
        return cost_model.predict(shape, mode, direction, peaks)
    return cost_model.triton_prediction(shape, direction, peaks)


def layer_rows(model: str, spec: dict, batch: int, dtype: str, peaks, channels_last: bool = False) -> list[dict]:
    """One row per pass (forward; backward = dx + wgrad) and mode; `chosen`: the dispatcher's pick for inference
    (forward rows) and for a training step (backward rows)."""
    shape = replace(cost_model.ConvShape.from_spec(spec, batch, ELEMENT_SIZE[dtype], out_size(spec)),
                    channels_last=channels_last)
    rows = []
    for label, directions in (("forward", ("forward",)), ("backward", ("dx", "wgrad"))):
        chosen = _MODE_OF[dispatcher_pick(spec, batch, dtype, label == "backward", channels_last).formulation]
        for mode in SHOWN:
            parts = [_predict(shape, mode, d, peaks) for d in directions]
            if any(p is None for p in parts):
                continue
            longest = max(parts, key=lambda p: p.seconds)
            rows.append({"model": model, "layer": spec["layer"], "count": spec["count"], "shape": shape_text(spec),
                         "batch": batch, "dtype": dtype, "layout": "NHWC" if channels_last else "NCHW",
                         "pass": label, "mode": mode, "predicted_ms": sum(p.ms for p in parts),
                         "gpu_ms": sum(p.gpu_seconds for p in parts) * 1e3,
                         "host_ms": sum(p.host_seconds for p in parts) * 1e3,
                         "launches": sum(p.launches for p in parts), "bound": longest.bound,
                         "chosen": mode == chosen})
    return rows


def floor_ms(spec: dict, batch: int, element_size: int, peaks) -> tuple[float, float, float]:
    """The forward roofline of one layer (docs/design.md §5): (FLOPs, bytes, floor ms) with x + y + E + attn moved."""
    shape = cost_model.ConvShape.from_spec(spec, batch, element_size, out_size(spec))
    flops = shape.conv_flops + shape.mix_flops
    moved = shape.x_bytes + shape.y_bytes + shape.warehouse_bytes + shape.attn_bytes
    seconds = max(flops / peaks.tensor_rate(element_size), moved / peaks.dram_bytes_per_s)
    return flops, moved, seconds * 1e3


def _label(mode: str) -> str:
    """A mode's column name: modelled-only modes carry a star."""
    return f"{mode}*" if mode in cost_model.MODELLED_ONLY else mode


def markdown(rows: list[dict], floors: dict, env: dict, peaks, dtype: str, channels_last: bool = False) -> str:
    layout = ("Inputs channels_last (NHWC), as a network converted with .to(memory_format=torch.channels_last) "
              "passes them: no boundary conversion." if channels_last else
              "Inputs NCHW, as the benchmarks pass them: the Triton modes include the conversion of x (dy) to "
              "channels_last.")
    lines = [f"# Cost-model predictions per layer ({dtype}, {'NHWC' if channels_last else 'NCHW'} inputs)", "",
             f"git {env['git_sha']}, torch {env['torch']}, triton {env['triton']}, {env['date']} UTC, "
             f"computed on {platform.machine()} (no GPU: every time below is a PREDICTION)",
             f"Peaks assumed: {peaks.source}.", "",
             "Predicted ms per layer call; backward = dx + weight gradient; **bold**: the dispatcher's pick "
             "(kw_ops.ops.dispatch: forward columns for inference, backward columns for a training step, where "
             "released is left out when the batch's kernels exceed KW_OPS_KEEP_BYTES, 256 MiB per layer) among "
             "released, torch_op (the op on its torch backend) and triton (what the Triton candidate runs: per pass "
             f"the cheaper of the built modes {', '.join(cost_model.KERNEL_MODES)}, shown beside it); "
             f"{', '.join(f'{m}*' for m in cost_model.MODELLED_ONLY)}: modelled, NOT built (comparison points); "
             "`-`: the mode cannot run the shape; bound: the term of the longest phase of the pick ('host': its "
             "launches take longer than its kernels); floor: the forward roofline of docs/design.md §5 (x + y + E + "
             "attn moved once, conv + mixing FLOPs); launches: of the pick, forward / backward. A pass takes the "
             "longer of its kernels' time and its launches' host time. " + layout + " Shapes with g=.. (grouped, "
             "depthwise) run the grouped kernels on CUDA cores; blocked runs groups = 1 only.", ""]
    table = {}
    for r in rows:
        table.setdefault((r["model"], r["batch"], r["layer"], r["shape"], r["count"]), {})[(r["pass"], r["mode"])] = r
    totals = {}
    for (model, batch) in dict.fromkeys((k[0], k[1]) for k in table):
        lines += [f"## {model}, batch {batch}", "",
                  "| layer | shape | × | floor fwd | " + " | ".join(f"{_label(m)} fwd" for m in SHOWN)
                  + " | fwd bound | "
                  + " | ".join(f"{_label(m)} bwd" for m in SHOWN) + " | bwd bound | launches |",
                  "|" + "---|" * (5 + 2 * len(SHOWN) + 2)]
        for key, cells in table.items():
            if key[:2] != (model, batch):
                continue
            _, _, layer, shape, count = key
            parts, launches = [], []
            for label in ("forward", "backward"):
                texts, bound = [], ""
                for mode in SHOWN:
                    r = cells.get((label, mode))
                    if r is None:
                        texts.append("-")
                        continue
                    total = totals.setdefault((model, batch, label, mode), 0.0)
                    totals[(model, batch, label, mode)] = total + r["predicted_ms"] * count
                    texts.append(f"**{r['predicted_ms']:.3f}**" if r["chosen"] else f"{r['predicted_ms']:.3f}")
                    bound = r["bound"] if r["chosen"] else bound
                    if r["chosen"]:
                        launches.append(str(r["launches"]))
                parts.append(" | ".join(texts) + f" | {bound}")
            lines.append(f"| {layer} | {shape} | {count} | {floors[key][2]:.3f} | " + " | ".join(parts)
                         + f" | {' / '.join(launches)} |")
        pick = {label: sum(r["predicted_ms"] * k[4] for k, c in table.items() if k[:2] == (model, batch)
                           for (lb, _), r in c.items() if lb == label and r["chosen"])
                for label in ("forward", "backward")}
        chosen = [(r, k[4]) for k, c in table.items() if k[:2] == (model, batch) for r in c.values() if r["chosen"]]
        step_launches = sum(r["launches"] * count for r, count in chosen)
        step_host = sum(r["host_ms"] * count for r, count in chosen)
        floor = sum(f[2] * k[4] for k, f in floors.items() if k[:2] == (model, batch))
        flops = sum(f[0] * k[4] for k, f in floors.items() if k[:2] == (model, batch))
        moved = sum(f[1] * k[4] for k, f in floors.items() if k[:2] == (model, batch))
        released = {label: totals.get((model, batch, label, "released"), 0.0) for label in ("forward", "backward")}
        slower = 0  # inference picks slower than released's forward; training picks slower over forward + backward
        for k, c in table.items():
            if k[:2] != (model, batch) or ("forward", "released") not in c:
                continue
            infer = next(r for (lb, _), r in c.items() if lb == "forward" and r["chosen"])
            train = next(r["mode"] for (lb, _), r in c.items() if lb == "backward" and r["chosen"])
            step = lambda mode: c[("forward", mode)]["predicted_ms"] + c[("backward", mode)]["predicted_ms"]  # noqa
            slower += infer["predicted_ms"] > c[("forward", "released")]["predicted_ms"]
            slower += step(train) > step("released")
        lines += ["", f"Whole network (each layer × its count): forward floor {floor:.2f} ms "
                      f"({flops / 1e9:.0f} GFLOP, {moved / 1e9:.2f} GB); the dispatcher's picks: forward "
                      f"{pick['forward']:.2f} ms ({released['forward'] / pick['forward']:.2f}x faster than released), "
                      f"backward {pick['backward']:.2f} ms ({released['backward'] / pick['backward']:.2f}x); picks "
                      f"predicted slower than released (inference forward, or a training step's forward + backward): {slower} "
                      f"(only where the memory budget, KW_OPS_KEEP_BYTES, leaves released out). Launches of a "
                      f"training step's picks (forward + backward of the KW layers): {step_launches}, "
                      f"{step_host:.2f} ms of host time at the assumed launch times.",
                  "",
                  "Network totals per mode (ms; `-`: the mode cannot run every layer):", "",
                  "| pass | " + " | ".join(map(_label, SHOWN)) + " |", "|" + "---|" * (1 + len(SHOWN))]
        layers = [c for k, c in table.items() if k[:2] == (model, batch)]
        for label in ("forward", "backward"):   # a mode that cannot run every layer has no network total
            lines.append(f"| {label} | " + " | ".join(
                f"{totals[(model, batch, label, m)]:.2f}" if all((label, m) in c for c in layers) else "-"
                for m in SHOWN) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--dtype", choices=sorted(ELEMENT_SIZE), default="bf16")
    parser.add_argument("--peaks", help="JSON peaks (gpu_check.py writes peaks.json); default: H100 SXM datasheet")
    parser.add_argument("--channels-last", action="store_true",
                        help="inputs in channels_last (no boundary conversion); writes cost_model_<dtype>_nhwc.*")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    peaks = cost_model.load_peaks(args.peaks) if args.peaks else cost_model.H100_SXM_DATASHEET
    env = _environment()
    print(f"cost_model_table: git {env['git_sha']}, torch {torch.__version__}, triton {env['triton']}, "
          f"device: none (predictions), peaks: {peaks.source}", flush=True)
    rows, floors = [], {}
    for model in args.models:
        specs = kw_layer_shapes(model)
        for batch in args.batches:
            for spec in specs:
                rows += layer_rows(model, spec, batch, args.dtype, peaks, args.channels_last)
                key = (model, batch, spec["layer"], shape_text(spec), spec["count"])
                floors[key] = floor_ms(spec, batch, ELEMENT_SIZE[args.dtype], peaks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cost_model_{args.dtype}" + ("_nhwc" if args.channels_last else "")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "git_sha": env["git_sha"], "peaks": peaks.source,
                             **{k: f"{r[k]:.4f}" for k in ("predicted_ms", "gpu_ms", "host_ms")}})
    report = markdown(rows, floors, env, peaks, args.dtype, args.channels_last)
    (out / f"{stem}.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
