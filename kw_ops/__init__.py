"""kw_ops: KernelWarehouse dynamic convolution (Li & Yao, ICML 2024) for PyTorch.

    import torch, kw_ops
    model = kw_ops.convert(my_convnet, kw_ops.KWConfig(budget=1.0), sharing=lambda name, conv: ...)
    kw_ops.set_temperature(model, 0.7)
    print(kw_ops.describe(model))
"""
from . import (
    models,  # noqa: E402  (after the layers it builds on)
    ops,
)
from .config import PRESETS, KWConfig
from .nn import (
    KWAttention,
    KWConv1d,
    KWConv2d,
    KWConv3d,
    KWLayer,
    KWLinear,
    PlanningError,
    TemperatureSchedule,
    Warehouse,
    assign_cells,
    convert,
    count_parameters,
    describe,
    get_temperature,
    per_layer,
    plan_warehouse,
    set_temperature,
    warehouses,
)

__version__ = "0.1.0"

__all__ = [
    "KWAttention", "KWConfig", "KWConv1d", "KWConv2d", "KWConv3d", "KWLayer", "KWLinear", "PRESETS",
    "PlanningError", "TemperatureSchedule", "Warehouse", "assign_cells", "convert", "count_parameters", "describe",
    "get_temperature", "models", "ops", "per_layer", "plan_warehouse", "set_temperature", "warehouses",
]
