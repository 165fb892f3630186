"""Tiny registered networks for smoke tests of the training tools (a few ms per step at 32x32).

`tiny_convnet`: a static stem conv, two stages of two 3x3 convs (8 -> 16 -> 32 channels), global
pooling and a linear classifier. `tiny_kw1d2x`, `tiny_kw1x`, `tiny_kw2x`: the same KW-ified with one
warehouse per stage (stem and classifier static), like the paper's ResNet presets.

`tiny_convnet_gn` / `tiny_gn_kw1x` use GroupNorm and a LayerNorm in the KW attention: nothing depends
on how a batch is split, so one step on 2 ranks x B samples equals one step on 2B samples.

`tiny_dy4x` / `tiny_od4x`: tiny_convnet with the stage convs as DY-Conv / ODConv (4 kernels), the
baselines' temperature schedules in a few ms per step.
"""
from __future__ import annotations

import torch.nn as nn

from ..baselines import to_dyconv, to_odconv
from ..config import KWConfig
from ..models.registry import KWRecipe, register, register_recipe

__all__ = ["tiny_convnet", "tiny_convnet_gn", "tiny_dy4x", "tiny_od4x", "tiny_stage_sharing", "TINY_WIDTHS"]

#: channels of the stem and of the two stages
TINY_WIDTHS = (8, 16, 32)
#: GroupNorm groups of the `_gn` variants
TINY_GROUPS = 4


def _norm(channels: int, kind: str) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(TINY_GROUPS, channels)


def _conv_norm_relu(cin: int, cout: int, stride: int, norm: str) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _norm(cout, norm), nn.ReLU(inplace=True)]


def _tiny(num_classes: int, in_chans: int, norm: str) -> nn.Sequential:
    stem, mid, wide = TINY_WIDTHS
    stage1 = nn.Sequential(*_conv_norm_relu(stem, mid, 2, norm), *_conv_norm_relu(mid, mid, 1, norm))
    stage2 = nn.Sequential(*_conv_norm_relu(mid, wide, 2, norm), *_conv_norm_relu(wide, wide, 1, norm))
    return nn.Sequential(nn.Sequential(*_conv_norm_relu(in_chans, stem, 1, norm)), stage1, stage2,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(wide, num_classes))


@register("tiny_convnet")
def tiny_convnet(num_classes: int = 10, in_chans: int = 3) -> nn.Sequential:
    """Static tiny ConvNet with BatchNorm2d (module paths '0' stem, '1' and '2' stages, '5' classifier)."""
    return _tiny(num_classes, in_chans, "batch")


@register("tiny_convnet_gn")
def tiny_convnet_gn(num_classes: int = 10, in_chans: int = 3) -> nn.Sequential:
    """Static tiny ConvNet with GroupNorm (batch-independent)."""
    return _tiny(num_classes, in_chans, "group")


def tiny_stage_sharing(name: str, module: nn.Module) -> str | None:
    """Convs of stage s (module '1' or '2') share warehouse 'stage{s}'; stem and classifier stay static."""
    top = name.split(".")[0]
    return f"stage{top}" if top in ("1", "2") and isinstance(module, nn.Conv2d) else None


for _budget in ("kw1d2x", "kw1x", "kw2x"):
    register_recipe(f"tiny_{_budget}", KWRecipe("tiny_convnet", KWConfig.preset(_budget), tiny_stage_sharing),
                    doc=f"tiny_convnet with KernelWarehouse {_budget}, one warehouse per stage (smoke tests).")
register_recipe("tiny_gn_kw1x", KWRecipe("tiny_convnet_gn", KWConfig(norm="layer"), tiny_stage_sharing),
                doc="tiny_convnet_gn with KernelWarehouse 1x and LayerNorm attention (batch-independent).")


def _stage_conv(name: str, module: nn.Module) -> bool:
    return name.split(".")[0] in ("1", "2")


@register("tiny_dy4x")
def tiny_dy4x(num_classes: int = 10, in_chans: int = 3) -> nn.Sequential:
    """tiny_convnet with DY-Conv (4 kernels) stage convs (smoke tests of the baselines' training)."""
    return to_dyconv(tiny_convnet(num_classes, in_chans), K=4, rule=_stage_conv)


@register("tiny_od4x")
def tiny_od4x(num_classes: int = 10, in_chans: int = 3) -> nn.Sequential:
    """tiny_convnet with ODConv (4 kernels) stage convs (smoke tests of the baselines' training)."""
    return to_odconv(tiny_convnet(num_classes, in_chans), K=4, rule=_stage_conv)
