"""Triton kernels verified on first use, and the devices they may run on.

No GPU has run this project's Triton kernels yet, so their first call on each new (kernel family, shape bucket,
dtype, device) also runs the torch path and compares: the output in the forward, every gradient in the backward,
with `max |triton - torch| <= ATOL + RTOL[dtype] · max |torch|` (and no NaN the reference lacks). A mismatch warns
once, naming the layer and the error, and that key runs the torch path for the rest of the process (the
dispatcher no longer picks Triton for it, and the call that failed returns the torch result). KW_OPS_VERIFY=0
turns this off, =1 (default) verifies each key once, =always verifies every call.

`arch_reasons` is Triton's gate: tensor cores for the dtype (sm_80+ for bf16 and fp32 as TF32, sm_70+ for fp16;
on ROCm the CDNA chips with matrix cores, gfx90a / gfx942 / gfx950, untested here).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
import warnings

import torch

from .cpu_costs import bucket

__all__ = ["VERIFY_ENV", "RTOL", "ATOL", "verify_mode", "arch_reasons", "failed", "verified_implementation",
           "current_layer", "reset"]

VERIFY_ENV = "KW_OPS_VERIFY"
#: relative tolerance by dtype (of the reference's largest magnitude): a few units of the operands' rounding (TF32
#: and fp16 keep 10 mantissa bits, bf16 7) grown over the sums; a wrong tile, phase or chunk errs by O(1)
RTOL = {torch.float64: 1e-9, torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
ATOL = 1e-5
_ROCM_MATRIX_CORES = ("gfx90a", "gfx942", "gfx950")

_VERIFIED: set = set()
_FAILED: dict = {}
_LAYER: contextvars.ContextVar = contextvars.ContextVar("kw_ops_layer", default=None)


def verify_mode() -> str:
    """'0' (off), '1' (first call per key) or 'always', from KW_OPS_VERIFY."""
    value = os.environ.get(VERIFY_ENV, "1")
    if value not in ("0", "1", "always"):
        raise ValueError(f"{VERIFY_ENV} must be 0, 1 or always, got {value!r}")
    return value


def reset() -> None:
    """Forget what was verified and what failed (tests)."""
    _VERIFIED.clear()
    _FAILED.clear()


@contextlib.contextmanager
def current_layer(name: str | None):
    """Name the layer whose calls run inside the block (for the warning of a failed verification)."""
    token = _LAYER.set(name)
    try:
        yield
    finally:
        _LAYER.reset(token)


def arch_reasons(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why Triton's kernels may not run on this device in this dtype (empty: they may)."""
    if device.type != "cuda":
        return []  # the interpreter (TRITON_INTERPRET=1) on CPU tensors
    if torch.version.hip:
        arch = torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
        if not arch.startswith(_ROCM_MATRIX_CORES):
            return [f"ROCm {arch}: the Triton kernels are only enabled on CDNA matrix-core chips "
                    f"({', '.join(_ROCM_MATRIX_CORES)})"]
        return []
    capability = torch.cuda.get_device_capability(device)
    needed = (7, 0) if dtype == torch.float16 else (8, 0)
    if capability < needed:
        return [f"sm_{capability[0]}{capability[1]} has no tensor cores for {str(dtype).replace('torch.', '')} "
                f"(the Triton kernels need sm_{needed[0]}{needed[1]}+)"]
    return []


def key_of(device: str, dtype: str, batch: int, channels: int, out_channels: int, kernel_size, stride, groups: int,
           positions: int) -> tuple:
    """(kernel family, shape bucket, dtype, device): one verification covers calls that share it."""
    family = "dense" if groups == 1 else ("depthwise" if channels == groups else "grouped")
    return (family, bucket(batch), bucket(channels), bucket(out_channels), tuple(kernel_size), tuple(stride),
            bucket(positions), dtype, device)


def _key(x: torch.Tensor, out_channels: int, kernel_size, stride, padding, dilation, groups: int) -> tuple:
    from .torch_impl import conv_output_size

    positions = math.prod(conv_output_size(x.shape[2:], kernel_size, stride, padding, dilation))
    return key_of(str(x.device), str(x.dtype).replace("torch.", ""), x.shape[0], x.shape[1], out_channels,
                  kernel_size, stride, groups, positions)


def failed(call) -> bool:
    """Whether Triton failed its verification for a dispatch.Call's key in this process."""
    if not _FAILED:
        return False
    device = call.device if call.device != "cuda" else f"cuda:{torch.cuda.current_device()}"
    positions = math.prod(call.out_size)
    return key_of(device, call.dtype, call.batch, call.channels, call.out_channels, call.kernel_size, call.stride,
                  call.groups, positions) in _FAILED


def _error(result: torch.Tensor, reference: torch.Tensor, rtol: float) -> tuple[bool, str]:
    """(within tolerance, what was measured) for one result against its reference."""
    result, reference = result.double(), reference.double()
    if torch.isnan(result).any() and not torch.isnan(reference).any():
        return False, "NaN where the torch path has none"
    scale = reference.abs().max().item() if reference.numel() else 0.0
    error = (result - reference).abs().max().item() if reference.numel() else 0.0
    tolerance = ATOL + rtol * scale
    return error <= tolerance, f"max abs error {error:.3g} (torch path's largest {scale:.3g}, tolerance {tolerance:.3g})"


def _compare(key, direction: str, results, references, dtype: torch.dtype) -> bool:
    """True when every result matches its reference; else warn once and mark the key failed."""
    names = ("dx", "dattn", "dwarehouse", "dbias") if direction == "backward" else ("y",)
    problems = []
    for name, result, reference in zip(names, results, references):
        if result is None or reference is None:
            continue
        ok, text = _error(result, reference, RTOL.get(dtype, 2e-2))
        if not ok:
            problems.append(f"{name}: {text}")
    if not problems:
        _VERIFIED.add((key, direction))
        return True
    _FAILED[key] = problems
    from .dispatch import clear_decisions

    clear_decisions()
    layer = _LAYER.get() or "a KW convolution"
    family, batch, channels, out_channels, kernel, stride, _, dtype_name, device = key
    warnings.warn(f"kw_ops: the Triton {direction} of {layer} ({family} {channels}->{out_channels} "
                  f"{'x'.join(map(str, kernel))}, batch ~{batch}, {dtype_name}, {device}) disagrees with the torch "
                  f"path: {'; '.join(problems)}. This shape bucket runs the torch path for the rest of the process; "
                  f"please report it with `python -m kw_ops info`.", RuntimeWarning, stacklevel=2)
    return False


def _reference_inputs(tensors, dtype: torch.dtype):
    """The torch path's inputs: 16-bit tensors in fp32, for a reference with less rounding than the result."""
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return [t.to(wide) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]


def _checked(direction: str, run, reference, tensors: tuple, args: tuple, formulation):
    """run(*tensors, *args, formulation) (Triton), checked against reference(*tensors, *args, None) (the torch
    path) when its key is new or `always` is asked for; the reference's result where they disagree or disagreed
    before. x is tensors[0] in the forward (x, attn, warehouse, bias), tensors[1] in the backward (grad, x, ...)."""
    mode = verify_mode()
    x = tensors[0] if direction == "forward" else tensors[1]
    geometry = args[:6] if direction == "forward" else args[1:7]
    key = _key(x, *geometry)
    if key in _FAILED:
        return reference(*tensors, *args, None)
    result = run(*tensors, *args, formulation)
    if mode == "0" or (mode == "1" and (key, direction) in _VERIFIED):
        return result
    expected = reference(*_reference_inputs(tensors, x.dtype), *args, None)
    results, expecteds = (result, expected) if direction == "backward" else ((result,), (expected,))
    if _compare(key, direction, results, expecteds, x.dtype):
        return result
    cast = tuple(e.to(r.dtype) if e is not None and r is not None else e for e, r in zip(expecteds, results))
    return cast if direction == "backward" else cast[0]


def verified_implementation(forward, backward, reference_forward, reference_backward):
    """(forward, backward) of Triton that verify each new key against the torch path (module docstring)."""

    def checked_forward(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation, groups,
                        formulation=None):
        return _checked("forward", forward, reference_forward, (x, attn, warehouse, bias),
                        (out_channels, kernel_size, stride, padding, dilation, groups), formulation)

    def checked_backward(grad, x, attn, warehouse, has_bias, out_channels, kernel_size, stride, padding, dilation,
                         groups, output_mask, formulation=None):
        return _checked("backward", backward, reference_backward, (grad, x, attn, warehouse),
                        (has_bias, out_channels, kernel_size, stride, padding, dilation, groups, output_mask),
                        formulation)

    return checked_forward, checked_backward
