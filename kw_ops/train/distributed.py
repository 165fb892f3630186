"""Process-group setup for `torchrun`: NCCL on CUDA, gloo on CPU; single process without torchrun.

KW networks share one warehouse Parameter between layers. `model.parameters()` yields it once, so
DistributedDataParallel registers it once and all-reduces its accumulated gradient once per step.

Ending cleanly: gloo runs its own threads, which stop only when the last reference to the process group
goes, not at `destroy_process_group()`. Threads left to interpreter exit abort the process now and then
('terminate called without an active exception': 4 of 20 two-process runs of a plain DDP script, 1 of 30
runs of `kw_ops train`, torch 2.13 on CPU). The reference that lasts to exit is in the default arguments
`group=group.WORLD` of `torch.distributed.nn.functional`, bound to the group when that module is first
imported (DDP imports it, through torch._dynamo) after `init_process_group`; so `setup` imports it first.
`cleanup` comes after the run (its DDP wrapper, which refers to the group too) is gone.
"""
from __future__ import annotations

import dataclasses
import importlib
import os

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistInfo", "parse_device", "setup", "cleanup", "wrap", "unwrap", "all_reduce_sum",
           "check_unique_parameters"]


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place: rank, world_size, local_rank and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes the CSV and saves checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def parse_device(requested: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' as a device this machine has; ValueError naming --device otherwise."""
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {requested!r}")
    count = torch.cuda.device_count()
    if device.type == "cuda" and count == 0:
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"--device {requested}: no CUDA device here (torch {torch.__version__}, {build}); "
                         f"use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise ValueError(f"--device {requested}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def _pick_device(requested: str | None, local_rank: int) -> torch.device:
    if requested not in (None, "auto"):
        device = parse_device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def setup(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT).

    Without WORLD_SIZE > 1 nothing is initialised. device: 'cuda', 'cpu' or None/'auto'.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = _pick_device(device, local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        importlib.import_module("torch.distributed.nn.functional")  # before the group exists: see the docstring
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                device_id=chosen if chosen.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, chosen)


def cleanup() -> None:
    """Leave the process group (if any). Call it once nothing refers to the group any more (drop the DDP
    wrapper first): then `destroy_process_group()` ends gloo's threads."""
    if dist.is_initialized():
        dist.destroy_process_group()


def check_unique_parameters(model: nn.Module) -> None:
    """Raise if one tensor is registered twice under different Parameters' storage (DDP would
    all-reduce it twice); shared warehouses pass because parameters() deduplicates them."""
    seen: dict[int, int] = {}
    for parameter in model.parameters():
        pointer = parameter.data_ptr()
        if parameter.numel() and pointer in seen and seen[pointer] != id(parameter):
            raise ValueError("check_unique_parameters: two Parameter objects share storage; share the module "
                             "(e.g. one Warehouse) instead of aliasing tensors")
        seen[pointer] = id(parameter)


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around `model` when running distributed; the model itself otherwise."""
    if not info.distributed:
        return model
    check_unique_parameters(model)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op in a single process)."""
    if info.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
