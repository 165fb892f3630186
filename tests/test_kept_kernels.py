"""The released formulation in plain ops (the dispatcher's `released` candidate): against the float64 loop oracle
in values and gradients, gradcheck, and the bench's released baseline being this computation."""
import pytest
import torch
from test_op import CASES, TOL_FP64, _assert_close, _oracle

import kw_ops
from kw_ops.ops.kept_kernels import kept_kernels_conv

RUNNABLE = [c for c in CASES if c.batch > 0]  # grouped convolution with groups = B needs a sample


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
