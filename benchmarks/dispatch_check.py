"""How good are the dispatcher's picks? Per KW layer of a model: each candidate's estimate and its measured time,
the pick, the fastest measured, and what the pick costs against the fastest and against released.

    PYTHONPATH=. python benchmarks/dispatch_check.py [--models resnet18_kw1x ...] [--batch 2] [--size 224]
                                                    [--train] [--repeat 5] [--out benchmarks/results]

Every distinct call of the model (one forward at the batch and size; a training step's with --train) is run in
each candidate formulation on random tensors of its shape, interleaved, the median of --repeat calls each (forward,
or forward and backward), on this CPU with torch's threads. Prints a markdown table and the sums over the model's
layers (each call counted once per layer that makes it), and writes it to OUT/dispatch_check_cpu.md (+ .csv).
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

from kw_ops import models
from kw_ops.dispatch_report import collect_calls
from kw_ops.ops import cpu_costs, dispatch


def _seconds(formulation: str, call: dispatch.Call, repeat: int) -> list[float]:
    """Seconds of each of `repeat` calls of the formulation on random tensors of the call's shape (forward, and
    backward if it has one), after a warm-up call."""
    once = cpu_costs._runner(cpu_costs.formulation_kernel(formulation, call))
    once()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        once()
        times.append(time.perf_counter() - started)
    return times


def check(model_name: str, batch: int, size: int, train: bool, repeat: int) -> list[dict]:
    model = models.create(model_name)
    calls = collect_calls(model, batch, size, train)
    counts: dict = {}
    for _, call in calls:
        counts[call] = counts.get(call, 0) + 1
    rows = []
    for call, count in counts.items():
        decision = dispatch.decide(call)
        candidates = [e for e in decision.estimates if e.seconds is not None]
        measured = {e.formulation: [] for e in candidates}
        for _ in range(repeat):  # interleaved: one call of each candidate per round
            for formulation in measured:
                measured[formulation] += _seconds(formulation, call, 1)
        medians = {f: statistics.median(t) for f, t in measured.items()}
        fastest = min(medians, key=medians.get)
        rows.append({
            "model": model_name, "call": call.describe(), "count": count, "pick": decision.formulation,
            "fastest": fastest, "pick_over_fastest": medians[decision.formulation] / medians[fastest],
            "released_over_pick": medians.get("released", float("nan")) / medians[decision.formulation],
            **{f"est_{e.formulation}": e.seconds * 1e3 for e in candidates},
            **{f"ms_{f}": m * 1e3 for f, m in medians.items()}})
        print(f"  {model_name} {call.describe()}: pick {decision.formulation}, fastest {fastest}", file=sys.stderr)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    formulations = [f for f in dispatch.FORMULATIONS if any(f"ms_{f}" in r for r in rows)]
    lines = [header, "", "| model | call | x | pick | fastest | pick / fastest | released / pick | "
             + " | ".join(f"{f} est / ms" for f in formulations) + " |",
             "|" + "---|" * (7 + len(formulations))]
    for r in rows:
        cells = [f"{r[f'est_{f}']:.3g} / {r[f'ms_{f}']:.3g}" if f"ms_{f}" in r else "-" for f in formulations]
        lines.append(f"| {r['model']} | {r['call']} | {r['count']} | {r['pick']} | {r['fastest']} | "
                     f"{r['pick_over_fastest']:.2f} | {r['released_over_pick']:.2f} | " + " | ".join(cells) + " |")
    lines.append("")
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        total = lambda key: sum(r["count"] * r[key] for r in sub if key in r)  # noqa: E731
        picked = sum(r["count"] * r[f"ms_{r['pick']}"] for r in sub)
        best = sum(r["count"] * r[f"ms_{r['fastest']}"] for r in sub)
        lines.append(f"{model}: KW layers' measured sum: picks {picked:.1f} ms, fastest per layer {best:.1f} ms, "
                     f"released {total('ms_released'):.1f} ms (released / picks {total('ms_released') / picked:.2f}x)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18_kw1x", "mobilenetv2_100_kw1x"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models:
        rows += check(name, args.batch, args.size, args.train, args.repeat)
    header = (f"# Dispatcher picks vs measured times ({'training step' if args.train else 'inference'}, batch "
              f"{args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads)\n\n"
              f"`{' '.join(['python benchmarks/dispatch_check.py', *(argv or sys.argv[1:])])}` · "
              f"{cpu_costs.machine_key()} · rates: {cpu_costs.rate_table().source}. Each cell: estimate / median "
              f"measured ms of one call; x: layers making the call.")
    text = markdown(rows, header)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"dispatch_check_cpu_{'train' if args.train else 'infer'}_b{args.batch}"
    (out / f"{stem}.md").write_text(text + "\n")
    with (out / f"{stem}.csv").open("w", newline="") as handle:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
