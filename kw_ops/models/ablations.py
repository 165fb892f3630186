"""The paper's ablations and KW* as named presets, each with the count the paper prints beside it
(kw_ops.models.paper). The choices the paper leaves open were searched by
benchmarks/search_paper_counts.py (ablations, kw_star); each rule's docstring says what it reproduces.

| preset | paper | what changes against the main preset |
|---|---|---|
| resnet18_kw1x_no_partition | Table 5, 11.78M | no kernel partition: a cell is a whole kernel |
| resnet18_kw1x_layer_sharing | Table 6, 11.81M | a warehouse per layer instead of per stage |
| resnet18_kw1x_no_sharing | Table 6, 11.78M | a warehouse per layer holding its one whole kernel |
| resnet50_kw1x_same_dims | Table 7, 26.95M | a stage's warehouse split by kernel dimensions |
| resnet18_kw1x_{softmax,sigmoid,relu_l1} | Table 8, 11.93M | the attention function |
| resnet18_kw4x_softmax | Table 10, 45.86M | the attention function |
| resnet18_dy4x_caf, resnet18_od4x_caf | Table 10, 45.47M, 44.90M | CAF for the baselines (kw_ops.baselines) |
| resnet18_kw1x_init_{all_to_one,none} | Table 13 (9), 11.93M | β initialisation |
| resnet18_kw4x_init_many_to_one | Table 13, 45.86M | 4 cells to each mixture |
| resnet18_kw1d2x_init_one_to_many | Table 13, 7.43M | 1 cell to 2 mixtures, no zero cell |
| mobilenetv2_100_kwstar4x | Table 17, 12.51M | KW*: ODConv's four attention dimensions |
"""
from __future__ import annotations

import torch.nn as nn

from ..config import KWConfig
from .mobilenetv2 import mobilenetv2_stage_sharing
from .registry import KWRecipe, register_recipe
from .resnet import resnet_stage_sharing

__all__ = ["resnet_shape_sharing", "resnet_layer_sharing"]


def resnet_shape_sharing(name: str, module: nn.Module) -> str | None:
    """`resnet_stage_sharing` with each stage's warehouse split by the weight's shape [O, I, k, k]: only
    same-dimensioned kernels share (Table 7; and Table 5, where without kernel partition only they can)."""
    stage = resnet_stage_sharing(name, module)
    return None if stage is None else f"{stage}_{'x'.join(map(str, module.weight.shape))}"


def resnet_layer_sharing(name: str, module: nn.Module) -> str | None:
    """A warehouse per layer, for the layers `resnet_stage_sharing` makes KW (Table 6)."""
    return None if resnet_stage_sharing(name, module) is None else name


_KW1X = KWConfig(budget=1)
_ABLATIONS = {
    "resnet18_kw1x_no_partition": (
        "resnet18", _KW1X.replace(spatial_partition=False), resnet_shape_sharing,
        "Table 5 (11.78M; builds 11,777,580): without kernel partition a cell is a whole kernel, so only a "
        "stage's same-shaped kernels can share a warehouse (the stage rule otherwise)."),
    "resnet18_kw1x_layer_sharing": (
        "resnet18", _KW1X, resnet_layer_sharing,
        "Table 6, sharing within each layer (11.81M; builds 11,805,134): a warehouse per layer."),
    "resnet18_kw1x_no_sharing": (
        "resnet18", _KW1X.replace(spatial_partition=False), resnet_layer_sharing,
        "Table 6, without sharing (11.78M; builds 11,776,974): a warehouse per layer holding its kernel as one "
        "cell, used by its one mixture; a warehouse per kernel cell (not expressible as one KW layer) counts "
        "11.78M as well."),
    "resnet50_kw1x_same_dims": (
        "resnet50", _KW1X, resnet_shape_sharing,
        "Table 7, sharing across same-dimensioned kernels only (26.95M; builds 26,927,702, 0.02M fewer): each "
        "stage's warehouse split by kernel shape. Splitting by original stages, KW-ifying the two convs the "
        "1x preset keeps static, or keeping the stage's cell shape all give 26.93M or more than 27.1M."),
    "resnet18_kw4x_softmax": (
        "resnet18", KWConfig(budget=4, attention="softmax"), resnet_stage_sharing,
        "Table 10 (45.86M): KW (4x) with softmax instead of CAF."),
    "resnet18_kw1x_init_all_to_one": (
        "resnet18", _KW1X.replace(init="all_to_one"), resnet_stage_sharing,
        "Table 13 (11.93M): every cell to every mixture (β = 1 everywhere)."),
    "resnet18_kw1x_init_none": (
        "resnet18", _KW1X.replace(init="none"), resnet_stage_sharing,
        "Tables 9 and 13 (11.93M): without the attention initialisation (no β, τ unused)."),
    "resnet18_kw4x_init_many_to_one": (
        "resnet18", KWConfig(budget=4, init="many_to_one"), resnet_stage_sharing,
        "Table 13 (45.86M): 4 fresh cells to each mixture (Figure 5(b))."),
    "resnet18_kw1d2x_init_one_to_many": (
        "resnet18", KWConfig.preset("kw1d2x", init="one_to_many"), resnet_stage_sharing,
        "Table 13 (7.43M): each cell to 2 consecutive mixtures, no zero cell."),
}
for _function in ("softmax", "sigmoid", "relu_l1"):
    _ABLATIONS[f"resnet18_kw1x_{_function}"] = (
        "resnet18", _KW1X.replace(attention=_function), resnet_stage_sharing,
        f"Table 8 (11.93M): KW (1x) with the {_function} attention function instead of CAF.")

for _name, (_static, _config, _sharing, _doc) in _ABLATIONS.items():
    register_recipe(_name, KWRecipe(_static, _config, _sharing), doc=f"{_static} ablation, {_doc}")

register_recipe(
    "mobilenetv2_100_kwstar4x",
    KWRecipe("mobilenetv2_100", KWConfig(budget=4, omni=True), mobilenetv2_stage_sharing(split_pointwise=True)),
    doc="KW* (4x) on MobileNetV2 1.0 (Table 17: 12.51M; this builds 12,507,761): mobilenetv2_100_kw4x whose "
        "attention also computes ODConv's input-channel, output-channel and spatial attentions, on every KW "
        "layer (depthwise and 1x1 included: ODConv's own skips of those give 11.92M, not the printed count).",
)
