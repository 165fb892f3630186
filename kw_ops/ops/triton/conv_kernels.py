"""Triton conv kernels of the KW op (groups = 1): forward and input gradient on per-sample kernels, and the
per-sample weight gradient in cell order.

Algorithm. The per-sample kernels W_b [KK, O, C] of a chunk of samples are mixed beforehand by the mixing
GEMM (gemm_kernels.kw_mix_kernel, tensor cores, K = n) and read here while they are in L2 (launch.py sizes
the chunk); each weight element is mixed once per sample, never per position tile. Both conv kernels are
implicit GEMMs over one sample, and so is the weight gradient; all three are tiled over the full channel
counts (not over cells), so small cells cost no masked lanes and channel tiles stay aligned.

- `kw_conv_fwd_kernel`: y[b, o, pos] = Σ_{t, c} W_b[t, o, c] · x[b, c, pos·stride - pad + t·dil] (+ bias).
  Program (position tile, output-channel tile, b); loop over the taps t and input-channel tiles.
- `kw_conv_dx_kernel`: dx[b, c, i] = Σ_{t, o} W_b[t, o, c] · dy[b, o, (i + pad - t·dil) / stride], by
  stride phase: the input positions i ≡ r (mod stride) of one phase r read only the taps t with
  (r + pad - t·dil) ≡ 0 (mod stride), exactly; a program covers one phase's positions and skips the other
  taps (a stride-2 3x3 layer runs 9 of 36 phase-tap pairs per 2x2 block, against 36 masked ones).
- `kw_conv_wgrad_kernel`: dW_b[t, o, c] = Σ_pos dy[b, o, pos] · x[b, c, pos(t)] over full-channel tiles,
  for one slice of the cell's rows: the SP rows P0..P0+SP-1 of every cell (output channels
  o = go*c_out + P0 + p, p < SP), scattered in the epilogue into cell order [b, m, SP, c_in, CK]
  (c = gi*c_in + q, t = s*CK + ck, j = (s*GO + go)*GI + gi: separable row and column address parts) for the
  contractions dattn += dW @ E[:, slice]^T and dE[:, slice] = attn^T @ dW (gemm_kernels.py; launch.py sizes
  the slice so that the dW of every sample stays in L2). SP = c_out, P0 = 0: the whole cell.
  Program ((o-tile, c-tile), t, b); loop over output-position tiles.

Channel blocks (launch.py's blocked mode): the forward may run on the kernels of a block of output channels only
(OC = GO*SP of them: cell rows P0..P0+SP-1 of every cell row block, the layer's channel go*CO + P0 + p at block
index go*SP + p) and dx on a block of input channels (C = GI*SQ: cell columns Q0..Q0+SQ-1, channel gi*CI + Q0 + q
at block index gi*SQ + q); only the stores (and the bias) map block channels to the layer's. The whole layer:
SP = CO = OC, P0 = 0 (SQ = CI = C, Q0 = 0). The constexpr CHANNEL_MAP picks the cheapest form of the map (the
identity, an offset, or the general one), so the whole-layer launches compile as before the blocks existed.

Layouts. x, y, dy, dx: [B, C, H, W] with any strides (1-D runs as H = 1); the launchers pass x and dy in
channels_last (NHWC) for 2-byte dtypes, so the [positions, channels] operand tiles are contiguous along
channels (vector loads that Triton can pipeline); y and dx are written NCHW (the op's contiguous outputs,
contiguous along the positions of a tile). Per-sample kernels W [B, KK, O, C] (C contiguous). Accumulation
in fp32 (fp64 for fp64 inputs).

Limits. groups = 1 (grouped and depthwise: grouped_kernels.py), 1-D/2-D (capability.py). Late-stage layers
(49 positions) give one position tile per sample, so the grid is (output-channel tiles x samples of a chunk).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .taps import phase_tap, stride_phase_tile, tap_inputs
from .tuning import autotune

__all__ = ["kw_conv_fwd_kernel", "kw_conv_dx_kernel", "kw_conv_wgrad_kernel"]

# (BLOCK_M: positions, BLOCK_N: output channels, BLOCK_K: reduced channels, warps, stages); BLOCK 16 tiles
# for small channel counts (pruned per call to the channel counts, tuning.py)
_CONV_TILES = [(128, 64, 32, 8, 4), (64, 64, 32, 4, 4), (128, 128, 32, 8, 3), (64, 32, 64, 8, 3),
               (64, 128, 32, 8, 3), (64, 16, 32, 4, 3), (128, 32, 16, 4, 4), (64, 16, 16, 4, 3)]
# (BLOCK_M: positions reduced over, BLOCK_N: output channels, BLOCK_K: input channels, warps, stages)
_WGRAD_TILES = [(64, 64, 64, 4, 3), (32, 64, 64, 4, 4), (64, 128, 64, 8, 3), (128, 64, 32, 4, 3),
                (64, 16, 32, 4, 3), (64, 32, 16, 4, 3), (64, 16, 16, 4, 3)]
# autotune keys: bucketed sizes (tuning.bucket: BB the batch of the launch, PB the positions per sample) and the
# fp32 dot precision (its configs differ, tuning.py)
_CONV_KEY = ["C", "OC", "KK", "PB", "BB", "INPUT_PRECISION"]
# CHANNEL_MAP of the conv kernels: how a block channel maps to the layer's (see `_layer_channels`)
WHOLE_LAYER, OFFSET_BLOCK, STRIDED_BLOCK = 0, 1, 2


@triton.jit
def _layer_channels(offs, width, first, cell, CHANNEL_MAP: tl.constexpr):
    """The layer's channels of block channels `offs`: cell row (column) first + c % width of cell block c // width,
    i.e. (c // width) * cell + first + c % width. WHOLE_LAYER: the identity; OFFSET_BLOCK (one cell block: GO or
    GI = 1): first + c. Both keep the store's channels contiguous, as the compiler sees them."""
    if CHANNEL_MAP == 0:
        return offs
    elif CHANNEL_MAP == 1:
        return first + offs
    else:
        return (offs // width) * cell + first + offs % width


@autotune(_CONV_TILES, _CONV_KEY, sizes=("PB", "OC", "C"))
@triton.jit
def kw_conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    C, H, W, OC, OH, OW, KW, KK, PB, BB, SP, P0, CO,
    sxb, sxc, sxh, sxw, swb, swt, swo, swc, syb, syo, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, CHANNEL_MAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_o = offs_o < OC
    # output-position tile
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < OH * OW
    oh = offs_m // OW
    ow = offs_m % OW
    w_tap = w_ptr + b * swb + offs_o[None, :] * swo
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for t in range(KK):
        # input rows read at kernel position t, with the padding mask
        ih, iw, valid_m = tap_inputs(oh, ow, mask_m, t // KW, t % KW, H, W, stride_h, stride_w, pad_h, pad_w,
                                      dil_h, dil_w)
        x_rows = x_ptr + b * sxb + ih * sxh + iw * sxw
        for c0 in range(0, C, BLOCK_K):
            offs_c = c0 + tl.arange(0, BLOCK_K)
            mask_c = offs_c < C
            xt = tl.load(x_rows[:, None] + offs_c[None, :] * sxc, mask=valid_m[:, None] & mask_c[None, :], other=0.0)
            wt = tl.load(w_tap + t * swt + offs_c[:, None] * swc, mask=mask_c[:, None] & mask_o[None, :], other=0.0)
            acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    chan_o = _layer_channels(offs_o, SP, P0, CO, CHANNEL_MAP)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + chan_o, mask=mask_o, other=0.0).to(ACC_DTYPE)[None, :]
    y_ptrs = y_ptr + b * syb + chan_o[None, :] * syo + (oh * syh + ow * syw)[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_o[None, :])


@autotune(_CONV_TILES, _CONV_KEY, sizes=("PB", "C", "OC"))
@triton.jit
def kw_conv_dx_kernel(
    dy_ptr, w_ptr, dx_ptr,
    C, H, W, OC, OH, OW, KH, KW, KK, PB, BB, SQ, Q0, CI,
    sdb, sdo, sdh, sdw, swb, swt, swo, swc, sxb, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, CHANNEL_MAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # BLOCK_M: input positions of one stride phase, BLOCK_N: input channels (the output tile),
    # BLOCK_K: output channels (reduced)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = offs_c < C
    rh, rw, ih, iw, mask_m = stride_phase_tile(pid_m, H, W, stride_h, stride_w, BLOCK_M)
    w_tap = w_ptr + b * swb + offs_c[None, :] * swc
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for t in range(KK):
        reaches, oh, ow, valid_m = phase_tap(rh, rw, ih, iw, mask_m, t // KW, t % KW, KH, KW, OH, OW, stride_h,
                                             stride_w, pad_h, pad_w, dil_h, dil_w)
        o_end = tl.where(reaches, OC, 0)  # a tap that misses the phase runs no iteration
        dy_rows = dy_ptr + b * sdb + oh * sdh + ow * sdw
        for o0 in range(0, o_end, BLOCK_K):
            offs_o = o0 + tl.arange(0, BLOCK_K)
            mask_o = offs_o < OC
            dyt = tl.load(dy_rows[:, None] + offs_o[None, :] * sdo, mask=valid_m[:, None] & mask_o[None, :],
                          other=0.0)
            wt = tl.load(w_tap + t * swt + offs_o[:, None] * swo, mask=mask_o[:, None] & mask_c[None, :], other=0.0)
            acc = tl.dot(dyt, wt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    chan_c = _layer_channels(offs_c, SQ, Q0, CI, CHANNEL_MAP)
    dx_ptrs = dx_ptr + b * sxb + chan_c[None, :] * sxc + (ih * sxh + iw * sxw)[:, None]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])


@autotune(_WGRAD_TILES, _CONV_KEY, sizes=("PB", "OC", "C"))
@triton.jit
def kw_conv_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr,
    C, H, W, OC, OH, OW, c_out, c_in, GO, GI, CK, KW, KK, PB, BB, SP, P0,
    sxb, sxc, sxh, sxw, sdb, sdo, sdh, sdw,
    swb, swj, swp, swq, swk,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # BLOCK_M: output positions (reduced), BLOCK_N: the OC = GO*SP output channels of the slice (cell rows
    # P0..P0+SP-1 of every cell row block go: channel go*c_out + P0 + p at slice index go*SP + p), BLOCK_K: input
    # channels c
    pid_oc = tl.program_id(0)
    t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    c_tiles = tl.cdiv(C, BLOCK_K)
    offs_o = (pid_oc // c_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = (pid_oc % c_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_o = offs_o < OC
    mask_c = offs_c < C
    chan_o = (offs_o // SP) * c_out + P0 + offs_o % SP
    kh = t // KW
    kw = t % KW
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC_DTYPE)
    for m0 in range(0, OH * OW, BLOCK_M):
        # dy tile [o, positions] and the x tile [positions, c] read at kernel position t
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < OH * OW
        oh = offs_m // OW
        ow = offs_m % OW
        ih, iw, valid_m = tap_inputs(oh, ow, mask_m, kh, kw, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
        dyt = tl.load(dy_ptr + b * sdb + chan_o[:, None] * sdo + (oh * sdh + ow * sdw)[None, :],
                      mask=mask_o[:, None] & mask_m[None, :], other=0.0)
        xt = tl.load(x_ptr + b * sxb + (ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc,
                     mask=valid_m[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(dyt, xt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    # scatter into cell order: j = (s*GO + go)*GI + gi splits into a tap part, a row (o) part and a column (c) part
    s = t // CK
    ck = t % CK
    row_off = (offs_o // SP) * GI * swj + (offs_o % SP) * swp
    col_off = (offs_c // c_in) * swj + (offs_c % c_in) * swq
    dw_ptrs = dw_ptr + b * swb + (s * GO * GI) * swj + ck * swk + row_off[:, None] + col_off[None, :]
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_o[:, None] & mask_c[None, :])
