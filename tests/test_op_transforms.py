"""The KW op under higher-order autograd and torch.func: double backward (gradgradcheck in float64, a
gradient-penalty training step), torch.func.grad / jacrev / jvp / jacfwd / hessian against autograd or
plain PyTorch, vmap against a loop."""
import warnings

import pytest
import torch
from test_op import Case, _tuple

import kw_ops
from kw_ops.ops import backends, cpp, kw_conv
from kw_ops.ops.export_impl import export_conv, export_mode

CASES = [
    Case(2, 4, 6, (5, 4), (3, 3), 3, 2, 3, stride=2, padding=1),
    Case(2, 4, 4, (4, 4), (3, 3), 2, 1, 2, padding=1, groups=2),
    Case(2, 4, 4, (5,), (3,), 2, 4, 2, padding=1, whole_cells=True),
]
FORMULATIONS = ["grouped", "gemm"]
# Each formulation is a backend's: forced, since on CPU the automatic choice takes cpp for some of these cases.
BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not cpp.available(), reason="kw_ops._C not built"))]


def _fn(case, formulation=None, backend=None):
    return lambda x, attn, warehouse, bias: kw_conv(x, attn, warehouse, bias, formulation=formulation,
                                                    backend=backend, **case.geometry())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gradgradcheck(case, formulation, backend):
    inputs = case.tensors()
    assert torch.autograd.gradgradcheck(_fn(case, formulation, backend), inputs, fast_mode=True)


@pytest.mark.parametrize("x_grad", [True, False], ids=["with-dx", "without-dx"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_second_derivatives_of_all_gradients_at_once_match_plain_pytorch(case, formulation, backend, x_grad):
    """Every first-order gradient weighted into one scalar (gradgradcheck takes them one at a time), then its
    gradient in grad and the differentiable inputs (no gradient depends on bias): against the export
    formulation, plain PyTorch ops."""
    inputs = case.tensors()
    inputs[0].requires_grad_(x_grad)
    leaves = [t for t in inputs if t.requires_grad]
    geometry = {key: _tuple(value, case.dims) if key not in ("out_channels", "groups") else value
                for key, value in case.geometry().items()}

    def second_derivatives(fn):
        y = fn(*inputs)
        grad = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y).requires_grad_()
        first = torch.autograd.grad(y, leaves, grad, create_graph=True)
        weights = [torch.cos(torch.arange(g.numel(), dtype=g.dtype)).view_as(g) for g in first]
        return torch.autograd.grad(sum((w * g).sum() for w, g in zip(weights, first)), (grad, *leaves[:-1]))

    got = second_derivatives(_fn(case, formulation, backend))
    expected = second_derivatives(lambda *ts: export_conv(*ts, **geometry))
    for index, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, msg=f"second derivative {index} (grad first, then the inputs)")


def test_gradgradcheck_of_a_direct_op_call():
    case = CASES[0]
    x, attn, warehouse, bias = case.tensors()

    def op(x, attn, warehouse, bias):
        return torch.ops.kw_ops.kw_conv(x, attn, warehouse, bias, 6, [3, 3], [2, 2], [1, 1], [1, 1], 1, "torch", "")

    assert torch.autograd.gradgradcheck(op, (x, attn, warehouse, bias), fast_mode=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_func_grad_and_jacrev_match_autograd(case):
    inputs = [t.detach() for t in case.tensors()]
    fn = _fn(case)
    weights = torch.randn(case.batch, case.c_out, *fn(*inputs).shape[2:], dtype=torch.float64)
    got = torch.func.grad(lambda *ts: (fn(*ts) * weights).sum(), argnums=(0, 1, 2, 3))(*inputs)
    leaves = [t.clone().requires_grad_() for t in inputs]
    expected = torch.autograd.grad((fn(*leaves) * weights).sum(), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    for argnum in range(4):
        jac = torch.func.jacrev(fn, argnums=argnum)(*inputs)
        reference = torch.autograd.functional.jacobian(
            lambda t: fn(*inputs[:argnum], t, *inputs[argnum + 1:]), inputs[argnum])
        torch.testing.assert_close(jac, reference)


def test_func_jacrev_of_grad_matches_autograd_hessian():
    """Reverse over reverse through torch.func: the backward op is itself differentiable under transforms."""
    case = CASES[0]
    x, attn, warehouse, bias = (t.detach() for t in case.tensors())
    attn, warehouse = attn[:1, :, :2].contiguous(), warehouse[:2]  # keep the Hessian small: [1, 9, 2] x [1, 9, 2]

    def loss(a):
        return kw_conv(x[:1], a, warehouse, bias, **case.geometry()).square().sum()

    hessian = torch.func.jacrev(torch.func.grad(loss))(attn)
    torch.testing.assert_close(hessian, torch.autograd.functional.hessian(loss, attn))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_mode_jvp_jacfwd_and_hessian_match_plain_pytorch(case):
    """Forward mode through both ops: jvp, jacfwd, forward-over-reverse (jvp of grad) and torch.func.hessian,
    against the export formulation (plain PyTorch ops)."""
    inputs = tuple(t.detach() for t in case.tensors())
    tangents = tuple(torch.randn_like(t) for t in inputs)
    geometry = {key: _tuple(value, case.dims) if key not in ("out_channels", "groups") else value
                for key, value in case.geometry().items()}
    fn, reference = _fn(case), (lambda *ts: export_conv(*ts, **geometry))
    torch.testing.assert_close(torch.func.jvp(fn, inputs, tangents)[1],
                               torch.func.jvp(reference, inputs, tangents)[1])
    torch.testing.assert_close(torch.func.jacfwd(fn, argnums=2)(*inputs), torch.func.jacrev(fn, argnums=2)(*inputs))

    def grads(f):
        return lambda *ts: torch.func.grad(lambda *us: f(*us).square().sum(), argnums=(0, 1, 2, 3))(*ts)

    for got, expected in zip(torch.func.jvp(grads(fn), inputs, tangents)[1],
                             torch.func.jvp(grads(reference), inputs, tangents)[1]):
        torch.testing.assert_close(got, expected)
    x, attn, warehouse, bias = inputs
    attn, warehouse = attn[:1, :, :2].contiguous(), warehouse[:2]  # a small Hessian: [1, m, 2] x [1, m, 2]

    def loss(f):
        return lambda a: f(x[:1], a, warehouse, bias).square().sum()

    torch.testing.assert_close(torch.func.hessian(loss(fn))(attn), torch.func.hessian(loss(reference))(attn))


@pytest.fixture
def no_vmap_fallback():
    """vmap must use the op's batching rules: PyTorch's slow per-slice fallback (and its warning) is an error."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)


@pytest.mark.parametrize("vmapped", ["x", "x-at-dim-1", "x+attn", "warehouse", "x+bias", "all"])
def test_vmap_matches_a_loop(no_vmap_fallback, vmapped):
    case = CASES[0]
    args = dict(zip(("x", "attn", "warehouse", "bias"), (t.detach() for t in case.tensors())))
    slices = 3
    names = {"x": ["x"], "x-at-dim-1": ["x"], "x+attn": ["x", "attn"], "warehouse": ["warehouse"],
             "x+bias": ["x", "bias"], "all": list(args)}[vmapped]
    dim = 1 if vmapped == "x-at-dim-1" else 0
    args.update({name: torch.randn(*args[name].shape[:dim], slices, *args[name].shape[dim:], dtype=torch.float64)
                 for name in names})
    in_dims = tuple(dim if name in names else None for name in args)
    fn = _fn(case)
    got = torch.vmap(fn, in_dims=in_dims)(*args.values())
    expected = torch.stack([fn(*(t.select(d, i) if d is not None else t for t, d in zip(args.values(), in_dims)))
                            for i in range(slices)])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("argnums", [(0, 1, 2, 3), (0, 1, 3)], ids=["with-warehouse", "without-warehouse"])
def test_per_sample_gradients_with_vmap_of_grad(no_vmap_fallback, argnums):
    """Per-sample warehouse gradients run one call per sample; without them the samples fold into one call."""
    case = CASES[1]
    x, attn, warehouse, bias = (t.detach() for t in case.tensors())
    fn = _fn(case)

    def loss(x1, attn1, warehouse, bias):
        return fn(x1[None], attn1[None], warehouse, bias).square().sum()

    got = torch.vmap(torch.func.grad(loss, argnums=argnums), in_dims=(0, 0, None, None))(x, attn, warehouse, bias)
    for b in range(case.batch):
        leaves = [t.clone().requires_grad_() for t in (x[b], attn[b], warehouse, bias)]
        expected = torch.autograd.grad(loss(*leaves), [leaves[i] for i in argnums])
        for g, e in zip(got, expected):
            torch.testing.assert_close(g[b], e)


def test_jacrev_of_x_folds_the_rows_into_one_backward_call(no_vmap_fallback, monkeypatch):
    forward, backward = backends.implementation("torch")
    calls = []
    monkeypatch.setitem(backends._IMPLEMENTATIONS, "torch", (forward, lambda *args: calls.append(1) or backward(*args)))
    monkeypatch.setenv(backends.ENV_VAR, "torch")  # on CPU the automatic choice may take the cpp backend
    case = CASES[0]
    x, attn, warehouse, bias = (t.detach() for t in case.tensors())

    def fn(x):
        return _fn(case)(x, attn, warehouse, bias).sum(dim=(2, 3))

    jac = torch.func.jacrev(fn)(x)
    assert len(calls) == 1
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(fn, x))


def test_gradient_penalty_training_step_matches_the_export_formulation():
    """loss + λ·|∂loss/∂x|² through the op's double backward = the same through plain PyTorch ops."""
    torch.manual_seed(0)
    layer = kw_ops.KWConv2d(4, 6, 3, padding=1, warehouse=kw_ops.KWConfig(), dtype=torch.float64).eval()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    penalty_weight = 0.5

    def step():
        layer.zero_grad()
        inputs = x.clone().requires_grad_()
        loss = layer(inputs).tanh().square().mean()
        (grad_x,) = torch.autograd.grad(loss, inputs, create_graph=True)
        (loss + penalty_weight * grad_x.square().sum()).backward()
        return {name: p.grad.clone() for name, p in layer.named_parameters()}

    got = step()
    with export_mode():
        expected = step()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.warehouse.cells.detach().clone()
    step()
    optimizer.step()
    assert not torch.equal(layer.warehouse.cells, before)


def test_func_grad_and_vmap_over_a_kw_layer(no_vmap_fallback):
    """torch.func on a KW layer (eval: the attention's BatchNorm reads its running statistics)."""
    layer = kw_ops.KWConv2d(4, 6, 3, padding=1, warehouse=kw_ops.KWConfig(), dtype=torch.float64).eval()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def loss(params, x):
        return torch.func.functional_call(layer, params, (x,)).square().sum()

    got = torch.func.grad(loss)(params, x)
    layer.zero_grad()
    loss(dict(layer.named_parameters()), x).backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)
    per_sample = torch.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x[:, None])
    for name, g in per_sample.items():
        torch.testing.assert_close(g.sum(0), got[name], msg=name)


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: c.id)
def test_gradgradcheck_with_a_fixed_attention(case):
    """attn not differentiable: the warehouse's second derivative through dx (the u_x term) still counts."""
    x, attn, warehouse, bias = case.tensors()
    attn = attn.detach()
    fn = _fn(case)
    assert torch.autograd.gradgradcheck(lambda x, warehouse: fn(x, attn, warehouse, None), (x, warehouse),
                                        fast_mode=True)
