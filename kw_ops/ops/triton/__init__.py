"""Triton kernels of the KW op (forward, backward), imported lazily.

`import kw_ops.ops.triton` needs no Triton: the capability checks live in `capability` and the launchers
are loaded on first access (`kw_conv_triton_forward`, `kw_conv_triton_backward`, `choose_mode`), which
imports triton and compiles nothing until a kernel runs.
"""
from __future__ import annotations

from .capability import interpreting, not_supported_reasons, supports, triton_available

__all__ = ["interpreting", "not_supported_reasons", "supports", "triton_available", "kw_conv_triton_forward",
           "kw_conv_triton_backward", "choose_mode"]

_LAZY = ("kw_conv_triton_forward", "kw_conv_triton_backward", "choose_mode")


def __getattr__(name):
    if name in _LAZY:
        if not triton_available():
            raise ImportError(f"kw_ops.ops.triton.{name} needs triton: pip install triton")
        from . import launch

        return getattr(launch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
