"""The KW op in plain PyTorch: the CPU path, the fallback of every backend and the readable math.

Per sample b (docs/semantics.md §2): the m mixtures w[b, j] = Σ_k attn[b, j, k] · E[k] are tiled into the
kernel W_b (mixture j = (s * GO + go) * GI + gi covers output block go, input block gi and
spatial cell s), then y_b = conv(x_b, W_b) + bias.

Backward (docs/design.md §1), with dW_b gathered back into cell order [m, cell]:

    dx_b = conv_transpose(dy_b, W_b)      dW_b = conv_weight_grad(x_b, dy_b)
    dattn[b] = dW_b @ E^T                 dE = Σ_b attn[b]^T @ dW_b          dbias = Σ dy

Only x, attn and E are needed: the per-sample kernels are recomputed in bounded pieces, never
B × the layer's weights at once.

Two formulations, chosen per call by kw_ops.ops.dispatch (by estimated cost) or forced by `formulation`:

- "grouped": samples in chunks of at most `CHUNK_BYTES` of per-sample kernels; per chunk one
  mixing GEMM, the tiles permuted into [Bc*O, I, *k] and one convolution with groups = Bc * groups
  (aten.convolution_backward for dx and dW in the backward). Any groups, including depthwise.
  Best where the convolution dominates (many output positions, small kernels: early stages).
- "gemm" (groups = 1): im2col of x once ([B, K*I, HW'], small in late stages); output channels in
  blocks of at most `BLOCK_BYTES` of mixed kernels for all samples, each block mixed, permuted in
  cache and consumed at once by a batched GEMM (the backward reuses the same blocks for dcols, dW,
  dattn and dE; col2im gives dx). Best where mixing dominates (few positions, large kernels: late
  stages, where the released formulation is slowest).

Limits: padding is given as ints (the layers turn 'same'/'valid' into ints or pre-pad); cells
are either spatially 1 (spatial partition) or the whole kernel.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["kw_conv_torch", "kw_conv_backward_torch", "assemble_kernels", "gather_cells", "FORMULATIONS", "CHUNK_BYTES", "BLOCK_BYTES", "conv_output_size", "output_memory_format"]

FORMULATIONS = ("grouped", "gemm")
# Per-sample kernels materialised at once by the grouped formulation (a chunk of samples).
CHUNK_BYTES = 32 << 20
# Mixed kernels of one output-channel block (all samples) in the gemm formulation: about L2-sized.
BLOCK_BYTES = 2 << 20
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _grid(x_channels: int, warehouse: torch.Tensor, out_channels: int, kernel_size: Sequence[int], groups: int):
    """(S, GO, GI): spatial cells per kernel, output blocks, input blocks of one layer."""
    _, c_out, c_in, *cell_k = warehouse.shape
    in_per_group = x_channels // groups
    return math.prod(kernel_size) // math.prod(cell_k), out_channels // c_out, in_per_group // c_in


def conv_output_size(size: Sequence[int], kernel_size, stride, padding, dilation) -> list[int]:
    """Output spatial size of a convolution with symmetric int padding: one int per spatial dim."""
    return [
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, st, p, d in zip(size, kernel_size, stride, padding, dilation)
    ]


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The op's output layout for x [B, C, *size]: x's channels-last format where x is in it (as nn.Conv2d/3d
    keep channels_last), else contiguous."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if channels_last is not None and not x.is_contiguous() and x.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


def assemble_kernels(attn: torch.Tensor, warehouse: torch.Tensor, out_channels: int, in_per_group: int,
                     kernel_size: Sequence[int]) -> torch.Tensor:
    """Per-sample kernels W_b from attention and warehouse (docs/semantics.md §2).

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


def gather_cells(weight_grad: torch.Tensor, warehouse: torch.Tensor) -> torch.Tensor:
    """Inverse layout of `assemble_kernels`: [B, O, I, *k] -> [B, m, cell] in mixture order."""
    batch, out_channels, in_per_group, *kernel_size = weight_grad.shape
    n, c_out, c_in, *cell_k = warehouse.shape
    ck = math.prod(cell_k)
    spatial = math.prod(kernel_size) // ck
    tiles = weight_grad.reshape(batch, out_channels // c_out, c_out, in_per_group // c_in, c_in, spatial, ck)
    # [B, GO, c_out, GI, c_in, S, CK] -> [B, S, GO, GI, c_out, c_in, CK]
    return tiles.permute(0, 5, 1, 3, 2, 4, 6).reshape(batch, -1, c_out * c_in * ck)


# -- grouped formulation ----------------------------------------------------------------------
def _sample_chunk(batch: int, kernel_numel: int, element_size: int) -> int:
    return max(1, min(batch, CHUNK_BYTES // max(1, kernel_numel * element_size)))


def _grouped_forward(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups):
    batch, channels, *size = x.shape
    in_per_group = channels // groups
    out = conv_output_size(size, kernel_size, stride, padding, dilation)
    chunk = _sample_chunk(batch, out_channels * in_per_group * math.prod(kernel_size), x.element_size())
    conv = _CONV[len(size)]
    if chunk >= batch:  # one chunk: the convolution's output is the result (no copy into y)
        weight = assemble_kernels(attn, warehouse, out_channels, in_per_group, kernel_size)
        ys = conv(x.reshape(1, batch * channels, *size),
                  weight.reshape(batch * out_channels, in_per_group, *kernel_size), None, stride, padding, dilation,
                  batch * groups)
        return ys.view(batch, out_channels, *out)
    y = x.new_empty(batch, out_channels, *out)
    for b0 in range(0, batch, chunk):
        b1 = min(batch, b0 + chunk)
        weight = assemble_kernels(attn[b0:b1], warehouse, out_channels, in_per_group, kernel_size)
        xs = x[b0:b1].reshape(1, (b1 - b0) * channels, *size)
        ys = conv(xs, weight.reshape((b1 - b0) * out_channels, in_per_group, *kernel_size), None, stride, padding,
                  dilation, (b1 - b0) * groups)
        y[b0:b1] = ys.view(b1 - b0, out_channels, *out)
    return y


def _grouped_backward(grad, x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups,
                      need_x, need_attn, need_warehouse):
    batch, channels, *size = x.shape
    n = warehouse.shape[0]
    in_per_group = channels // groups
    dims = len(size)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    dattn = torch.empty_like(attn) if need_attn else None
    dwarehouse = torch.empty_like(warehouse) if need_warehouse else None  # the first chunk writes it
    cells = warehouse.reshape(n, -1)
    need_weight = need_attn or need_warehouse
    chunk = _sample_chunk(batch, out_channels * in_per_group * math.prod(kernel_size), x.element_size())
    for b0 in range(0, batch, chunk):
        b1 = min(batch, b0 + chunk)
        bc = b1 - b0
        weight = assemble_kernels(attn[b0:b1], warehouse, out_channels, in_per_group, kernel_size)
        weight = weight.reshape(bc * out_channels, in_per_group, *kernel_size)
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad[b0:b1].reshape(1, bc * out_channels, *grad.shape[2:]), x[b0:b1].reshape(1, bc * channels, *size),
            weight, None, list(stride), list(padding), list(dilation), False, [0] * dims, bc * groups,
            [need_x, need_weight, False])
        if need_x:
            dx[b0:b1] = grad_x.view(bc, channels, *size)
        if need_weight:
            tiles = gather_cells(grad_w.view(bc, out_channels, in_per_group, *kernel_size), warehouse)
            if need_attn:
                torch.matmul(tiles, cells.t(), out=dattn[b0:b1])
            if need_warehouse:
                product = (attn[b0:b1].reshape(-1, n).t(), tiles.reshape(-1, cells.shape[1]))
                if b0 == 0:
                    torch.mm(*product, out=dwarehouse.view(n, -1))
                else:
                    dwarehouse.view(n, -1).addmm_(*product)
    return dx, dattn, dwarehouse


# -- gemm formulation -------------------------------------------------------------------------
def _im2col(x, kernel_size, stride, padding, dilation, channel_major: bool):
    """Sliding windows of x [B, C, *size]: [B, K, C, L] (kernel-major) or [B, C, K, L] (channel-major)."""
    batch, channels, *size = x.shape
    dims = len(size)
    if any(padding):
        x = F.pad(x, [v for p in reversed(padding) for v in (p, p)])
    x = x.contiguous()
    out = conv_output_size(size, kernel_size, stride, padding, dilation)
    st = x.stride()
    kernel_strides = [st[2 + d] * dilation[d] for d in range(dims)]
    out_strides = [st[2 + d] * stride[d] for d in range(dims)]
    if channel_major:
        shape, strides = (batch, channels, *kernel_size, *out), (st[0], st[1], *kernel_strides, *out_strides)
    else:
        shape, strides = (batch, *kernel_size, channels, *out), (st[0], *kernel_strides, st[1], *out_strides)
    windows = x.as_strided(shape, strides)
    k, positions = math.prod(kernel_size), math.prod(out)
    shape = (batch, channels, k, positions) if channel_major else (batch, k, channels, positions)
    return windows.reshape(shape).contiguous(), out


def _col2im(cols, size, kernel_size, stride, padding, dilation, channel_major: bool):
    """Adjoint of `_im2col`: sums the windows back into [B, C, *size]."""
    batch = cols.shape[0]
    channels = cols.shape[1] if channel_major else cols.shape[2]
    out = conv_output_size(size, kernel_size, stride, padding, dilation)
    padded = cols.new_zeros(batch, channels, *(s + 2 * p for s, p in zip(size, padding)))
    for t, offsets in enumerate(_kernel_offsets(kernel_size)):
        region = tuple(slice(o * d, o * d + st * (n_out - 1) + 1, st)
                       for o, d, st, n_out in zip(offsets, dilation, stride, out))
        piece = cols[:, :, t] if channel_major else cols[:, t]
        padded[(slice(None), slice(None), *region)] += piece.view(batch, channels, *out)
    inner = tuple(slice(p, p + s) for s, p in zip(size, padding))
    return padded[(slice(None), slice(None), *inner)].contiguous()  # a fresh contiguous dx, as the fake says


def _kernel_offsets(kernel_size):
    """Row-major kernel positions: [(0, 0), (0, 1), ...]."""
    positions = [()]
    for k in kernel_size:
        positions = [p + (i,) for p in positions for i in range(k)]
    return positions


def _gemm_layout(x, warehouse, out_channels, kernel_size):
    """Shared geometry of the gemm formulation and the output-channel block size."""
    batch, channels = x.shape[:2]
    n, c_out, c_in, *cell_k = warehouse.shape
    spatial, go, gi = _grid(channels, warehouse, out_channels, kernel_size, 1)
    inner = c_in * math.prod(cell_k)  # one cell row: (q, ck)
    block = BLOCK_BYTES // max(1, batch * spatial * gi * inner * x.element_size())
    return n, c_out, spatial, go, gi, inner, max(1, min(c_out, block))


def _mix_block(attn_go, cells, p0, p1, batch, tiles, inner):
    """Mixed kernels of output rows p0:p1 of one output block for all samples: [B, rows, S*GI*inner]."""
    n = cells.shape[0]
    mixed = torch.mm(attn_go, cells[:, p0:p1].reshape(n, (p1 - p0) * inner))  # rows (b, s, gi), cols (p, q, ck)
    return mixed.view(batch, tiles, p1 - p0, inner).transpose(1, 2).reshape(batch, p1 - p0, tiles * inner)


def _gemm_forward(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation):
    batch, channels, *size = x.shape
    n, c_out, spatial, grid_out, grid_in, inner, block = _gemm_layout(x, warehouse, out_channels, kernel_size)
    channel_major = spatial == 1 and math.prod(kernel_size) > 1
    cols, out = _im2col(x, kernel_size, stride, padding, dilation, channel_major)
    cols = cols.view(batch, -1, cols.shape[-1])  # rows (s, gi, q, ck) in both layouts
    cells = warehouse.reshape(n, c_out, inner)
    attn_tiles = attn.view(batch, spatial, grid_out, grid_in, n)
    tiles = spatial * grid_in
    y = x.new_empty(batch, out_channels, cols.shape[-1])
    for go in range(grid_out):
        attn_go = attn_tiles[:, :, go].reshape(batch * tiles, n)
        for p0 in range(0, c_out, block):
            p1 = min(c_out, p0 + block)
            weights = _mix_block(attn_go, cells, p0, p1, batch, tiles, inner)
            o0 = go * c_out
            y[:, o0 + p0:o0 + p1] = torch.bmm(weights, cols)
    return y.view(batch, out_channels, *out)


def _gemm_backward(grad, x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation,
                   need_x, need_attn, need_warehouse):
    batch, channels, *size = x.shape
    n, c_out, spatial, grid_out, grid_in, inner, block = _gemm_layout(x, warehouse, out_channels, kernel_size)
    channel_major = spatial == 1 and math.prod(kernel_size) > 1
    cols4, out = _im2col(x, kernel_size, stride, padding, dilation, channel_major)
    cols = cols4.view(batch, -1, cols4.shape[-1])
    grad = grad.reshape(batch, out_channels, -1)
    cells = warehouse.reshape(n, c_out, inner)
    attn_tiles = attn.view(batch, spatial, grid_out, grid_in, n)
    tiles = spatial * grid_in
    dcols = torch.zeros_like(cols) if need_x else None
    dattn = torch.empty_like(attn_tiles) if need_attn else None
    dwarehouse = torch.empty_like(cells) if need_warehouse else None  # each row block written at go = 0
    for go in range(grid_out):
        attn_go = attn_tiles[:, :, go].reshape(batch * tiles, n)
        dattn_go = attn_go.new_zeros(batch * tiles, n) if need_attn else None
        for p0 in range(0, c_out, block):
            p1 = min(c_out, p0 + block)
            rows = p1 - p0
            grad_block = grad[:, go * c_out + p0:go * c_out + p1]
            if need_x:
                weights = _mix_block(attn_go, cells, p0, p1, batch, tiles, inner)
                dcols.baddbmm_(weights.transpose(1, 2), grad_block)
            if need_attn or need_warehouse:
                # dW for these rows, back in mixing order: rows (b, s, gi), cols (p, q, ck)
                dw = torch.bmm(grad_block, cols.transpose(1, 2)).view(batch, rows, tiles, inner)
                dw = dw.transpose(1, 2).reshape(batch * tiles, rows * inner)
                cells_block = cells[:, p0:p1].reshape(n, rows * inner)
                if need_attn:
                    dattn_go.addmm_(dw, cells_block.t())
                if need_warehouse:
                    contribution = torch.mm(attn_go.t(), dw).view(n, rows, inner)
                    if go == 0:
                        dwarehouse[:, p0:p1] = contribution
                    else:
                        dwarehouse[:, p0:p1] += contribution
        if need_attn:
            dattn[:, :, go] = dattn_go.view(batch, spatial, grid_in, n)
    dx = _col2im(dcols.view_as(cols4), size, kernel_size, stride, padding, dilation, channel_major) \
        if need_x else None
    return (dx, dattn.view_as(attn) if need_attn else None,
            dwarehouse.view_as(warehouse) if need_warehouse else None)


# -- entry points -----------------------------------------------------------------------------
def _formulation(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups, formulation):
    if groups != 1:
        return "grouped"
    if formulation:
        return formulation
    from .dispatch import backend_formulation  # a direct call of the registered op: the dispatcher's pick

    return backend_formulation("torch", x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation,
                               groups)


def kw_conv_torch(x: torch.Tensor, attn: torch.Tensor, warehouse: torch.Tensor, bias: torch.Tensor | None,
                  out_channels: int, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int, formulation: str | None = None) -> torch.Tensor:
    """KW convolution in pure PyTorch; arguments already checked and normalised (see kw_ops.ops.kw_conv).

    x [B, C_in, *size], attn [B, m, n], warehouse [n, c_out, c_in, *cell_k], bias [C_out] or None
    -> y [B, C_out, *out_size] (a fresh contiguous tensor)
    """
    if x.shape[0] == 0:
        out = conv_output_size(x.shape[2:], kernel_size, stride, padding, dilation)
        return x.new_zeros(0, out_channels, *out)
    formulation = _formulation(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups,
                               formulation)
    if formulation == "gemm":
        y = _gemm_forward(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation)
    else:
        y = _grouped_forward(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups)
    if bias is not None:
        y += bias.view(1, -1, *([1] * (x.dim() - 2)))
    return y


def kw_conv_backward_torch(grad: torch.Tensor, x: torch.Tensor, attn: torch.Tensor, warehouse: torch.Tensor,
                           has_bias: bool, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int],
                           padding: Sequence[int], dilation: Sequence[int], groups: int,
                           output_mask: Sequence[bool], formulation: str | None = None):
    """Gradients of `kw_conv_torch` (hand-written, kernels recomputed in bounded pieces).

    grad [B, C_out, *out_size]; output_mask: which of (x, attn, warehouse, bias) need a gradient.
    -> (dx, dattn, dwarehouse, dbias), None where not asked for (dbias also None without bias)
    """
    need_x, need_attn, need_warehouse, need_bias = output_mask
    dbias = None
    if has_bias and need_bias:
        dbias = grad.sum(dim=[d for d in range(grad.dim()) if d != 1])
    if x.shape[0] == 0:
        return (torch.zeros_like(x) if need_x else None, torch.zeros_like(attn) if need_attn else None,
                torch.zeros_like(warehouse) if need_warehouse else None, dbias)
    grad = grad.contiguous()
    formulation = _formulation(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups,
                               formulation)
    if formulation == "gemm":
        dx, dattn, dwarehouse = _gemm_backward(grad, x, attn, warehouse, out_channels, kernel_size, stride, padding,
                                               dilation, need_x, need_attn, need_warehouse)
    else:
        dx, dattn, dwarehouse = _grouped_backward(grad, x, attn, warehouse, out_channels, kernel_size, stride,
                                                  padding, dilation, groups, need_x, need_attn, need_warehouse)
    return dx, dattn, dwarehouse, dbias
