"""The kept-kernels formulation of a KW layer, for small training steps on CPU.

    W = assemble_kernels(attn, warehouse)        one mixing GEMM for the batch: [B, O, I, *k]
    y = conv(x as [1, B*C, *size], W as [B*O, I, *k], groups = B * groups) + bias

in plain PyTorch ops, so autograd keeps W for the backward: the released code's formulation. The op
(kw_ops.ops.kw_conv) instead recomputes the per-sample kernels in its hand-written backward, so that it never
holds B x the layer's weights; that costs a fourth pass over the warehouse (mix, mix again, dattn, dE against
the released three). Where the batch's kernels are small and the layer has few output positions (mixing, not
the convolution, dominates) keeping them is the faster choice. Measured (2-core CPU, batch 2, 32x32, training
step, every eligible layer kept vs the op): ResNet18 KW 4x 1.22 vs 1.51 s, ResNet50 KW 4x 7.8 vs 9.2 s,
MobileNetV2 KW 4x 0.27 vs 0.46 s; ResNet18 KW 1x at 224x224, batch 8 keeps one layer and is unchanged
(2.20 vs 2.28 s).

`keeps_kernels` decides per call; KW layers ask it under the automatic backend choice only (a backend forced by
argument, `use_backend` or KW_OPS_BACKEND runs the op), on CPU, for steps that build a graph, outside
torch.compile and torch.func (where the registered op and its formulas run).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .backends import requested_backend
from .torch_impl import assemble_kernels, conv_output_size, output_memory_format

__all__ = ["keeps_kernels", "kept_kernels_conv", "released_conv", "KEEP_BYTES", "KEEP_POSITIONS"]

#: per-sample kernels of the whole batch (B x the layer's weights) kept at most, in bytes
KEEP_BYTES = 32 << 20
#: output positions per sample at most: above, the convolution dominates and the op's formulations win
KEEP_POSITIONS = 64
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _transforms_active() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


def keeps_kernels(x: torch.Tensor, attn: torch.Tensor, warehouse: torch.Tensor, out_channels: int, kernel_size,
                  stride, padding, dilation, groups: int, backend: str | None) -> bool:
    """Whether a KW layer runs this call in the kept-kernels formulation (see the module docstring).

    x [B, C, *size] (padding as ints, already normalised), attn [B, m, n], warehouse [n, c_out, c_in, *cell_k]
    """
    if x.device.type != "cpu" or x.shape[0] == 0 or requested_backend(backend)[0] != "auto":
        return False
    if not (torch.is_grad_enabled() and (x.requires_grad or attn.requires_grad or warehouse.requires_grad)):
        return False  # inference: the op's forward has no recomputation to save
    if torch.compiler.is_compiling() or _transforms_active():
        return False
    positions = math.prod(conv_output_size(x.shape[2:], kernel_size, stride, padding, dilation))
    kernel_bytes = x.shape[0] * out_channels * (x.shape[1] // groups) * math.prod(kernel_size) * x.element_size()
    return positions <= KEEP_POSITIONS and kernel_bytes <= KEEP_BYTES


def released_conv(x: torch.Tensor, attn: torch.Tensor, warehouse: torch.Tensor, bias: torch.Tensor | None,
                  out_channels: int, kernel_size, stride, padding, dilation, groups: int) -> torch.Tensor:
    """The released code's formulation in plain ops: one mixing GEMM for the batch, the kernels permuted into
    [B*O, I, *k], one convolution with groups = B * groups (also the bench's baseline,
    kw_ops.benchmarking.released).

    x [B, C, *size], attn [B, m, n], warehouse [n, c_out, c_in, *cell_k], bias [O] or None
    -> y [B, O, *out] (contiguous, as the released code returns it)
    """
    batch, channels, *size = x.shape
    weight = assemble_kernels(attn, warehouse, out_channels, channels // groups, kernel_size)
    y = _CONV[len(size)](x.reshape(1, batch * channels, *size), weight.reshape(batch * out_channels,
                         *weight.shape[2:]), None, stride, padding, dilation, batch * groups)
    y = y.view(batch, out_channels, *y.shape[2:])
    if bias is not None:
        y = y + bias.view(1, -1, *([1] * len(size)))
    return y


def kept_kernels_conv(x: torch.Tensor, attn: torch.Tensor, warehouse: torch.Tensor, bias: torch.Tensor | None,
                      out_channels: int, kernel_size, stride, padding, dilation, groups: int) -> torch.Tensor:
    """KW convolution with the batch's kernels mixed once and kept by autograd; the contract of kw_ops.ops.kw_conv.

    x [B, C, *size], attn [B, m, n], warehouse [n, c_out, c_in, *cell_k], bias [O] or None
    -> y [B, O, *out] (channels_last where x is)
    """
    y = released_conv(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation, groups)
    return y.contiguous(memory_format=output_memory_format(x))
