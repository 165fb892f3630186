"""What the Triton backend can run, decided without importing Triton's kernels (cheap, import-safe).

`not_supported_reasons(...)` takes the same normalised arguments as `kw_conv_torch` and returns every
reason the Triton kernels cannot run this call (an empty list: they can). `supports(...)` is its
boolean. Limits of the kernels (see the headers of conv_kernels.py and gemm_kernels.py):

- 1-D and 2-D convolutions (1-D runs as 2-D with a unit height); 3-D falls back to the torch path;
- any groups: groups != 1 (depthwise, grouped) runs the CUDA-core kernels of grouped_kernels.py;
- CUDA tensors in float16, bfloat16, float32; float64 only under the Triton interpreter
  (TRITON_INTERPRET=1, CPU tensors), where the kernels are tested;
- batch and the layer's grid below CUDA's 65535 limit of the second and third launch dimensions.
"""
from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence

import torch

__all__ = ["interpreting", "triton_available", "not_supported_reasons", "supports", "MAX_GRID_YZ"]

# CUDA's limit on the y and z launch dimensions (the kernels put the batch and the channel tiles there).
MAX_GRID_YZ = 65535
_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETER_DTYPES = (torch.float16, torch.float32, torch.float64)


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    """Triton importable (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def not_supported_reasons(x: torch.Tensor, attn: torch.Tensor, warehouse: torch.Tensor, bias: torch.Tensor | None,
                          out_channels: int, kernel_size: Sequence[int], stride: Sequence[int],
                          padding: Sequence[int], dilation: Sequence[int], groups: int) -> list[str]:
    """Every reason the Triton kernels cannot run this (already checked and normalised) kw_conv call."""
    reasons = []
    if not triton_available():
        reasons.append("triton is not installed (pip install triton; it ships with CUDA builds of torch on Linux)")
    if interpreting():
        if x.device.type != "cpu":
            reasons.append(f"TRITON_INTERPRET=1 runs kernels on CPU tensors, got {x.device}")
        if x.dtype not in _INTERPRETER_DTYPES:
            reasons.append(f"dtype {x.dtype} is not run in the Triton interpreter (float16/32/64; its bf16 is wrong)")
    else:
        if x.device.type != "cuda":
            reasons.append(f"the Triton kernels need CUDA tensors, got {x.device}")
        if x.dtype not in _GPU_DTYPES:
            reasons.append(f"dtype {x.dtype} not supported by the Triton kernels (float16, bfloat16, float32)")
    dims = len(kernel_size)
    if dims not in (1, 2):
        reasons.append(f"{dims}-D convolution: the Triton kernels do 1-D and 2-D (3-D uses the torch path)")
    cell_k = tuple(warehouse.shape[3:])
    if cell_k != tuple(kernel_size) and any(c != 1 for c in cell_k):
        reasons.append(f"cell kernel {cell_k} is neither all ones nor the kernel {tuple(kernel_size)}")
    if x.shape[0] > MAX_GRID_YZ:
        reasons.append(f"batch {x.shape[0]} exceeds the launch grid limit {MAX_GRID_YZ}")
    # the weight-gradient grid has (kernel positions x input channels per group) programs along y for groups != 1
    wgrad_rows = math.prod(kernel_size) * (x.shape[1] // groups if groups != 1 and x.dim() >= 2 else 1)
    if wgrad_rows > MAX_GRID_YZ:
        reasons.append(f"{wgrad_rows} kernel positions x input channels per group exceed the launch grid limit")
    return reasons


def supports(*args, **kwargs) -> bool:
    """True when `not_supported_reasons` with the same arguments finds nothing."""
    return not not_supported_reasons(*args, **kwargs)
