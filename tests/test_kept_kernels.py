"""The kept-kernels formulation (small CPU training steps of KW layers): against the float64 loop oracle in
values and gradients, gradcheck, the per-call rule with its boundaries, and a layer that takes it giving the
op's results."""
import pytest
import torch
from test_op import CASES, TOL_FP64, _assert_close, _oracle

import kw_ops
from kw_ops.nn import layers
from kw_ops.ops import kept_kernels, use_backend
from kw_ops.ops.kept_kernels import KEEP_BYTES, KEEP_POSITIONS, keeps_kernels, kept_kernels_conv
from kw_ops.ops.torch_impl import conv_output_size

RUNNABLE = [c for c in CASES if c.batch > 0]  # the rule never keeps an empty batch's kernels


def _args(case):
    dims = case.dims
    as_tuple = lambda v: v if isinstance(v, tuple) else (v,) * dims  # noqa: E731
    return (case.c_out, case.kernel, as_tuple(case.stride), as_tuple(case.padding), as_tuple(case.dilation),
            case.groups)


@pytest.mark.parametrize("case", RUNNABLE, ids=lambda c: c.id)
def test_values_and_gradients_match_the_loop_oracle(case):
    x, attn, warehouse, bias = case.tensors()
    y = kept_kernels_conv(x, attn, warehouse, bias, *_args(case))
    expected = _oracle(case, x, attn, warehouse, bias)
    _assert_close(y, expected, f"{case.id} y")
    if case.channels_last:
        assert not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last
                                                         if case.dims == 2 else torch.channels_last_3d)
    grad = torch.randn_like(expected)
    inputs = [t for t in (x, attn, warehouse, bias) if t is not None]
    for name, got, want in zip(("x", "attn", "warehouse", "bias"), torch.autograd.grad(y, inputs, grad),
                               torch.autograd.grad(expected, inputs, grad)):
        _assert_close(got, want, f"{case.id} d{name}", TOL_FP64)


def test_gradcheck():
    case = CASES[9]  # groups 3, stride 2, GO > 1
    x, attn, warehouse, bias = case.tensors()
    assert torch.autograd.gradcheck(lambda *t: kept_kernels_conv(*t, *_args(case)), (x, attn, warehouse, bias))


def _call(batch=2, channels=8, size=(4, 4), out_channels=8, kernel=(3, 3), padding=(1, 1), grad=True,
          dtype=torch.float32):
    x = torch.randn(batch, channels, *size, dtype=dtype, requires_grad=grad)
    attn = torch.randn(batch, 9, 3, dtype=dtype)
    warehouse = torch.randn(3, out_channels, channels, 1, 1, dtype=dtype)
    return x, attn, warehouse, out_channels, kernel, (1, 1), padding, (1, 1), 1


def test_rule_keeps_small_training_steps_on_cpu_under_the_automatic_choice(monkeypatch):
    monkeypatch.delenv("KW_OPS_BACKEND", raising=False)
    call = _call()
    assert keeps_kernels(*call, None) and keeps_kernels(*call, "auto")
    assert not keeps_kernels(*call, "torch")                     # a backend forced by argument
    with use_backend("torch"):
        assert not keeps_kernels(*call, None)                    # ... or by use_backend
    monkeypatch.setenv("KW_OPS_BACKEND", "cpp")
    assert not keeps_kernels(*call, None)                        # ... or by the environment
    monkeypatch.delenv("KW_OPS_BACKEND")
    assert not keeps_kernels(*_call(grad=False), None)            # nothing requires grad: inference
    with torch.no_grad():
        assert not keeps_kernels(*call, None)
    assert not keeps_kernels(*_call(batch=0), None)


def test_rule_boundaries_positions_and_bytes():
    side = int(KEEP_POSITIONS ** 0.5)
    assert side * side == KEEP_POSITIONS  # 8 x 8 output positions with padding 1: the largest kept map
    assert keeps_kernels(*_call(size=(side, side)), None)
    assert not keeps_kernels(*_call(size=(side, side + 1)), None)
    assert conv_output_size((side, side + 1), (3, 3), (1, 1), (1, 1), (1, 1)) == [side, side + 1]
    # B * O * C * k * 4 bytes: batch 2, 8 input channels, a 2x2 kernel, O output channels at the limit and one over
    limit = KEEP_BYTES // (2 * 8 * 4 * 4)
    assert limit * 2 * 8 * 4 * 4 == KEEP_BYTES
    one_position = {"size": (2, 2), "kernel": (2, 2), "padding": (0, 0)}
    assert keeps_kernels(*_call(out_channels=limit, **one_position), None)
    assert not keeps_kernels(*_call(out_channels=limit + 1, **one_position), None)


def test_rule_leaves_torch_func_and_compile_to_the_op():
    x, *rest = _call()
    seen = []
    torch.func.grad(lambda x: (seen.append(keeps_kernels(x, *rest, None)), x.sum())[1])(x.detach())
    assert seen == [False]


def test_layer_takes_it_for_small_training_steps_and_matches_the_op(monkeypatch):
    monkeypatch.delenv("KW_OPS_BACKEND", raising=False)
    torch.manual_seed(0)
    conv = kw_ops.KWConv2d(8, 16, 3, padding=1, warehouse=kw_ops.KWConfig(budget=1))
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    calls = []
    monkeypatch.setattr(layers, "kept_kernels_conv",
                        lambda *a: calls.append(1) or kept_kernels.kept_kernels_conv(*a))
    y = conv(x)
    assert calls == [1]
    grads = torch.autograd.grad(y.square().sum(), [x, *conv.parameters()])
    conv.backend = "torch"  # the op, hand-written backward
    y_op = conv(x)
    assert calls == [1]
    grads_op = torch.autograd.grad(y_op.square().sum(), [x, *conv.parameters()])
    tol = {"atol": 1e-4, "rtol": 1e-4}
    _assert_close(y, y_op, "y", tol)
    for i, (got, want) in enumerate(zip(grads, grads_op)):
        _assert_close(got, want, f"gradient {i}", tol)
    conv.backend = None
    with torch.no_grad():
        conv(x)
    assert calls == [1]  # inference runs the op


def test_the_bench_released_formulation_is_this_computation_and_matches_the_op():
    from kw_ops.benchmarking.released import released_formulation, released_kw_conv
    from kw_ops.ops.kept_kernels import released_conv

    assert released_kw_conv is released_conv
    torch.manual_seed(0)
    model = kw_ops.models.create("tiny_kw1x", num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        with released_formulation(model):
            got = model(x)
    _assert_close(got, expected, "released formulation vs the op", {"atol": 1e-4, "rtol": 1e-4})
