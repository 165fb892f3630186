"""ConvNeXt-Tiny with the reference (facebookresearch / KW authors') module names, and its KW preset.

Names: downsample_layers.0 = [stem conv 4x4/4, LayerNorm2d], downsample_layers.i = [LayerNorm2d,
conv 2x2/2]; stages.i.j = block (dwconv 7x7, norm, pwconv1, pwconv2, gamma); norm; head. pwconv1 and
pwconv2 are 1x1 Conv2d (the same parameters as the reference's Linear layers, with weights
[out, in, 1, 1]) so they can be KW-ified; gamma has shape [1, C, 1, 1] as in the KW authors' code.
28,589,128 parameters at 1000 classes.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..config import KWConfig
from .layers import DropPath, LayerNorm2d
from .registry import KWRecipe, register, register_recipe

__all__ = ["ConvNeXt", "ConvNeXtBlock", "convnext_tiny", "convnext_stage_sharing", "convnext_split_stage_sharing",
           "CONVNEXT_PAPER_REDUCTION", "CONVNEXT_KW3D4X_OVERRIDES"]

#: LayerNorm ε of ConvNeXt.
LN_EPS = 1e-6


class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 -> LayerNorm (channels) -> 1x1 (4C) -> GELU -> 1x1 (C) -> layer scale -> + residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pwconv1 = nn.Conv2d(dim, 4 * dim, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(4 * dim, dim, 1)
        self.gamma = (nn.Parameter(torch.full((1, dim, 1, 1), layer_scale_init_value))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x)
        y = self.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y)


class ConvNeXt(nn.Module):
    """ConvNeXt (Liu et al. 2022): x [B, in_chans, H, W] -> logits [B, num_classes].

    drop_path_rate: stochastic depth rising linearly from 0 to this over the blocks.
    """

    def __init__(self, depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0, drop_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.0):
        super().__init__()
        self.downsample_layers = nn.ModuleList([
            nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, 4), LayerNorm2d(dims[0], eps=LN_EPS))
        ])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(LayerNorm2d(dims[i], eps=LN_EPS),
                                                        nn.Conv2d(dims[i], dims[i + 1], 2, 2)))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*[ConvNeXtBlock(dims[i], rates[first + j], layer_scale_init_value)
                                               for j in range(depth)]))
        self.norm = nn.LayerNorm(dims[-1], eps=LN_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes)
        self.num_features = dims[-1]
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return self.norm(x.mean((-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x)))


@register("convnext_tiny")
def convnext_tiny(num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0, drop_rate: float = 0.0,
                  layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.0) -> ConvNeXt:
    """Static ConvNeXt-Tiny (28,589,128 parameters at 1000 classes)."""
    return ConvNeXt((3, 3, 9, 3), (96, 192, 384, 768), num_classes, in_chans, drop_path_rate, drop_rate,
                    layer_scale_init_value, head_init_scale)


_CONVNEXT_CONV = re.compile(r"downsample_layers\.(\d)\.\d|stages\.(\d+)\.\d+\.(dwconv|pwconv1|pwconv2)")


def convnext_stage_sharing(name: str, module: nn.Module) -> str | None:
    """The paper's ConvNeXt sharing (docs/semantics.md §6, released config): 'stem' (4x4 stem conv), 'downsample{i}'
    (each 2x2 downsample conv its own), per stage 'stage{i}_dw' (depthwise 7x7 convs) and 'stage{i}_pw'
    (pwconv1 + pwconv2). The head stays static.

    Note: the released configuration (and its 39,370,674 parameters) has one warehouse per stage for
    all 9 blocks of the third stage.
    """
    match = _CONVNEXT_CONV.fullmatch(name)
    if match is None or not isinstance(module, nn.Conv2d):
        return None
    if match.group(1) is not None:
        index = int(match.group(1))
        return "stem" if index == 0 else f"downsample{index}"
    stage, conv = int(match.group(2)), match.group(3)
    return f"stage{stage}_dw" if conv == "dwconv" else f"stage{stage}_pw"


register_recipe(
    "convnext_tiny_kw1x",
    KWRecipe("convnext_tiny", KWConfig(budget=1, norm="layer"), convnext_stage_sharing),
    doc="ConvNeXt-Tiny with KernelWarehouse 1x as the authors released it (39,370,674 parameters): LayerNorm in "
        "the attention, KW layers with biases. The paper's Table 2 model (32.99M) is `convnext_tiny_kw1x_paper`.",
)


#: Blocks per warehouse when the paper splits the third stage (9 blocks) into three stages.
SPLIT_STAGE_BLOCKS = 3
#: Attention reduction of the paper's ConvNeXt models: hidden = max(int(C_in / 32), 16). The paper
#: does not print it; it is the one value of the searched grid (benchmarks/search_paper_counts.py:
#: reductions 1/4 .. 1/64, minimum hidden 1 .. 32, LayerNorm or BatchNorm) that reproduces both
#: printed counts, 32.99M (KW 1x) and 24.53M (KW 3/4x). The released config's 1/16 gives 35.92M here.
CONVNEXT_PAPER_REDUCTION = 1 / 32


def convnext_split_stage_sharing(name: str, module: nn.Module) -> str | None:
    """The paper's ConvNeXt sharing (Appendix A.3, Table 14): as `convnext_stage_sharing`, with the
    third stage's 9 blocks split into three stages of 3 blocks, 'stage2a', 'stage2b', 'stage2c'
    (each with its '_dw' and '_pw' warehouse): 16 warehouses, Σm = 16, 4, 4, 4, then (147, 24) for
    each of the six stages.

    Table 14 prints seven (147, 24) pairs (18 warehouses); ConvNeXt-Tiny's 18 blocks in stages of 3
    make six, and six reproduce the printed parameter counts: the seventh pair is a typo.
    """
    warehouse = convnext_stage_sharing(name, module)
    if warehouse is None or not name.startswith("stages.2."):
        return warehouse
    part = "abc"[int(name.split(".")[2]) // SPLIT_STAGE_BLOCKS]
    return warehouse.replace("stage2", f"stage2{part}", 1)


#: KW (3/4x) (Appendix A.3): KW (1/2x) with half-gcd cells on the point-wise warehouses of the last two
#: stages (of the six), KW (1x) elsewhere.
CONVNEXT_KW3D4X_OVERRIDES = {name: {"budget": 0.5, "in_ratio": 0.5, "out_ratio": 0.5}
                             for name in ("stage2c_pw", "stage3_pw")}

register_recipe(
    "convnext_tiny_kw1x_paper",
    KWRecipe("convnext_tiny", KWConfig(budget=1, norm="layer", reduction=CONVNEXT_PAPER_REDUCTION),
             convnext_split_stage_sharing),
    doc="ConvNeXt-Tiny with KW (1x) as the paper trained it (Table 2: 32.99M; this builds 32,992,964): the "
        "third stage split into three warehouse stages, attention reduction 1/32. `convnext_tiny_kw1x` is the "
        "authors' released configuration (39,370,674).",
)
register_recipe(
    "convnext_tiny_kw3d4x_paper",
    KWRecipe("convnext_tiny", KWConfig(budget=1, norm="layer", reduction=CONVNEXT_PAPER_REDUCTION),
             convnext_split_stage_sharing, CONVNEXT_KW3D4X_OVERRIDES),
    doc="ConvNeXt-Tiny with KW (3/4x) as the paper trained it (Table 2: 24.53M; this builds 24,531,380; no "
        "released config): `convnext_tiny_kw1x_paper` with KW (1/2x), half-gcd cells, on the point-wise layers "
        "of the last two stages.",
)
