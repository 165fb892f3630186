"""Launchers of the Triton KW kernels, with the normalised arguments of `kw_conv_torch` (twin signatures).

Entry points (the interface other modules and benchmarks use):

    kw_conv_triton_forward(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation,
                           groups, *, mode=None, input_precision=None, chunk_bytes=None) -> y
    kw_conv_triton_backward(dy, x, attn, warehouse, has_bias, out_channels, kernel_size, stride, padding,
                            dilation, groups, *, output_mask=(True,)*4, mode=None, input_precision=None,
                            chunk_bytes=None) -> (dx, dattn, dwarehouse, dbias)
    choose_mode(layer, element_size, direction) -> a name in MODES, by cost_model.py (KW_OPS_TRITON_MODE overrides)

MODES = cost_model.KERNEL_MODES, chosen per call and pass by `choose_mode` (the cost model):
- two_phase: per chunk of samples whose per-sample kernels fit KERNEL_CHUNK_BYTES (32 MiB), the mixing GEMM on
  tensor cores (K = n) writes each per-sample kernel once, then the conv kernels (forward; input gradient by
  stride phase) read it while it is in L2. Every chunk reads the whole warehouse slice of the layer again.
- blocked (groups = 1): per block of cell rows (forward: the output channels go*c_out + rows, every go) or cell
  columns (dx: the input channels gi*c_in + columns), the kernels of that block for ALL samples are mixed into one
  reused buffer and consumed at once by the conv kernel, which writes only the block's channels. The warehouse
  moves once per pass (a block reads only its rows or columns of it), and the block count is set by
  cost_model.blocked_plan: blocks within the L2 (cost_model.block_budget: 16 MiB on an H100) keep the kernels
  out of DRAM, larger blocks cost fewer launches (two per block). Where one row (column) for every sample
  exceeds the budget, blocks of one row run over chunks of samples.
`chunk_bytes` (default: the cost model's choice) caps one chunk's or block's kernels. The former "fused" mode
(every weight tile re-mixed on CUDA cores for every position tile) is gone: by the cost model
(docs/design.md §5) it is never the cheapest (issue 12).
groups != 1 (depthwise, grouped) runs the grouped kernels (grouped_kernels.py) on the same per-sample kernels.
The weight gradient (groups = 1) runs by slices of the cell's rows (`_wgrad_sliced`; rows per slice from
cost_model.wgrad_slice_rows: the dW of every sample and mixture for those rows fits KERNEL_CHUNK_BYTES, or
whole channel tiles where the cost model predicts that cheaper; chunk_bytes caps it): per slice the weight
gradient kernel writes dW [B, m, rows, c_in, CK], then dE[:, slice] = attn^T @ dW is complete in one GEMM
(K = B·m, written once into dE in the op's dtype) and dattn += dW @ E[:, slice]^T (fp32, B·m·n). dE is thus
never read back and summed over chunks of samples (the former sample chunks moved 3·n·cell·4 bytes of fp32 dE
per chunk). groups != 1 runs per chunk of samples: per-sample gradients of the grouped kernel, contracted into
dattn (split-K GEMM) and dE (GEMM, fp32 sum over chunks). Never B × the layer's weights in memory at once
beyond one slice, chunk or block (by default a block at most cost_model.BLOCK_MAX_BYTES; an explicit
chunk_bytes caps it instead). (Contracting inside the wgrad epilogue instead was weighed and left out: dE sums
over samples and mixtures, so an epilogue needs n·P·B/BB fp32 atomic adds or partials for a layer of P weights
and BB samples per program, n ≥ BB, against 3·B·P·2 bytes of L2 traffic here.)

2-byte dtypes run channels_last (NHWC) inside: x and dy are converted at the boundary when they come in
another layout, so the kernels' operand loads are contiguous along channels. Outputs are fresh contiguous
tensors (dx too), as in the torch path. fp32 dots use TF32 by default (as Triton, and as cuDNN
convolutions in PyTorch by default); set KW_OPS_TRITON_FP32_PRECISION=ieee (or tf32x3) or pass
input_precision= for full fp32.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton

from ..torch_impl import conv_output_size
from . import cost_model
from .capability import not_supported_reasons
from .conv_kernels import (OFFSET_BLOCK, STRIDED_BLOCK, WHOLE_LAYER, kw_conv_dx_kernel, kw_conv_fwd_kernel,
                           kw_conv_wgrad_kernel)
from .gemm_kernels import kw_bias_grad_kernel, kw_matmul_kernel, kw_mix_kernel
from .grouped_kernels import kw_grouped_dx_kernel, kw_grouped_fwd_kernel, kw_grouped_wgrad_kernel
from .tuning import bucket

__all__ = ["kw_conv_triton_forward", "kw_conv_triton_backward", "choose_mode", "MODES", "KERNEL_CHUNK_BYTES"]

MODES = cost_model.KERNEL_MODES
MODE_ENV = cost_model.MODE_ENV
FP32_PRECISION_ENV = "KW_OPS_TRITON_FP32_PRECISION"
DEFAULT_FP32_PRECISION = "tf32"
_PRECISIONS = ("tf32", "tf32x3", "ieee")
# Per-sample kernels (or per-sample weight gradients) of one chunk of samples: small enough to stay in
# L2 (50 MB on H100) beside the chunk's activations, so the conv kernels never read them back from DRAM.
# Defined in cost_model.py, which models this chunking.
KERNEL_CHUNK_BYTES = cost_model.KERNEL_CHUNK_BYTES


@dataclass(frozen=True)
class _Layer:
    """The 2-D geometry of one call (1-D runs with height 1) and its cell grid."""
    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    out_h: int
    out_w: int
    n: int
    c_out: int
    c_in: int
    grid_out: int   # GO
    grid_in: int    # GI
    cell_numel: int  # CK: 1 (spatial partition) or KH*KW (whole-kernel cells)
    kh: int
    kw: int
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    channels_last: bool = False   # x comes channels_last (2-byte dtypes then need no conversion)

    @property
    def kk(self) -> int:
        return self.kh * self.kw

    @property
    def m(self) -> int:
        return self.kk // self.cell_numel * self.grid_out * self.grid_in

    @property
    def in_per_group(self) -> int:
        return self.channels // self.groups

    @property
    def weight_numel(self) -> int:
        return self.out_channels * self.in_per_group * self.kk

    def conv_args(self):
        """The shape arguments shared by the conv kernels: C, H, W, O, OH, OW."""
        return self.channels, self.height, self.width, self.out_channels, self.out_h, self.out_w

    def cell_args(self):
        return self.c_out, self.c_in, self.grid_out, self.grid_in, self.cell_numel, self.kw, self.kk

    def conv_params(self):
        return (*self.stride, *self.padding, *self.dilation)

    def cost_shape(self, element_size: int) -> cost_model.ConvShape:
        """This call as the cost model's shape."""
        return cost_model.ConvShape(self.batch, self.channels, self.out_channels, (self.height, self.width),
                                    (self.out_h, self.out_w), (self.kh, self.kw), self.groups, self.n, self.m,
                                    element_size, channels_last=self.channels_last, cell_rows=self.c_out,
                                    cell_cols=self.c_in)


def _as_2d(x, warehouse, kernel_size, stride, padding, dilation):
    """1-D calls as 2-D ones with a unit height; warehouse as [n, c_out, c_in, CK]."""
    n, c_out, c_in = warehouse.shape[:3]
    cells = warehouse.reshape(n, c_out, c_in, -1)
    if len(kernel_size) == 1:
        return (x.unsqueeze(2), cells, (1, *kernel_size), (1, *stride), (0, *padding), (1, *dilation))
    return x, cells, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation)


def _layer(x4, cells, out_channels, kernel_size, stride, padding, dilation, groups) -> _Layer:
    batch, channels, height, width = x4.shape
    n, c_out, c_in, ck = cells.shape
    out = conv_output_size((height, width), kernel_size, stride, padding, dilation)
    channels_last = not x4.is_contiguous() and x4.is_contiguous(memory_format=torch.channels_last)  # as dispatch's
    return _Layer(batch, channels, height, width, out_channels, out[0], out[1], n, c_out, c_in,
                  out_channels // c_out, channels // groups // c_in, ck, kernel_size[0], kernel_size[1], stride,
                  padding, dilation, groups, channels_last)


def _check(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation, groups):
    reasons = not_supported_reasons(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation,
                                    groups)
    if reasons:
        raise NotImplementedError("kw_conv: the Triton backend cannot run this call: " + "; ".join(reasons))


def _empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every output and buffer of the launchers comes from here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _input_precision(dtype: torch.dtype, override: str | None) -> str:
    """tl.dot input precision: configurable for fp32 (default tf32); 'ieee' for 16-bit and fp64 operands, which
    tensor cores take as they are (ROCm compiles 'tf32' only on gfx942, so asking it for 16-bit dots broke
    every kernel on other AMD chips)."""
    if dtype != torch.float32:
        return "ieee"
    value = override or os.environ.get(FP32_PRECISION_ENV) or DEFAULT_FP32_PRECISION
    if value not in _PRECISIONS:
        raise ValueError(f"kw_conv triton: fp32 input precision must be one of {_PRECISIONS}, got {value!r}")
    return value


def _acc_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def choose_mode(layer: _Layer, element_size: int, direction: str = "forward") -> str:
    """The mode of MODES with the least predicted time for the forward or the input gradient ('dx') of `layer`.

    cost_model.py predicts each mode's time from the DRAM, L2, tensor-core and CUDA-core work of its kernels,
    with the peaks of KW_OPS_PEAKS (measured by benchmarks/gpu_check.py) or the H100 SXM datasheet.
    KW_OPS_TRITON_MODE overrides (and is checked against MODES).
    """
    return cost_model.triton_prediction(layer.cost_shape(element_size), direction).mode


def _resolve_mode(mode: str | None, layer: _Layer, element_size: int, direction: str) -> str:
    """The mode that runs: `mode`, or `choose_mode`'s; refused outside MODES. 'blocked' runs groups = 1 only:
    a grouped or depthwise layer asked for it runs two_phase."""
    mode = mode or choose_mode(layer, element_size, direction)
    if mode not in MODES:
        raise ValueError(f"kw_conv triton: mode must be one of {MODES}, got {mode!r}")
    return "two_phase" if mode == "blocked" and layer.groups != 1 else mode


def _blocks(layer: _Layer, element_size: int, direction: str, chunk_bytes: int | None):
    """The blocked mode's (width, samples per chunk, buffer elements): cost_model.blocked_plan on this call
    (chunk_bytes caps one block's kernels); width in cell rows (forward) or cell columns (dx)."""
    shape = layer.cost_shape(element_size)
    width, chunk = cost_model.blocked_plan(shape, direction, budget=chunk_bytes)
    return width, chunk, chunk * width * cost_model.block_units(shape, direction)[1]


def _block_steps(units: int, width: int, batch: int, chunk: int):
    """(first unit, units, b0, b1) of every block of the blocked mode: units (cell rows or columns) outer, chunks of
    samples inner, the order the cost model counts (a block's warehouse slice stays in L2 across its chunks)."""
    for u0 in range(0, units, width):
        for b0 in range(0, batch, chunk):
            yield u0, min(width, units - u0), b0, min(batch, b0 + chunk)


def _forward_blocked(x4, attn, cells, bias, y4, layer: _Layer, precision: str, chunk_bytes: int | None):
    """The forward by blocks of cell rows (the output channels go*c_out + rows, every go): per block and chunk of
    samples, the block's kernels mixed into one reused buffer and consumed at once by the conv."""
    rows, chunk, numel = _blocks(layer, x4.element_size(), "forward", chunk_bytes)
    buffer = _empty((numel,), cells.dtype, cells.device)
    for r0, count, b0, b1 in _block_steps(layer.c_out, rows, layer.batch, chunk):
        weights = _mix(attn[b0:b1], cells, layer, precision, buffer, block=(r0, count, 0, layer.c_in))
        _launch_forward(x4[b0:b1], weights, bias, y4[b0:b1], layer, precision, rows=(r0, count))


def _dx_blocked(dy4, attn, cells, dx4, layer: _Layer, precision: str, chunk_bytes: int | None):
    """dx by blocks of cell columns (the input channels gi*c_in + columns, every gi), as `_forward_blocked`."""
    cols, chunk, numel = _blocks(layer, dy4.element_size(), "dx", chunk_bytes)
    buffer = _empty((numel,), cells.dtype, cells.device)
    for q0, count, b0, b1 in _block_steps(layer.c_in, cols, layer.batch, chunk):
        weights = _mix(attn[b0:b1], cells, layer, precision, buffer, block=(0, layer.c_out, q0, count))
        _launch_dx(dy4[b0:b1], weights, dx4[b0:b1], layer, precision, cols=(q0, count))


def _chunk(layer: _Layer, element_size: int, chunk_bytes: int | None) -> int:
    """Samples per chunk so that their per-sample kernels (or weight gradients) fit chunk_bytes
    (default KERNEL_CHUNK_BYTES)."""
    budget = KERNEL_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(1, min(layer.batch, budget // max(1, layer.weight_numel * element_size)))


def _native(t4: torch.Tensor) -> torch.Tensor:
    """The kernels' native layout of an activation [B, C, H, W]: channels_last for 2-byte dtypes (a copy only
    when it comes in another layout), as given otherwise."""
    if t4.element_size() == 2:
        return t4.contiguous(memory_format=torch.channels_last)
    return t4


def _mix(attn_chunk, cells, layer: _Layer, precision: str, buffer: torch.Tensor | None = None,
         block: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Phase 1: per-sample kernels [bc, KK, O, C / groups] of a chunk of samples, in the op's dtype, written into
    the first bc samples of `buffer` where given (one buffer serves every chunk of a call: never two alive).

    block (row0, rows, col0, cols): only cell rows row0..row0+rows-1 and columns col0..col0+cols-1 of every
    mixture, as kernels [bc, KK, GO*rows, GI*cols] (the blocked mode's block of output or input channels);
    `buffer` is then a flat buffer whose first elements are used."""
    bc = attn_chunk.shape[0]
    row0, rows_, col0, cols_ = block if block is not None else (0, layer.c_out, 0, layer.c_in)
    shape = (bc, layer.kk, layer.grid_out * rows_, layer.grid_in * cols_)
    if buffer is None:
        weights = _empty(shape, cells.dtype, cells.device)
    elif block is None:
        weights = buffer[:bc]
    else:
        weights = buffer[:math.prod(shape)].view(shape)
    rows, cols = bc * layer.m, rows_ * cols_ * layer.cell_numel
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_N"]))
    kw_mix_kernel[grid](
        attn_chunk, cells, weights, rows, cols, layer.n, layer.m, rows_, cols_, layer.grid_out,
        layer.grid_in, layer.cell_numel, bucket(rows), row0, col0, *attn_chunk.stride(), *cells.stride(),
        *weights.stride(), INPUT_PRECISION=precision, ACC_DTYPE=_acc_dtype(cells.dtype))
    return weights


def _buckets(layer: _Layer, batch: int):
    """Bucketed autotune keys of the conv kernels: positions per sample and the launch's batch."""
    return bucket(layer.out_h * layer.out_w), bucket(batch)


def _group_args(layer: _Layer):
    """Input and output channels per group, the grouped kernels' extra shape arguments."""
    return layer.in_per_group, layer.out_channels // layer.groups


def _channel_map(block: tuple[int, int] | None, cell_blocks: int) -> int:
    """The conv kernels' CHANNEL_MAP: the whole layer, a block within one cell block (GO or GI = 1: an offset), or a
    block strided over several cell blocks."""
    if block is None:
        return WHOLE_LAYER
    return OFFSET_BLOCK if cell_blocks == 1 else STRIDED_BLOCK


def _launch_forward(x4, weights, bias, y4, layer: _Layer, precision: str, rows: tuple[int, int] | None = None):
    """The conv of the forward on `weights`; rows (row0, count): they hold only that block of cell rows (groups = 1),
    the output channels go*c_out + row0 + p."""
    batch = x4.shape[0]
    positions = layer.out_h * layer.out_w
    row0, count = rows if rows is not None else (0, layer.c_out)
    channels = layer.grid_out * count if rows is not None else layer.out_channels
    grid = lambda meta: (triton.cdiv(positions, meta["BLOCK_M"]), triton.cdiv(channels, meta["BLOCK_N"]), batch)
    if layer.groups != 1:
        kw_grouped_fwd_kernel[grid](
            x4, weights, bias if bias is not None else weights, y4,
            *layer.conv_args(), layer.kw, layer.kk, *_group_args(layer), *_buckets(layer, batch),
            *x4.stride(), *weights.stride(), *y4.stride(), *layer.conv_params(),
            HAS_BIAS=bias is not None, ACC_DTYPE=_acc_dtype(x4.dtype))
        return
    c, h, w, _, oh, ow = layer.conv_args()
    kw_conv_fwd_kernel[grid](
        x4, weights, bias if bias is not None else weights, y4,
        c, h, w, channels, oh, ow, layer.kw, layer.kk, *_buckets(layer, batch), count, row0, layer.c_out,
        *x4.stride(), *weights.stride(), *y4.stride(), *layer.conv_params(),
        HAS_BIAS=bias is not None, ACC_DTYPE=_acc_dtype(x4.dtype), INPUT_PRECISION=precision,
        CHANNEL_MAP=_channel_map(rows, layer.grid_out))


def _launch_dx(dy4, weights, dx4, layer: _Layer, precision: str, cols: tuple[int, int] | None = None):
    """The input gradient on `weights`; cols (col0, count): they hold only that block of cell columns (groups = 1),
    the input channels gi*c_in + col0 + q."""
    batch = dy4.shape[0]
    sh, sw = layer.stride
    phases, phase_positions = sh * sw, triton.cdiv(layer.height, sh) * triton.cdiv(layer.width, sw)
    col0, count = cols if cols is not None else (0, layer.c_in)
    channels = layer.grid_in * count if cols is not None else layer.channels
    grid = lambda meta: (phases * triton.cdiv(phase_positions, meta["BLOCK_M"]),
                         triton.cdiv(channels, meta["BLOCK_N"]), batch)
    if layer.groups != 1:
        kw_grouped_dx_kernel[grid](
            dy4, weights, dx4, *layer.conv_args(), layer.kh, layer.kw, layer.kk, *_group_args(layer),
            *_buckets(layer, batch), *dy4.stride(), *weights.stride(), *dx4.stride(), *layer.conv_params(),
            ACC_DTYPE=_acc_dtype(dy4.dtype))
        return
    _, h, w, oc, oh, ow = layer.conv_args()
    kw_conv_dx_kernel[grid](
        dy4, weights, dx4, channels, h, w, oc, oh, ow, layer.kh, layer.kw, layer.kk, *_buckets(layer, batch),
        count, col0, layer.c_in, *dy4.stride(), *weights.stride(), *dx4.stride(), *layer.conv_params(),
        ACC_DTYPE=_acc_dtype(dy4.dtype), INPUT_PRECISION=precision, CHANNEL_MAP=_channel_map(cols, layer.grid_in))


def _launch_wgrad(x4, dy4, layer: _Layer, precision: str, rows: int, row0: int) -> torch.Tensor:
    """Weight gradients in cell order [b, m, rows, c_in, CK] (the op's dtype) of the cell rows row0..row0+rows-1
    (groups = 1; every row for groups != 1)."""
    bc = x4.shape[0]
    dw = _empty((bc, layer.m, rows, layer.c_in, layer.cell_numel), x4.dtype, x4.device)
    if layer.groups != 1:
        grid = lambda meta: (triton.cdiv(layer.out_channels, meta["BLOCK_N"]), layer.kk * layer.in_per_group, bc)
        kw_grouped_wgrad_kernel[grid](
            x4, dy4, dw, *layer.conv_args(), layer.kw, layer.kk, *_group_args(layer), *_buckets(layer, bc),
            *layer.cell_args()[:5], *x4.stride(), *dy4.stride(), *dw.stride(), *layer.conv_params(),
            ACC_DTYPE=_acc_dtype(x4.dtype))
        return dw
    channels, height, width, _, out_h, out_w = layer.conv_args()
    slice_channels = layer.grid_out * rows
    grid = lambda meta: (triton.cdiv(slice_channels, meta["BLOCK_N"]) * triton.cdiv(layer.channels, meta["BLOCK_K"]),
                         layer.kk, bc)
    kw_conv_wgrad_kernel[grid](
        x4, dy4, dw, channels, height, width, slice_channels, out_h, out_w, *layer.cell_args(), *_buckets(layer, bc),
        rows, row0, *x4.stride(), *dy4.stride(), *dw.stride(), *layer.conv_params(), ACC_DTYPE=_acc_dtype(x4.dtype),
        INPUT_PRECISION=precision)
    return dw


def _wgrad_sliced(x4, dy4, attn, cells, layer: _Layer, precision: str, chunk_bytes: int | None, dattn, dcells):
    """Weight gradient of groups = 1 by slices of the cell's rows (cost_model.wgrad_slice_rows): per slice, dW of
    every sample and mixture, then dE[:, slice] = attnᵀ·dW in one GEMM, written once into `dcells`, and
    dattn += dW·E[:, slice]ᵀ in fp32. dattn / dcells None: not asked for."""
    shape = layer.cost_shape(x4.element_size())
    rows = cost_model.wgrad_slice_rows(shape, budget=chunk_bytes)
    acc = None
    attn_cols = attn.reshape(layer.batch * layer.m, layer.n).t()
    for r0 in range(0, layer.c_out, rows):
        r1 = min(layer.c_out, r0 + rows)
        dw = _launch_wgrad(x4, dy4, layer, precision, r1 - r0, r0).view(layer.batch * layer.m, -1)
        if dattn is not None:
            part = _matmul(dw, cells[:, r0:r1].reshape(layer.n, -1).t(), precision)
            acc = part if acc is None else acc.add_(part)
        if dcells is not None:
            dcells[:, r0:r1] = _matmul(attn_cols, dw, precision).view(layer.n, r1 - r0, layer.c_in, -1)
    if dattn is not None:
        dattn.copy_(acc.view_as(dattn))


def _matmul(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """a [M, K] @ b [K, N] (any strides, one dtype) in fp32 (fp64 for fp64), split over K where M*N is small."""
    M, K = a.shape
    N = b.shape[1]
    split_len = cost_model.split_k_len(M, N, K)   # the split the cost model counts
    splits = triton.cdiv(K, split_len)
    acc = _acc_torch_dtype(a.dtype)
    partial = _empty((splits, M, N), acc, a.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)
    kw_matmul_kernel[grid](a, b, partial, M, N, K, split_len, bucket(M), bucket(K), *a.stride(), *b.stride(),
                           *partial.stride(), INPUT_PRECISION=precision, ACC_DTYPE=_acc_dtype(a.dtype))
    return partial[0] if splits == 1 else partial.sum(0)


def _bias_grad(dy4: torch.Tensor) -> torch.Tensor:
    batch, channels, out_h, out_w = dy4.shape
    acc = _acc_torch_dtype(dy4.dtype)
    partial = _empty((batch, channels), acc, dy4.device)
    block_o = 16 if channels <= 16 else 64
    kw_bias_grad_kernel[(triton.cdiv(channels, block_o), batch)](
        dy4, partial, channels, out_w, out_h * out_w, *dy4.stride(), partial.stride(0), ACC_DTYPE=_acc_dtype(dy4.dtype),
        BLOCK_O=block_o, BLOCK_P=64)
    return partial.sum(0).to(dy4.dtype)


def kw_conv_triton_forward(x: torch.Tensor, attn: torch.Tensor, warehouse: torch.Tensor, bias: torch.Tensor | None,
                           out_channels: int, kernel_size: Sequence[int], stride: Sequence[int],
                           padding: Sequence[int], dilation: Sequence[int], groups: int, *, mode: str | None = None,
                           input_precision: str | None = None, chunk_bytes: int | None = None) -> torch.Tensor:
    """KW convolution on the Triton kernels; arguments already checked and normalised (as kw_conv_torch).

    x [B, C_in, *size] (1-D or 2-D, any strides), attn [B, m, n], warehouse [n, c_out, c_in, *cell_k],
    bias [C_out] or None -> y [B, C_out, *out_size], a fresh contiguous tensor.
    mode: one of MODES (default: `choose_mode`); input_precision: fp32 tl.dot precision; chunk_bytes: the
    per-sample kernels held per chunk of samples (two_phase; default KERNEL_CHUNK_BYTES) or per block (blocked;
    default cost_model.blocked_plan's choice).
    """
    _check(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation, groups)
    x4, cells, kernel_size, stride, padding, dilation = _as_2d(x, warehouse, kernel_size, stride, padding, dilation)
    layer = _layer(x4, cells, out_channels, kernel_size, stride, padding, dilation, groups)
    y4 = _empty((layer.batch, out_channels, layer.out_h, layer.out_w), x.dtype, x.device)
    y = y4.squeeze(2) if x.dim() == 3 else y4
    if layer.batch == 0:
        return y
    precision = _input_precision(x.dtype, input_precision)
    mode = _resolve_mode(mode, layer, x.element_size(), "forward")
    x4 = _native(x4)
    if mode == "blocked":
        _forward_blocked(x4, attn, cells, bias, y4, layer, precision, chunk_bytes)
        return y
    chunk = _chunk(layer, x.element_size(), chunk_bytes)
    buffer = _empty((chunk, layer.kk, layer.out_channels, layer.in_per_group), cells.dtype, cells.device)
    for b0 in range(0, layer.batch, chunk):
        b1 = min(layer.batch, b0 + chunk)
        weights = _mix(attn[b0:b1], cells, layer, precision, buffer)
        _launch_forward(x4[b0:b1], weights, bias, y4[b0:b1], layer, precision)
    return y


def kw_conv_triton_backward(dy: torch.Tensor, x: torch.Tensor, attn: torch.Tensor, warehouse: torch.Tensor,
                            has_bias: bool, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int],
                            padding: Sequence[int], dilation: Sequence[int], groups: int, *,
                            output_mask: Sequence[bool] = (True, True, True, True), mode: str | None = None,
                            input_precision: str | None = None, chunk_bytes: int | None = None):
    """Gradients of `kw_conv_triton_forward` (kernels recomputed, weight gradients in bounded chunks).

    dy [B, C_out, *out_size] (any strides); output_mask: which of (x, attn, warehouse, bias) need a gradient.
    -> (dx, dattn, dwarehouse, dbias), None where not asked for (dbias also None without bias);
    dx is contiguous, dattn/dwarehouse have the shapes of attn/warehouse. mode, input_precision, chunk_bytes:
    as in `kw_conv_triton_forward` (chunk_bytes also bounds the weight gradients of a slice of cell rows, or of
    a chunk of samples for groups != 1).
    """
    _check(x, attn, warehouse, None, out_channels, kernel_size, stride, padding, dilation, groups)
    need_x, need_attn, need_warehouse, need_bias = output_mask
    x4, cells, kernel_size, stride, padding, dilation = _as_2d(x, warehouse, kernel_size, stride, padding, dilation)
    dy4 = dy.unsqueeze(2) if dy.dim() == 3 else dy
    layer = _layer(x4, cells, out_channels, kernel_size, stride, padding, dilation, groups)
    dx = _empty(x.shape, x.dtype, x.device) if need_x else None
    dattn = _empty(attn.shape, attn.dtype, attn.device) if need_attn else None
    dcells = None
    if need_warehouse:   # groups = 1: each slice written once in the op's dtype; grouped: an fp32 sum over chunks
        dcells = (_empty(cells.shape, warehouse.dtype, x.device) if groups == 1 and layer.batch
                  else torch.zeros(cells.shape, dtype=_acc_torch_dtype(x.dtype), device=x.device))
    dbias = None
    if has_bias and need_bias:
        dbias = _bias_grad(dy4) if layer.batch else dy.new_zeros(out_channels)
    if layer.batch == 0:
        if dx is not None:
            dx.zero_()
        if dattn is not None:
            dattn.zero_()
        return dx, dattn, dcells.to(warehouse.dtype).view_as(warehouse) if need_warehouse else None, dbias
    precision = _input_precision(x.dtype, input_precision)
    dx4 = (dx.unsqueeze(2) if x.dim() == 3 else dx) if need_x else None
    mode = _resolve_mode(mode, layer, x.element_size(), "dx") if need_x else None
    x4, dy4 = _native(x4), _native(dy4)
    if mode == "blocked":
        _dx_blocked(dy4, attn, cells, dx4, layer, precision, chunk_bytes)
        need_x = False
    chunk = _chunk(layer, x.element_size(), chunk_bytes)
    chunked_wgrad = groups != 1 and (need_attn or need_warehouse)
    flat_cells = cells.reshape(layer.n, -1)
    buffer = None   # the per-sample kernels of one chunk, reused by every chunk
    for b0 in range(0, layer.batch, chunk):
        b1 = min(layer.batch, b0 + chunk)
        if need_x:
            buffer = buffer if buffer is not None else _empty(
                (chunk, layer.kk, layer.out_channels, layer.in_per_group), cells.dtype, cells.device)
            weights = _mix(attn[b0:b1], cells, layer, precision, buffer)
            _launch_dx(dy4[b0:b1], weights, dx4[b0:b1], layer, precision)
            del weights
        if chunked_wgrad:
            # per-sample weight gradients of the chunk in cell order, then the two contractions
            dw = _launch_wgrad(x4[b0:b1], dy4[b0:b1], layer, precision, layer.c_out, 0).view((b1 - b0) * layer.m, -1)
            if need_attn:
                dattn[b0:b1] = _matmul(dw, flat_cells.t(), precision).view(b1 - b0, layer.m, layer.n)
            if need_warehouse:
                attn_rows = attn[b0:b1].reshape((b1 - b0) * layer.m, layer.n)
                dcells.view(layer.n, -1).add_(_matmul(attn_rows.t(), dw, precision))
    if groups == 1 and (need_attn or need_warehouse):
        _wgrad_sliced(x4, dy4, attn, cells, layer, precision, chunk_bytes, dattn, dcells)
    dwarehouse = dcells.to(warehouse.dtype).view_as(warehouse) if need_warehouse else None
    return dx, dattn, dwarehouse, dbias
