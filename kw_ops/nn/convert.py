"""KW-ify a network: replace the convolutions a sharing rule names by KW layers over shared warehouses."""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from typing import Callable

import torch.nn as nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..config import KWConfig
from .layers import KWConv1d, KWConv2d, KWConv3d, KWLayer, KWLinear
from .warehouse import Warehouse

__all__ = ["convert", "assign_cells", "warehouses", "per_layer"]

SharingRule = Callable[[str, nn.Module], "str | None"]
_KW_OF = {nn.Conv1d: KWConv1d, nn.Conv2d: KWConv2d, nn.Conv3d: KWConv3d}
#: The module types convert replaces (exactly these types: subclasses may have another forward).
_SUPPORTED = (*_KW_OF, nn.Linear)
#: convert warns when a warehouse's attention parameters exceed this multiple of its cell parameters.
ATTENTION_WARN_RATIO = 10


def per_layer(name: str, module: nn.Module) -> str | None:
    """Default sharing rule: every convolution gets a warehouse of its own; linears stay static."""
    return name if isinstance(module, nn.modules.conv._ConvNd) else None


def _kw_twin(module: nn.Module, warehouse: Warehouse) -> KWLayer:
    """A KW layer of the static layer's geometry, bias, device and dtype, joined to `warehouse`."""
    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    if isinstance(module, nn.Linear):
        return KWLinear(module.in_features, module.out_features, module.bias is not None, warehouse=warehouse,
                        **factory)
    return _KW_OF[type(module)](
        module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
        module.dilation, module.groups, module.bias is not None, warehouse=warehouse,
        padding_mode=module.padding_mode, **factory)


def warehouses(model: nn.Module) -> list[Warehouse]:
    """The warehouses of a model, in the order their first member is registered (found through every member,
    also where the module holding a warehouse's registration is not part of `model`)."""
    found: dict[int, Warehouse] = {}
    for module in model.modules():
        warehouse = module.warehouse if isinstance(module, KWLayer) else module
        if isinstance(warehouse, Warehouse):
            found.setdefault(id(warehouse), warehouse)
    return list(found.values())


def assign_cells(model: nn.Module) -> list[Warehouse]:
    """Hand out every warehouse's cells in module registration order (docs/semantics.md §4) and check the plans.

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


def _paths_by_module(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """Every submodule with all the paths it is registered under (a shared module has several), in module order."""
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        found.setdefault(id(module), (module, []))[1].append(name)
    return list(found.values())


def _warehouse_of(paths: list[str], module: nn.Module, sharing: SharingRule) -> str | None:
    """The warehouse the sharing rule names for a module; one answer for all of its paths, or an error. The
    default rule (`per_layer`) names a shared module's warehouse after its first path."""
    if sharing is per_layer:
        return per_layer(paths[0], module)
    answers = {path: sharing(path, module) for path in paths}
    names = {None if answer is None else str(answer) for answer in answers.values()}
    if len(names) > 1:
        raise ValueError(
            f"convert: {type(module).__name__} registered as {paths} is one module shared by these paths, but the "
            f"sharing rule gives them different warehouses {answers}; a shared module becomes one KW layer, so the "
            f"rule must give all its paths the same warehouse (or None for all)"
        )
    return names.pop()


def _why_static(module: nn.Module) -> str:
    """Why convert leaves a conv/linear the sharing rule names static (it converts exact types only)."""
    if isinstance(module, LazyModuleMixin):
        return f"{type(module).__name__}, not materialised: run one forward before convert"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return f"{type(module).__name__}: kw_ops has no transposed KW convolution"
    base = next(cls.__name__ for cls in type(module).__mro__ if cls in _SUPPORTED)
    return (f"{type(module).__name__}, a subclass of nn.{base} whose forward may differ: convert only replaces "
            f"nn.{base} itself; replace it by hand with a KW layer if its forward is nn.{base}'s")


def _warn_left_static(skipped: list[tuple[str, nn.Module]]) -> None:
    """One warning listing the layers a sharing rule names that convert cannot replace."""
    if skipped:
        listed = "; ".join(f"{path!r} ({_why_static(module)})" for path, module in skipped)
        warnings.warn(f"convert: {len(skipped)} layer(s) the sharing rule names stay static: {listed}", stacklevel=3)


def _attention_size(warehouse: Warehouse) -> int:
    """Parameters of the attention modules of a warehouse's layers."""
    return sum(p.numel() for layer in warehouse.members for p in layer.attention.parameters())


def _warn_big_attention(created: Mapping[str, Warehouse]) -> None:
    """Warn when the attention of the converted layers outweighs their warehouses more than ATTENTION_WARN_RATIO x."""
    attention = sum(map(_attention_size, created.values()))
    cells = sum(w.cells.numel() for w in created.values())
    if attention <= ATTENTION_WARN_RATIO * cells:
        return
    heaviest = sorted(created.values(), key=_attention_size, reverse=True)[:3]
    listed = "; ".join(
        f"{w.name!r}: attention {_attention_size(w):,}, cells {'x'.join(map(str, w.plan.cell_shape))} x n={w.plan.n} "
        f"= {w.cells.numel():,}, Σm={w.plan.total_mixtures}, layer channels "
        f"{sorted({c for layer in w.members for c in (layer.in_channels, layer.out_channels)})}" for w in heaviest)
    warnings.warn(
        f"convert: the KW layers' attention has {attention:,} parameters, {attention / cells:,.1f}x their "
        f"warehouses' {cells:,} (more than {ATTENTION_WARN_RATIO}x); heaviest warehouses: {listed}. Each attention "
        f"outputs m·(n+1) logits, which grows with the square of the number of cells: small cells (channel counts "
        f"with a small common divisor, such as 3, 7, 13, or in/out ratios < 1) make m and n large. Give the layers "
        f"with awkward channel counts a warehouse of their own or keep them static (sharing rule -> None), and "
        f"share cells only among layers whose channels have a large common divisor.", stacklevel=3)


def convert(model: nn.Module, config: KWConfig | None = None, sharing: SharingRule | None = None,
            overrides: Mapping[str, KWConfig | Mapping] | None = None) -> nn.Module:
    """Replace convolutions (and linears) of `model` by KW layers, in place; returns the model.

    sharing(name, module) returns the warehouse name a layer joins, or None to keep it static;
    default: each convolution its own warehouse. overrides maps warehouse names to a KWConfig
    or to changed fields of `config` (budget, ratios, reduction, norm, ...).
    Only nn.Conv1d/2d/3d and nn.Linear themselves are replaced; transposed, lazy and subclassed
    convs the rule names stay static, with one warning listing them. A module registered under
    several paths becomes one KW layer under all of them. KW layers take the replaced module's
    train/eval mode. The static layers' weights are not carried over (KW layers start from the β
    initialisation). Warns when the attention outweighs the warehouses more than 10x.

    >>> import torch.nn as nn, kw_ops
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 32, 3))
    >>> net = kw_ops.convert(net, kw_ops.KWConfig(budget=2), sharing=lambda n, m: "body" if n != "0" else None)
    >>> [w.cells.shape[0] for w in kw_ops.warehouses(net)]   # 2 * (9 + 18)
    [54]
    """
    config = config or KWConfig()
    sharing = sharing or per_layer
    overrides = dict(overrides or {})
    targets, skipped = [], []
    for module, paths in _paths_by_module(model):
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        warehouse_name = _warehouse_of(paths, module, sharing)
        if warehouse_name is None:
            continue
        if type(module) in _SUPPORTED:
            targets.append((paths, module, warehouse_name))
        else:
            skipped.append((paths[0], module))
    _warn_left_static(skipped)
    unknown = set(overrides) - {w for _, _, w in targets}
    if unknown:
        raise ValueError(f"convert: overrides name warehouses no layer joins: {sorted(unknown)}")
    created: dict[str, Warehouse] = {}
    with contextlib.ExitStack() as stack:
        for paths, module, warehouse_name in targets:
            if warehouse_name not in created:
                wh_config = overrides.get(warehouse_name, config)
                if not isinstance(wh_config, KWConfig):
                    wh_config = config.replace(**wh_config)
                created[warehouse_name] = Warehouse(warehouse_name, wh_config, device=module.weight.device,
                                                    dtype=module.weight.dtype)
                stack.enter_context(created[warehouse_name].planning_deferred())
            kw_layer = _kw_twin(module, created[warehouse_name]).train(module.training)
            kw_layer._name = paths[0]
            for path in paths:
                parent_name, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, kw_layer)
    assign_cells(model)
    _warn_big_attention(created)
    return model
