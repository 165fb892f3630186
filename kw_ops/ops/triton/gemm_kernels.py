"""Triton GEMM-shaped kernels of the KW op: kernel mixing, the attention/warehouse contractions, dbias.

- `kw_mix_kernel` (phase 1 of the two-phase forward and input gradient): the mixing GEMM
  attn[(b, j), k] @ E[k, (p, q, ck)] on tensor cores for a chunk of samples, stored straight into the
  per-sample kernel layout the conv kernels read, W[b, t, o, c] with t = s*CK + ck, o = go*c_out + p,
  c = gi*c_in + q (rows (b, j = (s*GO + go)*GI + gi) and columns (p, q, ck) split into row and column
  address parts, so the scatter costs nothing). fp32 accumulation, stored in the op's dtype.
  A block of the cell (launch.py's blocked mode): cell rows P0..P0+c_out-1 and columns Q0..Q0+c_in-1 of every
  mixture (the launcher passes the block's row and column counts as c_out and c_in), stored as W[b, t, o', c']
  with o' = go*c_out + p, c' = gi*c_in + q: the block's output (input) channels, contiguous. Whole cell:
  P0 = Q0 = 0.
- `kw_matmul_kernel`: C_split[M, N] = A[M, K_split] @ B[K_split, N] with any strides, fp32 (fp64)
  partial sums per K split, summed by the launcher. Used for dattn = dW @ E^T (M = B*m, N = n, K = the
  cell size: split-K gives the parallelism) and dE = attn^T @ dW (M = n, N = cell size, K = B*m).
- `kw_bias_grad_kernel`: per-sample partial sums of dy over positions, [B, OC] (the launcher sums over B).

Layouts: every operand through strides; outputs of `kw_matmul_kernel` are [SPLIT, M, N] contiguous.
Limits: operands of one dot share a dtype (the launcher keeps dW in the op's dtype, like the torch path).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tuning import autotune

__all__ = ["kw_mix_kernel", "kw_matmul_kernel", "kw_bias_grad_kernel"]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); chosen free of register spills for sm_90 in bf16
# (benchmarks/triton_compile_check.py prints registers and stack per config)
_MIX_TILES = [(64, 64, 32, 4, 3), (64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (32, 64, 16, 4, 3), (16, 128, 32, 4, 3)]
_MATMUL_TILES = [(64, 64, 32, 4, 3), (64, 64, 64, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3),
                 (128, 128, 32, 8, 3)]


@autotune(_MIX_TILES, ["cols", "n", "RB", "INPUT_PRECISION"], sizes=("rows", "cols", "n"))
@triton.jit
def kw_mix_kernel(
    attn_ptr, e_ptr, w_ptr,
    rows, cols, n, m, c_out, c_in, GO, GI, CK, RB, P0, Q0,
    sab, saj, sak, sen, sep, seq, sek, swb, swt, swo, swc,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # rows r = b*m + j of the attention, columns (p, q, ck) of a cell
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_col = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = offs_r < rows
    mask_col = offs_col < cols
    b = (offs_r // m).to(tl.int64)
    j = offs_r % m
    p = offs_col // (c_in * CK)
    q = (offs_col // CK) % c_in
    ck = offs_col % CK
    a_rows = attn_ptr + b * sab + j * saj
    e_cols = e_ptr + (P0 + p) * sep + (Q0 + q) * seq + ck * sek
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for k0 in range(0, n, BLOCK_K):
        # attention [rows, k] @ warehouse [k, cols]
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < n
        a = tl.load(a_rows[:, None] + offs_k[None, :] * sak, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        e = tl.load(e_cols[None, :] + offs_k[:, None] * sen, mask=mask_k[:, None] & mask_col[None, :], other=0.0)
        acc = tl.dot(a, e, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    # scatter into W[b, t, o, c]: a row part (b, s, go, gi) plus a column part (ck, p, q)
    s = j // (GO * GI)
    go = (j // GI) % GO
    gi = j % GI
    row_off = b * swb + (s * CK) * swt + (go * c_out) * swo + (gi * c_in) * swc
    col_off = ck * swt + p * swo + q * swc
    tl.store(w_ptr + row_off[:, None] + col_off[None, :], acc.to(w_ptr.dtype.element_ty),
             mask=mask_r[:, None] & mask_col[None, :])


@autotune(_MATMUL_TILES, ["N", "split_len", "MB", "KB", "INPUT_PRECISION"], sizes=("M", "N", None))
@triton.jit
def kw_matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K, split_len, MB, KB,
    sam, sak, sbk, sbn, scs, scm, scn,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # this program's share of the reduction: [k_lo, k_hi)
    k_lo = split * split_len
    k_hi = tl.minimum(k_lo + split_len, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * sam + offs_k[None, :].to(tl.int64) * sak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None].to(tl.int64) * sbk + offs_n[None, :].to(tl.int64) * sbn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    c_ptrs = c_ptr + split.to(tl.int64) * scs + offs_m[:, None].to(tl.int64) * scm + offs_n[None, :] * scn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def kw_bias_grad_kernel(dy_ptr, out_ptr, OC, OW, positions, sdb, sdo, sdh, sdw, sob,
                        ACC_DTYPE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_o = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < OC
    acc = tl.zeros([BLOCK_O], dtype=ACC_DTYPE)
    for p0 in range(0, positions, BLOCK_P):
        # sum a [channels, positions] tile of dy over positions
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < positions
        pos_off = (offs_p // OW) * sdh + (offs_p % OW) * sdw
        tile = tl.load(dy_ptr + b * sdb + offs_o[:, None] * sdo + pos_off[None, :],
                       mask=mask_o[:, None] & mask_p[None, :], other=0.0)
        acc += tl.sum(tile.to(ACC_DTYPE), axis=1)
    tl.store(out_ptr + b * sob + offs_o, acc, mask=mask_o)
