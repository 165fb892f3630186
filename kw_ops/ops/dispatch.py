"""The one place that decides how a KW convolution is computed: per call, the cheapest formulation that can run.

Candidates (`FORMULATIONS`; a name is `kind[:backend[:variant]]`):

    released              the released code's formulation in plain PyTorch ops (kept_kernels.released_conv): the
                          batch's kernels mixed once and kept by autograd for the backward; on CUDA, cuBLAS mixing
                          and a cuDNN grouped convolution
    op:torch:grouped      the registered op (hand-written backward that recomputes the kernels in bounded chunks)
    op:torch:gemm           on the torch backend, grouped convolutions or im2col GEMMs by output-channel blocks
    op:cpp:gemm           the registered op on the compiled CPU kernel (kw_ops._C), GEMM or convolution path
    op:cpp:grouped
    op:triton             the registered op on the Triton kernels (CUDA): mixing GEMMs, then implicit-GEMM
                          convolutions, by chunks of samples or blocks of channels (the Triton mode of each pass
                          chosen by the GPU cost model, as the launcher chooses it)
    export                batched MatMuls over kernel offsets, a batch that stays symbolic (while exporting)

What decides (`decide`), strongest first:

1. exporting (ONNX, torch.export, tracing, `export_mode()`): `export`, the only formulation with a dynamic batch;
   inside torch.compile: the registered op, its backend and formulation decided by cost when it runs (so that
   one graph serves every batch size);
2. a forced backend (`backend=`, a layer's `backend`, `use_backend()`, KW_OPS_BACKEND): that backend's op, its
   formulation by cost (or the `formulation=` asked for);
3. else every candidate that can run the call (device, dtype, the extension built, Triton's arch gate and its
   verification, `formulation=`) and is allowed to: under torch.func transforms only the op (its formulas and
   batching rules); `released` keeps B x the layer's weights for the backward and is left out of a training
   call where that exceeds `keep_bytes()` (KW_OPS_KEEP_BYTES, default 256 MiB per layer), so large-batch
   training keeps the op's bounded memory;
4. among those, the least estimated time of the call's passes (forward, and the backward when one follows): on
   CPU from `cpu_costs` (the formulation timed as a whole by `python -m kw_ops calibrate`, else its kernels at
   default rates), on CUDA from the GPU cost model (kw_ops.ops.triton.cost_model; peaks measured by gpu_check
   via KW_OPS_PEAKS, datasheet defaults otherwise). The released formulation is replaced only by a candidate
   predicted faster by `MARGIN` (`DEFAULT_MARGIN` where an estimate rests on default rates): a prediction that
   close is within the model's error, and released is what every kw_ops row is measured against.

`python -m kw_ops describe MODEL --dispatch` prints every layer's decision, the estimate of each candidate and
the reason.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os

import torch

from . import cpu_costs
from .backends import BackendUnavailableError, not_supported_reasons, requested_backend
from .export_impl import export_conv, exporting
from .kept_kernels import kept_kernels_conv
from .op import apply_kw_conv, autocast_args
from .torch_impl import conv_output_size

__all__ = ["Call", "Estimate", "Decision", "FORMULATIONS", "MARGIN", "DEFAULT_MARGIN", "KEEP_BYTES_ENV",
           "decide", "compiled_choice", "op_choice", "backend_formulation", "run_for_layer", "run_formulation", "keep_bytes", "recording", "estimate", "clear_decisions"]

FORMULATIONS = ("released", "op:torch:grouped", "op:torch:gemm", "op:cpp:gemm", "op:cpp:grouped",
                "op:triton", "export")
#: least predicted gain over released (fraction of its time) for another formulation to replace it
MARGIN = 0.10
#: the same where an estimate rests on default (uncalibrated) rates: only a gain the default model cannot be
#: that wrong about (measured: its estimates of the compiled kernel's grouped path on small maps were off 2x)
DEFAULT_MARGIN = 0.5
KEEP_BYTES_ENV = "KW_OPS_KEEP_BYTES"
_DEFAULT_KEEP_BYTES = 256 << 20


def keep_bytes() -> int:
    """Per-sample kernels (B x the layer's weights) a training call may keep for its backward, in bytes."""
    value = os.environ.get(KEEP_BYTES_ENV)
    if not value:
        return _DEFAULT_KEEP_BYTES
    try:
        parsed = int(float(value))
    except ValueError:
        parsed = -1
    if parsed < 0:
        raise ValueError(f"{KEEP_BYTES_ENV} must be a number of bytes >= 0, got {value!r}")
    return parsed


@dataclasses.dataclass(frozen=True)
class Call:
    """What the decision depends on: device, dtype, the geometry, whether a backward follows, the transform."""

    device: str                 # 'cpu', 'cuda', ...
    dtype: str                  # 'float32', 'bfloat16', ...
    batch: int
    channels: int
    size: tuple                 # input spatial size (padding applied by the op)
    out_channels: int
    kernel_size: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    n: int                      # warehouse cells
    cell: tuple                 # [c_out, c_in, *cell_k]
    backward: bool = False      # a backward pass follows (grad enabled, an input requires grad)
    input_grad: bool = True     # ... and it needs dx
    transform: str = ""         # '' | 'compile' | 'func' | 'export'
    channels_last: bool = False

    @classmethod
    def of(cls, x: torch.Tensor, attn: torch.Tensor, warehouse: torch.Tensor, out_channels: int, kernel_size,
           stride, padding, dilation, groups: int) -> Call:
        """The call of kw_conv on these tensors (arguments normalised), in the current grad mode and transforms."""
        backward = torch.is_grad_enabled() and (x.requires_grad or attn.requires_grad or warehouse.requires_grad)
        if exporting():
            transform = "export"
        elif torch._C._functorch.peek_interpreter_stack() is not None:
            transform = "func"
        elif torch.compiler.is_compiling():
            transform = "compile"
        else:
            transform = ""
        channels_last = (transform != "func" and x.dim() == 4 and not x.is_contiguous()  # (vmap cannot tell)
                         and x.is_contiguous(memory_format=torch.channels_last))
        dtype = x.dtype   # the op runs floating inputs in the autocast dtype (op.autocast_args)
        if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        return cls(x.device.type, str(dtype).replace("torch.", ""), x.shape[0], x.shape[1], tuple(x.shape[2:]),
                   out_channels, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), groups,
                   warehouse.shape[0], tuple(warehouse.shape[1:]), bool(backward), bool(backward and x.requires_grad),
                   transform, channels_last)

    @property
    def element_size(self) -> int:
        return torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()

    @property
    def out_size(self) -> tuple:
        return tuple(conv_output_size(self.size, self.kernel_size, self.stride, self.padding, self.dilation))

    @property
    def in_per_group(self) -> int:
        return self.channels // self.groups

    @property
    def weights(self) -> int:
        """P: elements of one sample's kernel [O, I, *k]."""
        return self.out_channels * self.in_per_group * math.prod(self.kernel_size)

    @property
    def m(self) -> int:
        return self.weights // math.prod(self.cell)

    @property
    def kept_bytes(self) -> int:
        """The batch's per-sample kernels: what `released` keeps for the backward."""
        return self.batch * self.weights * self.element_size

    def describe(self) -> str:
        k = "x".join(map(str, self.kernel_size))
        stride = "" if set(self.stride) == {1} else f"/s{self.stride[0]}"
        groups = "" if self.groups == 1 else f" g{self.groups}"
        size = "x".join(map(str, self.size))
        return (f"{self.channels}->{self.out_channels} {k}{stride}{groups} @{size} B{self.batch} n={self.n} "
                f"{self.dtype}{' train' if self.backward else ''}")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One candidate's estimated time for the call (None: it is not a candidate here, `why_not` says why)."""

    formulation: str
    seconds: float | None
    calibrated: bool = False    # every kernel of the estimate had a measured rate
    why_not: str = ""


@dataclasses.dataclass(frozen=True)
class Decision:
    formulation: str
    estimates: tuple
    reason: str

    @property
    def backend(self) -> str | None:
        parts = self.formulation.split(":")
        return parts[1] if len(parts) > 1 else None


# -- estimates ----------------------------------------------------------------------------------
def _conv_kernels(call: Call, passes) -> list:
    """The grouped convolution of the whole batch (groups = B · groups) for each pass (0 fwd, 1 dx, 2 dW)."""
    return [cpu_costs.conv(p, call.batch * call.groups, call.in_per_group, call.out_channels // call.groups,
                           call.kernel_size, call.size, call.stride, call.padding, call.dilation, call.dtype)
            for p in passes]


def _mix(call: Call, batch: int | None = None) -> list:
    """The mixing GEMM [B·m, n] x [n, cell] and the copy of the kernels into the convolution's layout."""
    batch = call.batch if batch is None else batch
    cell = math.prod(call.cell)
    return [cpu_costs.gemm(batch * call.m, cell, call.n, call.dtype),
            cpu_costs.copy(batch * call.weights * call.element_size, call.dtype)]


def _contractions(call: Call) -> list:
    """dattn = dW · Eᵀ and dE = attnᵀ · dW, with dW copied back into cell order first."""
    cell = math.prod(call.cell)
    rows = call.batch * call.m
    return [cpu_costs.copy(call.batch * call.weights * call.element_size, call.dtype),
            cpu_costs.gemm(rows, call.n, cell, call.dtype), cpu_costs.gemm(call.n, cell, rows, call.dtype)]


def _backward_passes(call: Call) -> tuple:
    return (1, 2) if call.input_grad else (2,)


def cpu_kernels(formulation: str, call: Call) -> list:
    """The kernels `formulation` runs for the call on CPU, forward and (when one follows) backward."""
    step = call.backward
    if formulation == "released":
        kernels = [cpu_costs.call("released_step" if step else "released_forward"), *_mix(call),
                   *_conv_kernels(call, (0,))]
        if step:
            kernels += [*_conv_kernels(call, _backward_passes(call)), *_contractions(call)]
        return kernels
    overhead = [cpu_costs.call("op_step" if step else "op_forward")]
    if formulation == "op:torch:grouped":
        kernels = [*overhead, *_mix(call), *_conv_kernels(call, (0,))]
        if step:
            kernels += [*_mix(call), *_conv_kernels(call, _backward_passes(call)), *_contractions(call)]
        return kernels
    if formulation == "op:torch:gemm":
        cols = call.batch * call.channels * math.prod(call.kernel_size) * math.prod(call.out_size) * call.element_size
        positions, depth = math.prod(call.out_size), call.channels * math.prod(call.kernel_size)
        kernels = [*overhead, cpu_costs.copy(cols, call.dtype), *_mix(call),
                   cpu_costs.bmm(call.batch, call.out_channels, positions, depth, call.dtype)]
        if step:
            kernels += [cpu_costs.copy(cols, call.dtype), *_mix(call),
                        cpu_costs.bmm(call.batch, call.out_channels, depth, positions, call.dtype),
                        *_contractions(call)]
            if call.input_grad:
                kernels += [cpu_costs.bmm(call.batch, depth, positions, call.out_channels, call.dtype),
                            cpu_costs.copy(cols, call.dtype)]
        return kernels
    if formulation.startswith("op:cpp:"):
        path = formulation.split(":")[2]
        geometry = (call.batch, call.channels, call.out_channels, call.groups, call.kernel_size, call.size,
                    call.stride, call.padding, call.dilation, call.cell, call.n, call.dtype)
        kernels = [*overhead, cpu_costs.cpp_kernel(0, path, *geometry)]
        if step:
            kernels.append(cpu_costs.cpp_kernel(1, path, *geometry))
        return kernels
    raise ValueError(f"no CPU cost for formulation {formulation!r}")


def _gpu_seconds(formulation: str, call: Call) -> tuple[float | None, str]:
    """Predicted seconds on a CUDA device by the GPU cost model (2-D and 1-D calls; None: not modelled)."""
    from .triton import cost_model

    if len(call.kernel_size) > 2:
        return None, "the GPU cost model covers 1-D and 2-D convolutions"
    two = lambda t, fill: (t + (fill,) * (2 - len(t)))[::-1] if len(t) < 2 else t  # noqa: E731  1-D as 1 x L
    shape = cost_model.ConvShape(call.batch, call.channels, call.out_channels, two(call.size, 1), two(call.out_size, 1),
                                 two(call.kernel_size, 1), call.groups, call.n, call.m, call.element_size,
                                 channels_last=call.channels_last, cell_rows=call.cell[0], cell_cols=call.cell[1])
    directions = ("forward",) + ((("dx",) if call.input_grad else ()) + ("wgrad",) if call.backward else ())
    if formulation == "op:triton":   # the mode the launcher runs
        return sum(cost_model.triton_prediction(shape, direction).seconds for direction in directions), ""
    mode = {"released": "released", "op:torch:grouped": "torch_op"}.get(formulation)
    if mode is None:
        return None, "not modelled on GPU"
    seconds = 0.0
    for direction in directions:
        seconds += cost_model.predict(shape, mode, direction).seconds
    return seconds, ""


def estimate(formulation: str, call: Call, table: cpu_costs.RateTable | None = None) -> Estimate:
    """Estimated seconds of the call's passes in `formulation` on the call's device."""
    if call.device == "cuda":
        seconds, why = _gpu_seconds(formulation, call)
        return Estimate(formulation, seconds, calibrated=bool(os.environ.get("KW_OPS_PEAKS")), why_not=why)
    table = table or cpu_costs.rate_table()
    whole = cpu_costs.formulation_kernel(formulation, call)
    if table.measured(whole):  # calibrated: the formulation itself timed on this shape (batch bucket)
        return Estimate(formulation, table.seconds(whole), True)
    kernels = cpu_kernels(formulation, call)
    return Estimate(formulation, sum(table.seconds(k) for k in kernels), all(table.measured(k) for k in kernels))


# -- candidates ---------------------------------------------------------------------------------
def _backend_reasons(backend: str, call: Call, tensors) -> list[str]:
    """Why `backend` cannot run the call: from the tensors when given, else from the Call (describe, calibrate)."""
    if tensors is None:
        return _call_reasons(backend, call)
    x, attn, warehouse, bias, geometry = tensors
    reasons = not_supported_reasons(backend, x, attn, warehouse, bias, geometry)
    if backend == "triton" and not reasons:
        from .verify import arch_reasons

        reasons = arch_reasons(x.device, x.dtype)
    return reasons


def _call_reasons(backend: str, call: Call) -> list[str]:
    from .backends import BACKENDS

    spec = BACKENDS[backend]
    dtype = getattr(torch, call.dtype)
    reasons = []
    if "*" not in spec.devices and call.device not in spec.devices:
        reasons.append(f"{call.device} tensors ({backend} runs on {' or '.join(spec.devices)})")
    if dtype not in spec.dtypes:
        reasons.append(f"dtype {call.dtype}")
    if backend == "cpp":
        from . import cpp

        reasons += cpp.unavailable_reasons()
    if backend == "triton":
        from .triton.capability import triton_available

        if not triton_available():
            reasons.append("triton is not installed")
        if len(call.kernel_size) > 2:
            reasons.append("3-D convolution")
    return reasons


def _op_formulations(backend: str, call: Call) -> list[str]:
    if backend == "torch":  # its gemm path: CPU (im2col GEMMs; on GPU the grouped convolution is cuDNN's)
        return ["op:torch:grouped"] + (["op:torch:gemm"] if call.groups == 1 and call.device == "cpu" else [])
    if backend == "cpp":
        return (["op:cpp:gemm"] if call.groups == 1 else []) + ["op:cpp:grouped"]
    return [f"op:{backend}"]


def _candidates(call: Call, requested: str, formulation: str | None, tensors,
                source: str = "automatic") -> tuple[list[str], dict[str, str]]:
    """(formulations that may run, {formulation: why not} for the others)."""
    automatic = {"cpu": ["torch", "cpp"], "cuda": ["torch", "triton"]}.get(call.device, ["torch"])
    backends = [requested] if requested != "auto" else automatic  # Triton on CPU tensors (its interpreter): forced
    allowed, excluded = [], {}
    if requested == "auto" and formulation is None:
        if call.batch == 0:
            excluded["released"] = "an empty batch (a convolution with groups = B cannot have B = 0)"
        elif call.transform == "func":
            excluded["released"] = "torch.func transforms run the op (its formulas and batching rules)"
        elif call.backward and call.kept_bytes > keep_bytes():
            excluded["released"] = (f"would keep {call.kept_bytes / 2**20:.0f} MiB of per-sample kernels, above "
                                    f"{KEEP_BYTES_ENV}={keep_bytes() / 2**20:.0f} MiB")
        else:
            allowed.append("released")
    for backend in backends:
        names = _op_formulations(backend, call)
        if formulation is not None:
            names = [f for f in names if f.endswith(":" + formulation)] or [names[0]]
        reasons = _backend_reasons(backend, call, tensors)
        if backend == "triton" and requested == "auto" and not reasons:
            from .verify import failed

            if failed(call):  # forced, its verified wrapper runs the torch path for the key instead
                reasons = ["its kernels disagreed with the torch path on this device and shape bucket earlier in "
                           "this process (verification on first use)"]
        if backend == "cpp" and call.device != "cpu":
            reasons = reasons or [f"{call.device} tensors"]
        if reasons:
            if requested != "auto":
                raise BackendUnavailableError(f"kw_ops backend {backend!r} ({source}) cannot run this call:\n  - "
                                              + "\n  - ".join(reasons))
            excluded.update({f: "; ".join(reasons) for f in names})
            continue
        allowed += names
    return allowed, excluded


def _choose(estimates: list[Estimate], uncalibrated_margin: float = DEFAULT_MARGIN) -> tuple[str, str]:
    timed = [e for e in estimates if e.seconds is not None]
    if not timed:
        raise RuntimeError("kw_ops dispatch: no formulation has an estimate for this call")
    best = min(timed, key=lambda e: e.seconds)
    released = next((e for e in timed if e.formulation == "released"), None)
    if released is None or best is released:
        others = [e for e in timed if e is not best]
        if not others:
            return best.formulation, "the only candidate"
        runner_up = min(others, key=lambda e: e.seconds)
        return best.formulation, (f"cheapest: {_ms(best)} vs {runner_up.formulation} {_ms(runner_up)}")
    margin = MARGIN if best.calibrated and released.calibrated else uncalibrated_margin
    gain = 1 - best.seconds / released.seconds
    if gain < margin:
        return "released", (f"{best.formulation} predicted {100 * gain:.0f}% faster ({_ms(best)} vs "
                            f"{_ms(released)}), below the {100 * margin:.0f}% margin: released")
    return best.formulation, f"predicted {100 * gain:.0f}% faster than released ({_ms(best)} vs {_ms(released)})"


def _ms(e: Estimate) -> str:
    return f"{e.seconds * 1e3:.3g} ms{'' if e.calibrated else '*'}"


_DECISIONS: dict = {}
_GENERATION = [0]  # bumped by clear_decisions: layers' own caches (run_for_layer) are dropped with it


def clear_decisions() -> None:
    """Forget cached decisions (after a calibration, a failed verification or a changed knob)."""
    _DECISIONS.clear()
    _GENERATION[0] += 1


def decide(call: Call, backend: str | None = None, formulation: str | None = None, tensors=None,
           name: str | None = None) -> Decision:
    """The formulation that runs `call` (see the module docstring); `tensors` = (x, attn, warehouse, bias,
    geometry) lets backends check what only the tensors tell (Triton's kernel limits); `name` is the caller's,
    for `recording()`."""
    requested, source = requested_backend(backend)
    key = (call, requested, source, formulation, keep_bytes())
    decision = _DECISIONS.get(key)
    if decision is None:
        decision = _decide(call, requested, source, formulation, tensors)
        if not torch.compiler.is_compiling():
            _DECISIONS[key] = decision
    _record(name, call, decision)
    return decision


def compiled_choice(backend: str | None, formulation: str | None) -> str:
    """Inside torch.compile: the registered op, whose backend and formulation are decided when it runs, on the
    concrete sizes (`op_choice`), so that one graph serves every batch size (a choice made while tracing would
    be a constant of the graph, and a new batch size a recompile). A forced backend is kept."""
    requested, _ = requested_backend(backend)
    return f"op:{requested}:{formulation or ''}"


def op_choice(x, attn, warehouse, out_channels: int, kernel_size, stride, padding, dilation, groups: int,
              backward: bool) -> tuple[str, str]:
    """(backend, formulation) for the registered op called with backend 'auto': the cheapest of the op's own
    candidates on the concrete tensors (the released formulation is not one: the op is already running)."""
    with torch.no_grad():
        call = Call.of(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups)
    call = dataclasses.replace(call, backward=backward, input_grad=backward, transform="")
    geometry = {"out_channels": out_channels, "kernel_size": tuple(kernel_size), "stride": tuple(stride),
                "padding": tuple(padding), "dilation": tuple(dilation), "groups": groups}
    allowed, _ = _candidates(call, "auto", None, (x, attn, warehouse, None, geometry))
    allowed = [f for f in allowed if f != "released"]
    choice = allowed[0] if len(allowed) == 1 else _choose([estimate(f, call) for f in allowed])[0]
    return _backend_variant(choice)


def _decide(call: Call, requested: str, source: str, formulation: str | None, tensors) -> Decision:
    if call.transform == "export":
        decision = Decision("export", (), "exporting: the formulation whose batch stays symbolic")
    else:
        allowed, excluded = _candidates(call, requested, formulation, tensors, source)
        if len(allowed) == 1:  # nothing to weigh (e.g. Triton forced on CPU tensors under its interpreter)
            estimates, choice, reason = [], allowed[0], "the only candidate"
        else:
            estimates = [estimate(f, call) for f in allowed]
            # On GPU the cost model is the only estimate (datasheet peaks until gpu_check measures them): its
            # picks stand at the usual margin, and Triton's results are verified on first use (verify.py)
            choice, reason = _choose(estimates, MARGIN if call.device == "cuda" else DEFAULT_MARGIN)
        if requested != "auto":
            reason = f"{requested} forced by {source}; {reason}"
        estimates += [Estimate(f, None, why_not=why) for f, why in excluded.items()]
        decision = Decision(choice, tuple(estimates), reason)
    return decision


def backend_formulation(backend: str, x, attn, warehouse, out_channels: int, kernel_size, stride, padding, dilation,
                        groups: int) -> str:
    """The cheapest of `backend`'s formulations ('grouped' or 'gemm') for a direct call of the registered op."""
    with torch.no_grad():  # the op's own pass: decide as for a call without a backward
        call = Call.of(x, attn, warehouse, out_channels, kernel_size, stride, padding, dilation, groups)
    decision = decide(dataclasses.replace(call, transform=""), backend)
    return _backend_variant(decision.formulation)[1]


def _backend_variant(formulation: str) -> tuple[str, str]:
    """('torch', 'gemm') of 'op:torch:gemm'; the variant '' where the backend decides it ('op:triton')."""
    parts = formulation.split(":")
    variant = parts[2] if len(parts) > 2 else ""
    return parts[1], variant if variant in ("grouped", "gemm") else ""


# -- running ------------------------------------------------------------------------------------
def run_formulation(formulation: str, x, attn, warehouse, bias, out_channels: int, kernel_size, stride, padding,
                    dilation, groups: int):
    """Run the call in `formulation` (arguments checked and normalised; the contract of kw_ops.ops.kw_conv)."""
    geometry = (out_channels, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), groups)
    if formulation in ("released", "export"):
        if torch.is_autocast_enabled(x.device.type):  # every operand in the autocast dtype, as the op runs
            dtype = torch.get_autocast_dtype(x.device.type)
            x, attn, warehouse = x.to(dtype), attn.to(dtype), warehouse.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        run = kept_kernels_conv if formulation == "released" else export_conv
        return run(x, attn, warehouse, bias, *geometry)
    backend, variant = _backend_variant(formulation)  # variant '': the op decides when it runs
    args = [x, attn, warehouse, bias, out_channels, list(kernel_size), list(stride), list(padding), list(dilation),
            groups, backend, variant]
    if torch.is_autocast_enabled(x.device.type):  # cast where autograd sees it, as the op's autocast kernel does
        args = autocast_args(x.device.type, args)
    return apply_kw_conv(*args)


def run_for_layer(cache: dict, x, attn, warehouse, bias, geometry: tuple, backend: str | None, name: str | None):
    """A KW layer's call: its arguments are the layer's own (checked when it was built; x checked by the layer),
    so the decision for calls like this one is kept in the layer's `cache`, keyed on what it depends on, and a
    repeated call costs a dict lookup instead of building and hashing a Call (the per-layer overhead measured
    150 us before, 10 % of a MobileNetV2 forward at batch 2). geometry: (out_channels, kernel_size, stride,
    padding, dilation, groups), normalised."""
    functorch = torch._C._functorch.peek_interpreter_stack() is not None
    key = (x.shape, x.dtype, x.device, x.requires_grad, attn.requires_grad, warehouse.requires_grad,
           torch.is_grad_enabled(), requested_backend(backend), exporting(), functorch,
           functorch or x.is_contiguous(), _GENERATION[0], os.environ.get(KEEP_BYTES_ENV))
    formulation = None if _RECORDING.get() is not None else cache.get(key)
    if formulation is None:
        call = Call.of(x, attn, warehouse, *geometry)
        names = ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
        formulation = decide(call, backend, None, (x, attn, warehouse, bias, dict(zip(names, geometry))),
                             name=name).formulation
        if len(cache) > 32:  # a layer sees few call shapes; a stream of new ones must not grow it without end
            cache.clear()
        cache[key] = formulation
    if formulation.startswith("op:triton"):
        from .verify import current_layer

        with current_layer(name):
            return run_formulation(formulation, x, attn, warehouse, bias, *geometry)
    return run_formulation(formulation, x, attn, warehouse, bias, *geometry)


# -- recording (describe --dispatch, calibrate) -------------------------------------------------
_RECORDING: contextvars.ContextVar = contextvars.ContextVar("kw_ops_dispatch_recording", default=None)


def _record(name: str | None, call: Call, decision: Decision) -> None:
    log = _RECORDING.get()
    if log is not None:
        log.append((name, call, decision))


@contextlib.contextmanager
def recording():
    """Collect (caller's name, call, decision) of every KW convolution decided inside the block."""
    log: list = []
    token = _RECORDING.set(log)
    try:
        yield log
    finally:
        _RECORDING.reset(token)


# -- calibration --------------------------------------------------------------------------------
def calibrate_calls(calls, min_time: float = 0.05, progress=None, redo: bool = False) -> cpu_costs.RateTable:
    """Time, on this CPU, every candidate formulation of these calls as a whole (forward, and backward where the
    call has one) whose bucket the cache lacks (all of them with `redo`); save the rates to the machine's cache
    and use them from now on."""
    table = cpu_costs.RateTable() if redo else cpu_costs.load_rates()
    kernels = []
    for call in calls:
        if call.device != "cpu" or call.transform:
            continue
        allowed, _ = _candidates(call, "auto", None, None)
        kernels += [cpu_costs.formulation_kernel(f, call) for f in allowed]
    table = cpu_costs.calibrate_kernels(kernels, table, min_time=min_time, progress=progress)
    cpu_costs.save_rates(table)
    clear_decisions()
    return table
