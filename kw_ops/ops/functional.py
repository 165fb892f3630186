"""The public KW op: argument checks and normalisation in front of the implementation."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import check_kw_conv_args
from .dispatch import Call, compiled_choice, decide, run_formulation
from .export_impl import exporting
from .verify import current_layer

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


def kw_conv(x: torch.Tensor, attn: torch.Tensor, warehouse: torch.Tensor, bias: torch.Tensor | None = None, *,
            out_channels: int, kernel_size: Sequence[int] | int, stride: Sequence[int] | int = 1,
            padding: Sequence[int] | int = 0, dilation: Sequence[int] | int = 1, groups: int = 1,
            formulation: str | None = None, backend: str | None = None, name: str | None = None) -> torch.Tensor:
    """KernelWarehouse convolution: per-sample kernels mixed from a shared warehouse, then convolved.

    x          [B, C_in, *size]              any memory format
    attn       [B, m, n]                     α after CAF and temperature, zero-cell column dropped
    warehouse  [n, c_out, c_in, *cell_k]     the shared warehouse
    bias       [C_out] or None
    returns    [B, C_out, *out_size]

    Mixture j = (s * GO + go) * GI + gi of sample b fills output block go, input block gi and
    spatial cell s of that sample's kernel (docs/semantics.md §2). How it is computed is decided per call by
    kw_ops.ops.dispatch (the released formulation, the registered op on a backend, the export formulation),
    by estimated cost. `backend` forces 'torch', 'triton' or 'cpp' for this call ('auto' or None:
    use_backend() / KW_OPS_BACKEND / automatic); `formulation` forces the op's 'grouped' or 'gemm' path
    (see kw_ops.ops.torch_impl). `name` names the caller in messages (KW layers pass their module path).
    Differentiable in x, attn, warehouse and bias (hand-written backward), to any
    order (double backward), under torch.func (grad, vjp, jacrev, jvp, jacfwd, hessian) and torch.vmap. The
    output is channels_last where x is (as nn.Conv2d).

    >>> x, attn, wh = torch.randn(2, 8, 5, 5), torch.randn(2, 9, 4), torch.randn(4, 8, 8, 1, 1)
    >>> kw_conv(x, attn, wh, out_channels=8, kernel_size=3, padding=1).shape
    torch.Size([2, 8, 5, 5])
    """
    if isinstance(kernel_size, int):  # as F.conv*d: the spatial rank comes from x
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"kw_conv: x must be a tensor, got {type(x).__name__}")
        dims = x.dim() - 2
        if dims not in (1, 2, 3):
            raise ValueError(f"kw_conv: x must be [B, C_in, *size] with 1-3 spatial dims, got shape {tuple(x.shape)}")
        if isinstance(warehouse, torch.Tensor) and warehouse.dim() - 3 != dims:
            raise ValueError(f"kw_conv: x must be [B, C_in, *size] and warehouse [n, c_out, c_in, *cell_k] with one "
                             f"cell dim per spatial dim, got x {tuple(x.shape)} ({dims} spatial) and warehouse "
                             f"{tuple(warehouse.shape)} ({warehouse.dim() - 3} cell)")
    elif isinstance(kernel_size, (tuple, list)) and 1 <= len(kernel_size) <= 3:
        dims = len(kernel_size)
    else:
        raise ValueError(f"kw_conv: kernel_size must be an int or 1-3 ints, got {kernel_size!r}")
    kernel_size = normalize_tuple(kernel_size, dims, "kernel_size")
    stride = normalize_tuple(stride, dims, "stride")
    padding = normalize_tuple(padding, dims, "padding")
    dilation = normalize_tuple(dilation, dims, "dilation")
    check_kw_conv_args(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation, groups)
    if formulation is not None and formulation not in ("grouped", "gemm"):
        raise ValueError(f"kw_conv: formulation must be None, 'grouped' or 'gemm', got {formulation!r}")
    geometry = {"out_channels": out_channels, "kernel_size": kernel_size, "stride": stride, "padding": padding,
                "dilation": dilation, "groups": groups}
    if torch.compiler.is_compiling():  # the op, its backend decided when it runs: one graph for every batch size
        chosen = "export" if exporting() else compiled_choice(backend, formulation)
        return run_formulation(chosen, x, attn, warehouse, bias, out_channels, kernel_size, stride, padding,
                               dilation, groups)
    call = Call.of(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups)
    decision = decide(call, backend, formulation, (x, attn, warehouse, bias, geometry), name=name)
    with current_layer(name):
        return run_formulation(decision.formulation, x, attn, warehouse, bias, out_channels, kernel_size, stride,
                               padding, dilation, groups)
