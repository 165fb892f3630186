"""torch.library registration of the KW op: `kw_ops::kw_conv` and its backward `kw_ops::kw_conv_backward`.

    kw_conv(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation, groups,
            backend, formulation) -> y          (a fresh tensor, channels_last where x is, as nn.Conv2d)
    kw_conv_backward(grad, x, attn, warehouse, has_bias, <geometry>, output_mask, backend, formulation)
            -> (dx, dattn, dwarehouse, dbias)       an empty [0] tensor where output_mask says "not needed"

The autograd formula is hand-written: only x, attn and warehouse are saved; the backend recomputes the
per-sample kernels in bounded pieces. The backward op is differentiable too (`_double_backward`: the op and
the backward op again), so any order of backward works; both have forward-mode formulas (`_jvp`,
`_backward_jvp`). `KWConvFunction` / `KWConvBackwardFunction` carry these formulas as autograd.Functions with
setup_context, which torch.func needs (the public `kw_conv` calls them); vmap uses the ops' batching rules
(the vmapped dim folded into the batch, or one call per slice where the warehouse itself is vmapped).
`backend` names the implementation the dispatcher chose (kw_ops.ops.dispatch), or 'auto' (inside torch.compile
with symbolic sizes: the dispatcher decides when the op runs); `formulation` is the backend's path ('' = the
dispatcher's choice). Autocast (CPU and CUDA) casts the floating inputs to the autocast
dtype and runs the op once in that dtype.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .backends import implementation
from .checks import check_kw_conv_args
from .torch_impl import conv_output_size, output_memory_format

__all__ = ["kw_conv_op", "kw_conv_backward_op", "KWConvFunction", "KWConvBackwardFunction", "apply_kw_conv",
           "autocast_args"]


@torch.library.custom_op("kw_ops::kw_conv", mutates_args=())
def kw_conv_op(x: Tensor, attn: Tensor, warehouse: Tensor, bias: Optional[Tensor], out_channels: int,
               kernel_size: List[int], stride: List[int], padding: List[int], dilation: List[int], groups: int,
               backend: str, formulation: str) -> Tensor:
    check_kw_conv_args(x, attn, warehouse, bias, out_channels, kernel_size, stride, padding, dilation, groups)
    if backend == "auto":  # symbolic sizes under torch.compile: decided here, on the concrete ones
        from .dispatch import op_choice

        backend, formulation = op_choice(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation,
                                         groups, backward=False)
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
    if backend == "auto":
        from .dispatch import op_choice

        backend, formulation = op_choice(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation,
                                         groups, backward=True)
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


# -- autograd -----------------------------------------------------------------------------------
def _produced(output_mask, has_bias: bool) -> list[bool]:
    """Which of the backward op's (dx, dattn, dwarehouse, dbias) are real gradients, not empty placeholders."""
    need_x, need_attn, need_warehouse, need_bias = output_mask
    return [bool(need_x), bool(need_attn), bool(need_warehouse), bool(need_bias and has_bias)]


def apply_kw_conv(*args) -> Tensor:
    """kw_conv_op(*args) through `KWConvFunction` in eager mode (torch.func needs its setup_context), the
    registered op itself while torch.compile traces (dynamo cannot trace an autograd.Function applied inside
    another's backward); both carry the same formulas."""
    if torch.compiler.is_compiling():
        return kw_conv_op(*args)
    return KWConvFunction.apply(*args)


def _setup_context(ctx, inputs, output):
    x, attn, warehouse, bias, *geometry, backend, formulation = inputs
    ctx.save_for_backward(x, attn, warehouse)
    ctx.save_for_forward(x, attn, warehouse)
    ctx.has_bias = bias is not None
    ctx.geometry = geometry
    ctx.backend, ctx.formulation = backend, formulation
    ctx.out_shape = output.shape


def _conv(ctx, x, attn, warehouse, bias):
    """kw_conv with ctx's geometry and backend, itself differentiable."""
    return apply_kw_conv(x, attn, warehouse, bias, *ctx.geometry, ctx.backend, ctx.formulation)


@dataclass(frozen=True)
class _BackwardSettings:
    """The backward op's non-tensor arguments as one opaque value (torch.func's generated vmap rule miscounts
    list arguments of an autograd.Function when it vmaps its jvp)."""

    has_bias: bool
    geometry: tuple
    output_mask: tuple
    backend: str
    formulation: str

    def args(self) -> list:
        return [self.has_bias, *self.geometry, list(self.output_mask), self.backend, self.formulation]


def _conv_backward(ctx, grad, x, attn, warehouse, mask, has_bias=False):
    """kw_conv_backward with ctx's geometry and backend, itself differentiable (see `apply_kw_conv`)."""
    if torch.compiler.is_compiling():
        return kw_conv_backward_op(grad, x, attn, warehouse, has_bias, *ctx.geometry, mask, ctx.backend,
                                   ctx.formulation)
    settings = _BackwardSettings(has_bias, tuple(ctx.geometry), tuple(mask), ctx.backend, ctx.formulation)
    return KWConvBackwardFunction.apply(grad, x, attn, warehouse, settings)


def _mixture_sum(pairs):
    """([a_1 | a_2 ...], [E_1 ; E_2 ...]) over the pairs whose parts both exist: kw_conv with them is the sum of
    kw_conv(x, a_i, E_i) (mixing is bilinear); None without a pair."""
    pairs = [(a, w) for a, w in pairs if a is not None and w is not None]
    if not pairs:
        return None
    return torch.cat([a for a, _ in pairs], dim=-1), torch.cat([w for _, w in pairs], dim=0)


def _directional(ctx, x, attn, warehouse, t_x, t_attn, t_warehouse, t_bias, out_shape):
    """J t, the op's derivative along t (None where every t is None):

        J t = kw_conv(t_x, attn, E) + kw_conv(x, [t_attn | attn], [E ; t_E]) + t_bias
    """
    mixed = _mixture_sum(((t_attn, warehouse), (attn, t_warehouse)))
    terms = []
    if t_x is not None:
        terms.append(_conv(ctx, t_x, attn, warehouse, t_bias))
    if mixed is not None:
        terms.append(_conv(ctx, x, *mixed, t_bias if t_x is None else None))
    if not terms and t_bias is not None:
        terms.append(t_bias.view(1, -1, *([1] * (len(out_shape) - 2))).expand(out_shape))
    result = None
    for term in terms:
        result = term if result is None else result + term
    return result


def _backward(ctx, grad):
    x, attn, warehouse = ctx.saved_tensors
    mask = _produced(ctx.needs_input_grad[:4], ctx.has_bias)
    if not any(mask):
        return (None,) * 12
    grads = _conv_backward(ctx, grad, x, attn, warehouse, mask, ctx.has_bias)
    return (*(g if needed else None for g, needed in zip(grads, mask)), *(None,) * 8)


def _jvp(ctx, t_x, t_attn, t_warehouse, t_bias, *_):
    x, attn, warehouse = ctx.saved_tensors
    tangent = _directional(ctx, x, attn, warehouse, t_x, t_attn, t_warehouse, t_bias, ctx.out_shape)
    return tangent if tangent is not None else x.new_zeros(ctx.out_shape)


def _save_backward_context(ctx, grad, x, attn, warehouse, settings: _BackwardSettings):
    ctx.save_for_backward(grad, x, attn, warehouse)
    ctx.save_for_forward(grad, x, attn, warehouse)
    ctx.produced = _produced(settings.output_mask, settings.has_bias)
    ctx.geometry = list(settings.geometry)
    ctx.backend, ctx.formulation = settings.backend, settings.formulation
    ctx.set_materialize_grads(False)  # an unused gradient stays None: no convolution of zeros


def _setup_backward_context(ctx, inputs, output):  # the registered op's flat arguments
    grad, x, attn, warehouse, has_bias, *geometry, output_mask, backend, formulation = inputs
    _save_backward_context(ctx, grad, x, attn, warehouse,
                           _BackwardSettings(has_bias, tuple(geometry), tuple(output_mask), backend, formulation))


def _double_backward(ctx, grad_dx, grad_dattn, grad_dwarehouse, grad_dbias):
    """Gradients of <u, backward(g, x, attn, E)> with u = (grad_dx, grad_dattn, grad_dwarehouse, grad_dbias).

    The backward is J^T g with J the Jacobian of y = kw_conv(x, attn, E) + bias, so <u, J^T g> = <g, J u> and

        J u = kw_conv(u_x, attn, E) + kw_conv(x, [u_attn | attn], [E ; u_E]) + u_bias

    (the op is linear in x and bilinear in (attn, E): two mixtures concatenated along n give the sum of both
    terms). Hence d/dg = J u, and d/dx, d/dattn, d/dE are the op's own backward of these two convolutions
    with cotangent g. Both steps are the differentiable op and backward op again: any order works.
    """
    grad, x, attn, warehouse = ctx.saved_tensors
    need_grad, need_x, need_attn, need_warehouse = ctx.needs_input_grad[:4]
    u_x, u_attn, u_warehouse, u_bias = (u if real else None for u, real in
                                        zip((grad_dx, grad_dattn, grad_dwarehouse, grad_dbias), ctx.produced))
    n = warehouse.shape[0]
    d_grad = d_x = d_attn = d_warehouse = None
    if need_grad:
        d_grad = _directional(ctx, x, attn, warehouse, u_x, u_attn, u_warehouse, u_bias, grad.shape)
    mixed = _mixture_sum(((u_attn, warehouse), (attn, u_warehouse)))
    if mixed is not None:
        mask = [need_x, need_attn and u_warehouse is not None, need_warehouse and u_attn is not None, False]
        if any(mask):
            mixed_dx, mixed_dattn, mixed_dwarehouse, _ = _conv_backward(ctx, grad, x, *mixed, mask)
            d_x = mixed_dx if mask[0] else None
            d_attn = mixed_dattn[..., -n:] if mask[1] else None  # the attn block pairs with u_E (last)
            d_warehouse = mixed_dwarehouse[:n] if mask[2] else None  # the E block pairs with u_attn (first)
    if u_x is not None and (need_attn or need_warehouse):
        _, ux_dattn, ux_dwarehouse, _ = _conv_backward(ctx, grad, u_x, attn, warehouse,
                                                       [False, need_attn, need_warehouse, False])
        d_attn = _add(d_attn, ux_dattn if need_attn else None)
        d_warehouse = _add(d_warehouse, ux_dwarehouse if need_warehouse else None)
    return (d_grad, d_x, d_attn, d_warehouse, *(None,) * 10)


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """a + b where None stands for zero."""
    return b if a is None else a if b is None else a + b


def _backward_jvp(ctx, t_grad, t_x, t_attn, t_warehouse, *_):
    """Tangents of (dx, dattn, dwarehouse, dbias) = backward(g, x, attn, E) along (t_g, t_x, t_attn, t_E).

    The backward is linear in g and in x (dattn, dwarehouse: through the per-sample weight gradient) and
    bilinear in (attn, E) (dx: through the mixed kernels; dattn = dW E^T; dwarehouse = attn^T dW), so

        backward(t_g, x, attn, E)                        every output
      + backward(g, t_x, attn, E)                        dattn, dwarehouse
      + backward(g, x, [t_attn | attn], [E ; t_E])       dx; dattn from the attn block; dwarehouse from the E block
    """
    grad, x, attn, warehouse = ctx.saved_tensors
    need_x, need_attn, need_warehouse, need_bias = ctx.produced
    n = warehouse.shape[0]
    tangents = [None] * 4
    if t_grad is not None:
        tangents = list(_conv_backward(ctx, t_grad, x, attn, warehouse, ctx.produced, need_bias))
    if t_x is not None and (need_attn or need_warehouse):
        _, dattn, dwarehouse, _ = _conv_backward(ctx, grad, t_x, attn, warehouse,
                                                 [False, need_attn, need_warehouse, False])
        tangents[1] = _add(tangents[1], dattn if need_attn else None)
        tangents[2] = _add(tangents[2], dwarehouse if need_warehouse else None)
    mixed = _mixture_sum(((t_attn, warehouse), (attn, t_warehouse)))
    if mixed is not None:
        mask = [need_x, need_attn and t_warehouse is not None, need_warehouse and t_attn is not None, False]
        if any(mask):
            dx, dattn, dwarehouse, _ = _conv_backward(ctx, grad, x, *mixed, mask)
            tangents[0] = _add(tangents[0], dx if mask[0] else None)
            tangents[1] = _add(tangents[1], dattn[..., -n:] if mask[1] else None)
            tangents[2] = _add(tangents[2], dwarehouse[:n] if mask[2] else None)
    shapes = (x.shape, attn.shape, warehouse.shape, grad.shape[1:2])
    return tuple(t if t is not None and real else grad.new_zeros(shape if real else 0)
                 for t, real, shape in zip(tangents, ctx.produced, shapes))


class KWConvFunction(torch.autograd.Function):
    """kw_ops::kw_conv with its autograd in the form torch.func needs (setup_context; vmap through the op's
    batching rule). The public `kw_conv` calls this; the op's own register_autograd uses the same formula."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args):
        return kw_conv_op(*args)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)
    jvp = staticmethod(_jvp)


class KWConvBackwardFunction(torch.autograd.Function):
    """kw_ops::kw_conv_backward made differentiable (double backward, torch.func over gradients):
    apply(grad, x, attn, warehouse, settings) with the op's other arguments in a `_BackwardSettings`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, x, attn, warehouse, settings):
        return kw_conv_backward_op(grad, x, attn, warehouse, *settings.args())

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_backward_context(ctx, *inputs)

    @staticmethod
    def backward(ctx, *grads):
        return _double_backward(ctx, *grads)[:5]

    jvp = staticmethod(_backward_jvp)


kw_conv_op.register_autograd(_backward, setup_context=_setup_context)
kw_conv_backward_op.register_autograd(_double_backward, setup_context=_setup_backward_context)


# -- vmap: fold the vmapped dim into the batch where one layer serves every slice, else a loop ----
def _vmapped_first(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    """t with the vmapped dim in front ([size, *t.shape] expanded when t is not vmapped)."""
    if t is None:
        return None
    return t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


@kw_conv_op.register_vmap
def _kw_conv_vmap(info, in_dims, x, attn, warehouse, bias, *settings):
    size = info.batch_size
    x_dim, attn_dim, warehouse_dim, bias_dim = in_dims[:4]
    x, attn = _vmapped_first(x, x_dim, size), _vmapped_first(attn, attn_dim, size)
    if warehouse_dim is None and bias_dim is None:  # [size, B, ...] -> [size * B, ...]: one call
        y = kw_conv_op(x.flatten(0, 1), attn.flatten(0, 1), warehouse, bias, *settings)
        return y.unflatten(0, (size, -1)), 0
    # a warehouse or bias per slice (an ensemble of layers): one call per slice
    warehouse, bias = _vmapped_first(warehouse, warehouse_dim, size), _vmapped_first(bias, bias_dim, size)
    ys = [kw_conv_op(x[i], attn[i], warehouse[i], None if bias is None else bias[i], *settings) for i in range(size)]
    return torch.stack(ys), 0


@kw_conv_backward_op.register_vmap
def _kw_conv_backward_vmap(info, in_dims, grad, x, attn, warehouse, has_bias, *settings):
    size = info.batch_size
    *geometry, output_mask, backend, formulation = settings
    produced = _produced(output_mask, has_bias)
    grad_dim, x_dim, attn_dim, warehouse_dim = in_dims[:4]
    grad, x, attn = (_vmapped_first(t, d, size) for t, d in ((grad, grad_dim), (x, x_dim), (attn, attn_dim)))
    if warehouse_dim is None and not produced[2]:  # per-sample gradients only: fold the slices into the batch
        empty = grad.new_empty(0)
        dx = dattn = empty
        if produced[0] or produced[1]:
            dx, dattn, _, _ = kw_conv_backward_op(grad.flatten(0, 1), x.flatten(0, 1), attn.flatten(0, 1),
                                                  warehouse, False, *geometry, [*produced[:2], False, False], backend,
                                                  formulation)
        dbias = grad.sum(dim=[d for d in range(grad.dim()) if d not in (0, 2)]) if produced[3] else empty
        return ((dx.unflatten(0, (size, -1)) if produced[0] else empty,
                 dattn.unflatten(0, (size, -1)) if produced[1] else empty, empty, dbias),
                tuple(0 if real and k != 2 else None for k, real in enumerate(produced)))
    # a gradient of the warehouse per slice (per-sample gradients, Jacobians): one call per slice
    warehouse = _vmapped_first(warehouse, warehouse_dim, size)
    outs = [kw_conv_backward_op(grad[i], x[i], attn[i], warehouse[i], has_bias, *settings) for i in range(size)]
    return (tuple(torch.stack([out[k] for out in outs]) if real else outs[0][k] for k, real in enumerate(produced)),
            tuple(0 if real else None for real in produced))


# -- autocast: cast to the autocast dtype of the device (bf16 or fp16), run once in it ----------
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def autocast_args(device_type: str, args) -> list:
    """The op's arguments with the floating tensors on `device_type` cast to its autocast dtype."""
    dtype = torch.get_autocast_dtype(device_type)
    return [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() and a.device.type == device_type else a
            for a in args]


_lib = torch.library.Library("kw_ops", "FRAGMENT")


def _register_autocast(device_type: str) -> None:
    key_name = _AUTOCAST_KEYS[device_type]
    key = getattr(torch._C.DispatchKey, key_name)
    overload = torch.ops.kw_ops.kw_conv.default

    def cast_and_call(*args):
        args = autocast_args(device_type, args)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return overload(*args)

    if overload.has_kernel_for_dispatch_key(key):
        overload.py_kernels.pop(key, None)
    overload.py_impl(key)(cast_and_call)  # seen by tracing (torch.compile, make_fx)
    _lib.impl("kw_conv", lambda _keyset, *args: cast_and_call(*args), key_name, with_keyset=True)


for _device in _AUTOCAST_KEYS:
    _register_autocast(_device)
