"""One process per benchmarked method: it builds its network, measures the memory of its first inference
and training steps (the process is fresh, so no earlier row's freed memory hides them; they are also
the warm-up), then times blocks of steps when the parent asks. The parent asks one worker at a time,
so the methods of a model run interleaved, round after round, and never at the same time.

Processes come from a forkserver that has imported torch and kw_ops but never run an op
(forkserver_preload.py): starting one costs a fork, not an import, and no OpenMP or CUDA state crosses
the fork."""
from __future__ import annotations

import contextlib
import multiprocessing
import time

import torch

from .. import models
from ..baselines import set_baseline_formulation
from ..nn.describe import count_parameters
from .measure import block_seconds, inference_step, make_inputs, step_memory_mb, train_step
from .released import released_formulation

NUM_CLASSES = 1000
#: seconds a worker waits before timing a block: the OpenMP threads of the worker that ran the block before
#: spin-wait for a few milliseconds after it (libgomp's default spin count) and would take CPU from this one
SETTLE_S = 0.02
#: errors that make a method 'skipped' with the error as its reason; anything else is a bug and raises
SKIPPABLE = (RuntimeError, NotImplementedError, ValueError)


@contextlib.contextmanager
def formulation(model, released: bool):
    """Inside the block, KW, DY-Conv and ODConv layers run as the released codes compute them."""
    if not released:
        yield model
        return
    set_baseline_formulation(model, "released")
    try:
        with released_formulation(model):
            yield model
    finally:
        set_baseline_formulation(model, "fast")


def _serve(conn, model_name: str, released: bool, settings) -> None:
    torch.set_num_threads(settings.threads)
    device = settings.device
    model = models.create(model_name, num_classes=NUM_CLASSES).to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    xs, _ = make_inputs(settings.batch, settings.size, device, settings.channels_last, NUM_CLASSES)
    train_xs, train_ys = make_inputs(settings.train_batch, settings.size, device, settings.channels_last,
                                     NUM_CLASSES)
    steps = {"infer": inference_step(model, xs, device, settings.amp),
             "train": train_step(model, train_xs, train_ys, device, settings.amp)}
    with formulation(model, released):
        ready = {"params": count_parameters(model)}
        for kind, step in steps.items():
            first = {}
            memory = step_memory_mb(lambda: first.update(_timed_block(step, device)), device)
            ready[f"{kind}_first_s"] = first["seconds"]  # the memory measurement's set-up is outside it
            ready[f"{kind}_rss_mb"], ready[f"{kind}_alloc_mb"] = memory["rss"], memory["alloc"]
        conn.send(("ready", ready))
        while (request := conn.recv()) is not None:
            kind, iters = request
            time.sleep(SETTLE_S)
            conn.send(("block", _timed_block(steps[kind], device, iters)))


def _timed_block(step, device, iters: int = 1) -> dict:
    """{'started': monotonic start, 'seconds' and 'wait' per step} of `iters` calls of `step`."""
    started = time.monotonic()
    seconds, wait = block_seconds(step, iters, device)
    return {"started": started, "seconds": seconds, "wait": wait}


def _main(conn, model_name: str, released: bool, settings) -> None:
    try:
        _serve(conn, model_name, released, settings)
    except SKIPPABLE as error:
        conn.send(("error", f"{type(error).__name__}: {error}"))


class Worker:
    """Parent side of one method's process: `start()` returns its parameter count, first-step memory and
    first-step seconds ('infer_first_s', 'train_first_s'), `block(kind, iters)` times a block of 'infer' or
    'train' steps there, `close()` ends it."""

    def __init__(self, model_name: str, released: bool, settings):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([f"{__package__}.forkserver_preload"])
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_main, args=(child, model_name, released, settings), daemon=True)
        self._process.start()
        child.close()
        self.label = f"{model_name} ({'released' if released else 'kw_ops'})"

    def _receive(self, expected: str) -> dict:
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"bench worker for {self.label} died (exit code {self._process.exitcode}); "
                               "its traceback is above") from None
        if kind == "error":
            raise WorkerError(payload)
        assert kind == expected, (kind, expected)
        return payload

    def start(self) -> dict:
        return self._receive("ready")

    def block(self, kind: str, iters: int) -> dict:
        self._conn.send((kind, iters))
        return self._receive("block")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._process.join()
        self._conn.close()


class WorkerError(Exception):
    """A method that cannot run here: the message is the skip reason."""
