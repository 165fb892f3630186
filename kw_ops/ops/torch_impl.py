"""The KW op in plain PyTorch: the CPU path, the fallback of every backend and the readable math.

Per sample b (SPEC §2): the m mixtures w[b, j] = Σ_k attn[b, j, k] · E[k] are tiled into the
kernel W_b (mixture j = (s * GO + go) * GI + gi covers output block go, input block gi and
spatial cell s), then y_b = conv(x_b, W_b) + bias.

Two formulations, chosen per layer shape (`choose_formulation`):

- "grouped": one mixing GEMM for all samples, the tiles permuted into [B*O, I, *k] and a single
  convolution with groups = B * groups. Any groups, including depthwise. Its kernels are
  written twice (GEMM output + permuted copy), which is cheap where HW' is large and P small.
- "gemm" (groups = 1): the attention rows and the warehouse are permuted first (both small) so
  the mixing GEMM writes each sample's kernel once, directly as the [K*I, c_out] matrices a
  per-sample im2col GEMM consumes; the output comes out channels-last. Wins where HW' is small
  and the kernels are large (late stages), where the released formulation is slowest.

Limits: padding is given as ints (the layers turn 'same'/'valid' into ints or pre-pad); cells
are either spatially 1 (spatial partition) or the whole kernel.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["kw_conv_torch", "assemble_kernels", "choose_formulation", "FORMULATIONS"]

FORMULATIONS = ("grouped", "gemm")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _grid(x_channels: int, warehouse: torch.Tensor, out_channels: int, kernel_size: Sequence[int], groups: int):
    _, c_out, c_in, *cell_k = warehouse.shape
    in_per_group = x_channels // groups
    return math.prod(kernel_size) // math.prod(cell_k), out_channels // c_out, in_per_group // c_in


def assemble_kernels(attn: torch.Tensor, warehouse: torch.Tensor, out_channels: int, in_per_group: int,
                     kernel_size: Sequence[int]) -> torch.Tensor:
    """Per-sample kernels W_b from attention and warehouse (SPEC §2).

    attn [B, m, n], warehouse [n, c_out, c_in, *cell_k] -> [B, out_channels, in_per_group, *kernel_size]
    """
    batch, m, n = attn.shape
    _, c_out, c_in, *cell_k = warehouse.shape
    spatial = math.prod(kernel_size) // math.prod(cell_k)
    go, gi = out_channels // c_out, in_per_group // c_in
    mixed = torch.mm(attn.reshape(batch * m, n), warehouse.reshape(n, -1))
    mixed = mixed.view(batch, spatial, go, gi, c_out, c_in, math.prod(cell_k))
    # [B, S, GO, GI, c_out, c_in, CK] -> [B, GO, c_out, GI, c_in, S, CK]; S or CK is 1.
    return mixed.permute(0, 2, 4, 3, 5, 1, 6).reshape(batch, out_channels, in_per_group, *kernel_size)


def _output_size(size: Sequence[int], kernel_size, stride, padding, dilation) -> list[int]:
    return [
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, st, p, d in zip(size, kernel_size, stride, padding, dilation)
    ]


def _grouped(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups):
    batch, channels, *size = x.shape
    weight = assemble_kernels(attn, warehouse, out_channels, channels // groups, kernel_size)
    conv = _CONV[len(size)]
    y = conv(x.reshape(1, batch * channels, *size), weight.reshape(batch * out_channels, *weight.shape[2:]),
             None, stride, padding, dilation, batch * groups)
    return y.view(batch, out_channels, *y.shape[2:])


def _im2col_channels_last(x, kernel_size, stride, padding, dilation, spatial_major: bool):
    """Sliding windows of x [B, C, *size] as [B, prod(out), K*C] ((s, c) order) or [B, prod(out), C*K]."""
    batch, channels, *size = x.shape
    dims = len(size)
    padded = x.new_zeros(batch, *(s + 2 * p for s, p in zip(size, padding)), channels)
    inner = tuple(slice(p, p + s) for s, p in zip(size, padding))
    padded[(slice(None), *inner)] = x.movedim(1, -1)
    out = _output_size(size, kernel_size, stride, padding, dilation)
    # strides of the padded [B, *padded_size, C] tensor
    pstrides = padded.stride()
    windows = padded.as_strided(
        (batch, *out, *kernel_size, channels),
        (pstrides[0], *(pstrides[1 + d] * stride[d] for d in range(dims)),
         *(pstrides[1 + d] * dilation[d] for d in range(dims)), 1),
    )
    if not spatial_major:
        windows = windows.movedim(-1, 1 + dims)
    return windows.reshape(batch, math.prod(out), -1), out


def _gemm(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation):
    batch, channels, *size = x.shape
    n, c_out, c_in, *cell_k = warehouse.shape
    spatial, go, gi = _grid(channels, warehouse, out_channels, kernel_size, 1)
    ck = math.prod(cell_k)
    # Rows (go, s, gi) and columns (c_in, CK, c_out): the GEMM output for one (b, go) is the
    # [K*I, c_out] weight matrix in the window order of the im2col below; written once.
    attn_rows = attn.view(batch, spatial, go, gi, n).transpose(1, 2).reshape(batch * go * spatial * gi, n)
    cells = warehouse.reshape(n, c_out, c_in * ck).transpose(1, 2).reshape(n, c_in * ck * c_out)
    weights = torch.mm(attn_rows, cells).view(batch, go, spatial * gi * c_in * ck, c_out)
    cols, out = _im2col_channels_last(x, kernel_size, stride, padding, dilation, spatial_major=ck == 1)
    y = torch.matmul(cols.unsqueeze(1), weights)  # [B, GO, HW', c_out]
    y = y.permute(0, 2, 1, 3).reshape(batch, *out, out_channels)
    return y.movedim(-1, 1)


def choose_formulation(x_shape: Sequence[int], out_channels: int, kernel_size: Sequence[int], stride, padding,
                       dilation, groups: int) -> str:
    """'gemm' where the kernels outweigh the output positions (late stages, groups = 1), else 'grouped'."""
    if groups != 1:
        return "grouped"
    positions = math.prod(_output_size(x_shape[2:], kernel_size, stride, padding, dilation))
    return "gemm" if positions <= out_channels else "grouped"


def kw_conv_torch(x: torch.Tensor, attn: torch.Tensor, warehouse: torch.Tensor, bias: torch.Tensor | None,
                  out_channels: int, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int, formulation: str | None = None) -> torch.Tensor:
    """KW convolution in pure PyTorch; arguments already checked and normalised (see kw_ops.ops.kw_conv).

    x [B, C_in, *size], attn [B, m, n], warehouse [n, c_out, c_in, *cell_k], bias [C_out] or None
    -> y [B, C_out, *out_size]
    """
    batch = x.shape[0]
    if batch == 0:
        out = _output_size(x.shape[2:], kernel_size, stride, padding, dilation)
        y = x.new_zeros(0, out_channels, *out)
    else:
        formulation = formulation or choose_formulation(x.shape, out_channels, kernel_size, stride, padding,
                                                        dilation, groups)
        if formulation == "gemm" and groups == 1:
            y = _gemm(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation)
        else:
            y = _grouped(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups)
    if bias is not None:
        y = y + bias.view(1, -1, *([1] * (x.dim() - 2)))
    return y
