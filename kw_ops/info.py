"""`python -m kw_ops info`: versions, devices and which op backends can run here and why not."""
from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys

import torch

import kw_ops


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as error:  # report any import failure, it is what the user needs to see
        return f"not importable ({type(error).__name__}: {error})"


def report() -> str:
    """Lines of text: kw_ops, python, torch, triton, devices, backends."""
    lines = [
        f"kw_ops  {kw_ops.__version__}",
        f"python  {platform.python_version()} on {platform.machine()}",
        f"torch   {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, threads: {torch.get_num_threads()})",
        f"triton  {_version('triton')}",
        f"cuda    {torch.cuda.device_count()} device(s)" + (
            f": {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""),
    ]
    backend_report = getattr(kw_ops.ops, "backend_report", None)
    if backend_report is not None:
        lines.append("backends:")
        lines.extend(f"  {line}" for line in backend_report())
    lines.append(f"triton  {triton_compiles()}")
    return "\n".join(lines)


#: the network whose first training step's Triton compiles `info` counts
COMPILE_COUNT_CASE = ("resnet50_kw1x", 128)


def triton_compiles() -> str:
    """How many Triton kernels the first training step of COMPILE_COUNT_CASE compiles (bf16), counted from its
    launches captured on meta tensors in a child process (Triton must be imported there without its
    interpreter); one config per shape class unless KW_OPS_TRITON_AUTOTUNE is set."""
    model, batch = COMPILE_COUNT_CASE
    code = ("from kw_ops.benchmarking.triton_capture import first_step_compiles; "
            f"print(*first_step_compiles({model!r}, {batch}))")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    try:
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"compiles of a first step: not counted ({type(error).__name__})"
    if result.returncode != 0 or len(result.stdout.split()) != 2:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"compiles of a first step: not counted ({reason})"
    compiles, launches = result.stdout.split()
    from kw_ops.ops.triton.tuning import AUTOTUNE_ENV, autotuning

    how = ("every surviving config benchmarked and compiled per key" if autotuning() else
           f"one config per shape class, nothing benchmarked; {AUTOTUNE_ENV}=1 autotunes")
    return (f"a first training step of {model} at batch {batch} in bf16 compiles {compiles} Triton kernels for "
            f"{launches} launch specialisations ({how})")
