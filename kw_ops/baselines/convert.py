"""Turn a static CNN into its DY-Conv or ODConv baseline: replace the nn.Conv2d layers a rule picks.

Rules are `rule(name, module) -> bool` over `model.named_modules()` (only plain nn.Conv2d layers
are offered). The papers' layer choices, on torchvision module names (docs/baselines.md §5):

| rule                     | replaced                                                   | static           |
|--------------------------|------------------------------------------------------------|------------------|
| `resnet_dyconv_rule`     | every conv in layer1-4, downsample.0 included              | stem `conv1`     |
| `resnet_odconv_rule`     | every block conv in layer1-4                               | stem, downsample |
| `mobilenetv2_dyconv_rule`| every conv in `features` but the stem                      | `features.0.0`   |
| `mobilenetv2_odconv_rule`| every block conv (features.1-17) and the final 1x1 (18.0)  | `features.0.0`   |

(On MobileNetV2 the two rules pick the same layers; they are kept apart because the papers
state them separately.) `rule=` also takes the names 'resnet' and 'mobilenetv2'.
"""
from __future__ import annotations

import re
from typing import Callable

import torch.nn as nn

from .dyconv import DYConv2d
from .odconv import ODConv2d

__all__ = [
    "RULES", "mobilenetv2_dyconv_rule", "mobilenetv2_odconv_rule", "resnet_dyconv_rule", "resnet_odconv_rule",
    "to_dyconv", "to_odconv",
]

Rule = Callable[[str, nn.Module], bool]
_RESNET_BLOCK = re.compile(r"layer[1-4]\.\d+\.")
_MOBILENETV2_STEM = "features.0.0"


def resnet_dyconv_rule(name: str, module: nn.Module) -> bool:
    """DY-Conv on a torchvision ResNet: every conv of the residual blocks, downsample 1x1 included."""
    return isinstance(module, nn.Conv2d) and _RESNET_BLOCK.match(name) is not None


def resnet_odconv_rule(name: str, module: nn.Module) -> bool:
    """ODConv on a torchvision ResNet: every conv of the residual blocks except the downsample."""
    return resnet_dyconv_rule(name, module) and ".downsample." not in name


def mobilenetv2_dyconv_rule(name: str, module: nn.Module) -> bool:
    """DY-Conv on a torchvision MobileNetV2: every conv of `features` except the stem features.0.0."""
    return isinstance(module, nn.Conv2d) and name.startswith("features.") and name != _MOBILENETV2_STEM


def mobilenetv2_odconv_rule(name: str, module: nn.Module) -> bool:
    """ODConv on a torchvision MobileNetV2: every inverted-residual conv and the final 1x1 (stem static)."""
    return mobilenetv2_dyconv_rule(name, module)


#: named rules per baseline, for `rule="resnet"` / `rule="mobilenetv2"`.
RULES: dict[str, dict[str, Rule]] = {
    "dyconv": {"resnet": resnet_dyconv_rule, "mobilenetv2": mobilenetv2_dyconv_rule},
    "odconv": {"resnet": resnet_odconv_rule, "mobilenetv2": mobilenetv2_odconv_rule},
}


def _every_conv(name: str, module: nn.Module) -> bool:
    return True


def _replace(model: nn.Module, rule: Rule | str | None, baseline: str, build) -> nn.Module:
    caller = f"to_{baseline}"
    if isinstance(rule, str):
        if rule not in RULES[baseline]:
            raise ValueError(f"{caller}: unknown rule {rule!r}; named rules: {sorted(RULES[baseline])}")
        rule = RULES[baseline][rule]
    rule = rule or _every_conv
    if not callable(rule):
        raise TypeError(f"{caller}: rule must be a callable (name, module) -> bool, a rule name or None, "
                        f"got {type(rule).__name__}")
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Conv2d and rule(name, m)]
    for name, conv in targets:
        dynamic = build(conv).train(conv.training)
        if not name:
            return dynamic
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dynamic)
    return model


def _geometry(conv: nn.Conv2d) -> dict:
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": conv.kernel_size,
            "stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups,
            "bias": conv.bias is not None, "padding_mode": conv.padding_mode, "device": conv.weight.device,
            "dtype": conv.weight.dtype}


def to_dyconv(model: nn.Module, K: int = 4, rule: Rule | str | None = None, **layer_kwargs) -> nn.Module:
    """Replace the nn.Conv2d layers of `model` that `rule(name, module)` picks by DYConv2d with K kernels.

    In place; returns the model (a lone nn.Conv2d passed as `model` comes back replaced). rule:
    a callable, 'resnet' / 'mobilenetv2' (the papers' choices), or None for every nn.Conv2d.
    Geometry, bias, padding mode, device, dtype and train/eval mode are kept; weights are freshly
    initialised.
    layer_kwargs go to every DYConv2d (formulation=, hidden_offset=).

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    >>> net = to_dyconv(net, K=4, rule=lambda name, m: name != "0")
    >>> type(net[0]).__name__, type(net[2]).__name__
    ('Conv2d', 'DYConv2d')
    """
    return _replace(model, rule, "dyconv",
                    lambda conv: DYConv2d(**_geometry(conv), num_kernels=K, **layer_kwargs))


def to_odconv(model: nn.Module, K: int = 4, rule: Rule | str | None = None, **layer_kwargs) -> nn.Module:
    """Replace the nn.Conv2d layers of `model` that `rule(name, module)` picks by ODConv2d with K kernels.

    K = 1 gives "ODConv (1x)", K = 4 "ODConv (4x)". In place; returns the model. rule: a callable,
    'resnet' / 'mobilenetv2' (the papers' choices), or None for every nn.Conv2d. A conv's bias is
    kept as ODConv2d's static bias (the papers' convs have none); train/eval mode is kept; weights are
    freshly initialised.
    layer_kwargs go to every ODConv2d (formulation=).

    >>> import torch.nn as nn
    >>> net = to_odconv(nn.Sequential(nn.Conv2d(8, 8, 3, bias=False)), K=1)
    >>> net[0].num_kernels, net[0].attention.kernel_fc is None
    (1, True)
    """
    return _replace(model, rule, "odconv",
                    lambda conv: ODConv2d(**_geometry(conv), num_kernels=K, **layer_kwargs))
