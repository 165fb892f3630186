"""The model zoo: static twins with torchvision / reference module names and the paper's KW presets.

    import kw_ops.models
    kw_ops.models.list_models("resnet18*")   # resnet18, resnet18_kw1d2x, resnet18_kw1d4x, ...
    model = kw_ops.models.create("resnet18_kw4x", num_classes=100)
    static = kw_ops.models.create("resnet18")
    kw = kw_ops.models.recipe("resnet18_kw4x").apply(static)   # the same network

Presets are `static twin + kw_ops.convert(model, config, sharing, overrides)`; their sharing rules
(`resnet_stage_sharing`, `mobilenetv2_stage_sharing(...)`, `convnext_stage_sharing`) are public
so they can KW-ify variants of these networks. `deit_tiny` / `deit_small` and their KW presets
(`deit_kw_sharing`) and the paper's ConvNeXt plans (`*_paper`) are models the paper trained without a
released config. Register more builders with `@register("name")`.
"""
from . import ablations  # noqa: F401  (registers the ablation presets and KW*)
from .convnext import (
    CONVNEXT_KW3D4X_OVERRIDES,
    ConvNeXt,
    ConvNeXtBlock,
    convnext_split_stage_sharing,
    convnext_stage_sharing,
    convnext_tiny,
)
from .deit import DeiT, DeiTBlock, deit_kw_sharing, deit_small, deit_tiny
from .layers import DropPath, LayerNorm2d
from .mobilenetv2 import (
    MOBILENETV2_KW1D2X_OVERRIDES,
    InvertedResidual,
    MobileNetV2,
    mobilenetv2_050,
    mobilenetv2_100,
    mobilenetv2_stage_sharing,
)
from .pretrained import load_pretrained, reference_key_map, reference_state_dict
from .registry import KWRecipe, create, is_model, list_models, recipe, register, register_recipe
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50, resnet_stage_sharing

__all__ = [
    "BasicBlock", "Bottleneck", "CONVNEXT_KW3D4X_OVERRIDES", "ConvNeXt", "ConvNeXtBlock", "DeiT", "DeiTBlock",
    "DropPath", "InvertedResidual", "KWRecipe", "LayerNorm2d", "MOBILENETV2_KW1D2X_OVERRIDES", "MobileNetV2",
    "ResNet", "convnext_split_stage_sharing", "convnext_stage_sharing", "convnext_tiny", "create",
    "deit_kw_sharing", "deit_small", "deit_tiny", "is_model", "list_models", "load_pretrained", "mobilenetv2_050",
    "mobilenetv2_100", "mobilenetv2_stage_sharing", "recipe", "reference_key_map", "reference_state_dict",
    "register", "register_recipe", "resnet18", "resnet50", "resnet_stage_sharing",
]
