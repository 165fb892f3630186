"""Registered DY-Conv and ODConv presets of the paper's comparisons (Tables 1-4, 12, 16):
`<backbone>_dy4x`, `<backbone>_od1x`, `<backbone>_od4x` for ResNet18/50 and MobileNetV2 1.0/0.5, and
Table 10's `resnet18_dy4x_caf`, `resnet18_od4x_caf` (KW's CAF as their kernel attention)."""
from __future__ import annotations

import functools

from ..models.registry import create, register
from .convert import to_dyconv, to_odconv

_RULE_OF = {"resnet18": "resnet", "resnet50": "resnet", "mobilenetv2_100": "mobilenetv2",
            "mobilenetv2_050": "mobilenetv2"}


def _baseline(backbone: str, convert, kernels: int, kernel_function: str = "softmax", **kwargs):
    return convert(create(backbone, **kwargs), K=kernels, rule=_RULE_OF[backbone], kernel_function=kernel_function)


for _backbone in _RULE_OF:
    register(f"{_backbone}_dy4x")(functools.partial(_baseline, _backbone, to_dyconv, 4))
    register(f"{_backbone}_od1x")(functools.partial(_baseline, _backbone, to_odconv, 1))
    register(f"{_backbone}_od4x")(functools.partial(_baseline, _backbone, to_odconv, 4))

register("resnet18_dy4x_caf")(functools.partial(_baseline, "resnet18", to_dyconv, 4, "caf"))
register("resnet18_od4x_caf")(functools.partial(_baseline, "resnet18", to_odconv, 4, "caf"))
