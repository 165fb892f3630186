"""Timing and memory measurement of one model: step functions, timed blocks, and the memory of one step.

Time: a block of `iters` calls between two perf_counter reads (CPU) or two CUDA events (GPU). The
interleaved rounds need blocks of a fixed size that cost only their calls, which the library timers do
not give: torch.utils.benchmark's Timer.timeit adds two warm-up calls to every block (three times the
cost of a one-step block of a slow network) and its autorange chooses its own block size, as does
triton.testing.do_bench, which also flushes L2 between calls. Beside the wall time, the run-queue wait
of the process's threads (Linux schedstat): time they were ready to run while another process had the CPU.

Memory of one step, above what was resident before it:
    rss    peak resident set (VmHWM after resetting it, minus VmRSS before; Linux): everything the
           process touched, oneDNN scratch and allocator slack included
    alloc  the CPU allocator's peak (torch.profiler memory events) or the CUDA allocator's peak
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROTATE = 3  # input batches rotated between calls so caches do not flatter


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def make_inputs(batch: int, size: int, device, channels_last: bool, num_classes: int, count: int = ROTATE):
    """`count` different input batches and targets."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [torch.randn(batch, 3, size, size, device=device).to(memory_format=fmt) for _ in range(count)]
    ys = [torch.randint(0, num_classes, (batch,), device=device) for _ in range(count)]
    return xs, ys


def inference_step(model: nn.Module, xs, device, amp=None):
    """A callable running one eval-mode, no-grad forward on the next input batch."""
    calls = itertools.count()

    def step():
        model.eval()
        with torch.no_grad(), _autocast(device, amp):
            model(xs[next(calls) % len(xs)])

    return step


def train_step(model: nn.Module, xs, ys, device, amp=None):
    """A callable running one training step (forward, cross-entropy, backward, SGD with momentum) on the next
    batch; gradients are freed after the step, momentum stays."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    calls = itertools.count()

    def step():
        model.train()
        i = next(calls) % len(xs)
        with _autocast(device, amp):
            loss = F.cross_entropy(model(xs[i]).float(), ys[i])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_queue_wait_s() -> float:
    """Seconds the threads of this process have waited on a run queue (0 where schedstat is missing)."""
    total = 0
    for task in Path("/proc/self/task").glob("*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def block_seconds(step, iters: int, device) -> tuple[float, float]:
    """(wall seconds per call, run-queue wait seconds per call, summed over threads) of `iters` calls of `step`."""
    wait = run_queue_wait_s()
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _sync(device)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        _sync(device)
        seconds = start.elapsed_time(end) / 1e3
    else:
        start = time.perf_counter()
        for _ in range(iters):
            step()
        seconds = time.perf_counter() - start
    return seconds / iters, (run_queue_wait_s() - wait) / iters


@contextlib.contextmanager
def _silent_stderr_fd():
    """Hide what C++ code writes to file descriptor 2 (the profiler's start/stop lines and warnings)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def allocator_peak_mb(run) -> float:
    """Peak bytes (MiB) the CPU allocator held above the start while `run()` executes, from the memory
    events of torch.profiler (allocations minus frees, in order). Memory oneDNN allocates for itself
    is not seen."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _silent_stderr_fd():
        prof.__enter__()
    try:
        run()
    finally:
        with _silent_stderr_fd():
            prof.__exit__(None, None, None)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _release_free_heap() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim), so memory freed by earlier steps
    cannot hide the next one's growth."""
    libc = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(libc).malloc_trim(0)


def rss_growth_mb(run) -> float | None:
    """Peak resident set (MiB) above the start while `run()` executes; None where Linux's
    /proc/self/clear_refs (to reset the peak) is missing."""
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kb("VmRSS")
    except OSError:
        run()
        return None
    run()
    return (_status_kb("VmHWM") - before) / 1024


def cuda_peak_mb(run, device) -> float:
    """CUDA allocator peak (MiB) while `run()` executes, above what was allocated before."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def step_memory_mb(step, device) -> dict:
    """Memory of one call of `step` (in a fresh process: the first): {'rss': MiB or None, 'alloc': MiB}.
    On CPU both come from the same call; the profiler's own records count in rss."""
    if torch.device(device).type == "cuda":
        return {"rss": None, "alloc": cuda_peak_mb(step, device)}
    measured = {}
    measured["alloc"] = allocator_peak_mb(lambda: measured.update(rss=rss_growth_mb(step)))
    return measured
