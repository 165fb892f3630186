"""ResNet18/50 with torchvision's module names, and the paper's KW presets (docs/semantics.md §6, §7).

Static twins: `resnet18`, `resnet50` (conv1, bn1, layer1.0.conv1, ..., layer2.0.downsample.0, fc;
torchvision's parameter names and counts: 11,689,512 and 25,557,032). KW presets are the twins
KW-ified by `resnet_stage_sharing`: one warehouse per stage, the first block of stage s handing
its conv1 and its downsample 1x1 to stage s-1's warehouse.

The paper's ResNet18 1/4x prints 4.08M parameters; its released configuration (and this preset)
builds 4,031,768.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from ..config import KWConfig
from .layers import DropPath
from .registry import KWRecipe, register, register_recipe

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet50", "resnet_stage_sharing"]


def _drop_path(p: float) -> nn.Module:
    return DropPath(p) if p > 0 else nn.Identity()


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 drop_path: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(identity + self.drop_path(out))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 drop_path: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = _drop_path(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(identity + self.drop_path(out))


class ResNet(nn.Module):
    """ResNet (He et al.) with torchvision's module names: x [B, in_chans, H, W] -> logits [B, num_classes].

    drop_rate: dropout before fc; drop_path_rate: stochastic depth of every block's residual
    branch (the same rate for every block, as in the KW authors' training code).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...], num_classes: int = 1000,
                 in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if index == 0 else 2
            setattr(self, f"layer{index + 1}", self._make_layer(block, planes, blocks, stride, drop_path_rate))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.num_features = 512 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, drop_path: float) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, drop_path)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, drop_path=drop_path) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.forward_features(x)), 1)
        return self.fc(self.dropout(x))


@register("resnet18")
def resnet18(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> ResNet:
    """Static ResNet18 (11,689,512 parameters at 1000 classes)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_chans, drop_rate, drop_path_rate)


@register("resnet50")
def resnet50(num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> ResNet:
    """Static ResNet50 (25,557,032 parameters at 1000 classes)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_chans, drop_rate, drop_path_rate)


_RESNET_CONV = re.compile(r"layer(\d+)\.(\d+)\.(conv\d+|downsample\.0)$")


def resnet_stage_sharing(name: str, module: nn.Module) -> str | None:
    """The paper's ResNet sharing (docs/semantics.md §6): warehouse 'stage{s}' for every conv of stage s = layer{s+1}.

    The first block of stage s hands its conv1 and its downsample 1x1 to stage s-1's warehouse.
    For stage 0 there is no previous warehouse: a BasicBlock's 3x3 conv1 stays in stage 0 (ResNet18),
    a Bottleneck's 1x1 conv1 stays static (ResNet50's layer1.0.conv1), and so does a stride-1
    downsample (ResNet50's layer1.0.downsample.0). The stem conv and fc stay static.
    """
    match = _RESNET_CONV.fullmatch(name)
    if match is None or not isinstance(module, nn.Conv2d):
        return None
    stage, block, conv = int(match.group(1)) - 1, int(match.group(2)), match.group(3)
    if conv.startswith("downsample"):
        if module.stride == (1, 1) or stage == 0:
            return None
        return f"stage{stage - 1}"
    if block == 0 and conv == "conv1" and stage > 0:
        return f"stage{stage - 1}"
    if block == 0 and conv == "conv1" and module.kernel_size == (1, 1):
        return None  # Bottleneck conv1 of the first stage: nothing to hand over to
    return f"stage{stage}"


_RESNET_PRESETS = {
    "resnet18": ("kw1d4x", "kw1d2x", "kw1x", "kw2x", "kw4x"),
    "resnet50": ("kw1d2x", "kw1x", "kw4x"),
}
#: ResNet50 at 1/2x uses the non-local basis attention with ratio 1/16 (the released config).
_RESNET_CHANGES = {("resnet50", "kw1d2x"): {"nonlocal_basis_ratio": 1 / 16}}

for _static, _budgets in _RESNET_PRESETS.items():
    for _budget in _budgets:
        register_recipe(
            f"{_static}_{_budget}",
            KWRecipe(_static, KWConfig.preset(_budget, **_RESNET_CHANGES.get((_static, _budget), {})),
                     resnet_stage_sharing),
            doc=f"{_static} with KernelWarehouse {_budget} (docs/semantics.md §6-7): one warehouse per stage, "
                f"kw_ops.models.resnet_stage_sharing.",
        )
