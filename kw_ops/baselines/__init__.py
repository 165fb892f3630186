"""The baselines KW is compared with: DY-Conv (Chen et al., 2020) and ODConv (Li, Zhou, Yao, 2022).

    from kw_ops.baselines import to_odconv, set_baseline_temperature, set_baseline_formulation
    model = to_odconv(kw_ops.models.create("resnet18"), K=4, rule="resnet")
    set_baseline_temperature(model, 1.0)          # inference value (training anneals from 30)
    set_baseline_formulation(model, "released")   # the authors' per-sample-weight formulation

Each layer runs the 'released' formulation (per-sample weights + one conv with groups = B, as in
the authors' code) or a 'fast' pure-PyTorch one (default); benchmarks should say which.
"""
from .common import (
    FORMULATIONS,
    INFERENCE_TEMPERATURE,
    BaselineConv2d,
    BaselineTemperatureSchedule,
    get_baseline_temperature,
    set_baseline_formulation,
    set_baseline_temperature,
)
from .convert import (
    RULES,
    mobilenetv2_dyconv_rule,
    mobilenetv2_odconv_rule,
    resnet_dyconv_rule,
    resnet_odconv_rule,
    to_dyconv,
    to_odconv,
)
from .dyconv import DY_HIDDEN_OFFSET, DYAttention, DYConv2d
from .odconv import ODAttention, ODConv2d

__all__ = [
    "DY_HIDDEN_OFFSET", "FORMULATIONS", "INFERENCE_TEMPERATURE", "RULES", "BaselineConv2d",
    "BaselineTemperatureSchedule",
    "DYAttention", "DYConv2d", "ODAttention", "ODConv2d", "get_baseline_temperature", "mobilenetv2_dyconv_rule",
    "mobilenetv2_odconv_rule", "resnet_dyconv_rule", "resnet_odconv_rule", "set_baseline_formulation",
    "set_baseline_temperature", "to_dyconv", "to_odconv",
]

from . import presets  # noqa: E402,F401  (registers resnet18_dy4x, ..., mobilenetv2_100_od4x)
