"""The released formulation of a KW convolution in plain PyTorch ops (the dispatcher's `released` candidate).

    W = assemble_kernels(attn, warehouse)        one mixing GEMM for the batch: [B, O, I, *k]
    y = conv(x as [1, B*C, *size], W as [B*O, I, *k], groups = B * groups) + bias

Autograd keeps W for the backward, as the released code does. The op (kw_ops.ops.kw_conv's registered op)
instead recomputes the per-sample kernels in its hand-written backward, so that it never holds B x the layer's
weights; that costs one more pass over the warehouse. kw_ops.ops.dispatch weighs the two (and the op's other
formulations) per call; this module only computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .torch_impl import assemble_kernels, output_memory_format

__all__ = ["kept_kernels_conv", "released_conv"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


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
