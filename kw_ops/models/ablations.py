"""The paper's ablations and KW* as named presets, each with the count the paper prints beside it
(kw_ops.models.paper). The choices the paper leaves open were searched by
benchmarks/search_paper_counts.py; each sharing rule's docstring says what it reproduces.
"""
from __future__ import annotations

from ..config import KWConfig
from .mobilenetv2 import mobilenetv2_stage_sharing
from .registry import KWRecipe, register_recipe

__all__: list[str] = []

register_recipe(
    "mobilenetv2_100_kwstar4x",
    KWRecipe("mobilenetv2_100", KWConfig(budget=4, omni=True), mobilenetv2_stage_sharing(split_pointwise=True)),
    doc="KW* (4x) on MobileNetV2 1.0 (Table 17: 12.51M; this builds 12,507,761): mobilenetv2_100_kw4x whose "
        "attention also computes ODConv's input-channel, output-channel and spatial attentions, on every KW "
        "layer (depthwise and 1x1 included: ODConv's own skips of those give 11.92M, not the printed count).",
)
