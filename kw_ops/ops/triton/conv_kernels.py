"""Triton kernels of the KW convolution: forward, input gradient and per-sample weight gradient.

Algorithm. Per sample b the kernel W_b is tiled from mixtures of warehouse cells (SPEC §2):
    W_b[go*c_out + p, gi*c_in + q, t] = Σ_k attn[b, j, k] · E[k, p, q, ck],  j = (s*GO + go)*GI + gi
with t the row-major kernel position, s = t // CK the spatial cell and ck = t % CK the position inside the
cell (CK = 1 for spatial-partition cells, CK = KH*KW for whole-kernel cells, then s = 0).
Every kernel here is an implicit GEMM over one sample with output-channel and input-channel tiles that
never straddle a cell (tile p in [0, c_out), q in [0, c_in), masked at the cell's edge), so one tile
belongs to one mixture j and its attention is a scalar per warehouse entry k.

- `kw_conv_fwd_kernel`: y[b, o, pos] = Σ_{t, c} W_b[o, c, t] · x[b, c, pos(t)] (+ bias).
  Program (position tile, (go, p-tile), b); loop over t, gi, q-tiles. MIX=True (fused): the weight
  tile is mixed from E and attn[b] in registers (an FMA loop over n) and never leaves the chip;
  MIX=False (two-phase): it is read from per-sample kernels written by `kw_mix_kernel`.
- `kw_conv_dx_kernel`: dx[b, c, pos_in] = Σ_{t, o} W_b[o, c, t] · dy[b, o, pos_out] where
  pos_in = pos_out*stride - pad + t*dilation (gather form of the transposed convolution: positions
  whose pos_out is fractional or out of range are masked). Program (input-position tile,
  (gi, q-tile), b); loop over t, go, p-tiles. Same MIX switch.
- `kw_conv_wgrad_kernel`: dW_b[j][p, q, ck] = Σ_pos dy[b, o, pos] · x[b, c, pos(t)], written in cell order
  [b, m, c_out, c_in, CK] for the contractions dattn = dW @ E^T and dE = attn^T @ dW (gemm_kernels.py).
  Program ((p-tile, q-tile), (t, go, gi), b); loop over output-position tiles.

Layouts. x, y, dy, dx: [B, C, H, W] with any strides (NCHW, channels_last, views); 1-D runs as H = 1.
attn [B, m, n] and E [n, c_out, c_in, CK] with any strides. Per-sample kernels (MIX=False):
[B, KH*KW, OC, C]. Accumulation in fp32 (fp64 for fp64 inputs); the mixed weight tile is cast to the
input dtype before tl.dot, as the torch path rounds its assembled kernels.

Limits. groups = 1, 1-D/2-D (capability.py). The fused mixing runs on CUDA cores: 2·n FLOPs per weight
element per position tile, so launch.py chooses it only where a sample has few position tiles.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .capability import interpreting

__all__ = ["kw_conv_fwd_kernel", "kw_conv_dx_kernel", "kw_conv_wgrad_kernel"]


def _configs(tiles):
    """Autotune configs from (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); a single small one when interpreting
    (the interpreter cannot autotune several configs, and small tiles keep it fast)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles]


# (BLOCK_M: positions, BLOCK_N: output channels, BLOCK_K: input channels, warps, stages); free of register
# spills for sm_90 in bf16/fp16 (benchmarks/triton_compile_check.py), fp32 spills a little in some
_CONV_TILES = [(128, 64, 32, 4, 4), (64, 64, 32, 4, 4), (128, 128, 32, 8, 3), (64, 32, 64, 4, 3),
               (64, 128, 32, 8, 3)]
# (BLOCK_M: positions reduced over, BLOCK_N: output channels, BLOCK_K: input channels, warps, stages)
_WGRAD_TILES = [(64, 64, 64, 4, 3), (32, 64, 64, 4, 4), (64, 128, 64, 8, 3), (128, 64, 32, 4, 3)]
_CONV_KEY = ["C", "OC", "OH", "OW", "KK", "n", "c_out", "c_in", "MIX"]


@triton.jit
def _mix_tile(a_ptr, sak, e_ptr, sen, e_offs, e_mask, n, ROWS: tl.constexpr, COLS: tl.constexpr,
              ACC_DTYPE: tl.constexpr):
    """Σ_k a[k] · E[k][tile] for one mixture: a [n] at a_ptr (stride sak), the tile's offsets e_offs inside a cell."""
    w = tl.zeros([ROWS, COLS], dtype=ACC_DTYPE)
    for k in range(n):
        a = tl.load(a_ptr + k * sak).to(ACC_DTYPE)
        e = tl.load(e_ptr + k * sen + e_offs, mask=e_mask, other=0.0).to(ACC_DTYPE)
        w += a * e
    return w


@triton.autotune(configs=_configs(_CONV_TILES), key=_CONV_KEY)
@triton.jit
def kw_conv_fwd_kernel(
    x_ptr, attn_ptr, e_ptr, w_ptr, bias_ptr, y_ptr,
    C, H, W, OC, OH, OW, n, c_out, c_in, GO, GI, CK, KW, KK,
    sxb, sxc, sxh, sxw, sab, saj, sak, sen, sep, seq, sek,
    swb, swt, swo, swc, syb, syo, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    HAS_BIAS: tl.constexpr, MIX: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    # output-channel tile inside output block go
    p_tiles = tl.cdiv(c_out, BLOCK_N)
    go = pid_n // p_tiles
    offs_p = (pid_n % p_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_p = offs_p < c_out
    offs_o = go * c_out + offs_p
    # output-position tile
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < OH * OW
    oh = offs_m // OW
    ow = offs_m % OW
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for t in range(KK):
        s = t // CK
        ck = t % CK
        # input rows read at kernel position t, with the padding mask
        ih = oh * stride_h - pad_h + (t // KW) * dil_h
        iw = ow * stride_w - pad_w + (t % KW) * dil_w
        valid_m = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_rows = x_ptr + b * sxb + ih * sxh + iw * sxw
        for gi in range(GI):
            j = (s * GO + go) * GI + gi
            for q0 in range(0, c_in, BLOCK_K):
                offs_q = q0 + tl.arange(0, BLOCK_K)
                mask_q = offs_q < c_in
                offs_c = gi * c_in + offs_q
                xt = tl.load(x_rows[:, None] + offs_c[None, :] * sxc, mask=valid_m[:, None] & mask_q[None, :],
                             other=0.0)
                mask_w = mask_q[:, None] & mask_p[None, :]
                if MIX:
                    # W^T tile [q, p] mixed in registers from the warehouse and attn[b, j]
                    wt = _mix_tile(attn_ptr + b * sab + j * saj, sak, e_ptr,  sen,
                                   offs_q[:, None] * seq + offs_p[None, :] * sep + ck * sek, mask_w, n,
                                   BLOCK_K, BLOCK_N, ACC_DTYPE)
                else:
                    wt = tl.load(w_ptr + b * swb + t * swt + offs_c[:, None] * swc + offs_o[None, :] * swo,
                                 mask=mask_w, other=0.0)
                acc = tl.dot(xt, wt.to(xt.dtype), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=mask_p, other=0.0).to(ACC_DTYPE)[None, :]
    y_ptrs = y_ptr + b * syb + offs_o[None, :] * syo + (oh * syh + ow * syw)[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_p[None, :])


@triton.autotune(configs=_configs(_CONV_TILES), key=_CONV_KEY)
@triton.jit
def kw_conv_dx_kernel(
    dy_ptr, attn_ptr, e_ptr, w_ptr, dx_ptr,
    C, H, W, OC, OH, OW, n, c_out, c_in, GO, GI, CK, KW, KK,
    sdb, sdo, sdh, sdw, sab, saj, sak, sen, sep, seq, sek,
    swb, swt, swo, swc, sxb, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    MIX: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # BLOCK_M: input positions, BLOCK_N: input channels (the output tile), BLOCK_K: output channels (reduced)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    # input-channel tile inside input block gi
    q_tiles = tl.cdiv(c_in, BLOCK_N)
    gi = pid_n // q_tiles
    offs_q = (pid_n % q_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_q = offs_q < c_in
    offs_c = gi * c_in + offs_q
    # input-position tile
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < H * W
    ih = offs_m // W
    iw = offs_m % W
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for t in range(KK):
        s = t // CK
        ck = t % CK
        # the output position that read (ih, iw) at kernel position t, if any
        th = ih + pad_h - (t // KW) * dil_h
        tw = iw + pad_w - (t % KW) * dil_w
        th_c = tl.where(th >= 0, th, 0)
        tw_c = tl.where(tw >= 0, tw, 0)
        oh = th_c // stride_h
        ow = tw_c // stride_w
        valid_m = mask_m & (th >= 0) & (tw >= 0) & (th_c % stride_h == 0) & (tw_c % stride_w == 0) \
            & (oh < OH) & (ow < OW)
        dy_rows = dy_ptr + b * sdb + oh * sdh + ow * sdw
        for go in range(GO):
            j = (s * GO + go) * GI + gi
            for p0 in range(0, c_out, BLOCK_K):
                offs_p = p0 + tl.arange(0, BLOCK_K)
                mask_p = offs_p < c_out
                offs_o = go * c_out + offs_p
                dyt = tl.load(dy_rows[:, None] + offs_o[None, :] * sdo, mask=valid_m[:, None] & mask_p[None, :],
                              other=0.0)
                mask_w = mask_p[:, None] & mask_q[None, :]
                if MIX:
                    # W tile [p, q] mixed in registers
                    wt = _mix_tile(attn_ptr + b * sab + j * saj, sak, e_ptr, sen,
                                   offs_p[:, None] * sep + offs_q[None, :] * seq + ck * sek, mask_w, n,
                                   BLOCK_K, BLOCK_N, ACC_DTYPE)
                else:
                    wt = tl.load(w_ptr + b * swb + t * swt + offs_o[:, None] * swo + offs_c[None, :] * swc,
                                 mask=mask_w, other=0.0)
                acc = tl.dot(dyt, wt.to(dyt.dtype), acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    dx_ptrs = dx_ptr + b * sxb + offs_c[None, :] * sxc + (ih * sxh + iw * sxw)[:, None]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_q[None, :])


@triton.autotune(configs=_configs(_WGRAD_TILES), key=["C", "OC", "OH", "OW", "KK", "c_out", "c_in"])
@triton.jit
def kw_conv_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr,
    C, H, W, OC, OH, OW, c_out, c_in, GO, GI, CK, KW, KK,
    sxb, sxc, sxh, sxw, sdb, sdo, sdh, sdw,
    swb, swj, swp, swq, swk,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # BLOCK_M: output positions (reduced), BLOCK_N: output channels p, BLOCK_K: input channels q
    pid_pq = tl.program_id(0)
    pid_tile = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    q_tiles = tl.cdiv(c_in, BLOCK_K)
    offs_p = (pid_pq // q_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_q = (pid_pq % q_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_p = offs_p < c_out
    mask_q = offs_q < c_in
    # which kernel position t and cell blocks (go, gi) this program covers, and its mixture j
    gi = pid_tile % GI
    go = (pid_tile // GI) % GO
    t = pid_tile // (GI * GO)
    s = t // CK
    ck = t % CK
    j = (s * GO + go) * GI + gi
    offs_o = go * c_out + offs_p
    offs_c = gi * c_in + offs_q
    kh = t // KW
    kw = t % KW
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=ACC_DTYPE)
    for m0 in range(0, OH * OW, BLOCK_M):
        # dy tile [p, positions] and the x tile [positions, q] read at kernel position t
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < OH * OW
        oh = offs_m // OW
        ow = offs_m % OW
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        valid_m = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        dyt = tl.load(dy_ptr + b * sdb + offs_o[:, None] * sdo + (oh * sdh + ow * sdw)[None, :],
                      mask=mask_p[:, None] & mask_m[None, :], other=0.0)
        xt = tl.load(x_ptr + b * sxb + (ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc,
                     mask=valid_m[:, None] & mask_q[None, :], other=0.0)
        acc = tl.dot(dyt, xt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    dw_ptrs = dw_ptr + b * swb + j * swj + offs_p[:, None] * swp + offs_q[None, :] * swq + ck * swk
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_q[None, :])
