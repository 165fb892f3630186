"""The KW op (torch.ops.kw_ops.kw_conv): forward and every gradient against a float64 loop oracle,
gradcheck, opcheck, autocast and torch.compile, on CPU."""
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from oracle import kw_conv_loop

import kw_ops
from kw_ops.ops import backends, kw_conv, torch_impl
from kw_ops.ops.export_impl import export_mode
from kw_ops.ops.torch_impl import output_memory_format

# float64 op vs float64 oracle: only summation order differs.
TOL_FP64 = {"atol": 1e-10, "rtol": 1e-9}


@dataclass(frozen=True)
class Case:
    """One layer geometry: x [batch, c_in, *size] through a KW conv with cells [cell_out, cell_in, *cell_k]."""

    batch: int
    c_in: int
    c_out: int
    size: tuple
    kernel: tuple
    cell_out: int
    cell_in: int
    n: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = True
    whole_cells: bool = False  # cells = the whole kernel instead of spatial partition (cell kernel 1)
    channels_last: bool = False

    @property
    def dims(self):
        return len(self.size)

    @property
    def cell_k(self):
        return self.kernel if self.whole_cells else (1,) * self.dims

    @property
    def m(self):
        spatial = math.prod(self.kernel) // math.prod(self.cell_k)
        return spatial * (self.c_out // self.cell_out) * (self.c_in // self.groups // self.cell_in)

    @property
    def id(self):
        text = (f"B{self.batch}-C{self.c_in}-O{self.c_out}-{self.dims}d{'x'.join(map(str, self.size))}"
                f"-K{'x'.join(map(str, self.kernel))}-cell{self.cell_out}x{self.cell_in}"
                f"{'-whole' if self.whole_cells else ''}-n{self.n}")
        for name, value, default in (("s", self.stride, 1), ("p", self.padding, 0), ("d", self.dilation, 1),
                                     ("g", self.groups, 1)):
            if value != default:
                text += f"-{name}{'x'.join(map(str, value)) if isinstance(value, tuple) else value}"
        if not self.bias:
            text += "-nobias"
        if self.channels_last:
            text += "-cl"
        return text

    def geometry(self):
        return {"out_channels": self.c_out, "kernel_size": self.kernel, "stride": self.stride,
                "padding": self.padding, "dilation": self.dilation, "groups": self.groups}

    def tensors(self, dtype=torch.float64):
        x = torch.randn(self.batch, self.c_in, *self.size, dtype=dtype)
        if self.channels_last:
            x = x.to(memory_format=torch.channels_last if self.dims == 2 else torch.channels_last_3d)
        attn = torch.randn(self.batch, self.m, self.n, dtype=dtype) / self.n
        warehouse = torch.randn(self.n, self.cell_out, self.cell_in, *self.cell_k, dtype=dtype)
        bias = torch.randn(self.c_out, dtype=dtype) if self.bias else None
        return [t.requires_grad_() if t is not None else None for t in (x, attn, warehouse, bias)]


CASES = [
    Case(3, 8, 12, (9, 7), (3, 3), 4, 4, 5, stride=2, padding=1, dilation=2),
    Case(1, 8, 12, (9, 7), (3, 3), 4, 4, 5, padding=(1, 0), whole_cells=True),
    Case(3, 8, 8, (6, 5), (3, 3), 8, 8, 4, padding=1, bias=False, channels_last=True),
    Case(0, 8, 8, (6, 6), (3, 3), 4, 8, 3, padding=1),
    Case(2, 6, 6, (11,), (3,), 3, 2, 4, padding=1),
    Case(2, 5, 7, (10,), (5,), 7, 5, 2, stride=3, padding=2, whole_cells=True),
    Case(2, 4, 6, (4, 5, 3), (3, 3, 1), 3, 2, 4, padding=(1, 1, 0)),
    Case(2, 2, 2, (3, 4, 3), (2, 2, 2), 2, 2, 3, whole_cells=True, channels_last=True),
    Case(3, 6, 6, (7, 7), (3, 3), 6, 1, 4, padding=1, groups=6),   # depthwise
    Case(2, 6, 9, (5, 6), (3, 3), 3, 1, 5, stride=2, padding=1, groups=3),
    Case(3, 8, 4, (5, 5), (1, 1), 2, 4, 3, stride=2),                # 1x1, several output and input blocks
    Case(2, 7, 13, (5, 5), (3, 3), 13, 7, 3, padding=1),            # prime channel counts
    Case(2, 14, 11, (4, 4), (1, 1), 11, 7, 2, bias=False),
]


def _assert_close(actual, expected, what, tol=TOL_FP64):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    err = (actual.double() - expected.double()).abs()
    bound = tol["atol"] + tol["rtol"] * expected.double().abs()
    worst = int((err - bound).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), expected.shape))
    assert bool((err <= bound).all()), (f"{what}: worst element {index}: {actual.reshape(-1)[worst].item():.6g} vs "
                                        f"{expected.reshape(-1)[worst].item():.6g} (|diff| {err.max().item():.3g})")


def _oracle(case, x, attn, warehouse, bias):
    if case.batch == 0:  # the oracle loops over samples; an empty batch has no sample to loop over
        weight = torch.zeros(case.c_out, case.c_in // case.groups, *case.kernel, dtype=x.dtype)
        conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}
        y = conv[case.dims](x, weight, None, case.stride, case.padding, case.dilation, case.groups)
        return y + 0 * attn.sum() + 0 * warehouse.sum() + (0 * bias.sum() if bias is not None else 0)
    return kw_conv_loop(x, attn, warehouse, bias, case.c_out, case.kernel, case.stride, case.padding, case.dilation,
                        case.groups)


@pytest.mark.parametrize("formulation", [None, *torch_impl.FORMULATIONS], ids=lambda f: f or "auto")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_and_gradients_match_loop_oracle(case, formulation):
    """The automatic choice, and each formulation of the torch backend (forced: on CPU the automatic choice takes
    the cpp backend for some cases, which test_cpp_backend checks on its own formulations)."""
    x, attn, warehouse, bias = case.tensors()
    backend = "torch" if formulation else None
    y = kw_conv(x, attn, warehouse, bias, formulation=formulation, backend=backend, **case.geometry())
    expected = _oracle(case, x, attn, warehouse, bias)
    _assert_close(y, expected, "y")
    assert y.is_contiguous(memory_format=output_memory_format(x)), "y does not keep x's memory format"
    grad = torch.randn_like(expected)
    inputs = [t for t in (x, attn, warehouse, bias) if t is not None]
    got = torch.autograd.grad(y, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad, allow_unused=True)
    for name, g, w in zip(("dx", "dattn", "dwarehouse", "dbias"), got, want):
        _assert_close(g, w if w is not None else torch.zeros_like(g), name)


def test_batch_zero_gradients_are_zeros_of_the_right_shape():
    case = Case(0, 8, 8, (6, 6), (3, 3), 4, 8, 3, padding=1)
    x, attn, warehouse, bias = case.tensors()
    y = kw_conv(x, attn, warehouse, bias, **case.geometry())
    assert y.shape == (0, 8, 6, 6)
    y.sum().backward()
    for t in (x, attn, warehouse, bias):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_output_is_fresh_and_contiguous():
    case = Case(2, 8, 8, (5, 5), (1, 1), 8, 8, 2)
    x, attn, warehouse, bias = case.tensors()
    with torch.no_grad():
        y = kw_conv(x, attn, warehouse, bias, **case.geometry())
    assert y.is_contiguous()
    for t in (x, attn, warehouse, bias):
        assert y.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_only_requested_gradients_are_computed(monkeypatch, with_bias):
    """The output mask that reaches the backend's backward asks only for what autograd needs."""
    forward, backward = backends.implementation("torch")
    masks = []

    def spy(grad, x, attn, warehouse, has_bias, out_channels, kernel_size, stride, padding, dilation, groups,
            output_mask, formulation=None):
        masks.append(list(output_mask))
        return backward(grad, x, attn, warehouse, has_bias, out_channels, kernel_size, stride, padding, dilation,
                        groups, output_mask, formulation)

    monkeypatch.setitem(backends._IMPLEMENTATIONS, "torch", (forward, spy))
    monkeypatch.setenv(backends.ENV_VAR, "torch")  # on CPU the automatic choice may take the cpp backend
    case = Case(2, 8, 8, (5, 5), (3, 3), 8, 8, 3, padding=1, bias=with_bias)
    x, attn, warehouse, bias = case.tensors()
    x.requires_grad_(False)
    kw_conv(x, attn, warehouse, bias, **case.geometry()).sum().backward()
    warehouse.grad = None
    attn.requires_grad_(False)
    kw_conv(x, attn, warehouse, None, **case.geometry()).sum().backward()
    assert masks == [[False, True, True, with_bias], [False, False, True, False]]
    assert warehouse.grad is not None


OPCHECK_CASES = [CASES[0], CASES[1], CASES[2], CASES[4], CASES[6], CASES[7], CASES[8], CASES[10]]


@pytest.mark.parametrize("formulation", torch_impl.FORMULATIONS)
@pytest.mark.parametrize("case", [Case(2, 4, 6, (5, 4), (3, 3), 3, 2, 3, stride=2, padding=1),
                                  Case(2, 4, 4, (4,), (3,), 2, 4, 2, padding=1, whole_cells=True),
                                  Case(2, 4, 4, (4, 4), (3, 3), 4, 1, 3, padding=1, groups=4)], ids=lambda c: c.id)
def test_gradcheck(case, formulation):
    x, attn, warehouse, bias = case.tensors()
    fn = lambda *ts: kw_conv(*ts, formulation=formulation, backend="torch", **case.geometry())  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, attn, warehouse, bias), fast_mode=True)


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.id)
def test_opcheck(case):
    x, attn, warehouse, bias = case.tensors()
    args = (x, attn, warehouse, bias, case.c_out, list(_tuple(case.kernel, case.dims)),
            list(_tuple(case.stride, case.dims)), list(_tuple(case.padding, case.dims)),
            list(_tuple(case.dilation, case.dims)), case.groups, "torch", "")
    torch.library.opcheck(torch.ops.kw_ops.kw_conv.default, args)


def _tuple(value, dims):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_autocast_cpu_runs_in_the_autocast_dtype(dtype):
    case = Case(2, 8, 8, (6, 6), (3, 3), 8, 8, 3, padding=1)
    x, attn, warehouse, bias = case.tensors(torch.float32)
    expected = kw_conv(x, attn, warehouse, bias, **case.geometry())
    with torch.autocast("cpu", dtype=dtype):
        y = kw_conv(x, attn, warehouse, bias, **case.geometry())
    assert y.dtype == dtype
    # bf16 rounding of inputs and of the 72-term sums: relative error ~1e-2
    _assert_close(y, expected, "y (autocast)", {"atol": 5e-2 * expected.abs().max().item(), "rtol": 5e-2})
    y.float().sum().backward()
    assert warehouse.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


class _TinyNet(nn.Module):
    """A KWConv2d layer and a raw kw_conv call (with its own attention parameters) in sequence."""

    def __init__(self):
        super().__init__()
        self.layer = kw_ops.KWConv2d(4, 8, 3, padding=1, warehouse=kw_ops.KWConfig())
        self.attn = nn.Linear(8, 9 * 3)
        self.cells = nn.Parameter(torch.randn(3, 8, 8, 1, 1) * 0.1)

    def forward(self, x):
        h = self.layer(x)
        attn = self.attn(h.mean(dim=(2, 3))).view(-1, 9, 3)
        return kw_conv(h, attn, self.cells, None, out_channels=8, kernel_size=3, padding=1)


def test_torch_compile_fullgraph_without_recompiling_per_batch_size():
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _TinyNet().eval()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=None)
    with torch.no_grad():
        for batch in (2, 3, 5, 7):
            x = torch.randn(batch, 4, 6, 6)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert counter.frame_count <= 2, f"compiled {counter.frame_count} times for 4 batch sizes"


def test_torch_compile_inductor_training_step():
    import torch._dynamo

    torch._dynamo.reset()
    model = _TinyNet().train()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    x = torch.randn(3, 4, 6, 6)
    compiled(x).square().mean().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().mean().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("formulation", ["grouped", "gemm"])
def test_compiled_backward_matches_eager_for_each_formulation(formulation):
    """The backward op's fake kernel must describe the real gradients (layout included) on every path."""
    import torch._dynamo

    torch._dynamo.reset()
    x = torch.randn(3, 8, 5, 5, requires_grad=True)
    attn = torch.randn(3, 18, 4, requires_grad=True)
    warehouse = torch.randn(4, 8, 4, 1, 1, requires_grad=True)

    def run(x, attn, warehouse):
        return kw_conv(x, attn, warehouse, None, out_channels=8, kernel_size=3, padding=1, stride=2,
                       formulation=formulation, backend="torch").square().sum()

    compiled = torch.compile(run, fullgraph=True)
    got = torch.autograd.grad(compiled(x, attn, warehouse), (x, attn, warehouse))
    expected = torch.autograd.grad(run(x, attn, warehouse), (x, attn, warehouse))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


# Pieces forced tiny so that every layer runs in several grouped chunks / gemm blocks, the last one ragged
# (5 samples in chunks of 2; output blocks of 5 or 3 rows mixed 2 rows at a time).
PIECE_CASES = [
    ("grouped", Case(5, 4, 6, (5, 4), (3, 3), 3, 2, 3, stride=2, padding=1, groups=2)),
    ("grouped", Case(5, 6, 4, (4, 5), (3, 3), 2, 3, 3, padding=1, whole_cells=True)),
    ("gemm", Case(3, 6, 10, (5, 5), (3, 3), 5, 3, 4, padding=1)),
    ("gemm", Case(3, 4, 6, (5, 5), (3, 3), 3, 4, 3, padding=1, whole_cells=True)),
]


@pytest.mark.parametrize("formulation, case", PIECE_CASES, ids=[f"{f}-{c.id}" for f, c in PIECE_CASES])
def test_several_chunks_and_blocks_match_loop_oracle(monkeypatch, formulation, case):
    x, attn, warehouse, bias = case.tensors()
    kernel_numel = case.c_out * (case.c_in // case.groups) * math.prod(case.kernel)
    monkeypatch.setattr(torch_impl, "CHUNK_BYTES", 2 * kernel_numel * x.element_size())
    block_row_bytes = case.batch * case.m // (case.c_out // case.cell_out) * case.cell_in \
        * math.prod(case.cell_k) * x.element_size()
    monkeypatch.setattr(torch_impl, "BLOCK_BYTES", 2 * block_row_bytes)
    if formulation == "grouped":
        assert torch_impl._sample_chunk(case.batch, kernel_numel, x.element_size()) == 2
    else:
        assert torch_impl._gemm_layout(x, warehouse, case.c_out, case.kernel)[-1] == 2
    # the torch backend's pieces: forced, since on CPU the automatic choice may take the cpp backend
    y = kw_conv(x, attn, warehouse, bias, formulation=formulation, backend="torch", **case.geometry())
    expected = _oracle(case, x, attn, warehouse, bias)
    _assert_close(y, expected, "y")
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(y, (x, attn, warehouse, bias), grad)
    want = torch.autograd.grad(expected, (x, attn, warehouse, bias), grad)
    for name, g, w in zip(("dx", "dattn", "dwarehouse", "dbias"), got, want):
        _assert_close(g, w, name)


def _bad_calls():
    """(id, message, call): wrong arguments through the functional and straight through the registered op."""
    x, attn, warehouse = torch.randn(2, 8, 5, 5), torch.randn(2, 9, 4), torch.randn(4, 8, 8, 1, 1)
    geometry = {"kernel_size": 3, "padding": 1}

    def op(x=x, attn=attn, warehouse=warehouse, bias=None, out_channels=8, kernel_size=(3, 3), stride=(1, 1),
           padding=(1, 1), dilation=(1, 1), groups=1, backend="torch"):
        return torch.ops.kw_ops.kw_conv(x, attn, warehouse, bias, out_channels, list(kernel_size), list(stride),
                                        list(padding), list(dilation), groups, backend, "")

    return [
        ("meta-bias", r"bias must be on x's device cpu, got meta",
         lambda: kw_conv(x, attn, warehouse, torch.zeros(8, device="meta"), out_channels=8, **geometry)),
        ("negative-out-channels", r"out_channels must be >= 1, got -8",
         lambda: kw_conv(x, attn, warehouse, out_channels=-8, **geometry)),
        ("zero-out-channels", r"out_channels must be >= 1, got 0",
         lambda: kw_conv(x, attn, warehouse, out_channels=0, **geometry)),
        ("zero-kernel", r"kernel_size must be >= 1, got \[0, 3\]",
         lambda: kw_conv(x, attn, warehouse, out_channels=8, kernel_size=(0, 3))),
        ("4d-warehouse-int-kernel",
         r"one cell dim per spatial dim, got x \(2, 8, 5, 5\) \(2 spatial\) and warehouse \(4, 8, 8, 1\) \(1 cell\)",
         lambda: kw_conv(x, attn, warehouse[..., 0], out_channels=8, **geometry)),
        ("4d-kernel", r"kernel_size must be an int or 1-3 ints, got \(3, 3, 3, 3\)",
         lambda: kw_conv(x, attn, warehouse, out_channels=8, kernel_size=(3, 3, 3, 3))),
        ("op-attn-shape", r"attn must be \[B, m, n\] = \[2, 9, 4\] for this layer and warehouse, got \(2, 8, 4\)",
         lambda: op(attn=attn[:, :8])),
        ("op-x-rank", r"x must be \[B, C_in, \*2 spatial dims\] \(4-D\) for a 2-D kernel, got shape \(2, 8, 5\)",
         lambda: op(x=x[..., 0])),
        ("op-untileable", r"a weight \[8, 6, \[3, 3\]\] cannot be tiled by cells", lambda: op(x=x[:, :6])),
        ("op-stride-length", r"stride must have 2 entries like kernel_size \[3, 3\], got \[1\]",
         lambda: op(stride=(1,))),
        ("op-negative-out-channels", r"out_channels must be >= 1, got -8", lambda: op(out_channels=-8)),
        ("op-bias-shape", r"bias must be \[8\], got \(3,\)", lambda: op(bias=torch.zeros(3))),
        ("op-meta-bias", r"bias must be on x's device cpu, got meta", lambda: op(bias=torch.zeros(8, device="meta"))),
        ("op-bogus-backend", r"backend must be one of torch, triton, cpp, got 'bogus'", lambda: op(backend="bogus")),
        # groups and cells: in_channels not divisible by groups; cells [3, 3] tile 12 channels but not a group's 4
        ("op-groups-in-channels", r"groups=2 must divide in_channels=9 and out_channels=8",
         lambda: op(x=torch.randn(2, 9, 5, 5), attn=torch.randn(2, 18, 4), warehouse=torch.randn(4, 4, 4, 1, 1),
                    groups=2)),
        ("op-zero-groups", r"groups must be >= 1, got 0", lambda: op(groups=0)),
        ("op-untileable-out", r"a weight \[12, 8, \[3, 3\]\] cannot be tiled by cells \[8, 8, \(1, 1\)\]",
         lambda: op(out_channels=12)),
        ("op-cells-tile-channels-not-groups",
         r"a weight \[6, 4, \[3, 3\]\] cannot be tiled by cells \[3, 3, \(1, 1\)\]",
         lambda: op(x=torch.randn(2, 12, 5, 5), attn=torch.randn(2, 18, 4), warehouse=torch.randn(4, 3, 3, 1, 1),
                    out_channels=6, groups=3)),
        ("op-bias-2d", r"bias must be \[8\], got \(2, 4\)", lambda: op(bias=torch.zeros(2, 4))),
        ("op-4d-kernel", r"kernel_size must have 1-3 entries \(one per spatial dim\), got \[3, 3, 3, 3\]",
         lambda: op(x=torch.randn(2, 8, 3, 3, 3, 3), kernel_size=(3,) * 4, stride=(1,) * 4, padding=(1,) * 4,
                    dilation=(1,) * 4)),
        ("op-warehouse-rank", r"warehouse must be \[n, c_out, c_in, \*2 cell dims\] \(5-D\) for a 2-D convolution, "
                              r"got shape \(4, 8, 8, 1, 1, 1\)", lambda: op(warehouse=warehouse[..., None])),
    ]


@pytest.mark.parametrize("name", [name for name, _, _ in _bad_calls()])
def test_bad_arguments_are_clear_errors(name):
    """Each wrong argument names itself, what was expected and what came (functional and direct op call)."""
    message, call = next((message, call) for n, message, call in _bad_calls() if n == name)
    with pytest.raises((ValueError, TypeError), match=message):
        call()


@pytest.mark.parametrize("path, dims", [("torch", 2), ("torch", 3), ("export", 2), ("export", 3), ("triton", 2)])
def test_channels_last_layer_keeps_channels_last_like_nn_conv(path, dims):
    """A channels_last model and input give a channels_last output, as nn.Conv2d/3d, on every backend (the Triton
    kernels run 1-D/2-D convs)."""
    if path == "triton":
        pytest.importorskip("triton")
        from kw_ops.ops.triton import interpreting

        if not interpreting():
            pytest.skip("on CPU the Triton kernels run under TRITON_INTERPRET=1")
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    layer_type, conv_type = (kw_ops.KWConv2d, nn.Conv2d) if dims == 2 else (kw_ops.KWConv3d, nn.Conv3d)
    layer = layer_type(4, 6, 3, padding=1, warehouse=kw_ops.KWConfig()).eval()
    layer.backend = "triton" if path == "triton" else "torch"
    layer.to(memory_format=fmt)
    x = torch.randn(2, 4, *(5,) * dims)
    with torch.no_grad():
        expected = layer(x)
        if path == "export":
            with export_mode():
                y = layer(x.to(memory_format=fmt))
        else:
            y = layer(x.to(memory_format=fmt))
    assert conv_type(4, 6, 3).to(memory_format=fmt)(x.to(memory_format=fmt)).is_contiguous(memory_format=fmt)
    assert y.is_contiguous(memory_format=fmt) and not y.is_contiguous()
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size, padding, dilation, fits", [
    (3, 0, 1, True), (2, 0, 1, False), (1, 1, 1, True), (4, 0, 2, False), (5, 0, 2, True), (3, 1, 2, True)])
def test_input_smaller_than_the_dilated_kernel_is_refused_at_the_boundary(size, padding, dilation, fits):
    """A 3x3 kernel needs size + 2 * padding >= dilation * 2 + 1; one pixel less is a clear error."""
    x, attn, warehouse = torch.randn(1, 4, size, size), torch.randn(1, 9, 2), torch.randn(2, 4, 4, 1, 1)
    call = lambda: kw_conv(x, attn, warehouse, out_channels=4, kernel_size=3, padding=padding,  # noqa: E731
                           dilation=dilation, backend="torch")
    if fits:
        assert call().shape[-1] == size + 2 * padding - 2 * dilation
    else:
        with pytest.raises(ValueError, match=r"is smaller than the dilated kernel"):
            call()


def test_bias_of_another_dtype_is_refused():
    x, attn, warehouse = torch.randn(2, 8, 5, 5), torch.randn(2, 9, 4), torch.randn(4, 8, 8, 1, 1)
    with pytest.raises(TypeError, match=r"bias dtype torch.float64 differs from x dtype torch.float32"):
        kw_conv(x, attn, warehouse, torch.zeros(8, dtype=torch.float64), out_channels=8, kernel_size=3, padding=1)
    with pytest.raises(TypeError, match=r"bias dtype torch.float64 differs from x dtype torch.float32"):
        torch.ops.kw_ops.kw_conv(x, attn, warehouse, torch.zeros(8, dtype=torch.float64), 8, [3, 3], [1, 1], [1, 1],
                                 [1, 1], 1, "torch", "")


def test_groups_must_divide_the_output_channels():
    # 8 -> 9 channels in 2 groups: cells [3, 4] would tile each group's [9, 4] weight, but 9 % 2 != 0
    x, attn, warehouse = torch.randn(2, 8, 5, 5), torch.randn(2, 27, 4), torch.randn(4, 3, 4, 1, 1)
    with pytest.raises(ValueError, match=r"groups=2 must divide in_channels=8 and out_channels=9"):
        torch.ops.kw_ops.kw_conv(x, attn, warehouse, None, 9, [3, 3], [1, 1], [1, 1], [1, 1], 2, "torch", "")


def test_attn_of_another_dtype_is_refused():
    x, attn, warehouse = torch.randn(2, 8, 5, 5), torch.randn(2, 9, 4, dtype=torch.float64), torch.randn(4, 8, 8, 1, 1)
    with pytest.raises(TypeError, match=r"x, attn and warehouse must share a dtype, got torch.float32, torch.float64, "
                                        r"torch.float32"):
        torch.ops.kw_ops.kw_conv(x, attn, warehouse, None, 8, [3, 3], [1, 1], [1, 1], [1, 1], 1, "torch", "")


def test_cell_kernel_neither_ones_nor_the_kernel_is_refused():
    x, attn, warehouse = torch.randn(2, 8, 5, 5), torch.randn(2, 1, 4), torch.randn(4, 8, 8, 3, 1)
    with pytest.raises(ValueError, match=r"cell kernel \(3, 1\) must be all ones \(spatial partition\) or the kernel "
                                         r"\(3, 3\)"):
        torch.ops.kw_ops.kw_conv(x, attn, warehouse, None, 8, [3, 3], [1, 1], [1, 1], [1, 1], 1, "torch", "")
