"""The export formulation of the KW op: batched MatMuls over kernel offsets, dynamic batch.

The released code cannot be exported with a dynamic batch: its convolution has groups = B, and
ONNX's Conv takes a static group count. While exporting or tracing, every KW layer computes

    y[b] = Σ_s W_b[:, :, s] @ x_s[b]        (x_s: the input window at kernel offset s, [C, HW'])

with one batched MatMul per kernel offset (per group) and static slices of the padded input:
ordinary ONNX ops whose batch dimension stays symbolic. Slower than the op; used for export only.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import threading

import torch
import torch.nn.functional as F

from .torch_impl import assemble_kernels, conv_output_size, output_memory_format

__all__ = ["export_conv", "exporting", "export_mode"]

# `export_mode`: whether this thread is inside export_mode() (absent: not). Thread-local, not a ContextVar,
# which torch.compile(fullgraph=True) cannot trace.
_THREAD = threading.local()


def exporting() -> bool:
    """True inside `export_mode()` (of this thread), an ONNX export, torch.export or TorchScript tracing."""
    return (getattr(_THREAD, "export_mode", False) or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_exporting())


@contextlib.contextmanager
def export_mode():
    """Run KW layers in the export formulation inside the block (e.g. around torch.export.export).

    Blocks nest and hold only in the thread that enters them.
    """
    previous = getattr(_THREAD, "export_mode", False)
    _THREAD.export_mode = True
    try:
        yield
    finally:
        _THREAD.export_mode = previous


def export_conv(x: torch.Tensor, attn: torch.Tensor, warehouse: torch.Tensor, bias: torch.Tensor | None,
                out_channels: int, kernel_size, stride, padding, dilation, groups: int) -> torch.Tensor:
    """KW convolution from batched MatMuls over kernel offsets; same contract as kw_ops.ops.kw_conv.

    x [B, C, *size], attn [B, m, n], warehouse [n, c_out, c_in, *cell_k] -> [B, O, *out] (channels_last where x is)
    """
    dims = len(kernel_size)
    channels, size = x.shape[1], x.shape[2:]
    in_per_group, out_per_group = channels // groups, out_channels // groups
    weight = assemble_kernels(attn, warehouse, out_channels, in_per_group, kernel_size)  # [B, O, I, *k]
    weight = weight.reshape(-1, groups, out_per_group, in_per_group, math.prod(kernel_size))
    padded = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)]) if any(padding) else x
    out = conv_output_size(size, kernel_size, stride, padding, dilation)
    y = None
    for offset, position in enumerate(itertools.product(*map(range, kernel_size))):
        window = padded
        for d in range(dims):
            start = position[d] * dilation[d]
            window = window.narrow(2 + d, start, (out[d] - 1) * stride[d] + 1)
            if stride[d] > 1:
                index = torch.arange(0, (out[d] - 1) * stride[d] + 1, stride[d], device=x.device)
                window = window.index_select(2 + d, index)
        cols = window.reshape(-1, groups, in_per_group, math.prod(out))
        term = torch.matmul(weight[..., offset], cols)
        y = term if y is None else y + term
    y = y.reshape(-1, out_channels, *out)
    if bias is not None:
        y = y + bias.view(1, -1, *([1] * dims))
    return y.contiguous(memory_format=output_memory_format(x))
