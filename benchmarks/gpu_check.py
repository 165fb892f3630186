"""One GPU window (about 6 minutes on an H100 / H200) that settles the Triton path: stages in order of value.

    PYTHONPATH=. python benchmarks/gpu_check.py --plan    # the compiles and timings it will do, its estimate (no GPU)
    PYTHONPATH=. python benchmarks/gpu_check.py           # on the GPU; writes under $OUT, else benchmarks/results/
    KW_OPS_GIT_SHA=<sha> ...                              # the sha to record where the tree was copied without .git

Stages, in this order; each has its own deadline, checked inside its loops (what does not fit is a 'skipped'
row saying so). The baselines run in this process; every stage that launches a Triton kernel runs in a child
process (ISOLATED), so a fault (an illegal address poisons the CUDA context) or a hung kernel (CASE_TIMEOUT_S)
costs the case in flight, as an error row naming it, and the stage goes on in a new child from the next case.
`--stages isolation_check` exercises that without a GPU.
compile         every kernel specialisation the stages below launch (captured on meta tensors by
                kw_ops.benchmarking.triton_capture, the config a real launch takes) in parallel processes into
                Triton's cache, before this process touches CUDA; --plan also counts the C launchers gcc builds
                at each kernel signature's first launch.
peaks           DRAM copy bandwidth (bytes read + written), an L2-resident copy, bf16 matmul (tensor cores), fp32
                matmul without TF32 (CUDA cores), the host time of an eager op's launch; written to peaks.json for
                the cost model (KW_OPS_PEAKS), with the host time of a Triton launch the smoke stage measures.
layers          forward and backward of every distinct ResNet50 KW1x layer at batch 128, bf16: cuDNN static, torch
                path, released formulation; median of CUDA-event timings over rotated inputs, the roofline floor
                with the peaks measured above, and the cost model's prediction with them.
network         Table 12 / 16 rows: ResNet50 static and KW1x in the released formulation: images/s, training
                step, peak memory.
smoke (child)   correctness of every kernel (each mode of launch.MODES, forward and backward) against the torch
                path in fp64 on the same inputs, relative Frobenius and largest absolute error (SMOKE_TOLERANCES):
                bf16 on every one of SMOKE_SHAPES (groups = 1, depthwise and grouped; NCHW inputs converted to
                channels_last and channels_last ones; dx by stride phase; several chunks), fp16 and fp32 (TF32 and
                ieee) on one shape per kernel path; outputs poisoned with NaN; stops at the --maxfail-th failure.
layers_triton   the layers stage's Triton rows (child); each layer's output or gradients are compared with the
(child)         released formulation's on the same inputs first, and not timed where they disagree.
premise (child) the design's premise, on layer4.1.conv2 of ResNet50 KW1x and KW4x at batch 128, bf16: mixing
                alone, the convolution alone and both, with the per-sample kernels of each chunk in one reused
                buffer of 8, 16 and 32 MiB (two_phase) and blocks of 16 and 128 MiB (blocked), eagerly and as CUDA
                graphs; the ratio both / (mix + conv).
network_kw_ops  the network stage's kw_ops row (child).
(child)
Output: gpu_check.csv (one row appended and flushed per result), gpu_check.md (rewritten after each stage),
peaks.json; every row and the header carry device, versions and git sha.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kw_ops.benchmarking.layer_shapes import kw_layer_shapes, out_size, shape_text  # noqa: E402
from kw_ops.benchmarking.model_bench import _environment  # noqa: E402
from kw_ops.ops.triton import cost_model  # noqa: E402  (no triton import: main() sets TRITON_INTERPRET first)

WINDOW_S = 360                 # the GPU window the default run must fit
# Order: the compile workers fork before the parent touches CUDA; the baselines (peaks, static, torch path,
# released) run in the parent; every stage that launches Triton kernels runs in a child process (ISOLATED), so a
# fault (an illegal address poisons a CUDA context) costs the case in flight, named, and the stage goes on in a
# new child from the next case.
STAGES = ("compile", "peaks", "layers", "network", "smoke", "layers_triton", "premise", "network_kw_ops")
ISOLATED = ("smoke", "layers_triton", "premise", "network_kw_ops", "isolation_check")
# Each stage's own budget (seconds); a stage also stops at the run's deadline (--budget-s).
STAGE_BUDGET_S = {"compile": 80, "peaks": 15, "layers": 70, "network": 40, "smoke": 60, "layers_triton": 80,
                  "premise": 50, "network_kw_ops": 30, "isolation_check": 60}
CASE_TIMEOUT_S = 90            # a case of an isolated stage that takes longer is a hung kernel: its child is killed
ISOLATION_CHECK_TIMEOUT_S = 5  # the same for the isolation check's cases (its hang sleeps an hour)
COMPILE_WORKERS = 16           # processes compiling into Triton's cache (the GPU machine has 16 CPU cores)
LAYER_MODEL = "resnet50_kw1x"
LAYER_BATCH = 128
PROVIDERS = ("static", "torch", "released", "triton")
WARMUP, REPEATS = 2, 5         # untimed and timed calls per layer case (median of the timed ones)
# Smoke precisions: (dtype, fp32 dot precision) -> (tolerance of the relative Frobenius error, of the largest
# absolute error over the reference's largest magnitude), both against the torch path in fp64 on the same values.
# bf16 keeps 8 mantissa bits (relative errors 1e-3 to 1e-2, METHOD.md); fp16 and TF32 keep 11; ieee fp32 24.
SMOKE_TOLERANCES = {("bf16", None): (1e-2, 5e-2), ("fp16", None): (2e-3, 1e-2), ("fp32", "tf32"): (2e-3, 1e-2),
                    ("fp32", "ieee"): (1e-5, 1e-4)}
SMOKE_REL_TOL = SMOKE_TOLERANCES[("bf16", None)][0]
#: the shapes also run in fp16 and fp32 (TF32 and ieee): the first of each kernel path (groups = 1 NCHW and NHWC,
#: stride-phase dx, depthwise, grouped, several chunks)
SMOKE_OTHER_DTYPE_CASES = 6
NETWORK_METHODS = (("resnet50", "static", False), ("resnet50_kw1x", "released", True),
                   ("resnet50_kw1x", "kw_ops", False))
# Table 12 times batch 100; 128 and NCHW here so that the Triton launches reuse stage c's compiles
NETWORK_BATCH = LAYER_BATCH
NETWORK_WARMUP, NETWORK_ITERS = 2, 5   # per measure; each memory measure is one more call
# Estimate (--plan) inputs that are assumptions until a run measures them:
ASSUMED_COMPILE_S = 3.0        # one Triton compile on one core (1.3-3.4 s measured on the shared CPU machine)
ASSUMED_SLOWDOWN = 4.0         # measured / predicted time of the unmeasured paths (Triton, torch path, networks)
ASSUMED_CASE_OVERHEAD_S = 0.25  # inputs (three sets), graphs, launches and synchronisation of one case
ASSUMED_STARTUP_S = 20.0       # imports, CUDA context, layer shapes
ASSUMED_CHILD_START_S = 10.0   # a child of an isolated stage: spawn, imports, CUDA context, its stage's items
ASSUMED_LAUNCHER_S = 0.4       # gcc building one C launcher (per kernel signature) at its first launch
GIT_SHA_ENV = "KW_OPS_GIT_SHA"
CSV_FIELDS = ("device", "torch", "triton", "cuda", "git_sha", "stage", "case", "provider", "mode", "status",
              "value", "unit", "predicted_ms", "floor_ms", "rel_err", "note")


# -- time and output -----------------------------------------------------------------------------------------
class Deadline:
    """A point in time on `clock`; `part(s)` is a deadline s seconds away, never later than this one."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.clock = clock
        self.end = clock() + seconds

    def left(self) -> float:
        return self.end - self.clock()

    def expired(self) -> bool:
        return self.left() <= 0

    def part(self, seconds: float) -> Deadline:
        return Deadline(min(seconds, self.left()), self.clock)


class CsvLog:
    """gpu_check.csv: a header once, then every row appended and flushed as it comes."""

    def __init__(self, path: Path, env: dict):
        self.env = {k: env.get(k, "") for k in CSV_FIELDS[:5]}
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS)
        if new:
            self.writer.writeheader()
        self.rows: list[dict] = []

    def write(self, row: dict) -> None:
        row = {**self.env, **row}
        self.writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})
        self.file.flush()
        self.rows.append(row)

    def close(self) -> None:
        self.file.close()


# A row of a child stage may carry rates for the parent's peaks under this key (popped before the row is logged).
MEASURED_KEY = "measured"


def log_rows(log, stage: str, case: str, rows, measured: dict) -> None:
    """Write a case's rows; rates a row carries (MEASURED_KEY) go into `measured`, not into the CSV."""
    for row in rows:
        measured.update(row.pop(MEASURED_KEY, None) or {})
        log.write({"stage": stage, "case": case, **row})


@dataclass
class Item:
    """One unit of a stage: a label and run(stage deadline) -> result rows (dicts with CSV fields)."""
    case: str
    run: object
    estimate_s: float = 0.0
    compiles: int = 0
    launchers: int = 0


def run_stage(stage: str, items: list[Item], deadline: Deadline, log: CsvLog, maxfail: int | None = None) -> str:
    """Run items until done, deadline or maxfail failures; every row to the log at once. -> a summary line."""
    done = failed = 0
    start = deadline.clock()
    for index, item in enumerate(items):
        if deadline.expired():
            log.write({"stage": stage, "case": item.case, "status": "skipped",
                       "note": f"stage deadline: {len(items) - index} of {len(items)} items not run"})
            break
        try:
            for row in item.run(deadline):   # a generator's rows reach the file as they come
                log.write({"stage": stage, "case": item.case, **row})
                failed += row.get("status") in ("fail", "error")
        except Exception as exc:  # recorded as an error row, never as a number
            log.write({"stage": stage, "case": item.case, "status": "error",
                       "note": f"{type(exc).__name__}: {str(exc)[:300]}"})
            failed += 1
        done += 1
        if maxfail is not None and failed >= maxfail:
            log.write({"stage": stage, "case": item.case, "status": "stopped", "note": f"{failed} failures"})
            break
    return f"{stage}: {done}/{len(items)} items, {failed} failed, {deadline.clock() - start:.0f} s"


# -- GPU helpers -------------------------------------------------------------------------------------------
def time_ms(fn, deadline: Deadline, warmup: int = WARMUP, repeats: int = REPEATS) -> float:
    """Median ms of `repeats` event-timed calls after `warmup` calls; stops early at the deadline (>= 1 timing)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if deadline.expired():
            break
    return statistics.median(times)


@contextlib.contextmanager
def pinned_configs():
    """Every launch takes the config a real launch takes by default: the pick per shape class of
    kw_ops/ops/triton/tuning.py (KW_OPS_TRITON_AUTOTUNE cleared inside the block), so nothing is benchmarked."""
    from kw_ops.ops.triton.tuning import AUTOTUNE_ENV

    saved = os.environ.pop(AUTOTUNE_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[AUTOTUNE_ENV] = saved


@contextlib.contextmanager
def poisoned_outputs():
    """Every buffer the launchers allocate starts as NaN, so an unwritten element fails the comparison."""
    from kw_ops.ops.triton import launch

    original = launch._empty
    launch._empty = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    try:
        yield
    finally:
        launch._empty = original


# -- stage 0: compile ---------------------------------------------------------------------------------------
_PENDING: list = []   # the launches forked compile workers read


def _compile_one(index: int):
    from kw_ops.benchmarking import triton_capture

    try:
        return index, "", triton_capture.compile_launch(_PENDING[index]).seconds
    except Exception as exc:  # reported as a row
        return index, f"{type(exc).__name__}: {str(exc)[:200]}", 0.0


def compile_item(launches_of, estimate: float, count: int, launcher_count: int = 0) -> Item:
    """Compile every specialisation later stages launch, in COMPILE_WORKERS processes, into Triton's on-disk cache
    (the same compile call as a launch: the stages then load instead of compiling). The C launchers gcc builds at
    each kernel signature's first launch are counted in the estimate (launcher_count x ASSUMED_LAUNCHER_S)."""
    def run(deadline):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures import TimeoutError as FuturesTimeout

        _PENDING[:] = launches_of()
        pool = ProcessPoolExecutor(min(COMPILE_WORKERS, os.cpu_count() or 1),
                                   mp_context=multiprocessing.get_context("fork"))
        futures = [pool.submit(_compile_one, i) for i in range(len(_PENDING))]
        done = 0
        try:
            for future in as_completed(futures, timeout=max(0.0, deadline.left())):
                index, error, seconds = future.result()
                launch = _PENDING[index]
                done += 1
                yield {"provider": "triton", "mode": "compile", "status": "error" if error else "ok",
                       "value": f"{seconds:.2f}", "unit": "s", "note": error or f"{launch.kernel} {launch.config}"}
        except FuturesTimeout:
            yield {"provider": "triton", "mode": "compile", "status": "skipped",
                   "note": f"stage deadline: {len(futures) - done} of {len(futures)} compiles not done"}
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    return Item("precompile", run, estimate_s=estimate + launcher_count * ASSUMED_LAUNCHER_S, compiles=count,
                launchers=launcher_count)


def planned_launches(specs, modes) -> dict[str, set]:
    """The specialisations the smoke and layer stages launch with pinned configs (captured on meta tensors; the
    network stage is assumed to reuse the layer stage's: same batch, layout and configs)."""
    from kw_ops.benchmarking import triton_capture

    from kw_ops.ops.triton.launch import FP32_PRECISION_ENV

    smoke_calls = [triton_capture.LayerCall(c.spec(), c.batch, torch.bfloat16, c.channels_last, c.name)
                   for c in SMOKE_SHAPES]
    layer_calls = triton_capture.layer_calls([(LAYER_MODEL, s) for s in specs], [LAYER_BATCH], [torch.bfloat16])
    found = {"smoke": set(), "layers": set()}
    passes = [("smoke", smoke_calls, modes, None), ("layers", layer_calls, (None,), None)]
    for dtype, precision in SMOKE_TOLERANCES:   # the smoke's other dtypes and fp32 precisions
        if dtype != "bf16":
            calls = [triton_capture.LayerCall(c.spec(), c.batch, _DTYPES[dtype], c.channels_last, c.name)
                     for c in _other_dtype_cases()]
            passes.append(("smoke", calls, modes, precision))
    for stage, calls, stage_modes, precision in passes:
        for mode in stage_modes:
            saved = os.environ.pop(FP32_PRECISION_ENV, None)
            if precision:
                os.environ[FP32_PRECISION_ENV] = precision
            try:
                with _forced_mode(mode), pinned_configs():
                    launches, _ = triton_capture.capture(calls)
            finally:
                os.environ.pop(FP32_PRECISION_ENV, None)
                if saved is not None:
                    os.environ[FP32_PRECISION_ENV] = saved
            found[stage] |= set(launches)
    return found


# -- stage a: smoke ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SmokeCase:
    """C_in -> C_out on `size` with a kernel, stride, padding, groups and cell (c_out, c_in: c_in input channels of
    one group); whole_cells: cells hold the whole kernel (else 1x1 spatial cells)."""
    channels: int
    out: int
    size: tuple
    kernel: tuple
    stride: tuple
    padding: tuple
    cell: tuple
    whole_cells: bool = False
    bias: bool = False
    channels_last: bool = False
    batch: int = 16
    n: int = 47
    groups: int = 1
    dilation: int = 1

    @property
    def name(self) -> str:
        k = "x".join(map(str, self.kernel))
        return (f"B{self.batch}-C{self.channels}-O{self.out}-{'x'.join(map(str, self.size))}-k{k}-s{self.stride[0]}"
                f"{f'-g{self.groups}' if self.groups != 1 else ''}{f'-d{self.dilation}' if self.dilation != 1 else ''}"
                f"{'-whole' if self.whole_cells else ''}{'-bias' if self.bias else ''}"
                f"{'-nhwc' if self.channels_last else ''}")

    def spec(self) -> dict:
        cell_k = self.kernel if self.whole_cells else (1,) * len(self.kernel)
        grid = (self.out // self.cell[0]) * (self.channels // self.groups // self.cell[1])
        m = grid * (1 if self.whole_cells else math.prod(self.kernel))
        return {"channels": self.channels, "out": self.out, "size": self.size, "kernel": self.kernel,
                "stride": self.stride, "padding": self.padding, "dilation": (self.dilation,) * len(self.kernel),
                "groups": self.groups,
                "bias": self.bias, "n": self.n, "m": m, "cell": (*self.cell, *cell_k), "layer": self.name,
                "count": 1}


# Six with the integer patterns of ResNet50 KW1x layers at batch 128 (channels multiples of 64, sizes 7 / 14 / 28,
# n = 47, no bias), so stage c reuses their compiles; then odd channels and sizes with whole-kernel cells and a bias,
# channels_last (no conversion), 1-D and a 5x5 kernel; the input gradient by stride phase (odd sizes, dilation,
# a 3-channel stem with 8-row cells); depthwise and grouped layers (the grouped kernels); a layer4 3x3 layer whose
# 16 samples take three chunks of KERNEL_CHUNK_BYTES (its weight gradient: two slices of 64 of its 128 cell rows).
# Each runs in every mode of launch.MODES, forward and backward.
SMOKE_SHAPES = (
    SmokeCase(64, 64, (14, 14), (3, 3), (1, 1), (1, 1), (64, 64)),
    SmokeCase(64, 256, (14, 14), (1, 1), (1, 1), (0, 0), (64, 64)),
    SmokeCase(256, 64, (14, 14), (1, 1), (1, 1), (0, 0), (64, 64)),
    SmokeCase(128, 128, (28, 28), (3, 3), (2, 2), (1, 1), (128, 128)),
    SmokeCase(256, 512, (28, 28), (1, 1), (2, 2), (0, 0), (128, 128)),
    SmokeCase(64, 64, (7, 7), (3, 3), (1, 1), (1, 1), (64, 64)),
    SmokeCase(13, 22, (9, 7), (3, 3), (1, 1), (1, 1), (11, 13), whole_cells=True, bias=True, batch=3, n=5),
    SmokeCase(64, 64, (14, 14), (3, 3), (1, 1), (1, 1), (64, 64), channels_last=True),
    SmokeCase(16, 32, (33,), (3,), (1,), (1,), (16, 16), bias=True, batch=4, n=5),
    SmokeCase(24, 40, (11, 11), (5, 5), (1, 1), (2, 2), (20, 24), batch=5, n=5),
    SmokeCase(32, 32, (15, 15), (3, 3), (2, 2), (1, 1), (32, 32), batch=4, n=5),
    SmokeCase(64, 128, (14, 14), (3, 3), (2, 2), (1, 1), (64, 64), whole_cells=True, channels_last=True, batch=4),
    SmokeCase(16, 24, (13, 13), (3, 3), (2, 2), (2, 2), (8, 16), dilation=2, batch=3, n=5),
    SmokeCase(3, 16, (16, 16), (3, 3), (2, 2), (1, 1), (8, 3), bias=True, batch=4, n=5),
    SmokeCase(32, 32, (14, 14), (3, 3), (1, 1), (1, 1), (32, 1), groups=32, batch=8),
    SmokeCase(48, 48, (15, 15), (3, 3), (2, 2), (1, 1), (16, 1), groups=48, bias=True, batch=4, n=5),
    SmokeCase(64, 64, (7, 7), (3, 3), (1, 1), (1, 1), (64, 1), groups=64, channels_last=True, batch=8),
    SmokeCase(32, 64, (10, 10), (3, 3), (1, 1), (1, 1), (16, 8), groups=4, whole_cells=True, bias=True, batch=3, n=5),
    SmokeCase(16, 16, (33,), (5,), (2,), (2,), (4, 4), groups=4, batch=4, n=5),
    SmokeCase(512, 512, (7, 7), (3, 3), (1, 1), (1, 1), (128, 128)),
)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _smoke_inputs(case: SmokeCase, dtype: torch.dtype = torch.bfloat16):
    spec = case.spec()
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, device="cuda") * scale).to(dtype)  # fresh data
    x = rand(case.batch, case.channels, *case.size)
    if case.channels_last:
        x = x.to(memory_format=torch.channels_last)
    attn = rand(case.batch, spec["m"], spec["n"], scale=1 / spec["n"])
    warehouse = rand(spec["n"], *spec["cell"], scale=0.1)
    bias = rand(case.out) if case.bias else None
    dy = rand(case.batch, case.out, *out_size(spec))
    return spec, x, attn, warehouse, bias, dy


def _errors(got, ref) -> tuple[float, float]:
    """(relative Frobenius error, largest absolute error over the reference's largest magnitude); inf for a
    missing or non-finite result."""
    if got is None or ref is None:
        return (0.0, 0.0) if got is ref else (math.inf, math.inf)
    got, ref = got.double(), ref.double()
    if not torch.isfinite(got).all():
        return math.inf, math.inf
    frobenius = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    largest = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if ref.numel() else 0.0
    return frobenius, largest


def smoke_item(case: SmokeCase, mode: str, dtype: str = "bf16", precision: str | None = None) -> Item:
    rel_tol, abs_tol = SMOKE_TOLERANCES[(dtype, precision)]

    def run(deadline):
        from kw_ops.ops.torch_impl import kw_conv_backward_torch, kw_conv_torch
        from kw_ops.ops.triton import launch

        spec, x, attn, warehouse, bias, dy = _smoke_inputs(case, _DTYPES[dtype])
        geometry = (spec["out"], spec["kernel"], spec["stride"], spec["padding"], spec["dilation"], spec["groups"])
        f64 = lambda t: None if t is None else t.double()   # the same values, exact arithmetic
        ref_y = kw_conv_torch(f64(x), f64(attn), f64(warehouse), f64(bias), *geometry)
        ref_grads = kw_conv_backward_torch(f64(dy), f64(x), f64(attn), f64(warehouse), case.bias, *geometry,
                                           (True, True, True, case.bias))
        with poisoned_outputs():   # the config a real launch takes: pinned_configs() around the stage
            y = launch.kw_conv_triton_forward(x, attn, warehouse, bias, *geometry, mode=mode, input_precision=precision)
            grads = launch.kw_conv_triton_backward(dy, x, attn, warehouse, case.bias, *geometry, mode=mode,
                                                   input_precision=precision)
        rows = []
        label = dtype + (f"-{precision}" if precision else "")
        for name, got, ref in zip(("y", "dx", "dattn", "dwarehouse", "dbias"), (y, *grads), (ref_y, *ref_grads)):
            frobenius, largest = _errors(got, ref)
            rows.append({"provider": "triton", "mode": f"{mode}:{label}:{name}", "rel_err": f"{frobenius:.2e}",
                         "value": f"{largest:.2e}", "unit": "max abs err / max abs ref",
                         "status": "ok" if frobenius <= rel_tol and largest <= abs_tol else "fail"})
        return rows

    label = dtype + (f"-{precision}" if precision else "")
    return Item(f"{case.name} {mode} {label}", run, estimate_s=ASSUMED_CASE_OVERHEAD_S)


def smoke_items(modes) -> list[Item]:
    """Every smoke shape in bf16; the first SMOKE_OTHER_DTYPE_CASES of them also in fp16 and fp32 (TF32, the
    default, and ieee)."""
    items = [smoke_item(case, mode) for case in SMOKE_SHAPES for mode in modes]
    for dtype, precision in SMOKE_TOLERANCES:
        if dtype != "bf16":
            items += [smoke_item(case, mode, dtype, precision) for case in _other_dtype_cases() for mode in modes]
    return items


def _other_dtype_cases() -> list[SmokeCase]:
    """One smoke shape per kernel path: groups = 1 (NCHW, NHWC), stride-2 dx, depthwise, grouped, several chunks."""
    picks = [next(c for c in SMOKE_SHAPES if c.groups == 1 and not c.channels_last),
             next(c for c in SMOKE_SHAPES if c.groups == 1 and c.channels_last),
             next(c for c in SMOKE_SHAPES if c.stride[0] == 2 and c.kernel[0] == 3 and c.groups == 1),
             next(c for c in SMOKE_SHAPES if c.groups == c.channels),
             next(c for c in SMOKE_SHAPES if 1 < c.groups < c.channels),
             SMOKE_SHAPES[-1]]
    assert len(picks) == SMOKE_OTHER_DTYPE_CASES
    return picks


# -- the L2 premise ------------------------------------------------------------------------------------------
PREMISE_LAYER = "layer4.1.conv2"                     # 512 -> 512 3x3 at 7x7: the largest per-sample kernels
PREMISE_MODELS = ("resnet50_kw1x", "resnet50_kw4x")
PREMISE_BUFFERS_MIB = (8, 16, 32)
PREMISE_BLOCKED_MIB = (16, 128)   # the blocked mode: L2-sized blocks, and the largest blocked_plan may choose


def premise_phases(spec, batch: int, buffer_bytes: int, dtype=torch.bfloat16, device="cuda", blocked: bool = False):
    """The two phases of the forward on one layer with the per-sample kernels of each chunk of samples (two_phase;
    blocked: of each block of cell rows for all samples) in ONE reused buffer of `buffer_bytes`: callables running,
    over all the chunks (blocks), the mixing alone, the convolution alone (kernels left in the buffer by the
    mixing) and both (mix a chunk, convolve it: the premise that the convolution then reads its kernels from L2),
    and the output of `both`. -> (phases dict, y, reference inputs)."""
    from kw_ops.ops.triton import launch

    make = lambda *shape, scale=1.0: (torch.randn(*shape, device=device) * scale).to(dtype)  # noqa: E731
    x = make(batch, spec["channels"], *spec["size"])
    attn = make(batch, spec["m"], spec["n"], scale=1.0 / spec["n"])
    warehouse = make(spec["n"], *spec["cell"], scale=0.05)
    geometry = (spec["out"], spec["kernel"], spec["stride"], spec["padding"], spec["dilation"], spec["groups"])
    x4, cells, kernel, stride, padding, dilation = launch._as_2d(x, warehouse, *geometry[1:5])
    layer = launch._layer(x4, cells, spec["out"], kernel, stride, padding, dilation, spec["groups"])
    precision = launch._input_precision(dtype, None)
    x4 = launch._native(x4)
    y4 = launch._empty((batch, spec["out"], layer.out_h, layer.out_w), dtype, x.device)
    if blocked:
        return _blocked_premise_phases(launch, layer, x4, attn, cells, y4, precision, buffer_bytes), y4, \
            (x, attn, warehouse, geometry)
    chunk = launch._chunk(layer, x.element_size(), buffer_bytes)
    buffer = launch._empty((chunk, layer.kk, layer.out_channels, layer.in_per_group), dtype, x.device)
    starts = range(0, batch, chunk)

    def mix():
        for b0 in starts:
            launch._mix(attn[b0:b0 + chunk], cells, layer, precision, buffer)

    def conv():
        for b0 in starts:
            b1 = min(batch, b0 + chunk)
            launch._launch_forward(x4[b0:b1], buffer[:b1 - b0], None, y4[b0:b1], layer, precision)

    def both():
        for b0 in starts:
            b1 = min(batch, b0 + chunk)
            launch._launch_forward(x4[b0:b1], launch._mix(attn[b0:b1], cells, layer, precision, buffer), None,
                                   y4[b0:b1], layer, precision)

    return {"mix": mix, "conv": conv, "both": both}, y4, (x, attn, warehouse, geometry)


def _blocked_premise_phases(launch, layer, x4, attn, cells, y4, precision, buffer_bytes):
    """premise_phases of the blocked mode: blocks of cell rows (and chunks of samples) as launch._forward_blocked
    runs them with chunk_bytes = buffer_bytes."""
    rows, chunk, numel = launch._blocks(layer, x4.element_size(), "forward", buffer_bytes)
    buffer = launch._empty((numel,), cells.dtype, cells.device)
    blocks = list(launch._block_steps(layer.c_out, rows, layer.batch, chunk))

    def mix_block(r0, count, b0, b1):
        return launch._mix(attn[b0:b1], cells, layer, precision, buffer, block=(r0, count, 0, layer.c_in))

    def conv_block(weights, r0, count, b0, b1):
        launch._launch_forward(x4[b0:b1], weights, None, y4[b0:b1], layer, precision, rows=(r0, count))

    def mix():
        for block in blocks:
            mix_block(*block)

    def conv():   # on what the buffer holds: the views the last mixing left there
        for r0, count, b0, b1 in blocks:
            shape = (b1 - b0, layer.kk, layer.grid_out * count, layer.in_per_group)
            conv_block(buffer[:math.prod(shape)].view(shape), r0, count, b0, b1)

    def both():
        for block in blocks:
            conv_block(mix_block(*block), *block)

    return {"mix": mix, "conv": conv, "both": both}


def _graphed(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream): a callable replaying it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def premise_items() -> list[Item]:
    """One item per model and buffer size: mixing alone, convolution alone and both, eagerly and as CUDA graphs,
    with the ratio both / (mix + conv) (below 1: the convolution reads the fresh kernels from L2)."""
    items = []
    for model in PREMISE_MODELS:
        spec = next(s for s in kw_layer_shapes(model) if s["layer"] == PREMISE_LAYER)
        for mib, blocked in [(mib, False) for mib in PREMISE_BUFFERS_MIB] + [(mib, True) for mib in
                                                                             PREMISE_BLOCKED_MIB]:
            def run(deadline, spec=spec, mib=mib, blocked=blocked):
                phases, _, _ = premise_phases(spec, LAYER_BATCH, mib << 20, blocked=blocked)
                rows = []
                for how, wrap in (("eager", lambda fn: fn), ("graph", _graphed)):
                    ms = {name: time_ms(wrap(fn), deadline) for name, fn in phases.items()}
                    rows += [{"provider": "triton", "mode": f"{how} {name}", "status": "ok", "value": f"{v:.4f}",
                              "unit": "ms"} for name, v in ms.items()]
                    rows.append({"provider": "triton", "mode": f"{how} both/(mix+conv)", "status": "ok",
                                 "value": f"{ms['both'] / (ms['mix'] + ms['conv']):.3f}", "unit": "ratio"})
                return rows
            items.append(Item(f"{model} {PREMISE_LAYER} {'blocked ' if blocked else ''}{mib} MiB", run,
                              estimate_s=3.0))
    return items


# -- stage b: peaks ----------------------------------------------------------------------------------------
PEAK_COPY_BYTES = 2 << 30      # 2 GiB source: many times any L2
PEAK_L2_COPY_BYTES = 8 << 20   # 8 MiB source (+ 8 MiB destination): resident in a 50-60 MB L2
PEAK_L2_COPIES = 64
PEAK_MATMUL = 8192


def peak_items(measured: dict) -> list[Item]:
    def copy(nbytes, copies, key):
        def run(deadline):
            src = torch.randn(nbytes // 4, device="cuda")
            dst = torch.empty_like(src)
            graph = torch.cuda.CUDAGraph()   # many copies in one graph: launch gaps out of the small copy's time
            with torch.cuda.graph(graph):
                for _ in range(copies):
                    dst.copy_(src)
            ms = time_ms(graph.replay, deadline, warmup=2, repeats=10) / copies
            measured[key] = 2 * nbytes / (ms * 1e-3)
            return [{"provider": "torch", "mode": "copy", "status": "ok", "value": f"{measured[key] / 1e9:.1f}",
                     "unit": "GB/s", "note": f"{nbytes >> 20} MiB read + written, {copies} copies per graph"}]
        return run

    def matmul(dtype, key, note):
        def run(deadline):
            a = torch.randn(PEAK_MATMUL, PEAK_MATMUL, device="cuda").to(dtype)
            b = torch.randn(PEAK_MATMUL, PEAK_MATMUL, device="cuda").to(dtype)
            with _tf32(False):
                ms = time_ms(lambda: a @ b, deadline, warmup=2, repeats=10)
            measured[key] = 2 * PEAK_MATMUL**3 / (ms * 1e-3)
            return [{"provider": "torch", "mode": "matmul", "status": "ok", "value": f"{measured[key] / 1e12:.1f}",
                     "unit": "TFLOP/s", "note": note}]
        return run

    def op_launch(deadline):
        a = torch.zeros(16, device="cuda")
        host = host_seconds_per_launch(lambda: torch.add(a, 1.0, out=a))
        measured["op_launch_s"] = host
        return [{"provider": "torch", "mode": "launch host time", "status": "ok", "value": f"{host * 1e6:.2f}",
                 "unit": "us", "note": f"an eager op on 16 elements, {LAUNCH_TIMING_CALLS} launches, host side"}]

    return [Item("dram copy", copy(PEAK_COPY_BYTES, 1, "dram_bytes_per_s"), 0.5),
            Item("l2 copy", copy(PEAK_L2_COPY_BYTES, PEAK_L2_COPIES, "l2_bytes_per_s"), 0.5),
            Item("bf16 matmul", matmul(torch.bfloat16, "tensor_flops", "8192^3 bf16, random data"), 1.0),
            Item("fp32 matmul", matmul(torch.float32, "cuda_core_flops", "8192^3 fp32, TF32 off: CUDA cores"), 2.0),
            Item("eager op launch", op_launch, 0.2)]


LAUNCH_TIMING_CALLS = 200   # far below the launch queue's depth: the host never waits for the GPU


def host_seconds_per_launch(launch_once) -> float:
    """Host time of one launch: `LAUNCH_TIMING_CALLS` launches timed on the host clock without synchronising
    (tiny kernels, so the GPU keeps up and the host's work is what is timed), after a warm-up."""
    for _ in range(20):
        launch_once()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(LAUNCH_TIMING_CALLS):
        launch_once()
    seconds = (time.perf_counter() - start) / LAUNCH_TIMING_CALLS
    torch.cuda.synchronize()
    return seconds


def triton_launch_item() -> Item:
    """The host time of one Triton launch through the launchers (the cost model's launch_s): a two_phase forward of
    the channels_last smoke shape in bf16 (the compile stage compiled it; two launches, mixing and conv, and the
    launcher's Python around them), per launch. A child-stage row carries it to the parent's peaks (MEASURED_KEY)."""
    def run(deadline):
        from kw_ops.ops.triton import launch

        case = next(c for c in SMOKE_SHAPES if c.channels_last and c.groups == 1 and not c.whole_cells)
        spec, x, attn, warehouse, bias, _ = _smoke_inputs(case)
        geometry = (spec["out"], spec["kernel"], spec["stride"], spec["padding"], spec["dilation"], spec["groups"])
        call = lambda: launch.kw_conv_triton_forward(x, attn, warehouse, bias, *geometry, mode="two_phase")  # noqa
        host = host_seconds_per_launch(call) / 2
        return [{"provider": "triton", "mode": "launch host time", "status": "ok", "value": f"{host * 1e6:.2f}",
                 "unit": "us", "note": f"{case.name} two_phase forward (2 launches) through its launcher, "
                                       f"{LAUNCH_TIMING_CALLS} calls, host side", MEASURED_KEY: {"launch_s": host}}]
    return Item("triton launch", run, estimate_s=2.0)


@contextlib.contextmanager
def _tf32(allowed: bool):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def measured_peaks(measured: dict) -> cost_model.Peaks:
    """The cost model's peaks with every measured rate replacing the datasheet's; L2 size and SM count read off the
    device."""
    base = cost_model.H100_SXM_DATASHEET
    names = sorted(measured)
    properties = torch.cuda.get_device_properties(0)
    return replace(base, **measured, l2_bytes=properties.L2_cache_size,
                   multiprocessors=properties.multi_processor_count,
                   source=f"measured by gpu_check.py on {torch.cuda.get_device_name(0)}: {', '.join(names)}; "
                          f"the rest: {base.source}")


# -- stage c: layers ---------------------------------------------------------------------------------------
def _predicted_ms(spec, provider: str, mode: str, peaks) -> float | None:
    """The cost model's time of a layer case (torch path: none; triton: the mode the launcher runs)."""
    shape = cost_model.ConvShape.from_spec(spec, LAYER_BATCH, 2, out_size(spec))
    directions = ("forward",) if mode == "forward" else ("dx", "wgrad")
    if provider == "torch":
        return None
    if provider == "triton":
        return sum(cost_model.triton_prediction(shape, d, peaks).ms for d in directions)
    return sum(cost_model.predict(shape, provider, d, peaks).ms for d in directions)


def disagreement_with_released(spec, mode: str, batch: int = LAYER_BATCH, dtype=torch.bfloat16,
                                device: str = "cuda") -> str:
    """'' where the Triton provider's result on one batch-128 bf16 input set (the output, or every gradient for
    the backward) is within twice the bf16 smoke tolerance of the released formulation's on the same inputs (both
    round in bf16), else what disagrees: a time of a wrong result never counts."""
    from kw_ops.benchmarking import op_bench

    tensors, bias, dy = op_bench._operands(spec, "triton", batch, dtype, device, mode != "forward")
    triton_fn, released_fn = op_bench._forward(spec, "triton"), op_bench._forward(spec, "released")
    if mode == "forward":
        with torch.no_grad():
            pairs = [("y", triton_fn(*tensors, bias), released_fn(*tensors, bias))]
    else:
        wrt = tensors + ([bias] if bias is not None else [])
        got = torch.autograd.grad(triton_fn(*tensors, bias), wrt, dy)
        want = torch.autograd.grad(released_fn(*tensors, bias), wrt, dy)
        pairs = list(zip(("dx", "dattn", "dwarehouse", "dbias"), got, want))
    rel_tol, abs_tol = SMOKE_TOLERANCES[("bf16", None)]
    problems = []
    for name, got, want in pairs:
        frobenius, largest = _errors(got, want)
        if frobenius > 2 * rel_tol or largest > 2 * abs_tol:
            problems.append(f"{name}: rel {frobenius:.1e}, max {largest:.1e}")
    return "; ".join(problems)


def layer_items(specs, peaks_of, providers=PROVIDERS) -> list[Item]:
    """One item per layer shape, provider and mode; peaks_of() gives the peaks at run time (stage b's)."""
    from kw_ops.benchmarking import op_bench

    items = []
    for spec in specs:
        for provider in providers:
            for mode in ("forward", "backward"):
                def run(deadline, spec=spec, provider=provider, mode=mode):
                    kw = provider != "static"
                    reasons = op_bench.skip_reasons(spec, provider, LAYER_BATCH, torch.bfloat16, "cuda")
                    if reasons:
                        return [{"provider": provider, "mode": mode, "status": "skipped", "note": "; ".join(reasons)}]
                    if provider == "triton":
                        problem = disagreement_with_released(spec, mode)
                        if problem:
                            return [{"provider": provider, "mode": mode, "status": "fail",
                                     "note": f"disagrees with released, not timed: {problem}"}]
                    case = op_bench.make_case(spec, provider, mode, LAYER_BATCH, torch.bfloat16, "cuda")
                    ms = time_ms(case, deadline)
                    peaks = peaks_of()
                    flops, moved = op_bench.cost(spec, LAYER_BATCH, 2, kw, mode)
                    floor = max(flops / peaks.tensor_flops, moved / peaks.dram_bytes_per_s) * 1e3
                    predicted = _predicted_ms(spec, provider, mode, peaks)
                    del case
                    torch.cuda.empty_cache()
                    return [{"provider": provider, "mode": mode, "status": "ok", "value": f"{ms:.4f}", "unit": "ms",
                             "floor_ms": f"{floor:.4f}",
                             "predicted_ms": "" if predicted is None else f"{predicted:.4f}",
                             "note": f"{shape_text(spec)} x{spec['count']}"}]

                estimate = _predicted_ms(spec, "released" if provider == "torch" else provider, mode,
                                         cost_model.H100_SXM_DATASHEET)
                slow = 1.0 if provider in ("static", "released") else ASSUMED_SLOWDOWN
                calls = WARMUP + REPEATS + (op_bench.ROTATE if mode == "backward" else 0)
                items.append(Item(f"{spec['layer']} {provider} {mode}", run,
                                  estimate_s=calls * estimate * slow / 1e3 + ASSUMED_CASE_OVERHEAD_S))
    return items


# -- stage d: network --------------------------------------------------------------------------------------
def network_items(network_estimate_s: float, methods=NETWORK_METHODS) -> list[Item]:
    from kw_ops import models
    from kw_ops.benchmarking import measure, worker

    items = []
    for name, label, released in methods:
        def run(deadline, name=name, label=label, released=released):
            model = models.create(name, num_classes=worker.NUM_CLASSES).cuda()
            xs, ys = measure.make_inputs(NETWORK_BATCH, 224, "cuda", False, worker.NUM_CLASSES)
            steps = {"inference": measure.inference_step(model, xs, "cuda", "bf16"),
                     "train step": measure.train_step(model, xs, ys, "cuda", "bf16")}
            rows = []
            with worker.formulation(model, released):
                for mode, step in steps.items():
                    memory_mib = measure.step_memory_mb(step, "cuda")["alloc"]
                    for _ in range(NETWORK_WARMUP):
                        step()
                    seconds, _ = measure.block_seconds(step, NETWORK_ITERS, "cuda")
                    value, unit = ((NETWORK_BATCH / seconds, "images/s") if mode == "inference" else
                                   (seconds * 1e3, "ms"))
                    rows += [(mode, value, unit), (f"{mode} memory", memory_mib, "MiB")]
            del model, steps
            torch.cuda.empty_cache()
            note = f"batch {NETWORK_BATCH}, bf16 autocast, NCHW, pinned configs"
            return [{"provider": label, "mode": mode, "status": "ok", "value": f"{value:.1f}", "unit": unit,
                     "note": note} for mode, value, unit in rows]
        items.append(Item(f"{name} {label}", run, estimate_s=network_estimate_s))
    return items


def network_estimate_s(specs) -> float:
    """Predicted seconds of one network method: inference (warm-up + iterations + memory) and training steps,
    from the layer predictions (KW1x, Triton's mode) scaled to the batch, times ASSUMED_SLOWDOWN."""
    fwd = sum(_predicted_ms(s, "triton", "forward", cost_model.H100_SXM_DATASHEET) * s["count"]
              for s in specs) * NETWORK_BATCH / LAYER_BATCH
    bwd = sum(_predicted_ms(s, "triton", "backward", cost_model.H100_SXM_DATASHEET) * s["count"]
              for s in specs) * NETWORK_BATCH / LAYER_BATCH
    calls = NETWORK_WARMUP + NETWORK_ITERS + 1
    return calls * (2 * fwd + bwd) * ASSUMED_SLOWDOWN / 1e3  # inference, then a training step's forward + backward


# -- plan ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _forced_mode(mode):
    from kw_ops.ops.triton import launch

    saved = os.environ.get(launch.MODE_ENV)
    if mode is not None:
        os.environ[launch.MODE_ENV] = mode
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(launch.MODE_ENV, None)
        else:
            os.environ[launch.MODE_ENV] = saved


def build_plan(stages, measured: dict, peaks_of) -> dict[str, list[Item]]:
    """Items per stage, in STAGES order."""
    from kw_ops.ops.triton import launch

    specs = kw_layer_shapes(LAYER_MODEL) if set(stages) & {"compile", "layers", "layers_triton", "network",
                                                           "network_kw_ops"} else []
    baselines = tuple(p for p in PROVIDERS if p != "triton")
    plan = {}
    for stage in stages:
        if stage == "compile":
            launches = planned_launches(specs, launch.MODES)
            every = sorted(launches["smoke"] | launches["layers"], key=str)
            plan[stage] = [compile_item(lambda: every, len(every) * ASSUMED_COMPILE_S / COMPILE_WORKERS,
                                        len(every), launchers(every))]
        elif stage == "smoke":
            plan[stage] = [triton_launch_item(), *smoke_items(launch.MODES)]
        elif stage == "peaks":
            plan[stage] = peak_items(measured)
        elif stage in ("layers", "layers_triton"):
            plan[stage] = layer_items(specs, peaks_of, ("triton",) if stage == "layers_triton"
                                      else baselines)
        elif stage in ("network", "network_kw_ops"):
            methods = [m for m in NETWORK_METHODS if (m[1] == "kw_ops") == (stage == "network_kw_ops")]
            plan[stage] = network_items(network_estimate_s(specs), methods)
        elif stage == "premise":
            plan[stage] = premise_items()
        elif stage == "isolation_check":
            plan[stage] = isolation_check_items()
    return plan


def launchers(launches) -> int:
    """C launchers gcc builds at the first launch of each kernel signature (cached on disk afterwards)."""
    return len({(launch.kernel, tuple(t for _, t in launch.signature if t != "constexpr")) for launch in launches})


# -- isolation: the stages that launch Triton kernels, in child processes -------------------------------------
def isolation_check_items() -> list[Item]:
    """Four cases that exercise the isolation without a GPU: fine, a crash (the process exits as a fault would
    leave it), fine again, a hang (killed at the case timeout), fine. `--stages isolation_check`."""
    def fine(deadline):
        return [{"provider": "none", "mode": "check", "status": "ok"}]

    def crash(deadline):
        os._exit(3)

    def hang(deadline):
        time.sleep(3600)

    return [Item(f"case {i} {fn.__name__}", fn) for i, fn in enumerate((fine, crash, fine, hang, fine))]


def _child(conn, stage: str, start: int, budget_s: float, measured: dict) -> None:
    """A child process runs `stage`'s items from index `start`: ('start', i), ('rows', i, rows) per item, 'end'."""
    os.environ["TRITON_INTERPRET"] = "0"
    peaks_of = lambda: measured_peaks(measured) if measured else cost_model.H100_SXM_DATASHEET  # noqa: E731
    items = build_plan([stage], measured, peaks_of)[stage]
    deadline = Deadline(budget_s)
    with pinned_configs():
        for index in range(start, len(items)):
            if deadline.expired():
                break
            conn.send(("start", index))
            try:
                rows = list(items[index].run(deadline))
            except Exception as exc:  # recorded as an error row, never as a number
                rows = [{"status": "error", "note": f"{type(exc).__name__}: {str(exc)[:300]}"}]
            conn.send(("rows", index, rows))
    conn.send(("end",))


def run_isolated_stage(stage: str, items: list[Item], deadline: Deadline, log: CsvLog, measured: dict,
                       maxfail: int | None = None, case_timeout_s: float = CASE_TIMEOUT_S) -> str:
    """Run `stage` in a spawned child process (which rebuilds the same items); a child that dies or hangs costs
    the case it was running (an error row naming it and the exit code, or the timeout) and the stage goes on in a
    new child from the next case. -> a summary line."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    done = failed = children = 0
    start, begun = 0, deadline.clock()
    while start < len(items) and not deadline.expired():
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_child, args=(send, stage, start, deadline.left(), measured), daemon=True)
        process.start()
        send.close()
        children += 1
        current = None
        while True:
            wait = max(0.1, min(deadline.left(), case_timeout_s)) if current is not None else max(0.1, deadline.left())
            message = ("timeout",)
            if receive.poll(wait):
                try:
                    message = receive.recv()
                except EOFError:
                    message = ("died",)
            if message[0] == "start":
                current = message[1]
                continue
            if message[0] == "rows":
                index, rows = message[1], message[2]
                log_rows(log, stage, items[index].case, rows, measured)
                failed += any(row.get("status") in ("fail", "error") for row in rows)
                done, start, current = done + 1, index + 1, None
                if maxfail is not None and failed >= maxfail:
                    log.write({"stage": stage, "case": items[index].case, "status": "stopped",
                               "note": f"{failed} failures"})
                    process.kill()
                    return _isolated_summary(stage, done, len(items), failed, children, deadline.clock() - begun)
                continue
            if message[0] == "end":
                process.join(10)
                start = len(items) if current is None and start >= len(items) else start
                break
            process.kill()  # died, or a case hung past its timeout (or the stage's deadline)
            process.join(10)
            if current is None:   # before any case started: the child itself failed
                log.write({"stage": stage, "case": "child start", "status": "error",
                           "note": f"the child process ended before its first case (exit code {process.exitcode})"})
                return _isolated_summary(stage, done, len(items), failed + 1, children, deadline.clock() - begun)
            why = (f"the child process died (exit code {process.exitcode})" if message[0] == "died" else
                   f"no result within {wait:.0f} s: a hung kernel or the stage's deadline; its child was killed")
            log.write({"stage": stage, "case": items[current].case, "status": "error",
                       "note": f"{why}; the stage goes on in a new child (rerun this case under compute-sanitizer "
                               f"to find the fault)"})
            failed, done, start = failed + 1, done + 1, current + 1
            break
        if message[0] == "end" and start < len(items):  # the child stopped at the deadline
            break
    if start < len(items):
        log.write({"stage": stage, "case": items[start].case, "status": "skipped",
                   "note": f"stage deadline: {len(items) - start} of {len(items)} items not run"})
    return _isolated_summary(stage, done, len(items), failed, children, deadline.clock() - begun)


def _isolated_summary(stage, done, total, failed, children, seconds) -> str:
    return f"{stage}: {done}/{total} items, {failed} failed, {seconds:.0f} s, in {children} child process(es)"


def estimate_s(items: list[Item]) -> float:
    return sum(i.estimate_s for i in items)


def print_plan(plan: dict, budget_s: float) -> tuple[float, list[str]]:
    """Print every stage's items and estimate; -> (total estimate, stages whose estimate exceeds their budget)."""
    total = ASSUMED_STARTUP_S
    print(f"gpu_check plan (estimate from the cost model with {cost_model.H100_SXM_DATASHEET.source}; assumed: "
          f"{ASSUMED_COMPILE_S} s per compile on {COMPILE_WORKERS} cores, {ASSUMED_LAUNCHER_S} s per C launcher, "
          f"{ASSUMED_SLOWDOWN}x the prediction for Triton / torch path / networks, {ASSUMED_CASE_OVERHEAD_S} s per "
          f"case, {ASSUMED_STARTUP_S} s start-up, {ASSUMED_CHILD_START_S} s per child process)")
    over = []
    for stage, items in plan.items():
        seconds = estimate_s(items) + (ASSUMED_CHILD_START_S if stage in ISOLATED else 0.0)
        total += seconds
        if seconds > STAGE_BUDGET_S[stage]:
            over.append(stage)
        child = f", in a child process ({ASSUMED_CHILD_START_S:.0f} s to start)" if stage in ISOLATED else ""
        built = sum(i.launchers for i in items)
        print(f"{stage}: {len(items)} items, {sum(i.compiles for i in items)} compiles"
              + (f", {built} C launchers" if built else "") + f"{child}, estimate {seconds:.0f} s "
              f"(budget {STAGE_BUDGET_S[stage]} s)")
        for item in items:
            print(f"  {item.case}: {item.estimate_s:.2f} s" + (f", {item.compiles} compiles" if item.compiles else ""))
    print(f"estimate: {total:.0f} s of a {budget_s:.0f} s budget ({WINDOW_S} s window)"
          + (f"; over their own budget: {', '.join(over)}" if over else ""))
    return total, over


# -- report --------------------------------------------------------------------------------------------------
def header_lines(env: dict) -> list[str]:
    return [f"device: {env['device']}", f"versions: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
            f"python {platform.python_version()}", f"git sha: {env['git_sha']}", f"date: {env['date']} UTC"]


def markdown(env: dict, summaries: list[str], rows: list[dict], peaks) -> str:
    lines = ["# gpu_check", "", *[f"- {h}" for h in header_lines(env)], "",
             "## Stages", "", *[f"- {s}" for s in summaries], "",
             f"Peaks used for floors and predictions: {peaks.source}", ""]
    verified = [r for r in rows if r["stage"] == "smoke"]
    smoke = [r for r in verified if r.get("status") != "ok"]
    lines += ["## Verified, faster than released, failed", "",
              f"- smoke: {len(verified) - len(smoke)} of {len(verified)} results within tolerance"]
    timed = {}
    for r in rows:
        if r["stage"] in ("layers", "layers_triton") and r.get("status") == "ok" and r.get("provider"):
            timed.setdefault((r["case"].split(" ")[0], r["mode"]), {})[r["provider"]] = float(r["value"])
    pairs = [(k, t["triton"], t["released"]) for k, t in timed.items() if {"triton", "released"} <= set(t)]
    if pairs:
        faster = [k for k, tr, rel in pairs if tr < rel]
        lines.append(f"- layers: Triton faster than released on {len(faster)} of {len(pairs)} (layer, pass) pairs")
    failures = [r for r in rows if r.get("status") in ("fail", "error")]
    lines += [f"- failed or errors: {len(failures)}" + (" (below)" if failures else "")]
    lines += [f"  - {r['stage']} {r['case']} {r.get('mode', '')}: {r.get('status')} {r.get('rel_err', '')} "
              f"{r.get('note', '')}" for r in failures]
    lines += ["", "## Smoke failures", ""] + ([f"- {r['case']} {r.get('mode', '')}: {r.get('status')} "
                                                f"{r.get('rel_err', '')} {r.get('note', '')}" for r in smoke] or ["none"])
    lines += ["", "## Peaks", ""] + [f"- {r['case']}: {r['value']} {r['unit']} ({r['note']})" for r in rows
                                     if (r["stage"] == "peaks" or r.get("mode") == "launch host time")
                                     and r.get("status") == "ok"]
    cells = {}
    for r in rows:
        if r["stage"] in ("layers", "layers_triton") and r.get("provider"):
            layer = r["case"].split(" ")[0]
            cells.setdefault(layer, {"note": r.get("note", "")})[(r["provider"], r["mode"])] = r
    if cells:
        lines += ["", f"## {LAYER_MODEL} layers, batch {LAYER_BATCH}, bf16: median ms (floor ms; predicted ms)", "",
                  "| layer | " + " | ".join(f"{p} {m[:3]}" for p in PROVIDERS for m in ("forward", "backward")) + " |",
                  "|" + "---|" * (1 + 2 * len(PROVIDERS))]
        for layer, c in cells.items():
            def text(r):
                if r is None:
                    return ""
                if r.get("status") != "ok":
                    return r.get("status", "")
                return f"{r['value']} ({r['floor_ms']}; {r['predicted_ms'] or '-'})"
            lines.append(f"| {layer} | " + " | ".join(text(c.get((p, m))) for p in PROVIDERS
                                                      for m in ("forward", "backward")) + " |")
    premise = [r for r in rows if r["stage"] == "premise" and r.get("unit") == "ratio"]
    if premise:
        lines += ["", f"## The L2 premise ({PREMISE_LAYER}, batch {LAYER_BATCH}, bf16): both / (mix + conv), "
                      "below 1: the convolution reads fresh kernels from L2", ""]
        lines += [f"- {r['case']} {r['mode'].split()[0]}: {r['value']}" for r in premise]
    network = [r for r in rows if r["stage"] in ("network", "network_kw_ops") and r.get("status") == "ok"]
    if network:
        lines += ["", "## Networks (Table 12 / 16 rows)", "", "| method | measure | value |", "|---|---|---|"]
        lines += [f"| {r['case']} | {r['mode']} | {r['value']} {r['unit']} |" for r in network]
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------------------
def environment() -> dict:
    """Versions, device and git sha (GIT_SHA_ENV names it where the copy of the tree has no git metadata)."""
    env = _environment()
    env["git_sha"] = os.environ.get(GIT_SHA_ENV) or env["git_sha"]
    env["cuda"] = torch.version.cuda or ""
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", action="store_true", help="print the compiles, timings and estimate; run nothing")
    parser.add_argument("--stages", nargs="+", choices=(*STAGES, "isolation_check"), default=list(STAGES),
                        help="isolation_check: a fault and a hang in child processes, without a GPU")
    parser.add_argument("--budget-s", type=float, default=WINDOW_S, help="the whole run's deadline")
    parser.add_argument("--maxfail", type=int, default=1, help="smoke failures before the smoke stage stops")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    deadline = Deadline(args.budget_s)
    os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels (tests/conftest.py sets the interpreter on CPU)
    env = environment()
    print("\n".join(header_lines(env)), flush=True)
    measured: dict = {}
    plan = build_plan(args.stages, measured, lambda: measured_peaks(measured) if measured else
                      cost_model.H100_SXM_DATASHEET)
    if args.plan:
        total, over = print_plan(plan, args.budget_s)
        return 0 if total <= args.budget_s and not over else 1
    if not torch.cuda.is_available() and args.stages != ["isolation_check"]:
        print("gpu_check: no CUDA device here (--plan and --stages isolation_check run without one)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = CsvLog(out / "gpu_check.csv", env)
    summaries = []
    try:
        with pinned_configs():   # no autotuning anywhere: one config per kernel
            for stage, items in plan.items():
                part = deadline.part(STAGE_BUDGET_S[stage])
                maxfail = args.maxfail if stage == "smoke" else None
                if stage in ISOLATED:
                    timeout = ISOLATION_CHECK_TIMEOUT_S if stage == "isolation_check" else CASE_TIMEOUT_S
                    summary = run_isolated_stage(stage, items, part, log, measured, maxfail, timeout)
                else:
                    summary = run_stage(stage, items, part, log, maxfail)
                if measured:   # the peaks stage's rates, and the Triton launch time the smoke stage measures
                    cost_model.save_peaks(measured_peaks(measured), out / "peaks.json")
                summaries.append(summary)
                print(summary, flush=True)
                peaks = measured_peaks(measured) if measured else cost_model.H100_SXM_DATASHEET
                (out / "gpu_check.md").write_text(markdown(env, summaries, log.rows, peaks))
    finally:
        log.close()
    print((out / "gpu_check.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
