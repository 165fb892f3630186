"""MobileNetV2 (width 1.0 and 0.5) with torchvision's module names, and the paper's KW presets.

Static twins: `mobilenetv2_100`, `mobilenetv2_050`: features.0 (stem conv-BN-ReLU6), features.1-17
(inverted residuals, `.conv` = [expand conv-BN-ReLU6,] depthwise conv-BN-ReLU6, project conv, BN),
features.18 (final 1x1 conv-BN-ReLU6), classifier = [Dropout, Linear]; 3,504,872 and 1,968,680
parameters at 1000 classes. KW presets: `mobilenetv2_stage_sharing(...)` (docs/semantics.md §6).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..config import KWConfig
from .registry import KWRecipe, register, register_recipe

__all__ = ["MobileNetV2", "InvertedResidual", "mobilenetv2_100", "mobilenetv2_050", "mobilenetv2_stage_sharing",
           "INVERTED_RESIDUAL_SETTING", "KW_STAGE_OF_GROUP"]

#: (expand ratio t, channels c, blocks n, stride s) of the 7 inverted-residual groups.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1))
#: KW stage of each group (the paper's stage table): the last two groups share stage 6.
KW_STAGE_OF_GROUP = (1, 2, 3, 4, 5, 6, 6)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of divisor, never more than 10% down (the TF MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU6(nn.Sequential):
    """conv (no bias) -> BatchNorm -> ReLU6, named 0, 1, 2 like torchvision's Conv2dNormActivation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel_size=1))
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al.): x [B, in_chans, H, W] -> logits [B, num_classes].

    width_mult scales every width but the last (1280, never below); drop_rate: dropout before
    the classifier.
    """

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 setting: Sequence[tuple[int, int, int, int]] = INVERTED_RESIDUAL_SETTING, round_nearest: int = 8):
        super().__init__()
        channels = make_divisible(32 * width_mult, round_nearest)
        self.num_features = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNReLU6(in_chans, channels, stride=2)]
        for t, c, n, s in setting:
            out = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(ConvBNReLU6(channels, self.num_features, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(self.num_features, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    #: The KW authors' 1x/4x MobileNetV2 keeps its head as a bare Linear `classifier`.
    reference_aliases = {"classifier.weight": "classifier.1.weight", "classifier.bias": "classifier.1.bias"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


@register("mobilenetv2_100")
def mobilenetv2_100(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0) -> MobileNetV2:
    """Static MobileNetV2 width 1.0 (3,504,872 parameters at 1000 classes)."""
    return MobileNetV2(1.0, num_classes, in_chans, drop_rate)


@register("mobilenetv2_050")
def mobilenetv2_050(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0) -> MobileNetV2:
    """Static MobileNetV2 width 0.5 (1,968,680 parameters at 1000 classes)."""
    return MobileNetV2(0.5, num_classes, in_chans, drop_rate)


_FEATURE = re.compile(r"features\.(\d+)\.(.+)")


def _block_stages(setting: Sequence[tuple[int, int, int, int]], stage_of_group: Sequence[int]) -> list[int]:
    """KW stage of each inverted residual (features.1, 2, ...): the first block of a group that starts
    a new stage goes to the previous stage's warehouses (docs/semantics.md §6)."""
    stages = []
    for group, (_, _, n, _) in enumerate(setting):
        for i in range(n):
            handover = i == 0 and group > 0 and stage_of_group[group] != stage_of_group[group - 1]
            stages.append(stage_of_group[group] - 1 if handover else stage_of_group[group])
    return stages


def mobilenetv2_stage_sharing(*, split_pointwise: bool = False, pointwise_stages: Sequence[int] | None = None,
                              kw_classifier: bool = False,
                              setting: Sequence[tuple[int, int, int, int]] = INVERTED_RESIDUAL_SETTING,
                              stage_of_group: Sequence[int] = KW_STAGE_OF_GROUP):
    """The paper's MobileNetV2 sharing rule (docs/semantics.md §6), as a `convert` sharing function.

    Warehouses: 'stem' (features.0), per stage s 'stage{s}_dw' (depthwise convs) and either
    'stage{s}_pw' (expand + project 1x1s; split_pointwise=False, the 1x preset) or
    'stage{s}_pw_expand' and 'stage{s}_pw_project' (split_pointwise=True, the 4x and 1/2x presets);
    the final 1x1 (features.18) joins the last stage's pointwise (project) warehouse, and the
    classifier ('classifier', a KW Linear) joins only with kw_classifier=True.
    pointwise_stages: the stages whose pointwise convs are KW (default all; the 1/2x preset: (6,)).
    """
    block_stage = _block_stages(setting, stage_of_group)
    last_stage = stage_of_group[-1]
    kw_pointwise = set(pointwise_stages) if pointwise_stages is not None else set(stage_of_group)

    def pointwise(stage: int, role: str) -> str | None:
        if stage not in kw_pointwise:
            return None
        return f"stage{stage}_pw_{role}" if split_pointwise else f"stage{stage}_pw"

    def sharing(name: str, module: nn.Module) -> str | None:
        if name == "classifier.1":
            return "classifier" if kw_classifier else None
        match = _FEATURE.fullmatch(name)
        if match is None or not isinstance(module, nn.Conv2d):
            return None
        index, rest = int(match.group(1)), match.group(2)
        if index == 0:
            return "stem"
        if index > len(block_stage):  # the final 1x1 conv
            return pointwise(last_stage, "project")
        stage = block_stage[index - 1]
        if module.groups > 1:
            return f"stage{stage}_dw"
        return pointwise(stage, "expand" if rest == "conv.0.0" else "project")

    sharing.__name__ = sharing.__qualname__ = "mobilenetv2_stage_sharing"
    return sharing


#: The 1/2x preset's per-warehouse settings (warehouse order: stem, stage1-5 dw, stage6 expand, stage6 dw,
#: stage6 project, classifier): b = (1,1,1,1,1,1,.5,1,.5,.5), in-ratio (...,.5,1,.5,.025), out (...,.5,1,.5,1).
_HALF = {"budget": 0.5, "in_ratio": 0.5, "out_ratio": 0.5}
MOBILENETV2_KW1D2X_OVERRIDES = {
    "stage6_pw_expand": _HALF,
    "stage6_pw_project": _HALF,
    "classifier": {"budget": 0.5, "in_ratio": 0.025, "out_ratio": 1.0},
}

for _static in ("mobilenetv2_100", "mobilenetv2_050"):
    register_recipe(f"{_static}_kw1x", KWRecipe(_static, KWConfig(budget=1), mobilenetv2_stage_sharing()),
                    doc=f"{_static} with KernelWarehouse 1x: per stage a depthwise and a pointwise warehouse.")
    register_recipe(f"{_static}_kw4x",
                    KWRecipe(_static, KWConfig(budget=4), mobilenetv2_stage_sharing(split_pointwise=True)),
                    doc=f"{_static} with KernelWarehouse 4x: per stage expand, depthwise and project warehouses.")
    register_recipe(
        f"{_static}_kw1d2x",
        KWRecipe(_static, KWConfig(budget=1, reduction=1 / 32),
                 mobilenetv2_stage_sharing(split_pointwise=True, pointwise_stages=(6,), kw_classifier=True),
                 MOBILENETV2_KW1D2X_OVERRIDES),
        doc=f"{_static} with KernelWarehouse 1/2x: KW stem, depthwise convs, stage-6 pointwise convs and "
            f"classifier (per-warehouse budgets, attention reduction 1/32); stage 1-5 pointwise convs static.",
    )
