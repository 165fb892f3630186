"""The fused KW op: `kw_conv` and the pure-PyTorch implementation behind it."""
from .functional import kw_conv
from .torch_impl import assemble_kernels

__all__ = ["kw_conv", "assemble_kernels"]
