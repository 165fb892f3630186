"""Triton kernels of the KW op (forward, backward), imported lazily.

`import kw_ops.ops.triton` needs no Triton: the capability checks live in `capability` and the launchers
are loaded on first access (`kw_conv_triton_forward`, `kw_conv_triton_backward`, `choose_mode`), which
imports triton and compiles nothing until a kernel runs.
"""
from __future__ import annotations

from .capability import interpreting, not_supported_reasons, supports, triton_available

__all__ = ["interpreting", "not_supported_reasons", "supports", "triton_available", "kw_conv_triton_forward",
           "kw_conv_triton_backward", "choose_mode", "kw_conv_implementation"]

_LAZY = ("kw_conv_triton_forward", "kw_conv_triton_backward", "choose_mode")


def kw_conv_implementation():
    """(forward, backward) for kw_ops.ops.backends, with the arguments of kw_conv_torch / kw_conv_backward_torch.

    The op's `formulation` (the torch path's 'grouped' / 'gemm') does not apply here; the Triton mode
    (launch.MODES) is chosen by `choose_mode` or KW_OPS_TRITON_MODE.
    """
    from . import launch

    def forward(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation, groups,
                formulation=None):
        return launch.kw_conv_triton_forward(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding,
                                             dilation, groups)

    def backward(grad, x, attn, warehouse, has_bias, out_channels, kernel_size, stride, padding, dilation, groups,
                 output_mask, formulation=None):
        return launch.kw_conv_triton_backward(grad, x, attn, warehouse, has_bias, out_channels, kernel_size, stride,
                                              padding, dilation, groups, output_mask=tuple(output_mask))

    return forward, backward


def __getattr__(name):
    if name in _LAZY:
        if not triton_available():
            raise ImportError(f"kw_ops.ops.triton.{name} needs triton: pip install triton")
        from . import launch

        return getattr(launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
