"""The compiled CPU kernel (`cpp` backend, kw_ops._C): every op case against the float64 loop oracle and the
torch path, on both formulations and with blocks forced small (several, ragged), gradcheck, opcheck,
torch.compile, bf16 error, threads, and the automatic choice. Skipped only where the extension is not built."""
import pytest
import torch
from oracle import kw_conv_loop, kw_conv_loop_grads
from test_op import CASES, Case, _assert_close, _oracle, _tuple

import kw_ops
from kw_ops.ops import backends, cpp, kw_conv

pytestmark = pytest.mark.skipif(not cpp.available(), reason="kw_ops._C is not built: "
                                + "; ".join(cpp.unavailable_reasons()))

PATHS = [None, "gemm", "grouped"]
# Shapes that force every block path: several output blocks (GO > 1) and row blocks, ragged last blocks,
# groups, depthwise, stride 2, 1-D / 3-D, batch 0 / 1.
BLOCK_CASES = [
    Case(2, 16, 40, (5, 5), (3, 3), 20, 8, 6, padding=1, stride=2),           # GO = 2, GI = 2
    Case(1, 12, 30, (4, 3), (3, 3), 30, 12, 5, padding=1),                    # one output block, batch 1
    Case(3, 9, 21, (7,), (3,), 7, 3, 4, padding=2, dilation=2),               # 1-D, prime-ish rows
    Case(2, 4, 10, (3, 4, 3), (3, 1, 3), 5, 2, 3, padding=(1, 0, 1), stride=2),  # 3-D
    Case(2, 12, 12, (6, 6), (3, 3), 12, 1, 5, padding=1, groups=12),          # depthwise, cell spans groups
    Case(2, 12, 18, (5, 6), (3, 3), 6, 2, 4, padding=1, stride=2, groups=3),  # groups with GO > groups
    Case(2, 8, 12, (5, 5), (3, 3), 4, 2, 3, padding=1, groups=2),             # cells of 4 rows straddle groups of 6
    Case(0, 8, 10, (4, 4), (3, 3), 5, 4, 3, padding=1),                       # batch 0
]
# Buffer sizes (bytes) that leave one row / one tile per block: every block boundary is exercised.
TINY = 1


@pytest.fixture(params=["default-blocks", "tiny-blocks"])
def block_bytes(request, monkeypatch):
    if request.param == "tiny-blocks":
        monkeypatch.setattr(cpp, "BLOCK_BYTES", TINY)
        monkeypatch.setattr(cpp, "CONV_BLOCK_BYTES", TINY)
    return request.param


def _grads(y, inputs, grad):
    return torch.autograd.grad(y, inputs, grad, allow_unused=True)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p or "auto")
@pytest.mark.parametrize("case", CASES + BLOCK_CASES, ids=lambda c: c.id)
def test_matches_loop_oracle_and_torch_path(case, path, block_bytes):
    x, attn, warehouse, bias = case.tensors()
    y = kw_conv(x, attn, warehouse, bias, formulation=path, backend="cpp", **case.geometry())
    expected = _oracle(case, x, attn, warehouse, bias)
    reference = kw_conv(x, attn, warehouse, bias, formulation=path, backend="torch", **case.geometry())
    _assert_close(y, expected, "y vs oracle")
    _assert_close(y, reference, "y vs torch path")
    grad = torch.randn_like(expected)
    inputs = [t for t in (x, attn, warehouse, bias) if t is not None]
    got, want, ref = _grads(y, inputs, grad), _grads(expected, inputs, grad), _grads(reference, inputs, grad)
    for name, g, w, r in zip(("dx", "dattn", "dwarehouse", "dbias"), got, want, ref):
        _assert_close(g, w if w is not None else torch.zeros_like(g), f"{name} vs oracle")
        _assert_close(g, r, f"{name} vs torch path")


def test_gemm_row_blocks_with_a_ragged_last_one(monkeypatch):
    """Cells of 20 rows mixed 3 rows at a time (a buffer of 3 rows of 2 samples x 18 tiles x 8 inputs, float64):
    blocks of 3, 3, ..., 3, 2 in each of the GO = 2 output blocks, forward and backward."""
    case = BLOCK_CASES[0]
    monkeypatch.setattr(cpp, "BLOCK_BYTES", 3 * 2 * 18 * 8 * 8)
    x, attn, warehouse, bias = case.tensors()
    y = kw_conv(x, attn, warehouse, bias, formulation="gemm", backend="cpp", **case.geometry())
    expected = _oracle(case, x, attn, warehouse, bias)
    _assert_close(y, expected, "y")
    grad = torch.randn_like(expected)
    for name, got, want in zip(("dx", "dattn", "dwarehouse"), _grads(y, [x, attn, warehouse], grad),
                               _grads(expected, [x, attn, warehouse], grad)):
        _assert_close(got, want, name)


@pytest.mark.parametrize("path", ["gemm", "grouped"])
@pytest.mark.parametrize("case", [Case(2, 4, 6, (5, 4), (3, 3), 3, 2, 3, stride=2, padding=1),
                                  Case(2, 4, 4, (4,), (3,), 2, 4, 2, padding=1, whole_cells=True),
                                  Case(2, 4, 4, (4, 4), (3, 3), 4, 1, 3, padding=1, groups=4),
                                  Case(1, 2, 4, (3, 3, 2), (2, 2, 1), 2, 1, 2)], ids=lambda c: c.id)
def test_gradcheck(case, path, block_bytes):
    x, attn, warehouse, bias = case.tensors()
    fn = lambda *ts: kw_conv(*ts, formulation=path, backend="cpp", **case.geometry())  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, attn, warehouse, bias), fast_mode=True)


@pytest.mark.parametrize("case", [CASES[0], CASES[8], BLOCK_CASES[3]], ids=lambda c: c.id)
def test_opcheck(case):
    x, attn, warehouse, bias = case.tensors()
    args = (x, attn, warehouse, bias, case.c_out, list(_tuple(case.kernel, case.dims)),
            list(_tuple(case.stride, case.dims)), list(_tuple(case.padding, case.dims)),
            list(_tuple(case.dilation, case.dims)), case.groups, "cpp", "")
    torch.library.opcheck(torch.ops.kw_ops.kw_conv.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", ["gemm", "grouped"])
@pytest.mark.parametrize("case", [CASES[0], CASES[8], BLOCK_CASES[0], BLOCK_CASES[2]], ids=lambda c: c.id)
def test_low_precision_error_at_most_twice_the_torch_paths(case, path, dtype):
    """Against the float64 oracle, the kernel's error in fp32 / bf16 is at most ~2x the torch path's."""
    x, attn, warehouse, bias = case.tensors()
    expected = _oracle(case, x, attn, warehouse, bias)
    grad = torch.randn_like(expected)
    exact = (expected, *_grads(expected, [x, attn, warehouse, bias], grad))
    errors = {}
    for backend in ("cpp", "torch"):
        ins = [t.detach().to(dtype).requires_grad_() for t in (x, attn, warehouse, bias)]
        y = kw_conv(*ins, formulation=path, backend=backend, **case.geometry())
        assert y.dtype == dtype
        grads = torch.autograd.grad(y, ins, grad.to(dtype))
        errors[backend] = [(a.double() - b.double()).abs().max().item() for a, b in
                           zip((y, *grads), exact)]
    scale = 1e-6 if dtype == torch.float32 else 1e-2  # ~one rounding of the dtype, relative to O(1) values
    for what, mine, theirs in zip(("y", "dx", "dattn", "dwarehouse", "dbias"), errors["cpp"], errors["torch"]):
        assert mine <= 2 * theirs + scale, f"{what}: cpp error {mine:.3g} vs torch path {theirs:.3g}"


#: unit roundoff of bfloat16 (8 significant bits): one rounding moves a value by at most this fraction of it
BF16_UNIT_ROUNDOFF = 2.0 ** -8
#: ResNet-like 256 -> 256 3x3 at 8x8, batch 32, cells 128 x 128 (GO = GI = 2, m = 36), n = 16
REALISTIC = Case(32, 256, 256, (8, 8), (3, 3), 128, 128, 16, padding=1, bias=False)


@pytest.fixture(scope="module")
def realistic_bf16():
    """bf16 inputs of REALISTIC and the float64 oracle's (y, dx, dattn, dwarehouse) on the same values."""
    generator = torch.Generator().manual_seed(0)
    case = REALISTIC
    x = torch.randn(case.batch, case.c_in, *case.size, generator=generator).bfloat16()
    attn = (torch.randn(case.batch, case.m, case.n, generator=generator) / case.n ** 0.5).bfloat16()
    warehouse = torch.randn(case.n, case.cell_out, case.cell_in, 1, 1, generator=generator).bfloat16()
    grad = torch.randn(case.batch, case.c_out, *case.size, generator=generator).bfloat16()
    geometry = (case.c_out, case.kernel, (1, 1), (1, 1), (1, 1), 1)
    with torch.no_grad():
        y = kw_conv_loop(x, attn, warehouse, None, *geometry)
    return (x, attn, warehouse, grad), (y, *kw_conv_loop_grads(grad, x, attn, warehouse, *geometry))


@pytest.mark.parametrize("path", ["gemm", "grouped"])
def test_bf16_sums_accumulate_in_fp32_at_a_realistic_size(path, realistic_bf16):
    """Each output sums 2304 products (256 channels x 9 taps); the grouped path's dwarehouse sums the 32 samples'
    products and the gemm path's dx the output blocks'. Against the float64 oracle on the same bf16 values, every
    result's relative RMS error stays below one bf16 rounding, as fp32 partial sums give (measured 2.3e-3 to
    3.0e-3); partial sums kept in bf16 measured 5.7e-3 (gemm dx) and 7.0e-3 (grouped dwarehouse)."""
    (x, attn, warehouse, grad), exact = realistic_bf16
    inputs = [t.clone().requires_grad_() for t in (x, attn, warehouse)]
    y = kw_conv(*inputs, None, formulation=path, backend="cpp", **REALISTIC.geometry())
    results = (y, *torch.autograd.grad(y, inputs, grad))
    for what, got, want in zip(("y", "dx", "dattn", "dwarehouse"), results, exact):
        assert got.dtype == torch.bfloat16
        error = ((got.double() - want).norm() / want.norm()).item()
        assert error < BF16_UNIT_ROUNDOFF, f"{path} {what}: relative RMS error {error:.3g} vs the float64 oracle"


@pytest.mark.parametrize("case", [BLOCK_CASES[0], BLOCK_CASES[5], CASES[1], BLOCK_CASES[2]], ids=lambda c: c.id)
def test_oracle_gradients_are_autograd_through_the_loop(case):
    """kw_conv_loop_grads (the loop's adjoint, used at realistic sizes) equals autograd through kw_conv_loop."""
    x, attn, warehouse, _ = case.tensors()
    geometry = (case.c_out, case.kernel, *(_tuple(getattr(case, k), case.dims) for k in ("stride", "padding",
                                                                                          "dilation")), case.groups)
    y = kw_conv_loop(x, attn, warehouse, None, *geometry)
    grad = torch.randn_like(y)
    expected = torch.autograd.grad(y, (x, attn, warehouse), grad)
    for name, got, want in zip(("dx", "dattn", "dwarehouse"), kw_conv_loop_grads(grad, x, attn, warehouse, *geometry),
                               expected):
        _assert_close(got, want, name)


def test_several_threads_give_the_single_thread_result(block_bytes):
    # tiny blocks: one sample per chunk, so both threads own chunks and their partial dE sums are folded
    case = Case(4, 16, 40, (5, 5), (3, 3), 20, 8, 6, padding=1)
    x, attn, warehouse, bias = case.tensors()
    results = {}
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for path in ("gemm", "grouped"):
                y = kw_conv(x, attn, warehouse, bias, formulation=path, backend="cpp", **case.geometry())
                results[count, path] = (y, *torch.autograd.grad(y.square().sum(), (x, attn, warehouse)))
    finally:
        torch.set_num_threads(threads)
    for path in ("gemm", "grouped"):
        for a, b in zip(results[1, path], results[2, path]):
            _assert_close(a, b, f"{path}: 2 threads vs 1")


def test_torch_compile_fullgraph_with_the_kernel_inside():
    import torch._dynamo

    torch._dynamo.reset()
    layer = kw_ops.KWConv2d(4, 8, 3, padding=1, warehouse=kw_ops.KWConfig()).train()
    layer.backend = "cpp"
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 4, 6, 6)
    compiled(x).square().mean().backward()
    got = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer.backend = "torch"
    layer(x).square().mean().backward()
    for g, p in zip(got, layer.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def test_automatic_choice_weighs_cpp_and_leaves_it_out_for_dtypes_it_lacks():
    from kw_ops.ops import dispatch

    case = Case(2, 8, 8, (5, 5), (3, 3), 4, 4, 3, padding=1)
    x, attn, warehouse, bias = case.tensors(torch.float32)
    geometry = {k: _tuple(v, 2) if k in ("kernel_size", "stride", "padding", "dilation") else v
                for k, v in case.geometry().items()}
    call = dispatch.Call.of(x, attn, warehouse, **geometry)
    decision = dispatch.decide(call, tensors=(x, attn, warehouse, bias, geometry))
    assert {"op:cpp:gemm", "op:cpp:grouped"} <= {e.formulation for e in decision.estimates if e.seconds is not None}
    # fp16 is not among the kernel's dtypes: a candidate no more, with the reason
    half = [t.half() for t in (x, attn, warehouse)]
    call = dispatch.Call.of(*half, **geometry)
    decision = dispatch.decide(call, tensors=(*half, None, geometry))
    excluded = {e.formulation: e.why_not for e in decision.estimates if e.seconds is None}
    assert "float16" in excluded["op:cpp:gemm"] and not decision.formulation.startswith("op:cpp")
    assert any(line.startswith("cpp") and "unavailable" not in line for line in backends.backend_report())

def test_kernel_refuses_bad_inputs_with_a_message():
    case = Case(2, 8, 8, (5, 5), (3, 3), 4, 4, 3, padding=1)
    x, attn, warehouse = case.tensors()[:3]
    with pytest.raises(RuntimeError, match="do not tile"):
        torch.ops.kw_ops_C.kw_conv_forward(x.detach(), attn.detach()[:, :5].contiguous(), warehouse.detach(), 8,
                                           [3, 3], [1, 1], [1, 1], [1, 1], 1, 1, 1 << 20, 0)
    x, attn, warehouse = Case(2, 8, 8, (5, 5), (3, 3), 4, 4, 3, padding=1, groups=2).tensors()[:3]
    with pytest.raises(RuntimeError, match="groups = 1"):
        torch.ops.kw_ops_C.kw_conv_forward(x.detach(), attn.detach(), warehouse.detach(), 8, [3, 3], [1, 1], [1, 1],
                                           [1, 1], 2, 1, 1 << 20, 0)


def test_oracle_helper_is_the_loop():  # keeps the import honest: the oracle module is the float64 loop
    case = CASES[0]
    x, attn, warehouse, bias = case.tensors()
    _assert_close(kw_conv_loop(x, attn, warehouse, bias, case.c_out, case.kernel, case.stride, case.padding,
                               case.dilation, case.groups), _oracle(case, x, attn, warehouse, bias), "oracle")


@pytest.mark.parametrize("wanted", ["attn", "warehouse"])
def test_one_gradient_at_a_time_matches_the_torch_path(wanted):
    """Only dattn or only dwarehouse asked for: the kernel's mask names the right one of the two."""
    case = Case(2, 8, 8, (5, 5), (3, 3), 4, 4, 3, padding=1)
    x, attn, warehouse = (t.detach().requires_grad_(name == wanted) for name, t in
                          zip(("x", "attn", "warehouse"), case.tensors()[:3]))
    bias = None
    target = {"attn": attn, "warehouse": warehouse}[wanted]
    grads = {}
    for backend in ("cpp", "torch"):
        y = kw_conv(x, attn, warehouse, bias, backend=backend, **case.geometry())
        grads[backend], = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                              target)
    _assert_close(grads["cpp"], grads["torch"], f"d{wanted}")


@pytest.mark.parametrize("mask", [(True, False, False, False), (False, True, False, True), (False, False, False, True),
                                  (True, True, True, False)],
                         ids=lambda m: "".join(name for name, asked in zip("xaEb", m) if asked))
def test_backward_gives_exactly_the_gradients_asked_for(mask):
    """The backend's backward returns None for every gradient the mask does not ask for (dbias included), and
    the asked ones equal those of a call that asks for all."""
    case = Case(2, 8, 8, (5, 5), (3, 3), 4, 4, 3, padding=1)
    x, attn, warehouse, _ = (t.detach() for t in case.tensors())
    grad = torch.randn(2, 8, 5, 5, dtype=x.dtype)
    geometry = (8, [3, 3], [1, 1], [1, 1], [1, 1], 1)
    backward = backends.implementation("cpp")[1]
    every = backward(grad, x, attn, warehouse, True, *geometry, (True,) * 4)
    got = backward(grad, x, attn, warehouse, True, *geometry, mask)
    for name, asked, value, full in zip(("dx", "dattn", "dwarehouse", "dbias"), mask, got, every):
        assert (value is not None) == asked, name
        if asked:
            _assert_close(value, full, name)


def test_the_conv_path_backward_ends_with_two_threads():
    """oneDNN's weight-gradient convolution synchronises its threads with a barrier; called from inside the
    kernel's own parallel region it waited forever (MobileNetV2 KW 4x's first layer, 3 -> 32 3x3 stride 2 at
    224x224, batch 2, two threads). A child process with a deadline, so a hang fails instead of stalling CI."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch
        from kw_ops.ops import cpp
        torch.set_num_threads(2)
        torch.manual_seed(0)
        x, attn, cells = torch.randn(2, 3, 224, 224), torch.randn(2, 9, 36), torch.randn(36, 32, 3, 1, 1)
        args = (32, (3, 3), (2, 2), (1, 1), (1, 1), 1)
        y = cpp.kw_conv_cpp(x, attn, cells, None, *args, "grouped")
        grads = cpp.kw_conv_backward_cpp(torch.ones_like(y), x, attn, cells, False, *args, (True, True, True, False),
                                         "grouped")
        print(all(torch.isfinite(g).all() for g in grads[:3]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]
