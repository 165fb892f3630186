"""Cost of a KW convolution on CPU, at two levels:

    measured   a formulation (kw_ops.ops.dispatch) timed as a whole, its forward and its backward where the call
               has one (`formulation_kernel`), by `python -m kw_ops calibrate` on a call of the same *bucket*
               (every field of the call exact but the batch, rounded to the nearest power of 2): the call's
               estimate is that time per sample x its batch. The rates are cached in a JSON file per machine,
               torch version and thread count (`cache_path()`; redo it with `python -m kw_ops calibrate --redo`);
    default    else the sum of the kernels the formulation runs (the mixing GEMM, a copy of the per-sample kernels
               into the convolution's layout, a grouped convolution (groups = B · groups), the GEMMs of dattn and
               dE, the compiled kernel of the `cpp` backend, a fixed cost per call), each a `Kernel` of its kind,
               exact dims and work (FLOPs, or bytes for copies), at a roofline rate of its kind (`DEFAULT_RATES`,
               measured on the 2-core x86 machine this project is developed on), scaled down for thin GEMMs and
               small convolutions, where libraries are known to run far below their peak.

Timing the kernels one by one predicted late layers 2-3x too fast (their per-sample kernels leave the cache
between kernels), which is why calibration times whole formulations. The dispatcher only trusts a prediction
that beats the released formulation by a margin (`dispatch.MARGIN`), wider where it rests on default rates.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .torch_impl import conv_output_size

__all__ = ["Kernel", "RateTable", "DEFAULT_RATES", "CACHE_ENV", "cache_path", "load_rates", "save_rates", "rate_table",
           "calibrate_kernels", "bucket", "machine_key", "gemm", "bmm", "copy", "conv", "cpp_kernel", "call",
           "formulation_kernel"]

CACHE_ENV = "KW_OPS_CALIBRATION"
#: roofline rates of the development machine (2-core x86_64, torch 2.13 CPU, 2 threads, fp32): FLOP/s for
#: GEMMs, convolutions and the compiled kernel, bytes/s (read + written) for copies, seconds per call for `call`
#: `call:NAME`: the fixed cost of one call of a formulation (the registered op goes through torch.library's
#: dispatch and an autograd.Function: measured 60-70 us more than the released formulation's plain ops per forward)
DEFAULT_RATES = {"gemm": 100e9, "bmm": 100e9, "conv": 80e9, "cpp": 70e9, "copy": 10e9, "call": 30e-6,
                 "call:op_forward": 70e-6, "call:op_step": 200e-6, "call:released_forward": 10e-6,
                 "call:released_step": 40e-6}
# Work below which a kernel's rate falls (dispatch overhead, tiny tiles): default rates assume the kernel
# reaches half its peak at this many FLOPs.
_HALF_RATE_FLOPS = 2e6


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel of a formulation, or a whole formulation: its kind, its exact arguments, its work (FLOPs;
    bytes read and written for copies; 1 for a call's overhead; the batch for a formulation) and the bucket whose
    measured rate it takes. Build them with `gemm`, `bmm`, `copy`, `conv`, `cpp_kernel`, `call` and
    `formulation_kernel`."""

    kind: str
    dims: tuple
    work: float
    key: str
    dtype: str = "float32"


def _key(kind: str, dtype: str, exact: tuple, rounded: tuple) -> str:
    return f"{kind}:{dtype}:" + "x".join(map(str, exact + tuple(bucket(v) for v in rounded)))


def gemm(m: int, n: int, k: int, dtype: str) -> Kernel:
    """C[m, n] = A[m, k] · B[k, n]."""
    return Kernel("gemm", (m, n, k), 2.0 * m * n * k, _key("gemm", dtype, (), (m, n, k)), dtype)


def bmm(batch: int, m: int, n: int, k: int, dtype: str) -> Kernel:
    """`batch` GEMMs C[m, n] = A[m, k] · B[k, n]."""
    return Kernel("bmm", (batch, m, n, k), 2.0 * batch * m * n * k, _key("bmm", dtype, (), (batch, m, n, k)), dtype)


def copy(nbytes: int, dtype: str) -> Kernel:
    """A strided copy (permute, im2col, col2im) reading and writing `nbytes`."""
    return Kernel("copy", (nbytes,), 2.0 * nbytes, _key("copy", dtype, (), (nbytes,)), dtype)


def conv(pass_: int, groups: int, cin: int, cout: int, kernel: tuple, size: tuple, stride: tuple, padding: tuple,
         dilation: tuple, dtype: str) -> Kernel:
    """A grouped convolution of one image with `groups` groups of cin -> cout channels: its forward (pass 0), its
    input gradient (1) or weight gradient (2). Taps and strides are exact in the bucket, sizes rounded."""
    taps, positions = math.prod(kernel), math.prod(conv_output_size(size, kernel, stride, padding, dilation))
    work = 2.0 * groups * cin * cout * taps * positions
    key = _key("conv", dtype, (pass_, *kernel, *stride), (groups, cin, cout, positions))
    return Kernel("conv", (pass_, groups, cin, cout, tuple(kernel), tuple(size), tuple(stride), tuple(padding),
                           tuple(dilation)), work, key, dtype)


def cpp_kernel(direction: int, path: str, batch: int, channels: int, out_channels: int, groups: int, kernel: tuple,
               size: tuple, stride: tuple, padding: tuple, dilation: tuple, cell: tuple, n: int, dtype: str) -> Kernel:
    """The compiled kernel of the cpp backend, forward (direction 0) or backward (1, every gradient), on `path`
    ('gemm' or 'grouped') for a whole call: its work is the mixing and convolution FLOPs of the pass."""
    in_per_group = channels // groups
    positions = math.prod(conv_output_size(size, kernel, stride, padding, dilation))
    weights = out_channels * in_per_group * math.prod(kernel)
    flops = 2.0 * batch * n * weights + 2.0 * batch * weights * positions
    work = flops if direction == 0 else 2.5 * flops  # backward: mixing again, dx, dW, dattn, dE
    key = _key("cpp", dtype, (direction, path, *kernel, *stride, int(groups == 1)),
               (batch, channels, out_channels, positions, n, math.prod(cell)))
    return Kernel("cpp", (direction, path, batch, channels, out_channels, groups, tuple(kernel), tuple(size),
                          tuple(stride), tuple(padding), tuple(dilation), tuple(cell), n), work, key, dtype)


def formulation_kernel(formulation: str, call) -> Kernel:
    """A whole formulation of a dispatch.Call (its forward, and backward when one follows) as one kernel: its
    work is the batch, its bucket the call with the batch rounded to a power of 2 (the rest exact), so a
    calibration that timed it predicts the call as time per sample x batch."""
    fields = dataclasses.astuple(call)
    exact = tuple(v for i, v in enumerate(fields) if i != 2)  # every field but the batch (index 2)
    key = f"formulation:{formulation}:{bucket(call.batch)}:" + ":".join(map(str, exact))
    return Kernel("formulation", (formulation, fields), float(call.batch), key, call.dtype)


def call(name: str) -> Kernel:
    """The fixed cost of one call of a Python-level formulation (argument checks, autograd bookkeeping)."""
    return Kernel("call", (name,), 1.0, f"call:{name}")


def bucket(value: int) -> int:
    """The power of 2 nearest to `value` in log scale (0 stays 0)."""
    if value <= 0:
        return 0
    return 1 << round(math.log2(value))


def _default_seconds(kernel: Kernel, rates: dict) -> float:
    rate = rates[kernel.kind]
    if kernel.kind == "call":
        return rates.get(kernel.key, rate)
    if kernel.kind == "copy":
        return kernel.work / rate
    seconds = kernel.work / rate + _HALF_RATE_FLOPS / rate
    if kernel.kind in ("gemm", "bmm"):  # a thin side (< 16) leaves most of a GEMM's vector lanes idle
        thin = min(kernel.dims[-3:])
        seconds *= max(1.0, 16 / max(1, thin)) ** 0.5
    return seconds


@dataclasses.dataclass
class RateTable:
    """Measured rates by kernel bucket, the default rates, and where they come from."""

    rates: dict = dataclasses.field(default_factory=dict)      # key -> work per second (seconds per call: call)
    defaults: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_RATES))
    source: str = "defaults"

    def seconds(self, kernel: Kernel) -> float:
        rate = self.rates.get(kernel.key)
        if rate is None:
            return _default_seconds(kernel, self.defaults)
        return rate if kernel.kind == "call" else kernel.work / rate

    def measured(self, kernel: Kernel) -> bool:
        return kernel.key in self.rates

    def to_json(self) -> dict:
        return {"source": self.source, "machine": machine_key(), "defaults": self.defaults, "rates": self.rates}


def machine_key() -> str:
    """What a calibration holds for: processor, core count, torch version and intra-op threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} | {os.cpu_count()} cores | torch {torch.__version__} | {torch.get_num_threads()} threads"


def cache_path() -> Path:
    """The calibration file of this machine, torch version and thread count (KW_OPS_CALIBRATION overrides)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kw_ops"
    name = "".join(c if c.isalnum() else "-" for c in machine_key()).strip("-")
    return base / f"cpu-rates-{name}.json"


def load_rates(path: Path | None = None) -> RateTable:
    """The cached calibration of this machine (defaults where there is none or it is for another machine)."""
    path = Path(path) if path is not None else cache_path()
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return RateTable()
    if data.get("machine") != machine_key() or not isinstance(data.get("rates"), dict):
        return RateTable()
    return RateTable(dict(data["rates"]), {**DEFAULT_RATES, **data.get("defaults", {})},
                     f"calibrated ({path})")


@functools.cache
def _cached_table(path: str, threads: int) -> RateTable:
    return load_rates(Path(path))


def rate_table() -> RateTable:
    """The rates the dispatcher uses now (read once per cache file and thread count)."""
    return _cached_table(str(cache_path()), torch.get_num_threads())


def save_rates(table: RateTable, path: Path | None = None) -> Path:
    """Write the table atomically (processes calibrating at once never leave a torn file)."""
    path = Path(path) if path is not None else cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(table.to_json(), f, indent=1, sort_keys=True)
    os.replace(f.name, path)
    _cached_table.cache_clear()
    return path


# -- measuring ----------------------------------------------------------------------------------
def _best_seconds(fn: Callable[[], object], min_time: float) -> float:
    """Least time of one call over at least two timed calls, more while they last under `min_time` seconds in
    all (after one warm-up call)."""
    fn()
    best, spent, calls = math.inf, 0.0, 0
    while calls < 2 or (spent < min_time and calls < 50):
        started = time.perf_counter()
        fn()
        seconds = time.perf_counter() - started
        best, spent, calls = min(best, seconds), spent + seconds, calls + 1
    return best


def _runner(kernel: Kernel) -> Callable[[], object] | None:
    """A call that runs a formulation kernel on random tensors of its call's shape (None for other kinds: only
    whole formulations are timed)."""
    if kernel.kind == "formulation":
        return _formulation_runner(*kernel.dims)
    return None


def _formulation_runner(formulation: str, fields: tuple):
    """One call of the formulation on random tensors of the call's shape (forward, and backward if it has one)."""
    from .dispatch import Call, run_formulation

    call = Call(*fields)
    dtype = getattr(torch, call.dtype)
    grad = call.backward
    x = torch.randn(call.batch, call.channels, *call.size, dtype=dtype, requires_grad=grad and call.input_grad)
    attn = (torch.randn(call.batch, call.m, call.n, dtype=dtype) / call.n).requires_grad_(grad)
    warehouse = torch.randn(call.n, *call.cell, dtype=dtype).requires_grad_(grad)
    args = (call.out_channels, call.kernel_size, call.stride, call.padding, call.dilation, call.groups)
    if grad:
        return lambda: run_formulation(formulation, x, attn, warehouse, None, *args).sum().backward()

    def forward():
        with torch.no_grad():
            run_formulation(formulation, x, attn, warehouse, None, *args)
    return forward


#: share of a calibration's time its threads may wait for a CPU before it is called unreliable
BUSY_WAIT = 0.10


class BusyMachineWarning(UserWarning):
    """The machine was busy while a calibration ran: its rates are too low and skewed (rerun it idle)."""


def calibrate_kernels(kernels: Iterable[Kernel], table: RateTable | None = None, min_time: float = 0.05,
                      progress: Callable[[str], None] | None = None) -> RateTable:
    """Time every formulation kernel (`formulation_kernel`) whose bucket the table lacks (kernels of other kinds
    are not timed: they keep their default rates); returns the table with their rates added. Each kernel's
    rate is from its fastest call of several (at least two, more while they last under `min_time` s in all),
    which a short burst of other work does not move; a machine busy throughout (its threads waited on a run
    queue for over BUSY_WAIT of the time: with every core in use, OpenMP threads wait for each other) is
    warned about, since every rate then comes out low and small kernels lowest."""
    import warnings

    from ..benchmarking.measure import run_queue_wait_s

    table = table or load_rates()
    started, waited = time.perf_counter(), run_queue_wait_s()
    seen = set()
    for kernel in kernels:
        key = kernel.key
        if key in table.rates or key in seen:
            continue
        seen.add(key)
        runner = _runner(kernel)
        if runner is None:
            continue
        seconds = _best_seconds(runner, min_time)
        table.rates[key] = kernel.work / max(seconds, 1e-9)
        if progress:
            progress(key)
    table.source = "calibrated"
    spent, waited = time.perf_counter() - started, run_queue_wait_s() - waited
    if seen and spent > 0 and waited / spent > BUSY_WAIT:
        warnings.warn(f"kw_ops calibrate: other processes held the CPU for {100 * waited / spent:.0f}% of the "
                      f"calibration; its rates are unreliable (run `python -m kw_ops calibrate --redo` on an idle "
                      f"machine)", BusyMachineWarning, stacklevel=2)
    return table
