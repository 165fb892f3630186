"""The exact specialisations the Triton launchers request, captured without a GPU, and their sm_90 compiles.

`capture(calls)` runs the launchers (kw_ops.ops.triton.kw_conv_implementation: the backend's forward and
backward) on meta tensors with every `kernel[grid](...)` launch intercepted: nothing executes. Each
launch is bound by Triton's own binder for a CUDA target, once per autotune config (and after
@triton.heuristics), as JITFunction.run would: the signature (pointer dtypes, i32 / i64 integers),
the integers specialised to the constant 1, the 16-divisibility / 16-byte alignment attributes, the
constexprs and the compile options. Tensors stand in with their dtype and a data pointer of
storage_offset · element_size (allocations themselves are at least 256-byte aligned on CUDA).

`compile_launch` compiles one captured specialisation for a GPU target with Triton's compiler (ptxas
included, no device) and reads registers, stack frame (spills) and shared memory; `occupancy` applies
the launch limits of compute capability 9.0.

The environment must have TRITON_INTERPRET unset or 0 before Triton is imported (the interpreter's
kernels are not JIT functions).
"""
from __future__ import annotations

import contextlib
import math
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Launch", "LayerCall", "capture", "layer_calls", "compile_launch", "compile_key", "Resources", "occupancy",
           "SM90", "first_step_compiles"]


@dataclass(frozen=True)
class LayerCall:
    """One call of the op: the geometry of a layer_shapes spec, a batch, a dtype and a memory format."""
    spec: dict = field(hash=False, compare=False)
    batch: int
    dtype: torch.dtype
    channels_last: bool
    label: str


@dataclass(frozen=True)
class Launch:
    """One kernel specialisation for one config, as Triton would compile it."""
    kernel: str
    signature: tuple             # ((arg name, type), ...) with 'constexpr' for the specialised ones
    constexprs: tuple            # ((arg name, value), ...)
    attrs: tuple                 # ((arg name, ((attribute, value), ...)), ...) e.g. tt.divisibility 16
    options: tuple               # ((name, value), ...) num_warps, num_stages, ...
    jit: object = field(default=None, compare=False, repr=False)   # the JITFunction to compile
    launch_key: str = field(default="", compare=False, repr=False)  # Triton's cache key of the real launch

    @property
    def dtype(self) -> str:
        """The element type of the first pointer argument."""
        return next((t[1:] for _, t in self.signature if t.startswith("*")), "-")

    @property
    def config(self) -> str:
        blocks = "x".join(str(v) for k, v in self.constexprs if k.startswith("BLOCK"))
        opts = dict(self.options)
        return f"{blocks} w{opts.get('num_warps')} s{opts.get('num_stages')}"

    def specialisation(self) -> str:
        """Integers and pointers as specialised: '=1' constants, ':16' divisible by 16, ':i64' wide; then the
        pointers without the 16-byte alignment attribute."""
        ones = {k for k, v in self.constexprs if v == 1}
        divisible = {k for k, pairs in self.attrs if ("tt.divisibility", 16) in pairs}
        parts = []
        for name, kind in self.signature:
            if name in ones:
                parts.append(f"{name}=1")
            elif kind == "i64":
                parts.append(f"{name}:i64")
            elif kind == "i32" and name in divisible:
                parts.append(f"{name}:16")
        unaligned = [n for n, t in self.signature if t.startswith("*") and n not in divisible]
        return " ".join(parts) + (f" | pointers not 16-B aligned: {' '.join(unaligned)}" if unaligned else "")


def _jit_of(kernel):
    """(JITFunction, autotune configs or [None], heuristics value dicts outermost first) of a launched kernel."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    configs, heuristics = [None], []
    while not isinstance(kernel, JITFunction):
        if isinstance(kernel, Autotuner):
            configs = list(kernel.configs)
        elif isinstance(kernel, Heuristics):
            heuristics.append(kernel.values)
        else:
            raise TypeError(f"cannot unwrap {type(kernel).__name__}: is TRITON_INTERPRET set?")
        kernel = kernel.fn
    return kernel, configs, heuristics


def _stand_in(arg):
    """A tensor as Triton's binder sees it: its dtype and a data pointer with the tensor's alignment."""
    from triton.runtime.jit import MockTensor

    if not isinstance(arg, torch.Tensor):
        return arg

    class Pointer(MockTensor):
        def data_ptr(self):
            return arg.storage_offset() * arg.element_size()

    return Pointer(arg.dtype)


@contextlib.contextmanager
def _intercepted(record):
    """Every `kernel[grid](*args, **kwargs)` calls record(kernel, args, kwargs) instead of launching."""
    from triton.runtime.jit import KernelInterface

    original = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda self, grid: (lambda *args, **kwargs: record(self, args, kwargs))
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


@contextlib.contextmanager
def _meta_allowed(launch_module):
    """The launchers check that tensors are on CUDA: let meta tensors through (callers filter real limits)."""
    original = launch_module.not_supported_reasons
    launch_module.not_supported_reasons = lambda *args, **kwargs: []
    try:
        yield
    finally:
        launch_module.not_supported_reasons = original


def _specialise(kernel, args, kwargs, backend) -> list[Launch]:
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    jit, configs, heuristics = _jit_of(kernel)
    prune = getattr(kernel, "early_config_prune", None)
    if prune is not None and configs[0] is not None:  # the configs a real launch would compile (tuning.py)
        configs = prune(configs, dict(zip(jit.arg_names, args)), **kwargs)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    launches = []
    for config in configs:
        options = {**kwargs, **(config.all_kwargs() if config is not None else {})}
        for values in heuristics:
            named = {**dict(zip(jit.arg_names, args)), **options}
            options.update({name: rule(named) for name, rule in values.items()})
        bound, specialization, rest = binder(*map(_stand_in, args), **options)
        parsed, signature, constexprs, attrs = jit._pack_args(backend, options, bound, specialization, rest)
        names = jit.arg_names
        source = ASTSource(jit, signature, constexprs, attrs)
        launches.append(Launch(
            kernel=jit.__name__,
            signature=tuple(signature.items()),
            constexprs=tuple((names[path[0]], value) for path, value in constexprs.items()),
            attrs=tuple((names[path[0]], tuple(map(tuple, attr))) for path, attr in attrs.items()),
            options=tuple((k, getattr(parsed, k)) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg")
                          if getattr(parsed, k) is not None),
            jit=jit, launch_key=_cache_key(source, backend, parsed.__dict__)))
    return launches


def _cache_key(source, backend, options: dict) -> str:
    """The key triton.compile files a kernel under (as it computes it from its arguments)."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.runtime.cache import get_cache_key

    parsed = backend.parse_options(dict(options, **source.parse_options()))
    return get_cache_key(source, backend, parsed, get_cache_invalidating_env_vars())


def layer_calls(specs: Iterable[tuple[str, dict]], batches, dtypes, channels_last=(False,)) -> list[LayerCall]:
    """Every (spec, batch, dtype, memory format) call; channels_last applies to 2-D layers only (others once)."""
    calls = []
    for model, spec in specs:
        for batch in batches:
            for dtype in dtypes:
                for cl in channels_last if len(spec["size"]) == 2 else (False,):
                    label = f"{model}/{spec['layer']} B{batch} {str(dtype)[6:]}{' NHWC' if cl else ''}"
                    calls.append(LayerCall(spec, batch, dtype, cl, label))
    return calls


def _tensors(call: LayerCall):
    spec, meta = call.spec, {"device": "meta", "dtype": call.dtype}
    x = torch.empty(call.batch, spec["channels"], *spec["size"], **meta)
    if call.channels_last:
        x = x.to(memory_format=torch.channels_last)
    attn = torch.empty(call.batch, spec["m"], spec["n"], **meta)
    warehouse = torch.empty(spec["n"], *spec["cell"], **meta)
    bias = torch.empty(spec["out"], **meta) if spec["bias"] else None
    return x, attn, warehouse, bias


def _geometry(spec):
    return (spec["out"], spec["kernel"], spec["stride"], spec["padding"], spec["dilation"], spec["groups"])


def unsupported(call: LayerCall) -> list[str]:
    """Why the Triton backend would not run this call on a GPU (reasons meta tensors share with a plain
    supported call are about the meta device and are dropped)."""
    from kw_ops.ops.triton.capability import not_supported_reasons

    x, attn, warehouse, bias = _tensors(call)
    plain = LayerCall({"channels": 16, "out": 16, "size": (8, 8), "kernel": (1, 1), "stride": (1, 1),
                       "padding": (0, 0), "dilation": (1, 1), "groups": 1, "n": 2, "m": 1,
                       "cell": (16, 16, 1, 1), "bias": False}, 2, call.dtype, False, "plain")
    device_reasons = set(not_supported_reasons(*_tensors(plain), *_geometry(plain.spec)))
    return [r for r in not_supported_reasons(x, attn, warehouse, bias, *_geometry(call.spec))
            if r not in device_reasons]


def capture(calls: Iterable[LayerCall], arch: int = 90) -> tuple[dict[Launch, list[str]], dict[str, list[str]]]:
    """Run the forward and backward launchers on every call (meta tensors, nothing executes).

    -> ({Launch: labels of the calls that request it}, {label: reasons} for calls the backend does not take).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from kw_ops.ops import triton as kw_triton
    from kw_ops.ops.triton import launch as launch_module

    backend = make_backend(GPUTarget("cuda", arch, 32))
    forward, backward = kw_triton.kw_conv_implementation()
    found: dict[Launch, list[str]] = {}
    skipped: dict[str, list[str]] = {}
    current = []

    def record(kernel, args, kwargs):
        for launch in _specialise(kernel, args, kwargs, backend):
            found.setdefault(launch, []).append(current[0])

    with _intercepted(record), _meta_allowed(launch_module):
        for call in calls:
            reasons = unsupported(call)
            if reasons:
                skipped[call.label] = reasons
                continue
            current[:] = [call.label]
            x, attn, warehouse, bias = _tensors(call)
            geometry = _geometry(call.spec)
            y = forward(x, attn, warehouse, bias, *geometry)
            backward(torch.empty_like(y), x, attn, warehouse, bias is not None, *geometry, (True, True, True, True))
    return found, skipped


# -- compiling ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resources:
    registers: int
    stack_bytes: int             # stack frame: spills (Triton kernels keep no local arrays)
    shared_bytes: int            # dynamic shared memory Triton requests
    mma: str                     # wgmma, mma.sync or fma: the dot instructions in the PTX
    seconds: float               # compile time on this machine


def _cuobjdump():
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL ... of the kernel in a cubin, from cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    return {k: int(v) for k, v in fields.items() if v.isdigit()}


def _source(launch: Launch):
    """The ASTSource of a captured launch, rebuilt from its recorded signature, constexprs and attributes."""
    from triton.compiler import ASTSource

    index = launch.jit.arg_names.index
    constexprs = {(index(name),): value for name, value in launch.constexprs}
    attrs = {(index(name),): [list(pair) for pair in pairs] for name, pairs in launch.attrs}
    return ASTSource(launch.jit, dict(launch.signature), constexprs, attrs)


def compile_key(launch: Launch, arch: int = 90) -> str:
    """Triton's cache key of `compile_launch(launch)`: equal to `launch.launch_key` when compiling it here fills
    the cache the real launch reads."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return _cache_key(_source(launch), make_backend(GPUTarget("cuda", arch, 32)), dict(launch.options))


def compile_launch(launch: Launch, arch: int = 90) -> Resources:
    """Compile one specialisation for sm_<arch> (no device) and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget

    start = time.perf_counter()
    compiled = triton.compile(_source(launch), target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    seconds = time.perf_counter() - start
    usage = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm.get("ptx", "")
    mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "fma"
    return Resources(usage.get("REG", 0), usage.get("STACK", 0), compiled.metadata.shared, mma, seconds)


@dataclass(frozen=True)
class _Limits:
    """Per-SM launch limits of compute capability 9.0 (CUDA C++ Programming Guide, compute capabilities table)."""
    registers: int = 65536
    register_unit: int = 256          # registers are allocated per warp in units of 256
    warps: int = 64
    blocks: int = 32
    shared: int = 233472              # 228 KB per SM
    shared_per_block: int = 232448    # 227 KB per block
    shared_reserved: int = 1024       # reserved per block by the system


SM90 = _Limits()


def occupancy(resources: Resources, num_warps: int, limits: _Limits = SM90) -> tuple[int, str]:
    """(resident programs per SM, the limiting resource); 0 programs when the config cannot launch."""
    if resources.shared_bytes > limits.shared_per_block:
        return 0, "shared"
    per_warp = math.ceil(resources.registers * 32 / limits.register_unit) * limits.register_unit
    bounds = {"warps": limits.warps // num_warps, "blocks": limits.blocks,
              "registers": limits.registers // max(1, per_warp * num_warps),
              "shared": limits.shared // (resources.shared_bytes + limits.shared_reserved)}
    limit = min(bounds, key=bounds.get)
    return bounds[limit], limit


def first_step_compiles(model: str, batch: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(kernels a first training step compiles, launch specialisations) for every KW layer of `model` at `batch`
    (forward and backward, NCHW inputs): the distinct Triton cache keys of the launches, one config each unless
    KW_OPS_TRITON_AUTOTUNE is set. Needs TRITON_INTERPRET unset before Triton is imported."""
    from .layer_shapes import kw_layer_shapes

    found, _ = capture(layer_calls([(model, spec) for spec in kw_layer_shapes(model)], [batch], [dtype]))
    return len({launch.launch_key for launch in found}), len(found)
