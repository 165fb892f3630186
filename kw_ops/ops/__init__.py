"""The fused KW op: `kw_conv` (registered as torch.ops.kw_ops.kw_conv), its backends and the PyTorch math."""
from .backends import BACKENDS, BackendUnavailableError, backend_report, not_supported_reasons, use_backend
from .functional import kw_conv
from .torch_impl import assemble_kernels

__all__ = ["BACKENDS", "BackendUnavailableError", "assemble_kernels", "backend_report", "kw_conv",
           "not_supported_reasons", "use_backend"]
