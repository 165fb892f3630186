"""Timing and memory measurement: warm-up, synchronisation, median of repeats, rotated inputs."""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def make_inputs(batch: int, size: int, device, channels_last: bool, count: int = 3, num_classes: int = 1000):
    """`count` different input batches (rotated so caches do not flatter) and targets."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [torch.randn(batch, 3, size, size, device=device).to(memory_format=fmt) for _ in range(count)]
    ys = [torch.randint(0, num_classes, (batch,), device=device) for _ in range(count)]
    return xs, ys


def _median_seconds(step, inputs, device, warmup: int, iters: int) -> float:
    for i in range(warmup):
        step(*inputs[i % len(inputs)])
    _sync(device)
    times = []
    for i in range(iters):
        start = time.perf_counter()
        step(*inputs[i % len(inputs)])
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inference_seconds(model: nn.Module, xs, device, amp=None, warmup=2, iters=5) -> float:
    """Median seconds of one eval-mode, no-grad forward."""
    model.eval()

    def step(x):
        with torch.no_grad(), _autocast(device, amp):
            model(x)

    return _median_seconds(step, [(x,) for x in xs], device, warmup, iters)


def train_step_seconds(model: nn.Module, xs, ys, device, amp=None, warmup=2, iters=5) -> float:
    """Median seconds of one training step (forward, cross-entropy, backward, SGD step)."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step(x, y):
        with _autocast(device, amp):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _median_seconds(step, list(zip(xs, ys)), device, warmup, iters)


@contextlib.contextmanager
def _silent_stderr_fd():
    """Hide what C++ code writes to file descriptor 2 (the profiler's start/stop lines)."""
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


def step_peak_mb(run, device) -> float:
    """Peak memory of one call of `run` above the start: the CUDA allocator's on GPU, the CPU allocator's else."""
    if torch.device(device).type == "cuda":
        return cuda_peak_mb(run, device)
    return allocator_peak_mb(run)


def cuda_peak_mb(run, device) -> float:
    """CUDA allocator peak (MiB) while `run()` executes, above what was allocated before."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20
