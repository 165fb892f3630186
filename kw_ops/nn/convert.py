"""KW-ify a network: replace the convolutions a sharing rule names by KW layers over shared warehouses."""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Callable

import torch.nn as nn

from ..config import KWConfig
from .layers import KWConv1d, KWConv2d, KWConv3d, KWLayer, KWLinear
from .warehouse import Warehouse

__all__ = ["convert", "assign_cells", "warehouses", "per_layer"]

SharingRule = Callable[[str, nn.Module], "str | None"]
_KW_OF = {nn.Conv1d: KWConv1d, nn.Conv2d: KWConv2d, nn.Conv3d: KWConv3d}


def per_layer(name: str, module: nn.Module) -> str | None:
    """Default sharing rule: every convolution gets a warehouse of its own; linears stay static."""
    return name if type(module) in _KW_OF else None


def _kw_twin(module: nn.Module, warehouse: Warehouse) -> KWLayer:
    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    if isinstance(module, nn.Linear):
        return KWLinear(module.in_features, module.out_features, module.bias is not None, warehouse=warehouse,
                        **factory)
    return _KW_OF[type(module)](
        module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
        module.dilation, module.groups, module.bias is not None, warehouse=warehouse,
        padding_mode=module.padding_mode, **factory)


def warehouses(model: nn.Module) -> list[Warehouse]:
    """The warehouses of a model, in the order their first member is registered."""
    return [m for m in model.modules() if isinstance(m, Warehouse)]


def assign_cells(model: nn.Module) -> list[Warehouse]:
    """Hand out every warehouse's cells in module registration order (SPEC §4) and check the plans.

    Names the layers after their module paths (for messages and describe()); raises PlanningError
    when a warehouse's cells cannot be assigned one-to-one.
    """
    order: dict[int, list[KWLayer]] = {}
    found: dict[int, Warehouse] = {}
    for name, module in model.named_modules():
        if isinstance(module, KWLayer):
            module._name = name
            found.setdefault(id(module.warehouse), module.warehouse)
            order.setdefault(id(module.warehouse), []).append(module)
    for key, warehouse in found.items():
        outside = [m for m in warehouse.members if all(m is not o for o in order[key])]
        warehouse.reorder(order[key] + outside)
        warehouse.check_complete()
    return list(found.values())


def convert(model: nn.Module, config: KWConfig | None = None, sharing: SharingRule | None = None,
            overrides: Mapping[str, KWConfig | Mapping] | None = None) -> nn.Module:
    """Replace convolutions (and linears) of `model` by KW layers, in place; returns the model.

    sharing(name, module) returns the warehouse name a layer joins, or None to keep it static;
    default: each nn.Conv1d/2d/3d its own warehouse. overrides maps warehouse names to a
    KWConfig or to changed fields of `config` (budget, ratios, reduction, norm, ...).
    The static layers' weights are not carried over (KW layers start from the β initialisation).

    >>> import torch.nn as nn, kw_ops
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 32, 3))
    >>> net = kw_ops.convert(net, kw_ops.KWConfig(budget=2), sharing=lambda n, m: "body" if n != "0" else None)
    >>> [w.cells.shape[0] for w in kw_ops.warehouses(net)]   # 2 * (9 + 18)
    [54]
    """
    config = config or KWConfig()
    sharing = sharing or per_layer
    overrides = dict(overrides or {})
    targets = []
    for name, module in model.named_modules():
        if type(module) in _KW_OF or type(module) is nn.Linear:
            warehouse_name = sharing(name, module)
            if warehouse_name is not None:
                targets.append((name, module, str(warehouse_name)))
    unknown = set(overrides) - {w for _, _, w in targets}
    if unknown:
        raise ValueError(f"convert: overrides name warehouses no layer joins: {sorted(unknown)}")
    created: dict[str, Warehouse] = {}
    with contextlib.ExitStack() as stack:
        for name, module, warehouse_name in targets:
            if warehouse_name not in created:
                wh_config = overrides.get(warehouse_name, config)
                if not isinstance(wh_config, KWConfig):
                    wh_config = config.replace(**wh_config)
                created[warehouse_name] = Warehouse(warehouse_name, wh_config, device=module.weight.device,
                                                    dtype=module.weight.dtype)
                stack.enter_context(created[warehouse_name].planning_deferred())
            kw_layer = _kw_twin(module, created[warehouse_name])
            kw_layer._name = name
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, kw_layer)
    assign_cells(model)
    return model
