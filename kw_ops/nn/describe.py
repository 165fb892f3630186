"""describe(model): the warehouse table of a KW network (the paper's Tables 14/15 for any model)."""
from __future__ import annotations

import torch.nn as nn

from .convert import warehouses
from .layers import KWLayer

__all__ = ["describe", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(model: nn.Module) -> str:
    """A text table: per warehouse its cell shape, n, budget and members (path, m, grid, attention params)."""
    lines = []
    for index, warehouse in enumerate(warehouses(model)):
        plan = warehouse.plan
        cell = "x".join(map(str, plan.cell_shape))
        lines.append(f"warehouse {index} {warehouse.name!r}: cells {cell}, n={plan.n}, Σm={plan.total_mixtures}, "
                     f"budget={warehouse.config.budget}, parameters={warehouse.cells.numel():,}")
        for member, layer_plan in zip(warehouse.members, plan.layers):
            attention = sum(p.numel() for p in member.attention.parameters())
            s, go, gi = layer_plan.grid
            # b < 1 can leave a layer no cell: every mixture of it takes the zero cell
            cells = (f"cells {layer_plan.start}..{layer_plan.start + layer_plan.consumed - 1}" if layer_plan.consumed
                     else "zero cell only")
            lines.append(f"  {layer_plan.name:<28} m={layer_plan.m:<4} grid S×GO×GI={s}×{go}×{gi:<4} {cells}  "
                         f"attention params={attention:,}")
    kw_layers = [m for m in model.modules() if isinstance(m, KWLayer)]
    attention_total = sum(p.numel() for m in kw_layers for p in m.attention.parameters())
    warehouse_total = sum(w.cells.numel() for w in warehouses(model))
    lines.append(f"{len(kw_layers)} KW layers in {len(warehouses(model))} warehouses: warehouse parameters "
                 f"{warehouse_total:,}, attention parameters {attention_total:,}, model parameters "
                 f"{count_parameters(model):,}")
    return "\n".join(lines)
