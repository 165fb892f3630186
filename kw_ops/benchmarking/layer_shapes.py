"""The distinct KW layer calls of a model preset, recorded by hooks: the shapes the op benchmarks time.

A spec is a dict: channels, out, size (input H, W as the op sees it, pre-padding included), kernel,
stride, padding, dilation, groups, bias, n (warehouse size), cell (c_out, c_in, *cell_k), m (mixtures),
layer (the first module with this call) and count (how many layers make the same call).
"""
from __future__ import annotations

import torch

from ..models.registry import create
from ..nn.layers import KWLayer
from ..ops.torch_impl import conv_output_size

__all__ = ["kw_layer_shapes", "out_size", "shape_text"]


def kw_layer_shapes(model_name: str, resolution: int = 224) -> list[dict]:
    """Distinct 2-D KW layer calls of a model: geometry recorded by forward pre-hooks on a batch-1 CPU forward."""
    model = create(model_name).eval()
    seen, layers = {}, []

    def hook(module, inputs):
        x = inputs[0]
        size = list(x.shape[2:])
        if module._pre_pad is not None:  # padding applied before the op: the op sees the padded size
            for d in range(len(size)):
                size[-1 - d] += module._pre_pad[2 * d] + module._pre_pad[2 * d + 1]
        spec = dict(channels=module.in_channels, out=module.out_channels, size=tuple(size),
                    kernel=tuple(module.kernel_size), stride=tuple(module.stride),
                    padding=tuple(module._conv_padding), dilation=tuple(module.dilation), groups=module.groups,
                    bias=module.bias is not None, n=module.warehouse.cells.shape[0],
                    cell=tuple(module.warehouse.cells.shape[1:]), m=module.m)
        key = tuple(sorted(spec.items()))
        if key in seen:
            seen[key]["count"] += 1
        elif len(spec["kernel"]) == 2:
            seen[key] = {"layer": name_of[module], "count": 1, **spec}
            layers.append(seen[key])

    name_of = {m: name for name, m in model.named_modules() if isinstance(m, KWLayer)}
    handles = [m.register_forward_pre_hook(hook) for m in name_of]
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, resolution, resolution))
    finally:
        for handle in handles:
            handle.remove()
    return layers


def out_size(spec: dict) -> list[int]:
    """Output spatial size of a spec's convolution."""
    return conv_output_size(spec["size"], spec["kernel"], spec["stride"], spec["padding"], spec["dilation"])


def shape_text(spec: dict) -> str:
    """'C_in->C_out kxk/sS @HxW n=.. m=..' (and g=.. when grouped)."""
    h, w = spec["size"]
    text = f"{spec['channels']}->{spec['out']} {spec['kernel'][0]}x{spec['kernel'][1]}/s{spec['stride'][0]} @{h}x{w}"
    text += f" n={spec['n']} m={spec['m']}"
    return text + (f" g={spec['groups']}" if spec["groups"] != 1 else "")
