"""The public KW op: argument checks and normalisation in front of the implementation."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .backends import select_backend
from .op import kw_conv_op

__all__ = ["kw_conv", "normalize_tuple"]


def normalize_tuple(value, dims: int, name: str) -> tuple[int, ...]:
    """An int or a sequence of `dims` ints as a tuple of `dims` ints (clear error otherwise)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * dims
    if isinstance(value, (tuple, list)) and len(value) == 1 and dims != 1:
        value = tuple(value) * dims
    if isinstance(value, (tuple, list)) and len(value) == dims and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return tuple(value)
    raise ValueError(f"{name}: expected an int or {dims} ints, got {value!r}")


def _check(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation, groups):
    for name, t in (("x", x), ("attn", attn), ("warehouse", warehouse)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"kw_conv: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"kw_conv: {name} must be floating point, got {t.dtype}")
    dims = len(kernel_size)
    if x.dim() != dims + 2:
        raise ValueError(f"kw_conv: x must be [B, C_in, *{dims} spatial dims] ({dims + 2}-D), "
                         f"got shape {tuple(x.shape)}")
    if warehouse.dim() != dims + 3:
        raise ValueError(
            f"kw_conv: warehouse must be [n, c_out, c_in, *{dims} cell dims], got shape {tuple(warehouse.shape)}"
        )
    if attn.dim() != 3:
        raise ValueError(f"kw_conv: attn must be [B, m, n], got shape {tuple(attn.shape)}")
    if not (x.dtype == attn.dtype == warehouse.dtype):
        raise TypeError(
            f"kw_conv: x, attn and warehouse must share a dtype, got {x.dtype}, {attn.dtype}, {warehouse.dtype}"
        )
    devices = {t.device for t in (x, attn, warehouse)}
    if len(devices) != 1:
        raise ValueError(f"kw_conv: x, attn and warehouse must be on one device, got {sorted(map(str, devices))}")
    batch, channels = x.shape[:2]
    if groups < 1 or channels % groups or out_channels % groups:
        raise ValueError(
            f"kw_conv: groups={groups} must divide in_channels={channels} and out_channels={out_channels}"
        )
    n, c_out, c_in, *cell_k = warehouse.shape
    in_per_group = channels // groups
    if out_channels % c_out or in_per_group % c_in:
        raise ValueError(
            f"kw_conv: a weight [{out_channels}, {in_per_group}, {kernel_size}] cannot be tiled by cells "
            f"[{c_out}, {c_in}, {tuple(cell_k)}] of warehouse shape {tuple(warehouse.shape)}"
        )
    if tuple(cell_k) != tuple(kernel_size) and any(c != 1 for c in cell_k):
        raise ValueError(
            f"kw_conv: cell kernel {tuple(cell_k)} must be all ones (spatial partition) or the kernel {kernel_size}"
        )
    m = math.prod(kernel_size) // math.prod(cell_k) * (out_channels // c_out) * (in_per_group // c_in)
    if tuple(attn.shape) != (batch, m, n):
        raise ValueError(
            f"kw_conv: attn must be [B, m, n] = [{batch}, {m}, {n}] for this layer and warehouse, "
            f"got {tuple(attn.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"kw_conv: bias must be [{out_channels}], got {tuple(bias.shape)}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"kw_conv: bias dtype {bias.dtype} differs from x dtype {x.dtype}")
    for name, values, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if any(v < low for v in values):
            raise ValueError(f"kw_conv: {name} must be >= {low}, got {values}")
    for size, k, p, d in zip(x.shape[2:], kernel_size, padding, dilation):
        if size + 2 * p < d * (k - 1) + 1:
            raise ValueError(
                f"kw_conv: input spatial size {tuple(x.shape[2:])} with padding {padding} is smaller than the "
                f"dilated kernel {kernel_size} (dilation {dilation})"
            )


def kw_conv(x: torch.Tensor, attn: torch.Tensor, warehouse: torch.Tensor, bias: torch.Tensor | None = None, *,
            out_channels: int, kernel_size: Sequence[int] | int, stride: Sequence[int] | int = 1,
            padding: Sequence[int] | int = 0, dilation: Sequence[int] | int = 1, groups: int = 1,
            formulation: str | None = None, backend: str | None = None) -> torch.Tensor:
    """KernelWarehouse convolution: per-sample kernels mixed from a shared warehouse, then convolved.

    x          [B, C_in, *size]              any memory format
    attn       [B, m, n]                     α after CAF and temperature, zero-cell column dropped
    warehouse  [n, c_out, c_in, *cell_k]     the shared warehouse
    bias       [C_out] or None
    returns    [B, C_out, *out_size]

    Mixture j = (s * GO + go) * GI + gi of sample b fills output block go, input block gi and
    spatial cell s of that sample's kernel (SPEC §2). `formulation` forces 'grouped' or 'gemm'
    (see kw_ops.ops.torch_impl); the default picks by shape. `backend` forces 'torch', 'triton', 'cpp' or
    'cuda' for this call ('auto' or None: use_backend() / KW_OPS_BACKEND / automatic, see
    kw_ops.ops.backends). Differentiable in x, attn, warehouse and bias (hand-written backward).

    >>> x, attn, wh = torch.randn(2, 8, 5, 5), torch.randn(2, 9, 4), torch.randn(4, 8, 8, 1, 1)
    >>> kw_conv(x, attn, wh, out_channels=8, kernel_size=3, padding=1).shape
    torch.Size([2, 8, 5, 5])
    """
    if isinstance(kernel_size, int):
        dims = warehouse.dim() - 3 if isinstance(warehouse, torch.Tensor) else -1
    else:
        dims = len(kernel_size)
    if dims not in (1, 2, 3):
        got = tuple(warehouse.shape) if isinstance(warehouse, torch.Tensor) else type(warehouse).__name__
        raise ValueError(f"kw_conv: warehouse must be [n, c_out, c_in, *cell_k] with 1-3 cell dims, got {got}")
    kernel_size = normalize_tuple(kernel_size, dims, "kernel_size")
    stride = normalize_tuple(stride, dims, "stride")
    padding = normalize_tuple(padding, dims, "padding")
    dilation = normalize_tuple(dilation, dims, "dilation")
    _check(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation, groups)
    if formulation is not None and formulation not in ("grouped", "gemm"):
        raise ValueError(f"kw_conv: formulation must be None, 'grouped' or 'gemm', got {formulation!r}")
    geometry = {"out_channels": out_channels, "kernel_size": kernel_size, "stride": stride, "padding": padding,
                "dilation": dilation, "groups": groups}
    name = select_backend(x, attn, warehouse, bias, backend, geometry)
    return kw_conv_op(x, attn, warehouse, bias, out_channels, list(kernel_size), list(stride), list(padding),
                      list(dilation), groups, name, formulation or "")
