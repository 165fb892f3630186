"""torch.library registration of the KW op: `kw_ops::kw_conv` and its backward `kw_ops::kw_conv_backward`.

    kw_conv(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation, groups,
            backend, formulation) -> y          (a fresh tensor, channels_last where x is, as nn.Conv2d)
    kw_conv_backward(grad, x, attn, warehouse, has_bias, <geometry>, output_mask, backend, formulation)
            -> (dx, dattn, dwarehouse, dbias)       an empty [0] tensor where output_mask says "not needed"

The autograd formula is hand-written: only x, attn and warehouse are saved; the backend recomputes the
per-sample kernels in bounded pieces. `backend` names the implementation chosen by kw_ops.ops.backends
before the call; `formulation` is a torch-backend hint ('' = choose by shape). Autocast (CPU and CUDA)
casts the floating inputs to the autocast dtype and runs the op once in that dtype.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .backends import implementation
from .checks import check_kw_conv_args
from .torch_impl import conv_output_size, output_memory_format

__all__ = ["kw_conv_op", "kw_conv_backward_op"]


@torch.library.custom_op("kw_ops::kw_conv", mutates_args=())
def kw_conv_op(x: Tensor, attn: Tensor, warehouse: Tensor, bias: Optional[Tensor], out_channels: int,
               kernel_size: List[int], stride: List[int], padding: List[int], dilation: List[int], groups: int,
               backend: str, formulation: str) -> Tensor:
    check_kw_conv_args(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation, groups)
    forward, _ = implementation(backend)
    y = forward(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation, groups,
                formulation or None)
    return y.contiguous(memory_format=output_memory_format(x))


@kw_conv_op.register_fake
def _kw_conv_fake(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation, groups, backend,
                  formulation):
    check_kw_conv_args(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation, groups)
    out = conv_output_size(x.shape[2:], kernel_size, stride, padding, dilation)
    return torch.empty(x.shape[0], out_channels, *out, dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))


@torch.library.custom_op("kw_ops::kw_conv_backward", mutates_args=())
def kw_conv_backward_op(grad: Tensor, x: Tensor, attn: Tensor, warehouse: Tensor, has_bias: bool, out_channels: int,
                        kernel_size: List[int], stride: List[int], padding: List[int], dilation: List[int],
                        groups: int, output_mask: List[bool], backend: str,
                        formulation: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    _, backward = implementation(backend)
    grads = backward(grad, x, attn, warehouse, has_bias, out_channels, kernel_size, stride, padding, dilation,
                     groups, output_mask, formulation or None)
    return tuple(g if g is not None else grad.new_empty(0) for g in grads)


@kw_conv_backward_op.register_fake
def _kw_conv_backward_fake(grad, x, attn, warehouse, has_bias, out_channels, kernel_size, stride, padding, dilation,
                           groups, output_mask, backend, formulation):
    need_x, need_attn, need_warehouse, need_bias = output_mask
    empty = grad.new_empty(0)
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else empty,
            torch.empty_like(attn) if need_attn else empty,
            torch.empty_like(warehouse) if need_warehouse else empty,
            grad.new_empty(out_channels) if has_bias and need_bias else empty)


def _setup_context(ctx, inputs, output):
    x, attn, warehouse, bias, *geometry, backend, formulation = inputs
    ctx.save_for_backward(x, attn, warehouse)
    ctx.has_bias = bias is not None
    ctx.geometry = geometry
    ctx.backend, ctx.formulation = backend, formulation


def _backward(ctx, grad):
    x, attn, warehouse = ctx.saved_tensors
    mask = [bool(v) for v in ctx.needs_input_grad[:4]]
    mask[3] = mask[3] and ctx.has_bias
    if not any(mask):
        return (None,) * 12
    dx, dattn, dwarehouse, dbias = kw_conv_backward_op(grad, x, attn, warehouse, ctx.has_bias, *ctx.geometry, mask,
                                                       ctx.backend, ctx.formulation)
    grads = [g if needed else None for g, needed in zip((dx, dattn, dwarehouse, dbias), mask)]
    return (*grads, *(None,) * 8)


kw_conv_op.register_autograd(_backward, setup_context=_setup_context)


# -- autocast: cast to the autocast dtype of the device (bf16 or fp16), run once in it ----------
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_lib = torch.library.Library("kw_ops", "FRAGMENT")


def _register_autocast(device_type: str) -> None:
    key_name = _AUTOCAST_KEYS[device_type]
    key = getattr(torch._C.DispatchKey, key_name)
    overload = torch.ops.kw_ops.kw_conv.default

    def cast_and_call(*args):
        dtype = torch.get_autocast_dtype(device_type)
        args = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() and a.device.type == device_type
                else a for a in args]
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return overload(*args)

    if overload.has_kernel_for_dispatch_key(key):
        overload.py_kernels.pop(key, None)
    overload.py_impl(key)(cast_and_call)  # seen by tracing (torch.compile, make_fx)
    _lib.impl("kw_conv", lambda _keyset, *args: cast_and_call(*args), key_name, with_keyset=True)


for _device in _AUTOCAST_KEYS:
    _register_autocast(_device)
