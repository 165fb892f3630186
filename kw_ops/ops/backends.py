"""The implementations of the KW op: a capability table, the reasons a backend cannot run, which one is asked for.

    torch    pure PyTorch, every device and floating dtype (kw_ops.ops.torch_impl)
    triton   Triton kernels on CUDA tensors (kw_ops.ops.triton, imported lazily; verified on first use,
             kw_ops.ops.verify)
    cpp      the compiled extension kw_ops._C on CPU tensors (kw_ops.ops.cpp; csrc/cpu/)

A backend is asked for, strongest first, by the per-call `backend=` argument (layers: their `backend`
attribute), the innermost `use_backend(name)` block of this thread
(thread-local: other threads are not affected), the `KW_OPS_BACKEND` environment variable; else the
choice is automatic. Whatever is asked for, kw_ops.ops.dispatch decides what runs (a forced backend that
cannot run raises there with every reason). Nothing here imports triton or the extension, or touches the GPU,
until asked.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Backend", "BACKENDS", "ENV_VAR", "BackendUnavailableError", "not_supported_reasons",
           "requested_backend", "use_backend", "backend_report", "register_implementation"]

ENV_VAR = "KW_OPS_BACKEND"
_AUTO = "auto"


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run these inputs (the message lists every reason)."""


@dataclass(frozen=True)
class Backend:
    """One row of the capability table."""

    name: str
    devices: tuple[str, ...]            # device types it runs on ("*": any)
    dtypes: tuple[torch.dtype, ...]
    module: str                         # where its implementation lives (imported on first use)
    install: str                        # how to get it when missing
    description: str


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", ("*",), _FLOATS, "kw_ops.ops.torch_impl", "part of kw_ops",
                     "pure PyTorch (grouped conv / blocked im2col GEMM), every device"),
    "triton": Backend("triton", ("cuda",), (torch.float16, torch.bfloat16, torch.float32), "kw_ops.ops.triton",
                      "pip install triton (and a CUDA build of torch)",
                      "tensor-core mixing GEMM + implicit-GEMM conv Triton kernels on CUDA tensors"),
    "cpp": Backend("cpp", ("cpu",), (torch.bfloat16, torch.float32, torch.float64), "kw_ops.ops.cpp",
                   "pip install -e . --no-build-isolation with a C++ compiler (kw_ops._C)",
                   "compiled CPU kernel (csrc/cpu/): blocks of mixed kernels consumed in cache by ATen GEMMs/convs"),
}

# name -> (forward, backward) with the signatures of kw_conv_torch / kw_conv_backward_torch.
_IMPLEMENTATIONS: dict[str, tuple[Callable, Callable]] = {}


def register_implementation(name: str, forward: Callable, backward: Callable) -> None:
    """Hook for a backend module to provide its twin forward/backward (same normalised arguments as torch)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown KW backend {name!r}; known: {sorted(BACKENDS)}")
    _IMPLEMENTATIONS[name] = (forward, backward)


def implementation(name: str) -> tuple[Callable, Callable]:
    """(forward, backward) of a backend, importing its module on first use."""
    if name not in BACKENDS:
        raise ValueError(f"kw_conv: backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name not in _IMPLEMENTATIONS:
        if name == "torch":
            from .torch_impl import kw_conv_backward_torch, kw_conv_torch
            register_implementation("torch", kw_conv_torch, kw_conv_backward_torch)
        else:
            module = importlib.import_module(BACKENDS[name].module)
            hook = getattr(module, "kw_conv_implementation", None)
            if hook is None:
                raise BackendUnavailableError(f"kw_ops backend {name!r}: {BACKENDS[name].module} provides no "
                                              f"kw_conv_implementation()")
            forward, backward = hook()
            if name == "triton":  # no GPU run has validated them: checked against the torch path on first use
                from .torch_impl import kw_conv_backward_torch, kw_conv_torch
                from .verify import verified_implementation

                forward, backward = verified_implementation(forward, backward, kw_conv_torch, kw_conv_backward_torch)
            register_implementation(name, forward, backward)
    return _IMPLEMENTATIONS[name]


# -- why a backend cannot run -----------------------------------------------------------------
def _find_missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


# Whether triton and each backend's module are missing, found once at import (find_spec runs no module): the
# automatic choice asks inside torch.compile'd regions, where the file system cannot be looked at.
_MISSING = {module: _find_missing(module) for module in ("triton", *(b.module for b in BACKENDS.values()))}


def _module_missing(module: str) -> bool:
    return _MISSING[module]


def _installation_reasons(name: str) -> list[str]:
    """Reasons that do not depend on the inputs (missing packages, missing build), decided at import."""
    backend = BACKENDS[name]
    reasons = []
    if name == "cpp":
        from . import cpp

        return cpp.unavailable_reasons()
    if name == "triton" and _module_missing("triton"):
        reasons.append(f"triton is not installed ({backend.install})")
    if _module_missing(backend.module):
        reasons.append(f"the Triton kernels {backend.module} are not part of this kw_ops installation")
    return reasons


def not_supported_reasons(backend: str, x: torch.Tensor | None = None, attn: torch.Tensor | None = None,
                          warehouse: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                          geometry: dict | None = None) -> list[str]:
    """Every reason `backend` cannot run these tensors (empty: it can). Without tensors: whether it can run here.

    geometry: the call's normalised out_channels, kernel_size, stride, padding, dilation and groups; with
    it (and the tensors) the Triton backend also checks the limits of its kernels (and accepts CPU
    tensors under TRITON_INTERPRET=1, where its kernels are tested).
    """
    if backend not in BACKENDS:
        return [f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})"]
    if backend == "triton" and geometry is not None and x is not None:
        from .triton.capability import not_supported_reasons as triton_reasons

        reasons = triton_reasons(x, attn, warehouse, bias, **geometry)
        return reasons + [r for r in _installation_reasons(backend) if r not in reasons]
    spec = BACKENDS[backend]
    reasons = []
    tensors = [(label, t) for label, t in (("x", x), ("attn", attn), ("warehouse", warehouse), ("bias", bias))
               if t is not None]
    for label, t in tensors:
        if "*" not in spec.devices and t.device.type not in spec.devices:
            reasons.append(f"{label} is on {t.device} ({backend} needs {' or '.join(spec.devices)} tensors)")
        if t.dtype not in spec.dtypes:
            reasons.append(f"{label} has dtype {t.dtype} ({backend} supports "
                           f"{', '.join(str(d).replace('torch.', '') for d in spec.dtypes)})")
    if not tensors and "cuda" in spec.devices and not torch.cuda.is_available():
        reasons.append(f"no CUDA device here ({backend} needs CUDA tensors)")
    reasons += _installation_reasons(backend)
    return reasons


# -- choice -----------------------------------------------------------------------------------
# `forced`: the innermost use_backend() name of this thread (absent outside any block). Thread-local rather
# than a contextvars.ContextVar: torch.compile(fullgraph=True) cannot trace ContextVar.get, while it guards
# this attribute per call (a compiled layer follows the block of the thread calling it).
_THREAD = threading.local()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend ('torch', 'triton', 'cpp' or 'auto') for kw_conv calls inside the block.

    Blocks nest (the innermost holds) and hold only in the thread that enters them.
    """
    _validate(name, "use_backend")
    previous = getattr(_THREAD, "forced", None)
    _THREAD.forced = name
    try:
        yield
    finally:
        _THREAD.forced = previous


def _validate(name, where: str) -> None:
    if name != _AUTO and name not in BACKENDS:
        raise ValueError(f"{where}: unknown KW backend {name!r}; choose one of {', '.join((_AUTO, *BACKENDS))}")


def requested_backend(backend: str | None = None) -> tuple[str, str]:
    """(name or 'auto', where the request came from)."""
    if backend is not None:
        _validate(backend, "kw_conv(backend=...)")
        return backend, "backend= argument"
    forced = getattr(_THREAD, "forced", None)
    if forced is not None:
        return forced, "use_backend()"
    env = os.environ.get(ENV_VAR)
    if env:
        _validate(env, ENV_VAR)
        return env, f"{ENV_VAR}={env}"
    return _AUTO, "automatic"


def backend_report() -> list[str]:
    """Lines for `python -m kw_ops info`: every backend, whether it can run here, and why not."""
    automatic = "automatic: the cheapest formulation per call (python -m kw_ops describe MODEL --dispatch)"
    try:
        name, source = requested_backend()
        lines = [f"backend choice: {name} ({source}); {automatic}"]
    except ValueError as error:  # a bad KW_OPS_BACKEND: report it, the op refuses to run until it is fixed
        lines = [f"backend choice: INVALID, the KW op will refuse to run: {error}; {automatic}"]
    for backend in BACKENDS.values():
        reasons = not_supported_reasons(backend.name)
        state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        dtypes = ", ".join(str(d).replace("torch.", "") for d in backend.dtypes)
        lines.append(f"{backend.name:7s} {state}  [{backend.description}; devices: {', '.join(backend.devices)}; "
                     f"dtypes: {dtypes}]")
    return lines
