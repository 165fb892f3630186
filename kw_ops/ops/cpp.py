"""The `cpp` backend: the compiled CPU kernel of the KW op (csrc/, the extension kw_ops._C).

Same normalised arguments as kw_ops.ops.torch_impl (twin signatures). Two formulations, chosen per call by
kw_ops.ops.dispatch (by estimated cost) or forced with formulation='gemm' / 'grouped' (the torch backend's
names):

    gemm     groups = 1: im2col once, output-channel blocks of mixed kernels consumed at once by GEMMs
    grouped  any groups: per sample and output block, mix, then ATen's convolution ('conv' in csrc/)

`BLOCK_BYTES` / `CONV_BLOCK_BYTES` bound the thread-local buffer of mixed kernels (tests lower them to
force several and ragged blocks). The extension is optional: `unavailable_reasons()` says why it
cannot run (not built, build skipped or failed, import error).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from .torch_impl import conv_output_size

__all__ = ["available", "unavailable_reasons", "kw_conv_cpp",
           "kw_conv_backward_cpp", "kw_conv_implementation", "BLOCK_BYTES", "CONV_BLOCK_BYTES"]

# Mixed kernels of one output block for all samples (gemm path), resident in L3: smaller blocks make the
# per-sample GEMMs too thin (measured best at 4 MiB on the ResNet18 layer4 shape, benchmarks/bench_cpp.py).
BLOCK_BYTES = 4 << 20
# Mixed kernels per convolution call (conv path): one sample's block, or several samples' whole kernels.
CONV_BLOCK_BYTES = 4 << 20
# Output positions from which the conv path convolves one sample per call (oneDNN is efficient at batch 1
# there); below it, as many samples as CONV_BLOCK_BYTES holds go into one call with groups = samples.
PER_SAMPLE_POSITIONS = 56 * 56
_PATHS = {"gemm": 1, "grouped": 2}
_BUILD_NOTE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_C_build.txt")

#: KW_OPS_NO_EXT=1 skips the extension: at install (setup.py does not build it) and at run time (not loaded).
NO_EXT_VAR = "KW_OPS_NO_EXT"

if os.environ.get(NO_EXT_VAR) == "1":
    _IMPORT_ERROR = f"{NO_EXT_VAR}=1 is set"
else:
    try:
        from kw_ops import _C  # noqa: F401  (loading it registers torch.ops.kw_ops_C)
        _IMPORT_ERROR = None
    except ImportError as error:  # not built, or built against another torch
        _IMPORT_ERROR = f"{type(error).__name__}: {error}"


def _find_unavailable_reasons() -> tuple[str, ...]:
    """Why the compiled kernel cannot run here (empty: it can), from the import above and the build note."""
    if _IMPORT_ERROR is None:
        return ()
    how = "pip install -e . --no-build-isolation with a C++ compiler"
    if os.environ.get(NO_EXT_VAR) == "1":
        return (f"{NO_EXT_VAR}=1 is set: kw_ops does not load the compiled extension kw_ops._C (unset it to use "
                f"it where it is built; {how})",)
    note = ""
    if os.path.exists(_BUILD_NOTE):
        with open(_BUILD_NOTE) as f:
            note = f.read().strip()
    if note and note != "kw_ops._C built":
        return (f"{note} ({how})",)
    return (f"the compiled extension kw_ops._C is not importable ({_IMPORT_ERROR}; {how})",)


# Decided once, at import: the automatic backend choice asks inside torch.compile'd regions, where looking
# at files (the build note) would break the graph.
_UNAVAILABLE = _find_unavailable_reasons()


def available() -> bool:
    return _IMPORT_ERROR is None


def unavailable_reasons() -> list[str]:
    """Why the compiled kernel cannot run here (empty: it can); decided when kw_ops.ops.cpp is imported."""
    return list(_UNAVAILABLE)


def _path(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups, formulation):
    if groups != 1:
        return "grouped"
    if formulation in ("gemm", "grouped"):
        return formulation
    from .dispatch import backend_formulation  # a direct call of the registered op: the dispatcher's pick

    return backend_formulation("cpp", x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups)


def _block_bytes(path: str) -> int:
    return BLOCK_BYTES if path == "gemm" else CONV_BLOCK_BYTES


def _conv_samples(x, kernel_size, stride, padding, dilation) -> int:
    """Samples per convolution call on the conv path: 1 for large maps, else 0 (as many as the buffer holds)."""
    positions = math.prod(conv_output_size(x.shape[2:], kernel_size, stride, padding, dilation))
    return 1 if positions >= PER_SAMPLE_POSITIONS else 0


def kw_conv_cpp(x: torch.Tensor, attn: torch.Tensor, warehouse: torch.Tensor, bias: torch.Tensor | None,
                out_channels: int, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, formulation: str | None = None) -> torch.Tensor:
    """KW convolution by the compiled CPU kernel; the twin of kw_ops.ops.torch_impl.kw_conv_torch.

    x [B, C_in, *size], attn [B, m, n], warehouse [n, c_out, c_in, *cell_k], bias [C_out] or None
    -> y [B, C_out, *out_size] (a fresh contiguous tensor)
    """
    path = _path(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups, formulation)
    y = torch.ops.kw_ops_C.kw_conv_forward(x.contiguous(), attn.contiguous(), warehouse.contiguous(), out_channels,
                                           list(kernel_size), list(stride), list(padding), list(dilation), groups,
                                           _PATHS[path], _block_bytes(path), _conv_samples(x, kernel_size, stride,
                                                                                           padding, dilation))
    if bias is not None:
        y += bias.view(1, -1, *([1] * (x.dim() - 2)))
    return y


def kw_conv_backward_cpp(grad: torch.Tensor, x: torch.Tensor, attn: torch.Tensor, warehouse: torch.Tensor,
                         has_bias: bool, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int],
                         padding: Sequence[int], dilation: Sequence[int], groups: int,
                         output_mask: Sequence[bool], formulation: str | None = None):
    """Gradients of `kw_conv_cpp`: (dx, dattn, dwarehouse, dbias), None where not asked for."""
    need_x, need_attn, need_warehouse, need_bias = output_mask
    dbias = grad.sum(dim=[d for d in range(grad.dim()) if d != 1]) if has_bias and need_bias else None
    if not (need_x or need_attn or need_warehouse):
        return None, None, None, dbias
    path = _path(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups, formulation)
    dx, dattn, dwarehouse = torch.ops.kw_ops_C.kw_conv_backward(
        grad.contiguous(), x.contiguous(), attn.contiguous(), warehouse.contiguous(), out_channels, list(kernel_size),
        list(stride), list(padding), list(dilation), groups, [int(need_x), int(need_attn), int(need_warehouse)],
        _PATHS[path], _block_bytes(path), _conv_samples(x, kernel_size, stride, padding, dilation))
    return (dx if need_x else None, dattn if need_attn else None, dwarehouse if need_warehouse else None, dbias)


def kw_conv_implementation():
    """(forward, backward) for kw_ops.ops.backends; raises ImportError with the reason when not built."""
    if not available():
        raise ImportError("kw_ops cpp backend: " + "; ".join(unavailable_reasons()))
    return kw_conv_cpp, kw_conv_backward_cpp
