"""Triton kernels of the KW op for groups != 1 (depthwise, grouped): forward, input gradient, weight gradient.

Algorithm. The per-sample kernels W_b [KK, O, Ig] (Ig = C / groups input channels per group, Og = O / groups
output channels per group) come from the same mixing GEMM as for groups = 1 (gemm_kernels.kw_mix_kernel,
per chunk of samples sized for L2, launch.py). Output channel o reads the input channels g(o)*Ig + cc,
g(o) = o // Og. A tile of output channels spans several groups, so the reduction (Ig terms per tap) is an
elementwise multiply-add on CUDA cores over [positions, channels] tiles, not a tensor-core dot: the
memory-bound algorithm that depthwise convolutions (Ig = Og = 1: MobileNetV2, ConvNeXt) need; grouped layers
with wide groups pay Ig CUDA-core FMAs per output element and tap.

- `kw_grouped_fwd_kernel`: y[b, o, pos] = Σ_{t, cc} W_b[t, o, cc] · x[b, g(o)*Ig + cc, pos(t)] (+ bias).
  Program (position tile, output-channel tile, b).
- `kw_grouped_dx_kernel`: dx[b, c, i] = Σ_{t, oo} W_b[t, g*Og + oo, c - g*Ig] · dy[b, g*Og + oo, (i + pad - t·dil)
  / stride], g = c // Ig, by stride phase as `conv_kernels.kw_conv_dx_kernel` (only the taps that reach the
  phase). Program (phase position tile, input-channel tile, b).
- `kw_grouped_wgrad_kernel`: dW_b[t, o, cc] = Σ_pos dy[b, o, pos] · x[b, g(o)*Ig + cc, pos(t)], stored in cell
  order [b, m, c_out, c_in, CK] (j = (s*GO + go)*GI + gi from o = go*c_out + p, cc = gi*c_in + q,
  t = s*CK + ck) for the contractions of gemm_kernels.py. Program (output-channel tile, (t, cc), b); loop
  over position tiles.

Layouts. x, y, dy, dx [B, C, H, W] with any strides; the launchers pass x and dy channels_last for 2-byte
dtypes (for depthwise, a tile's channels are then contiguous). W [B, KK, O, Ig]. fp32 (fp64) accumulation.
Limits. 1-D/2-D; CUDA cores only (no tensor cores), so wide groups are slower than cuDNN's grouped GEMMs.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .taps import phase_tap, stride_phase_tile, tap_inputs
from .tuning import autotune

__all__ = ["kw_grouped_fwd_kernel", "kw_grouped_dx_kernel", "kw_grouped_wgrad_kernel"]

# (BLOCK_M: positions, BLOCK_N: channels, BLOCK_K: unused (1 tile), warps, stages): elementwise tiles
_GROUPED_TILES = [(64, 64, 16, 8, 2), (128, 32, 16, 8, 2), (32, 128, 16, 4, 2), (64, 16, 16, 2, 2)]
_GROUPED_KEY = ["C", "OC", "KK", "Ig", "PB", "BB"]


@autotune(_GROUPED_TILES, _GROUPED_KEY, sizes=("PB", "OC", None))
@triton.jit
def kw_grouped_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    C, H, W, OC, OH, OW, KW, KK, Ig, Og, PB, BB,
    sxb, sxc, sxh, sxw, swb, swt, swo, swc, syb, syo, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_o = offs_o < OC
    first_c = (offs_o // Og) * Ig  # first input channel of each output channel's group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < OH * OW
    oh = offs_m // OW
    ow = offs_m % OW
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for t in range(KK):
        ih, iw, valid_m = tap_inputs(oh, ow, mask_m, t // KW, t % KW, H, W, stride_h, stride_w, pad_h, pad_w,
                                      dil_h, dil_w)
        x_rows = x_ptr + b * sxb + ih * sxh + iw * sxw
        for cc in range(Ig):
            # x at each output channel's cc-th group input, times that channel's weight
            xt = tl.load(x_rows[:, None] + (first_c + cc)[None, :] * sxc, mask=valid_m[:, None] & mask_o[None, :],
                         other=0.0)
            wv = tl.load(w_ptr + b * swb + t * swt + offs_o * swo + cc * swc, mask=mask_o, other=0.0)
            acc += xt.to(ACC_DTYPE) * wv.to(ACC_DTYPE)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(ACC_DTYPE)[None, :]
    y_ptrs = y_ptr + b * syb + offs_o[None, :] * syo + (oh * syh + ow * syw)[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_o[None, :])


@autotune(_GROUPED_TILES, _GROUPED_KEY, sizes=("PB", "C", None))
@triton.jit
def kw_grouped_dx_kernel(
    dy_ptr, w_ptr, dx_ptr,
    C, H, W, OC, OH, OW, KH, KW, KK, Ig, Og, PB, BB,
    sdb, sdo, sdh, sdw, swb, swt, swo, swc, sxb, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = offs_c < C
    first_o = (offs_c // Ig) * Og  # first output channel of each input channel's group
    offs_cc = offs_c % Ig          # the input channel's index inside its group
    rh, rw, ih, iw, mask_m = stride_phase_tile(pid_m, H, W, stride_h, stride_w, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for t in range(KK):
        reaches, oh, ow, valid_m = phase_tap(rh, rw, ih, iw, mask_m, t // KW, t % KW, KH, KW, OH, OW, stride_h,
                                             stride_w, pad_h, pad_w, dil_h, dil_w)
        if reaches:
            dy_rows = dy_ptr + b * sdb + oh * sdh + ow * sdw
            # a static loop for depthwise (Og = 1 is specialised), so the channel offsets stay aligned
            for oo in range(Og):
                dyt = tl.load(dy_rows[:, None] + (first_o + oo)[None, :] * sdo,
                              mask=valid_m[:, None] & mask_c[None, :], other=0.0)
                wv = tl.load(w_ptr + b * swb + t * swt + (first_o + oo) * swo + offs_cc * swc, mask=mask_c,
                             other=0.0)
                acc += dyt.to(ACC_DTYPE) * wv.to(ACC_DTYPE)[None, :]
    dx_ptrs = dx_ptr + b * sxb + offs_c[None, :] * sxc + (ih * sxh + iw * sxw)[:, None]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])


@autotune(_GROUPED_TILES, _GROUPED_KEY, sizes=("PB", "OC", None))
@triton.jit
def kw_grouped_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr,
    C, H, W, OC, OH, OW, KW, KK, Ig, Og, PB, BB, c_out, c_in, GO, GI, CK,
    sxb, sxc, sxh, sxw, sdb, sdo, sdh, sdw, swb, swj, swp, swq, swk,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_tc = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_tc // Ig
    cc = pid_tc % Ig
    offs_o = pid_o * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_o = offs_o < OC
    offs_c = (offs_o // Og) * Ig + cc  # the input channel each output channel reads at this cc
    kh = t // KW
    kw = t % KW
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for m0 in range(0, OH * OW, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < OH * OW
        oh = offs_m // OW
        ow = offs_m % OW
        ih, iw, valid_m = tap_inputs(oh, ow, mask_m, kh, kw, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w)
        dyt = tl.load(dy_ptr + b * sdb + offs_o[None, :] * sdo + (oh * sdh + ow * sdw)[:, None],
                      mask=mask_m[:, None] & mask_o[None, :], other=0.0)
        xt = tl.load(x_ptr + b * sxb + offs_c[None, :] * sxc + (ih * sxh + iw * sxw)[:, None],
                     mask=valid_m[:, None] & mask_o[None, :], other=0.0)
        acc += dyt.to(ACC_DTYPE) * xt.to(ACC_DTYPE)
    dw = tl.sum(acc, axis=0)
    # scatter into cell order: j = (s*GO + go)*GI + gi, element (p, q, ck)
    s = t // CK
    ck = t % CK
    go = offs_o // c_out
    p = offs_o % c_out
    gi = cc // c_in
    q = cc % c_in
    j = (s * GO + go) * GI + gi
    dw_ptrs = dw_ptr + b * swb + j * swj + p * swp + q * swq + ck * swk
    tl.store(dw_ptrs, dw.to(dw_ptr.dtype.element_ty), mask=mask_o)
