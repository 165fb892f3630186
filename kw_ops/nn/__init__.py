"""KW layers, warehouses, planning, conversion and temperature."""
from .attention import KWAttention
from .convert import assign_cells, convert, per_layer, warehouses
from .describe import count_parameters, describe
from .layers import KWConv1d, KWConv2d, KWConv3d, KWLayer, KWLinear
from .planning import LayerPlan, PlanningError, WarehousePlan, WeightShape, plan_warehouse
from .temperature import TemperatureSchedule, get_temperature, set_temperature
from .warehouse import Warehouse

__all__ = [
    "KWAttention", "KWConv1d", "KWConv2d", "KWConv3d", "KWLayer", "KWLinear", "LayerPlan", "PlanningError",
    "TemperatureSchedule", "Warehouse", "WarehousePlan", "WeightShape", "assign_cells", "convert",
    "count_parameters", "describe", "get_temperature", "per_layer", "plan_warehouse", "set_temperature",
    "warehouses",
]
