"""`python -m kw_ops describe MODEL --dispatch`: what the dispatcher runs for every KW layer of a model, and why.

The model runs one forward (and, for a training step, a backward) on CPU at the given batch and size to
collect its KW calls; each call is then decided for the asked device and dtype (on a machine without that
device, from the cost model alone: nothing runs there) and printed with every candidate's estimated time.
"""
from __future__ import annotations

import dataclasses

import torch

__all__ = ["dispatch_table", "collect_calls"]


def collect_calls(model: torch.nn.Module, batch: int, size: int, train: bool) -> list:
    """(layer name, dispatch.Call) of every KW convolution in one forward on CPU (a training step's with `train`)."""
    from .ops import dispatch

    model.train(train)
    x = torch.randn(batch, 3, size, size)
    with dispatch.recording() as log:
        if train:
            model(x).sum().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(x)
    return [(name, call) for name, call, _ in log]


def dispatch_table(model: torch.nn.Module, batch: int, size: int, train: bool, device: str = "cpu",
                   dtype: str | None = None) -> str:
    """A text table: per KW layer its call, the formulation chosen for `device`, each candidate's estimate."""
    from .ops import cpu_costs, dispatch

    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    calls = collect_calls(model, batch, size, train)
    rows, chosen_total, released_total, names, unpaired = [], 0.0, 0.0, [], 0
    for name, call in calls:
        call = dataclasses.replace(call, device=device, dtype=dtype)
        decision = dispatch.decide(call)
        estimates = {e.formulation: e for e in decision.estimates}
        for formulation in estimates:
            if formulation not in names:
                names.append(formulation)
        chosen = estimates.get(decision.formulation)
        released = estimates.get("released")
        if chosen is not None and chosen.seconds is not None and released is not None and released.seconds:
            chosen_total += chosen.seconds
            released_total += released.seconds
        else:
            unpaired += 1
        rows.append((name or "?", call, decision, estimates))
    names.sort(key=dispatch.FORMULATIONS.index)
    source = cpu_costs.rate_table().source if device == "cpu" else _gpu_source()
    lines = [f"dispatch on {device} ({dtype}), batch {batch}, {size}x{size}, {'training step' if train else 'inference'}"
             f"; estimates from {source}; * = default rates (not calibrated), - = not a candidate"]
    header = ["layer", "call", "runs", *names, "reason"]
    table = [header]
    for name, call, decision, estimates in rows:
        cells = []
        for formulation in names:
            e = estimates.get(formulation)
            cells.append("-" if e is None or e.seconds is None else
                         f"{e.seconds * 1e3:.3g}{'' if e.calibrated else '*'}")
        table.append([name, call.describe(), decision.formulation, *cells, decision.reason])
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    if not rows:
        return lines[0] + "\nno KW layer: nothing for the dispatcher to decide"
    if released_total:
        skipped = f", over the {len(rows) - unpaired} layers where released is a candidate" if unpaired else ""
        lines.append(f"sum of the estimates (ms): chosen {chosen_total * 1e3:.4g}, released {released_total * 1e3:.4g} "
                     f"({released_total / chosen_total:.2f}x predicted speed-up of the KW layers{skipped})")
    excluded = {f: e.why_not for _, _, _, estimates in rows for f, e in estimates.items() if e.seconds is None}
    for formulation, why in excluded.items():
        lines.append(f"not a candidate: {formulation}: {why}")
    return "\n".join(lines)


def _gpu_source() -> str:
    from .ops.triton import cost_model

    return f"the GPU cost model ({cost_model.default_peaks().source})"
