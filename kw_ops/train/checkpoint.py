"""Checkpoints that resume a run exactly: model, optimizer, LR scheduler, GradScaler, temperature schedule,
position (epoch, batches done in it, global step), best top-1, the RNG states, the epoch's running sums
(loss, samples, seconds), the run's id and the settings it was trained with.

Data order and augmentation are functions of (seed, epoch, index) (see `data.py`), so the position
is enough to rebuild the data stream; the RNG states cover dropout / drop-path.
"""
from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import torch

__all__ = ["Position", "rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint", "check_train_checkpoint",
           "TRAIN_CHECKPOINT_KEYS", "SETTINGS_KEYS"]

#: what `python -m kw_ops train` saves, and needs to resume
TRAIN_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "temperature", "position", "rng", "model_name",
                         "classes")
#: what it saves since runs have an identity and resumes compare settings (older checkpoints lack them)
SETTINGS_KEYS = ("run_id", "recipe", "config", "world_size", "train_images", "iters_per_epoch", "epoch_sums")


@dataclasses.dataclass
class Position:
    """Where a run stands: `epoch` (0-based, the one in progress), `batches` done in it, `step` global."""

    epoch: int = 0
    batches: int = 0
    step: int = 0
    best_top1: float = -1.0


def rng_state() -> dict:
    """RNG states of torch (CPU and every CUDA device) and Python's `random`."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, **state) -> None:
    """torch.save(state) to `path` atomically (write then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path, map_location="cpu"):
    """Load a file written by `torch.save` (it may hold Python objects: only load your own).

    Raises FileNotFoundError when there is no such file and ValueError, naming the file, when it
    cannot be read (truncated, or not a torch.save file at all, e.g. an image).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # unpickling a foreign or truncated file can fail with any exception type
        reason = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"{path} is not a readable checkpoint (truncated, or not written by torch.save): "
                         f"{type(error).__name__}: {reason}") from error


def check_train_checkpoint(state, path) -> None:
    """Raise ValueError unless `state` is a checkpoint of `python -m kw_ops train` (not, e.g., a state_dict)."""
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a `kw_ops train` checkpoint")
    missing = [key for key in TRAIN_CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ValueError(f"{path} is not a `kw_ops train` checkpoint (a plain state_dict?): it lacks "
                         f"{', '.join(repr(key) for key in missing)}; resume only from a last.pt written by train")
    missing = [key for key in SETTINGS_KEYS if key not in state]
    if missing:
        raise ValueError(f"{path} was written by an older `kw_ops train` (it lacks {', '.join(missing)}): this "
                         f"version cannot resume it; its weights are state['model']")
