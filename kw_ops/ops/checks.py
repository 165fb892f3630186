"""Argument checks of the KW op, shared by the public functional and the registered op itself.

A direct `torch.ops.kw_ops.kw_conv` call (or its fake kernel under torch.compile) goes through the same
checks as `kw_ops.ops.kw_conv`, so bad shapes end in an error that names the argument, what was expected
and what it got, never in a reshape error deep inside a backend.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["check_kw_conv_args"]


def _check_geometry(out_channels, kernel_size, stride, padding, dilation, groups) -> None:
    if not 1 <= len(kernel_size) <= 3:
        raise ValueError(f"kw_conv: kernel_size must have 1-3 entries (one per spatial dim), got {list(kernel_size)}")
    for name, values in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(values) != len(kernel_size):
            raise ValueError(f"kw_conv: {name} must have {len(kernel_size)} entries like kernel_size "
                             f"{list(kernel_size)}, got {list(values)}")
    if out_channels < 1:
        raise ValueError(f"kw_conv: out_channels must be >= 1, got {out_channels}")
    for name, values, low in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                              ("dilation", dilation, 1)):
        if any(v < low for v in values):
            raise ValueError(f"kw_conv: {name} must be >= {low}, got {list(values)}")
    if groups < 1:
        raise ValueError(f"kw_conv: groups must be >= 1, got {groups}")


def _check_tensors(x, attn, warehouse, bias, dims: int) -> None:
    for name, t in (("x", x), ("attn", attn), ("warehouse", warehouse)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"kw_conv: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"kw_conv: {name} must be floating point, got {t.dtype}")
    if x.dim() != dims + 2:
        raise ValueError(f"kw_conv: x must be [B, C_in, *{dims} spatial dims] ({dims + 2}-D) for a "
                         f"{dims}-D kernel, got shape {tuple(x.shape)}")
    if warehouse.dim() != dims + 3:
        raise ValueError(f"kw_conv: warehouse must be [n, c_out, c_in, *{dims} cell dims] ({dims + 3}-D) for a "
                         f"{dims}-D convolution, got shape {tuple(warehouse.shape)}")
    if attn.dim() != 3:
        raise ValueError(f"kw_conv: attn must be [B, m, n], got shape {tuple(attn.shape)}")
    if not (x.dtype == attn.dtype == warehouse.dtype):
        raise TypeError(
            f"kw_conv: x, attn and warehouse must share a dtype, got {x.dtype}, {attn.dtype}, {warehouse.dtype}"
        )
    devices = {t.device for t in (x, attn, warehouse)}
    if len(devices) != 1:
        raise ValueError(f"kw_conv: x, attn and warehouse must be on one device, got {sorted(map(str, devices))}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"kw_conv: bias must be a tensor or None, got {type(bias).__name__}")
        if bias.device != x.device:
            raise ValueError(f"kw_conv: bias must be on x's device {x.device}, got {bias.device}")
        if bias.dtype != x.dtype:
            raise TypeError(f"kw_conv: bias dtype {bias.dtype} differs from x dtype {x.dtype}")


def check_kw_conv_args(x: torch.Tensor, attn: torch.Tensor, warehouse: torch.Tensor, bias: torch.Tensor | None,
                       out_channels: int, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                       dilation: Sequence[int], groups: int) -> None:
    """Raise a ValueError/TypeError naming the argument, the expected and the actual value; None if all is well.

    x [B, C_in, *size], attn [B, m, n], warehouse [n, c_out, c_in, *cell_k], bias [out_channels] or None;
    kernel_size, stride, padding, dilation: one int per spatial dim (already normalised).
    """
    _check_geometry(out_channels, kernel_size, stride, padding, dilation, groups)
    _check_tensors(x, attn, warehouse, bias, len(kernel_size))
    batch, channels = x.shape[:2]
    if channels % groups or out_channels % groups:
        raise ValueError(
            f"kw_conv: groups={groups} must divide in_channels={channels} and out_channels={out_channels}"
        )
    n, c_out, c_in, *cell_k = warehouse.shape
    in_per_group = channels // groups
    if out_channels % c_out or in_per_group % c_in:
        raise ValueError(
            f"kw_conv: a weight [{out_channels}, {in_per_group}, {list(kernel_size)}] cannot be tiled by cells "
            f"[{c_out}, {c_in}, {tuple(cell_k)}] of warehouse shape {tuple(warehouse.shape)}"
        )
    if tuple(cell_k) != tuple(kernel_size) and any(c != 1 for c in cell_k):
        raise ValueError(f"kw_conv: cell kernel {tuple(cell_k)} must be all ones (spatial partition) or the kernel "
                         f"{tuple(kernel_size)}")
    m = math.prod(kernel_size) // math.prod(cell_k) * (out_channels // c_out) * (in_per_group // c_in)
    if tuple(attn.shape) != (batch, m, n):
        raise ValueError(
            f"kw_conv: attn must be [B, m, n] = [{batch}, {m}, {n}] for this layer and warehouse, "
            f"got {tuple(attn.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"kw_conv: bias must be [{out_channels}], got {tuple(bias.shape)}")
    for size, k, p, d in zip(x.shape[2:], kernel_size, padding, dilation):
        if size + 2 * p < d * (k - 1) + 1:
            raise ValueError(
                f"kw_conv: input spatial size {tuple(x.shape[2:])} with padding {list(padding)} is smaller than the "
                f"dilated kernel {list(kernel_size)} (dilation {list(dilation)})"
            )
