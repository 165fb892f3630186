"""Triton kernels of the KW op against the pure-PyTorch op (+ autograd) and the float64 loop oracle.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set in conftest.py before any
`import triton`): fp64, fp32 and fp16 (the interpreter's bf16 is wrong), tiny shapes, every output and
buffer of the launchers poisoned with NaN so an unwritten element fails. Tests marked `gpu` (bf16,
larger shapes, every KW1x ResNet18/50 layer) run only where CUDA is available.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from oracle import kw_conv_loop  # noqa: E402

from kw_ops.ops.torch_impl import kw_conv_torch  # noqa: E402
from kw_ops.ops.triton import cost_model, interpreting, launch, not_supported_reasons, supports  # noqa: E402
from kw_ops.ops.triton.launch import kw_conv_triton_backward, kw_conv_triton_forward  # noqa: E402

ON_GPU = torch.cuda.is_available() and not interpreting()
DEVICE = "cpu"  # the interpreter tests; GPU tests pass device="cuda"
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
# CPU tests run the kernels in the interpreter; GPU tests compile them (conftest sets TRITON_INTERPRET=1 only
# where CUDA is not available).
interpreter = pytest.mark.skipif(not interpreting(), reason="Triton interpreter test: needs TRITON_INTERPRET=1")
gpu_triton = pytest.mark.skipif(interpreting(), reason="compiled Triton test: run with TRITON_INTERPRET=0 on a GPU")
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# (atol, rtol) per dtype, with the reason.
TOLERANCES = {
    # fp64 in and fp64 accumulation: only the summation order differs from the torch path
    torch.float64: (1e-10, 1e-10),
    # fp32: summation order (the interpreter's dots are exact fp32; on GPU the tests force ieee)
    torch.float32: (2e-4, 2e-4),
}
# Half precision: the Triton error against the fp64 oracle must stay within this factor of the torch path's
# error in the same dtype (about 2x), plus a floor for outputs the torch path happens to get nearly exact.
HALF_ERROR_RATIO = 2.0
HALF_ERROR_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@dataclass(frozen=True)
class Case:
    batch: int = 2
    channels: int = 8
    out: int = 8
    size: tuple = (5, 6)
    kernel: tuple = (3, 3)
    stride: tuple = (1, 1)
    padding: tuple = (1, 1)
    dilation: tuple = (1, 1)
    cell: tuple = (8, 8)           # (c_out, c_in)
    whole_kernel: bool = False     # cells are the whole kernel (S = 1) instead of spatial partition
    n: int = 3
    groups: int = 1
    bias: bool = True
    dtype: torch.dtype = torch.float64

    @property
    def id(self) -> str:
        dims = lambda v: "x".join(map(str, v))
        parts = [f"B{self.batch}", f"C{self.channels}", f"O{self.out}", dims(self.size), f"K{dims(self.kernel)}",
                 f"s{dims(self.stride)}", f"p{dims(self.padding)}", f"d{dims(self.dilation)}",
                 f"cell{dims(self.cell)}{'-whole' if self.whole_kernel else ''}", f"n{self.n}", f"g{self.groups}",
                 "bias" if self.bias else "nobias", str(self.dtype).replace("torch.float", "fp")]
        return "-".join(parts)

    @property
    def m(self) -> int:
        spatial = 1 if self.whole_kernel else math.prod(self.kernel)
        return spatial * (self.out // self.cell[0]) * (self.channels // self.groups // self.cell[1])

    def args(self):
        return self.out, self.kernel, self.stride, self.padding, self.dilation, self.groups

    def inputs(self, device=DEVICE, dtype=None):
        dtype = dtype or self.dtype
        cell_k = self.kernel if self.whole_kernel else (1,) * len(self.kernel)
        x = torch.randn(self.batch, self.channels, *self.size, dtype=torch.float64)
        attn = torch.randn(self.batch, self.m, self.n, dtype=torch.float64) / self.n
        warehouse = torch.randn(self.n, *self.cell, *cell_k, dtype=torch.float64) / math.sqrt(
            self.cell[1] * math.prod(self.kernel))
        bias = torch.randn(self.out, dtype=torch.float64) if self.bias else None
        return [t if t is None else t.to(device=device, dtype=dtype) for t in (x, attn, warehouse, bias)]


CASES = [
    Case(),
    Case(stride=(2, 1), padding=(1, 2), dilation=(1, 2), cell=(4, 4)),                   # GO = GI = 2
    Case(size=(6, 5), kernel=(3, 3), dilation=(2, 1), padding=(2, 0), whole_kernel=True, cell=(4, 8)),
    Case(channels=5, out=7, size=(4, 5), kernel=(2, 3), stride=(1, 2), padding=(0, 1), cell=(7, 5), n=2),  # odd
    Case(batch=1, channels=8, out=8, size=(3, 3), kernel=(1, 1), stride=(2, 2), padding=(0, 0), cell=(4, 4),
         bias=False),                                                                     # 1x1, stride 2
    Case(size=(7,), kernel=(3,), stride=(2,), padding=(1,), dilation=(1,), cell=(4, 8)),  # 1-D
    # several channel tiles (interpreter tiles are 16), ragged; 6 stride phases of dx, dilated taps
    Case(channels=20, out=24, size=(7, 8), stride=(2, 3), padding=(1, 2), dilation=(2, 1), cell=(12, 10), n=4),
    # depthwise (several channel tiles, stride 2) and grouped (Ig = 2, Og = 3) on the grouped kernels
    Case(channels=18, out=18, size=(6, 5), stride=(2, 2), cell=(6, 1), groups=18),
    Case(channels=8, out=12, size=(5, 4), kernel=(3, 2), padding=(1, 0), cell=(3, 1), groups=4, n=2),
]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every output and buffer of the launchers starts as NaN: an element a kernel forgets stays NaN."""
    monkeypatch.setattr(launch, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                               dtype=dtype, device=device))
    if ON_GPU:  # the torch reference in fp32 must not use TF32 either
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _assert_close(actual, expected, dtype, name):
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert not actual.isnan().any(), f"{name}: {int(actual.isnan().sum())} elements unwritten (NaN)"
    err = (actual - expected).abs() - rtol * expected.abs()
    worst = int(err.argmax())
    assert err.max() <= atol, (f"{name}: worst element {tuple(torch.unravel_index(torch.tensor(worst), actual.shape))}"
                               f" = {actual.flatten()[worst]:.6g}, expected {expected.flatten()[worst]:.6g}")


def _reference(case, x, attn, warehouse, bias, dy):
    """y and (dx, dattn, dwarehouse, dbias) of the torch path with autograd, in the inputs' dtype."""
    leaves = [t if t is None else t.detach().clone().requires_grad_() for t in (x, attn, warehouse, bias)]
    y = kw_conv_torch(*leaves, *case.args())
    y.backward(dy)
    return y.detach(), [None if t is None else t.grad for t in leaves]


def _relative_error(actual, expected):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert not actual.isnan().any(), "unwritten (NaN) elements"
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else None


@interpreter
@pytest.mark.parametrize("mode", launch.MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_and_gradients_match_torch_path(case, mode):
    x, attn, warehouse, bias = case.inputs()
    y_ref, grads_ref = _reference(case, x, attn, warehouse, bias, dy := torch.randn_like(
        kw_conv_torch(x, attn, warehouse, bias, *case.args())))
    y = kw_conv_triton_forward(x, attn, warehouse, bias, *case.args(), mode=mode, input_precision=_precision(x.dtype))
    _assert_close(y, y_ref, case.dtype, "y")
    assert y.is_contiguous()
    grads = kw_conv_triton_backward(dy, x, attn, warehouse, case.bias, *case.args(), mode=mode,
                                    input_precision=_precision(x.dtype))
    for name, got, ref in zip(("dx", "dattn", "dwarehouse", "dbias"), grads, grads_ref):
        if ref is None:
            assert got is None, f"{name} returned without a bias"
            continue
        _assert_close(got, ref, case.dtype, name)


@interpreter
def test_forward_matches_float64_loop_oracle():
    case = CASES[1]
    x, attn, warehouse, bias = case.inputs()
    y = kw_conv_triton_forward(x, attn, warehouse, bias, *case.args())
    _assert_close(y, kw_conv_loop(x, attn, warehouse, bias, *case.args()).to(y.device), torch.float64, "y")


@interpreter
def test_fp32_channels_last_and_strided_inputs():
    case = replace(CASES[1], dtype=torch.float32)
    x, attn, warehouse, bias = case.inputs()
    x_cl = x.to(memory_format=torch.channels_last)
    attn_t = attn.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    y_ref, grads_ref = _reference(case, x, attn, warehouse, bias, dy := torch.randn(
        case.batch, case.out, 3, 6, dtype=torch.float32, device=DEVICE))
    dy_cl = dy.to(memory_format=torch.channels_last)
    for mode in launch.MODES:
        y = kw_conv_triton_forward(x_cl, attn_t, warehouse, bias, *case.args(), mode=mode, input_precision="ieee")
        _assert_close(y, y_ref, torch.float32, f"y ({mode})")
        grads = kw_conv_triton_backward(dy_cl, x_cl, attn_t, warehouse, True, *case.args(), mode=mode,
                                        input_precision="ieee")
        for name, got, ref in zip(("dx", "dattn", "dwarehouse", "dbias"), grads, grads_ref):
            _assert_close(got, ref, torch.float32, f"{name} ({mode})")


@interpreter
@pytest.mark.parametrize("case", [CASES[1], CASES[-2]], ids=lambda c: c.id)
def test_fp16_error_within_twice_the_torch_path(case):
    """fp16 (channels_last inside the launchers), dense and depthwise."""
    case = replace(case, dtype=torch.float16)
    x, attn, warehouse, bias = case.inputs(dtype=torch.float64)
    dy = torch.randn_like(kw_conv_torch(x, attn, warehouse, bias, *case.args()))
    y64, grads64 = _reference(case, x, attn, warehouse, bias, dy)
    half = [t.half() for t in (x, attn, warehouse, bias, dy)]
    y16_torch, grads16_torch = _reference(case, *half)
    for mode in launch.MODES:
        outputs = {"y": kw_conv_triton_forward(*half[:4], *case.args(), mode=mode)}
        outputs.update(zip(("dx", "dattn", "dwarehouse", "dbias"),
                           kw_conv_triton_backward(half[4], *half[:3], True, *case.args(), mode=mode)))
        references = dict(zip(("y", "dx", "dattn", "dwarehouse", "dbias"), (y64, *grads64)))
        torch_half = dict(zip(("y", "dx", "dattn", "dwarehouse", "dbias"), (y16_torch, *grads16_torch)))
        for name, got in outputs.items():
            assert got.dtype == torch.float16, f"{name}: dtype {got.dtype}"
            err = _relative_error(got, references[name])
            bound = HALF_ERROR_RATIO * _relative_error(torch_half[name], references[name]) + \
                HALF_ERROR_FLOOR[torch.float16]
            assert err <= bound, f"{name} ({mode}): relative error {err:.3g} > {bound:.3g} (2x the torch path)"


@interpreter
@pytest.mark.parametrize("case", [replace(CASES[0], batch=3, cell=(8, 4)),
                                  replace(CASES[-1], batch=3, out=16, cell=(16, 2))], ids=lambda c: c.id)
def test_chunks_and_split_k(monkeypatch, case):
    """Several sample chunks (per-sample kernels; weight gradients of the grouped kernels), one-row slices of the
    dense weight gradient and several K splits (dattn of the grouped chunks, dE of the dense slices) give the
    same result."""
    monkeypatch.setattr(launch.cost_model, "SPLIT_K_MIN_LEN", 16)
    monkeypatch.setattr(launch.cost_model, "SPLIT_K_ALIGN", 16)
    x, attn, warehouse, bias = case.inputs()
    dy = torch.randn_like(kw_conv_torch(x, attn, warehouse, bias, *case.args()))
    y_ref, grads_ref = _reference(case, x, attn, warehouse, bias, dy)
    cell_size = math.prod(warehouse.shape[1:])
    if case.groups == 1:   # dE of one slice: K = B*m
        rows = case.batch * case.m
        assert launch.triton.cdiv(rows, launch.cost_model.split_k_len(case.n, cell_size // case.cell[0], rows)) > 1
    else:
        assert launch.triton.cdiv(cell_size, launch.cost_model.split_k_len(case.m, case.n, cell_size)) > 1
    y = kw_conv_triton_forward(x, attn, warehouse, bias, *case.args(), chunk_bytes=1)  # one sample per chunk
    _assert_close(y, y_ref, case.dtype, "y")
    grads = kw_conv_triton_backward(dy, x, attn, warehouse, True, *case.args(), chunk_bytes=1)
    for name, got, ref in zip(("dx", "dattn", "dwarehouse", "dbias"), grads, grads_ref):
        _assert_close(got, ref, case.dtype, name)


SLICE_CASES = [Case(batch=3, out=10, size=(5, 4), stride=(2, 2), cell=(5, 4), n=2),           # GO = GI = 2
               Case(batch=3, out=10, size=(5, 4), stride=(2, 2), cell=(5, 8), whole_kernel=True, bias=False)]


@interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", SLICE_CASES, ids=lambda c: c.id)
def test_weight_gradient_slices(case, dtype):
    """The dense weight gradient in slices of 2 cell rows (2, 2 and a ragged 1 of 5; stride 2, spatial and
    whole-kernel cells) matches the torch path; fp16 within twice the torch path's error."""
    x, attn, warehouse, bias = case.inputs(dtype=torch.float64)
    dy = torch.randn_like(kw_conv_torch(x, attn, warehouse, bias, *case.args()))
    _, grads64 = _reference(case, x, attn, warehouse, bias, dy)
    inputs = [t if t is None else t.to(dtype) for t in (x, attn, warehouse, dy)]
    row_bytes = case.batch * case.m * (warehouse[0, 0].numel()) * inputs[0].element_size()
    layer = launch._layer(inputs[0], inputs[2].reshape(*warehouse.shape[:3], -1), *case.args())
    assert cost_model.wgrad_slice_rows(layer.cost_shape(inputs[0].element_size()), budget=2 * row_bytes) == 2
    grads = kw_conv_triton_backward(inputs[3], *inputs[:3], case.bias, *case.args(), chunk_bytes=2 * row_bytes,
                                    input_precision=_precision(dtype))
    if dtype != torch.float16:
        for name, got, ref in zip(("dx", "dattn", "dwarehouse"), grads, grads64):
            _assert_close(got, ref.to(dtype), dtype, name)
        return
    _, grads16 = _reference(case, *[t if t is None else t.half() for t in (x, attn, warehouse, bias, dy)])
    for name, got, ref, torch_half in zip(("dx", "dattn", "dwarehouse"), grads, grads64, grads16):
        assert got.dtype == torch.float16, f"{name}: dtype {got.dtype}"
        bound = HALF_ERROR_RATIO * _relative_error(torch_half, ref) + HALF_ERROR_FLOOR[torch.float16]
        assert _relative_error(got, ref) <= bound, f"{name}: relative error above {bound:.3g}"


BLOCK_CASES = [Case(batch=3, out=10, channels=10, size=(5, 4), stride=(2, 2), cell=(5, 5), n=2),   # GO = GI = 2
               Case(batch=3, out=10, channels=8, size=(5, 6), dilation=(1, 2), padding=(1, 2), cell=(5, 8),
                    whole_kernel=True, bias=False),
               Case(batch=3, out=7, channels=5, size=(4, 5), kernel=(2, 3), stride=(1, 2), padding=(0, 1),
                    cell=(7, 5), n=2),
               Case(batch=3, size=(7,), kernel=(3,), stride=(2,), padding=(1,), dilation=(1,), cell=(4, 4))]


def _unit_bytes(case, direction, element_size):
    """Bytes of one cell row (forward) or column (dx) of one sample's kernel: P / c_out or P / c_in elements."""
    weights = case.out * case.channels * math.prod(case.kernel)
    return weights // case.cell[0 if direction == "forward" else 1] * element_size


@interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: c.id)
def test_blocked_mode_blocks_and_chunks(case, dtype):
    """The blocked mode in blocks of 2 cell rows (forward) or columns (dx) for all samples (a ragged last block
    where 2 does not divide c_out or c_in), and in blocks of one row or column for 2 of the 3 samples (a ragged
    last chunk), matches the torch path (fp16: within twice the torch path's error); the plans are checked."""
    x, attn, warehouse, bias = case.inputs(dtype=torch.float64)
    dy = torch.randn_like(kw_conv_torch(x, attn, warehouse, bias, *case.args()))
    y64, grads64 = _reference(case, x, attn, warehouse, bias, dy)
    low = [t if t is None else t.to(dtype) for t in (x, attn, warehouse, bias, dy)]
    size = low[0].element_size()
    layer = launch._layer(*(t.unsqueeze(2) if t.dim() == 3 else t for t in low[:1]),
                          low[2].reshape(*warehouse.shape[:3], -1), case.out,
                          *[(1, *v) if len(v) == 1 else v for v in case.args()[1:4]],
                          (1, *case.dilation) if len(case.dilation) == 1 else case.dilation, case.groups)
    shape = layer.cost_shape(size)
    for budget, plan in (("two units", (2, case.batch)), ("one unit, two samples", (1, 2))):
        got = {}
        for direction in ("forward", "dx"):
            unit = _unit_bytes(case, direction, size)
            chunk_bytes = 2 * case.batch * unit if plan[1] == case.batch else 2 * unit
            assert cost_model.blocked_plan(shape, direction, budget=chunk_bytes) == plan, (budget, direction)
            if direction == "forward":
                got["y"] = kw_conv_triton_forward(*low[:4], *case.args(), mode="blocked", chunk_bytes=chunk_bytes,
                                                  input_precision=_precision(dtype))
            else:
                got["dx"] = kw_conv_triton_backward(low[4], *low[:3], case.bias, *case.args(), mode="blocked",
                                                    chunk_bytes=chunk_bytes, output_mask=(True, False, False, False),
                                                    input_precision=_precision(dtype))[0]
        if dtype == torch.float64:
            _assert_close(got["y"], y64, dtype, f"y ({budget})")
            _assert_close(got["dx"], grads64[0], dtype, f"dx ({budget})")
            continue
        y16, grads16 = _reference(case, *low)
        for name, value, ref, torch_half in (("y", got["y"], y64, y16), ("dx", got["dx"], grads64[0], grads16[0])):
            assert value.dtype == dtype, f"{name}: dtype {value.dtype}"
            bound = HALF_ERROR_RATIO * _relative_error(torch_half, ref) + HALF_ERROR_FLOOR[dtype]
            assert _relative_error(value, ref) <= bound, f"{name} ({budget}): relative error above {bound:.3g}"


@interpreter
def test_blocked_mode_ragged_block_of_two():
    """Blocks of 5 of 7 cell rows and columns: a last block of 2 (forward and dx, fp64)."""
    case = Case(batch=2, out=14, channels=7, size=(5, 4), cell=(7, 7), n=3)
    x, attn, warehouse, bias = case.inputs()
    dy = torch.randn_like(kw_conv_torch(x, attn, warehouse, bias, *case.args()))
    y64, grads64 = _reference(case, x, attn, warehouse, bias, dy)
    for direction in ("forward", "dx"):
        chunk_bytes = 5 * case.batch * _unit_bytes(case, direction, 8)
        layer = launch._layer(x, warehouse.reshape(*warehouse.shape[:3], -1), *case.args())
        assert cost_model.blocked_plan(layer.cost_shape(8), direction, budget=chunk_bytes) == (5, case.batch)
        if direction == "forward":
            y = kw_conv_triton_forward(x, attn, warehouse, bias, *case.args(), mode="blocked", chunk_bytes=chunk_bytes)
            _assert_close(y, y64, case.dtype, "y")
        else:
            dx = kw_conv_triton_backward(dy, x, attn, warehouse, True, *case.args(), mode="blocked",
                                         chunk_bytes=chunk_bytes, output_mask=(True, False, False, False))[0]
            _assert_close(dx, grads64[0], case.dtype, "dx")


class _Recorder:
    """A stand-in for a Triton kernel: records each launch's grid at the model's 64 x 64 tiles and its arguments."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            self.launches.append((grid({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}), args))
        return launch_


@interpreter
@pytest.mark.parametrize("direction", ["forward", "dx"])
def test_blocked_launches_and_buffer_are_what_the_cost_model_counts(monkeypatch, direction):
    """With the kernels stubbed: the blocked launcher makes the launches, programs and buffer the cost model's plan
    counts, with several blocks and several chunks of samples (width 1, 2 of 5 samples per chunk)."""
    mix, conv = _Recorder(), _Recorder()
    monkeypatch.setattr(launch, "kw_mix_kernel", mix)
    monkeypatch.setattr(launch, "kw_conv_fwd_kernel" if direction == "forward" else "kw_conv_dx_kernel", conv)
    buffers = []

    def empty(shape, dtype, device):
        buffers.append(math.prod(shape) if isinstance(shape, tuple) else shape)
        return torch.zeros(shape, dtype=dtype, device=device)

    monkeypatch.setattr(launch, "_empty", empty)
    case = Case(batch=5, out=16, channels=12, size=(6, 6), cell=(8, 6), n=3)   # GO = 2, GI = 2
    x, attn, warehouse, bias = case.inputs(dtype=torch.float32)
    layer = launch._layer(x, warehouse.reshape(*warehouse.shape[:3], -1), *case.args())
    shape = layer.cost_shape(4)
    chunk_bytes = 2 * _unit_bytes(case, direction, 4)
    plan = cost_model.blocked_plan(shape, direction, budget=chunk_bytes)
    assert plan == (1, 2)
    if direction == "forward":
        launch.kw_conv_triton_forward(x, attn, warehouse, None, *case.args(), mode="blocked", chunk_bytes=chunk_bytes)
    else:
        dy = torch.zeros(case.batch, case.out, *case.size)
        launch.kw_conv_triton_backward(dy, x, attn, warehouse, False, *case.args(), mode="blocked",
                                       chunk_bytes=chunk_bytes, output_mask=(True, False, False, False))
    peaks = cost_model.H100_SXM_DATASHEET
    mix_work, conv_work = cost_model._blocked_phases(shape, direction, peaks, plan)[-2:]
    units = case.cell[0] if direction == "forward" else case.cell[1]
    assert len(mix.launches) == len(conv.launches) == mix_work.launches == conv_work.launches == units * 3
    assert math.prod(mix.launches[0][0]) == mix_work.programs       # a full chunk's block
    assert math.prod(conv.launches[0][0]) == conv_work.programs
    assert [math.prod(g) for g, _ in conv.launches[:3]] == [conv_work.programs] * 2 + [conv_work.programs // 2]
    per_unit = layer.weight_numel // units
    assert plan[1] * plan[0] * per_unit in buffers and plan[1] * plan[0] * per_unit * 4 <= chunk_bytes


@interpreter
def test_output_mask_returns_only_what_is_asked():
    case = CASES[4]
    x, attn, warehouse, _ = case.inputs()
    dy = torch.randn(1, case.out, 2, 2, dtype=case.dtype, device=DEVICE)
    _, grads_ref = _reference(case, x, attn, warehouse, None, dy)
    dx, dattn, dwarehouse, dbias = kw_conv_triton_backward(dy, x, attn, warehouse, False, *case.args(),
                                                           output_mask=(False, True, False, True))
    assert dx is None and dwarehouse is None and dbias is None
    _assert_close(dattn, grads_ref[1], case.dtype, "dattn")


@interpreter
def test_batch_zero_launches_nothing():
    case = replace(CASES[0], batch=0)
    x, attn, warehouse, bias = case.inputs()
    y = kw_conv_triton_forward(x, attn, warehouse, bias, *case.args())
    assert y.shape == (0, case.out, *case.size)
    dx, dattn, dwarehouse, dbias = kw_conv_triton_backward(torch.empty_like(y), x, attn, warehouse, True,
                                                           *case.args())
    assert dx.shape == x.shape and dattn.shape == attn.shape
    assert torch.equal(dwarehouse, torch.zeros_like(warehouse)) and torch.equal(dbias, torch.zeros_like(bias))


def test_autotune_pruning_and_buckets(monkeypatch):
    """Configs are pruned to the positions and channel counts (BLOCK 16 for small cells) and, for ieee fp32, to
    spill-free tiles (what KW_OPS_TRITON_AUTOTUNE=1 benchmarks; by default the first of them runs)."""
    from kw_ops.ops.triton import tuning

    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    assert [tuning.bucket(v) for v in (0, 1, 5, 64, 65)] == [0, 1, 8, 64, 128]
    configs = [launch.triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}) for bm, bn, bk in
               [(128, 128, 32), (64, 64, 32), (64, 16, 16), (128, 64, 64)]]
    prune = tuning._prune_for(("PB", "OC", "C"))
    blocks = lambda kept: [tuple(c.kwargs.values()) for c in kept]
    half, single = torch.empty(1, dtype=torch.float16), torch.empty(1, dtype=torch.float32)
    large = {"PB": 4096, "OC": 512, "C": 512}
    assert blocks(prune(configs, {"x_ptr": half, "PB": 4096, "OC": 8, "C": 3})) == [(64, 16, 16)]
    assert blocks(prune(configs, {"x_ptr": half, **large, "PB": 64})) == [(64, 64, 32), (64, 16, 16)]  # 7x7
    assert blocks(prune(configs, {"x_ptr": half, **large})) == blocks(configs)
    assert blocks(prune(configs, {"x_ptr": single, **large}, INPUT_PRECISION="ieee")) == [(64, 64, 32), (64, 16, 16)]
    assert blocks(prune(configs, {"x_ptr": single, **large}, INPUT_PRECISION="tf32")) == blocks(configs)
    monkeypatch.delenv(tuning.AUTOTUNE_ENV)
    assert blocks(prune(configs, {"x_ptr": half, **large, "PB": 64})) == [(64, 64, 32)]
    assert blocks(prune(configs, {"x_ptr": half, **large})) == [(128, 128, 32)]


def test_mode_choice_and_override(monkeypatch):
    monkeypatch.delenv(launch.MODE_ENV, raising=False)
    monkeypatch.delenv(cost_model.PEAKS_ENV, raising=False)
    # ResNet18 KW1x layer4 at batch 128: 512 -> 512 3x3 on 7x7, n = 27
    layer = launch._layer(torch.empty(128, 512, 7, 7, device="meta"), torch.empty(27, 512, 512, 1, device="meta"),
                          512, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    assert layer.cost_shape(2) == cost_model.ConvShape(128, 512, 512, (7, 7), (7, 7), (3, 3), 1, 27, 9, 2,
                                                       cell_rows=512, cell_cols=512)
    depthwise = launch._layer(torch.empty(8, 96, 14, 14, device="meta"), torch.empty(7, 96, 1, 9, device="meta"),
                              96, (3, 3), (2, 2), (1, 1), (1, 1), 96)
    assert depthwise.cost_shape(2).groups == 96
    for direction in ("forward", "dx"):
        assert launch.choose_mode(layer, 2, direction) == cost_model.choose_mode(layer.cost_shape(2), launch.MODES,
                                                                                direction)
    # channels_last input: priced without the boundary conversion, as the dispatcher prices it
    x_cl = torch.empty(128, 512, 7, 7, device="meta").to(memory_format=torch.channels_last)
    assert launch._layer(x_cl, torch.empty(27, 512, 512, 1, device="meta"), 512, (3, 3), (1, 1), (1, 1), (1, 1),
                         1).cost_shape(2).channels_last
    assert not layer.cost_shape(2).channels_last
    # late layer at batch 128: mixing dominates, the blocked mode reads the warehouse once (cost_model tests the why)
    assert launch.choose_mode(layer, 2) == "blocked"
    assert launch.choose_mode(depthwise, 2) == "two_phase"   # blocked runs groups = 1 only
    monkeypatch.setenv(launch.MODE_ENV, "blocked")
    assert launch._resolve_mode(None, depthwise, 2, "forward") == "two_phase"
    assert launch._resolve_mode(None, layer, 2, "dx") == "blocked"
    monkeypatch.setenv(launch.MODE_ENV, "fused")  # the removed re-mixing mode
    with pytest.raises(ValueError, match="KW_OPS_TRITON_MODE"):
        launch.choose_mode(layer, 2)
    monkeypatch.setenv(launch.MODE_ENV, "bogus")
    with pytest.raises(ValueError, match="KW_OPS_TRITON_MODE"):
        launch.choose_mode(layer, 2)


@interpreter
def test_not_supported_reasons_name_every_limit():
    x = torch.randn(2, 4, 5, 5, 5)
    attn = torch.randn(2, 27 * 2, 3)
    warehouse = torch.randn(3, 4, 2, 1, 1, 1)
    reasons = not_supported_reasons(x.to(torch.bfloat16), attn, warehouse, None, 4, (3, 3, 3), (1,) * 3, (1,) * 3,
                                    (1,) * 3, 2)
    text = " | ".join(reasons)
    assert "3-D" in text and "bfloat16" in text and "groups" not in text, text
    case = CASES[0]
    x, attn, warehouse, bias = case.inputs()
    assert supports(x, attn, warehouse, bias, *case.args())
    with pytest.raises(NotImplementedError, match="bfloat16"):
        kw_conv_triton_forward(x.bfloat16(), attn, warehouse, bias, *case.args())


def test_package_import_does_not_import_triton():
    code = ("import sys, kw_ops, kw_ops.ops.triton as t; assert 'triton' not in sys.modules, 'triton imported'; "
            "print(t.supports.__name__)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


# -- GPU ------------------------------------------------------------------------------------------------
def _resnet_layers(preset):
    """(path, Case) for every KW conv of a preset at 224x224 input (spatial size from the stride history)."""
    spec = json.loads((FIXTURES / f"{preset}.json").read_text())
    shapes = {w["index"]: w["shape"] for w in spec["warehouses"]}
    stage_size = {"layer1": 56, "layer2": 28, "layer3": 14, "layer4": 7}
    layers = []
    for layer in spec["kw_layers"]:
        if layer["groups"] != 1 or len(layer["kernel"]) != 2:
            continue
        stage = layer["path"].split(".")[0]
        block0 = ".0." in layer["path"]
        size = stage_size[stage]
        # in the first block of a stage the stride-2 conv (and the downsample) read the previous stage's size
        if block0 and stage != "layer1" and (layer["stride"][0] == 2 or layer["path"].endswith("conv1")):
            size *= 2
        n, c_out, c_in = shapes[layer["warehouse"]][:3]
        layers.append((layer["path"], Case(channels=layer["in"], out=layer["out"], size=(size, size),
                                           kernel=tuple(layer["kernel"]), stride=tuple(layer["stride"]),
                                           padding=tuple(layer["padding"]), dilation=tuple(layer["dilation"]),
                                           cell=(c_out, c_in), n=n, bias=layer["bias"])))
    return layers


def _unique_layers(presets):
    seen, out = set(), []
    for preset in presets:
        for path, case in _resnet_layers(preset):
            if case not in seen:
                seen.add(case)
                out.append(pytest.param(case, id=f"{preset}-{path}"))
    return out


def _check_against_fp64(case, dtype, mode, fwd_only=False):
    """Relative errors of the Triton outputs (dtype) against fp64 torch-path references on the GPU."""
    x, attn, warehouse, bias = case.inputs(device="cuda", dtype=torch.float64)
    if fwd_only:
        y64 = kw_conv_torch(x, attn, warehouse, bias, *case.args())
        grads64 = [None] * 4
        low = [t if t is None else t.to(dtype) for t in (x, attn, warehouse, bias)]
        y_low, grads_low = kw_conv_torch(*low, *case.args()), [None] * 4
    else:
        dy = torch.randn_like(kw_conv_torch(x, attn, warehouse, bias, *case.args()))
        y64, grads64 = _reference(case, x, attn, warehouse, bias, dy)
        low = [t if t is None else t.to(dtype) for t in (x, attn, warehouse, bias, dy)]
        y_low, grads_low = _reference(case, *low)
    got = {"y": kw_conv_triton_forward(*low[:4], *case.args(), mode=mode, input_precision=_precision(dtype))}
    if not fwd_only:
        got.update(zip(("dx", "dattn", "dwarehouse", "dbias"),
                       kw_conv_triton_backward(low[4], *low[:3], case.bias, *case.args(), mode=mode,
                                               input_precision=_precision(dtype))))
    refs = dict(zip(("y", "dx", "dattn", "dwarehouse", "dbias"), (y64, *grads64)))
    torch_low = dict(zip(("y", "dx", "dattn", "dwarehouse", "dbias"), (y_low, *grads_low)))
    for name, value in got.items():
        if refs[name] is None:
            continue
        err = _relative_error(value, refs[name])
        if dtype == torch.float32:
            bound = 1e-5
        else:
            bound = HALF_ERROR_RATIO * _relative_error(torch_low[name], refs[name]) + HALF_ERROR_FLOOR[dtype]
        assert err <= bound, f"{case.id} {name} ({mode}, {dtype}): relative error {err:.3g} > {bound:.3g}"


@pytest.mark.gpu
@gpu_triton
@pytest.mark.parametrize("mode", launch.MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES + [
    Case(batch=5, channels=96, out=160, size=(13, 11), kernel=(3, 3), stride=(2, 2), padding=(1, 1), cell=(32, 48),
         n=37),
    Case(batch=3, channels=64, out=64, size=(9, 9), kernel=(3, 3), whole_kernel=True, cell=(64, 32), n=5),
    Case(batch=4, channels=40, out=24, size=(17,), kernel=(5,), stride=(1,), padding=(2,), dilation=(2,),
         cell=(24, 20), n=11),
    # MobileNetV2 / ConvNeXt depthwise layers (grouped kernels)
    Case(batch=3, channels=96, out=96, size=(15, 13), stride=(2, 2), cell=(32, 1), groups=96, n=7),
    Case(batch=2, channels=64, out=64, size=(14, 14), kernel=(7, 7), padding=(3, 3), cell=(64, 1), groups=64, n=5),
], ids=lambda c: c.id)
def test_gpu_larger_shapes_and_half_precision(case, dtype, mode):
    _check_against_fp64(case, dtype, mode)


@pytest.mark.gpu
@gpu_triton
def test_gpu_tf32_default_is_near_fp32():
    case = Case(batch=4, channels=64, out=64, size=(14, 14), cell=(64, 64), n=9, dtype=torch.float32)
    x, attn, warehouse, bias = case.inputs(device="cuda")
    y = kw_conv_triton_forward(x, attn, warehouse, bias, *case.args())
    ref = kw_conv_torch(*(t.double() for t in (x, attn, warehouse, bias)), *case.args())
    assert _relative_error(y, ref) < 3e-3


@pytest.mark.gpu
@gpu_triton
@pytest.mark.parametrize("batch", [1, 32, 128])
@pytest.mark.parametrize("case", _unique_layers(["kw1x_resnet18", "kw1x_resnet50"]))
def test_gpu_resnet_layers_bf16(case, batch):
    """Every KW1x ResNet18/50 layer shape: forward at batch 1/32/128, backward at batch 1 and 32 (fp64
    references of the backward at batch 128 would dominate the run)."""
    case = replace(case, batch=batch)
    for mode in launch.MODES:
        _check_against_fp64(case, torch.bfloat16, mode, fwd_only=batch == 128)
