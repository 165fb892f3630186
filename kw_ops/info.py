"""`python -m kw_ops info`: versions, devices and which op backends can run here and why not."""
from __future__ import annotations

import importlib
import platform

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
    return "\n".join(lines)
