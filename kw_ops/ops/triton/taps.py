"""Tap geometry shared by the conv kernels (conv_kernels.py, grouped_kernels.py), per spatial axis (1-D runs as H = 1).

Forward and weight gradient: output position o reads input position o·stride - pad + k·dil at tap k
(`tap_inputs`, with the padding mask). Input gradient, by stride phase: the input positions i ≡ r
(mod stride) of one phase r read only the taps t with (r + pad - t·dil) ≡ 0
(mod stride), and at such a tap the output position that read i is exactly (i + pad - t·dil) / stride. A
program covers a tile of one phase's positions: `stride_phase_tile` gives the tile, `phase_tap` whether a tap
reaches the phase and the output positions it reads there.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def stride_phase_tile(pid_m, H, W, stride_h, stride_w, BLOCK_M: tl.constexpr):
    """Program pid_m's phase (rh, rw) and its tile of input positions ih = rh + i·stride_h, iw = rw + j·stride_w
    (row-major over the phase's grid), with the mask of the positions inside the input."""
    phase_w = tl.cdiv(W, stride_w)
    phase_positions = tl.cdiv(H, stride_h) * phase_w
    phase_tiles = tl.cdiv(phase_positions, BLOCK_M)
    phase = pid_m // phase_tiles
    rh = phase // stride_w
    rw = phase % stride_w
    offs_m = (pid_m % phase_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    ih = rh + (offs_m // phase_w) * stride_h
    iw = rw + (offs_m % phase_w) * stride_w
    mask_m = (offs_m < phase_positions) & (ih < H) & (iw < W)
    return rh, rw, ih, iw, mask_m


@triton.jit
def phase_tap(rh, rw, ih, iw, mask_m, kh, kw, KH, KW, OH, OW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w):
    """Whether tap (kh, kw) reaches phase (rh, rw), and the output positions (oh, ow) that read (ih, iw) at it
    with their mask (valid only where the tap reaches the phase)."""
    # (r + pad - k·dil) a multiple of the stride, kept non-negative
    tap_h = (rh + pad_h + stride_h * (KH - 1) * dil_h - kh * dil_h) % stride_h == 0
    tap_w = (rw + pad_w + stride_w * (KW - 1) * dil_w - kw * dil_w) % stride_w == 0
    th = ih + pad_h - kh * dil_h
    tw = iw + pad_w - kw * dil_w
    oh = tl.where(th >= 0, th, 0) // stride_h
    ow = tl.where(tw >= 0, tw, 0) // stride_w
    valid_m = mask_m & (th >= 0) & (tw >= 0) & (oh < OH) & (ow < OW)
    return tap_h & tap_w, oh, ow, valid_m


@triton.jit
def tap_inputs(oh, ow, mask_m, kh, kw, H, W, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w):
    """The input positions (ih, iw) that output positions (oh, ow) read at tap (kh, kw), and their mask
    (inside the output tile and the unpadded input)."""
    ih = oh * stride_h - pad_h + kh * dil_h
    iw = ow * stride_w - pad_w + kw * dil_w
    valid_m = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return ih, iw, valid_m
