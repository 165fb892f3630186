"""The folder of a run (`--out`): what it holds, the checks before a run writes there, a new default folder
per run, and `--overwrite`'s set-aside of the run it replaces.

A run is identified by its `run_id`, drawn when it starts and written into every checkpoint and every row of
`log.csv`. Resuming into a folder that holds a run continues that run (the checkpoint has its id) or is
refused; a checkpoint of another run may only continue in a folder without one.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import time
import uuid
from pathlib import Path

from .checkpoint import load_checkpoint

__all__ = ["CHECKPOINT_FILES", "CSV_FIELDS", "DEFAULT_OUT_ROOT", "LOG_FILE", "SET_ASIDE", "FolderRun", "SetAside",
           "check_out", "check_same_run", "new_out", "new_run_id"]

#: parent of the default output folder of a run, `<model>-<local time>` (see `TrainConfig.out`)
DEFAULT_OUT_ROOT = Path("runs") / "train"
#: the checkpoints a run writes into its folder
CHECKPOINT_FILES = ("last.pt", "best.pt")
LOG_FILE = "log.csv"
#: columns of log.csv: one row per epoch end (and per --max-steps stop); `run` is the run's id, `tau` the
#: temperature the network had (KW's τ, DY-Conv's / ODConv's T; empty for a static network)
CSV_FIELDS = ("model", "run", "epoch", "step", "train_loss", "val_loss", "top1", "top5", "lr", "tau", "images_per_s")
#: the sub-folder where --overwrite keeps the replaced run's files until the new run's first checkpoint
SET_ASIDE = "overwritten"
#: hex digits of a run id
RUN_ID_LENGTH = 12


def new_run_id() -> str:
    """A new run's identity: RUN_ID_LENGTH random hex digits."""
    return uuid.uuid4().hex[:RUN_ID_LENGTH]


@dataclasses.dataclass(frozen=True)
class FolderRun:
    """The run an output folder holds: its checkpoint files, the model they record (or the log's, without
    checkpoints; None: unreadable) and the run ids found in its first checkpoint and in the log's rows."""

    out: Path
    checkpoints: tuple[str, ...]
    model: str | None
    run_ids: tuple[str, ...]

    def describe(self) -> str:
        """'<out> holds a run of <model> (<files>)'."""
        model = repr(self.model) if self.model else "an unknown model"
        return f"{self.out} holds a run of {model} ({', '.join(self.checkpoints or (LOG_FILE,))})"


def _recorded(path: Path) -> tuple[str | None, str | None]:
    """(model name, run id) a checkpoint file records; None for what cannot be read."""
    try:
        state = load_checkpoint(path)
    except ValueError:
        return None, None
    if not isinstance(state, dict):
        return None, None
    return state.get("model_name"), state.get("run_id")


def _log_rows(out: Path) -> tuple[tuple[str, ...], list[dict]]:
    """(header, rows) of <out>/log.csv; empty when there is none."""
    path = out / LOG_FILE
    if not path.is_file():
        return (), []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return tuple(reader.fieldnames or ()), rows


def read_folder(out: Path) -> FolderRun:
    """What `out` holds (see FolderRun)."""
    checkpoints = tuple(name for name in CHECKPOINT_FILES if (out / name).is_file())
    model, run_id = _recorded(out / checkpoints[0]) if checkpoints else (None, None)
    _, rows = _log_rows(out)
    if not checkpoints and rows:
        model = rows[-1].get("model")
    ids = {row.get("run") for row in rows} | {run_id}
    return FolderRun(out, checkpoints, model, tuple(sorted(i for i in ids if i)))


def _check_is_folder(out: Path) -> None:
    """Refuse an --out that is a file, or lies under one."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "is" if path == out else f"lies under {path}, which is"
                raise ValueError(f"--out {out} {where} a file, not a folder: pass a folder for the run's log and "
                                 f"checkpoints")
            return


def _check_log_columns(out: Path) -> None:
    """Refuse to append to a log.csv with other columns than CSV_FIELDS (one written by an older version)."""
    header, _ = _log_rows(out)
    if header and header != CSV_FIELDS:
        raise ValueError(f"{out / LOG_FILE} has the columns {','.join(header)}, not {','.join(CSV_FIELDS)}: move it "
                         f"away, or pass another --out")


def _check_run(held: FolderRun, model: str, resume: str | None) -> None:
    """Refuse to write where `held` has checkpoints of another run: unless resuming, never; not into a run of
    another model; not `resume='auto'` where only best.pt is left (starting afresh would overwrite it)."""
    holder = held.describe()
    if resume is None:
        raise ValueError(f"{holder}: pass --resume auto to continue it, --overwrite to replace it, or another --out")
    if resume == "auto" and "last.pt" not in held.checkpoints:
        raise ValueError(f"{holder} but no last.pt to resume from (starting afresh would overwrite best.pt): pass "
                         f"--overwrite to start over there, or another --out")
    if held.model != model:
        raise ValueError(f"{holder}, not of {model!r}: pass --overwrite to replace it, or another --out")


def check_out(out: str | None, model: str, resume: str | None, overwrite: bool) -> FolderRun | None:
    """Check the run's folder before anything is written; returns what it holds (None: nothing to check, for a
    new default folder or with `overwrite`). The checkpoint to resume is checked against it by
    `check_same_run` once loaded."""
    if out is None:
        return None
    folder = Path(out)
    _check_is_folder(folder)
    if overwrite:
        if (folder / SET_ASIDE).exists():
            raise ValueError(f"{folder / SET_ASIDE} holds the files of a run an interrupted --overwrite replaced: "
                             f"move them back into {folder} or delete them, then run again")
        return None
    held = read_folder(folder)
    if held.checkpoints:
        _check_run(held, model, resume)
    elif held.run_ids and resume in (None, "auto"):
        raise ValueError(f"{held.describe()} but no checkpoint: pass --overwrite to replace it, or another --out")
    _check_log_columns(folder)
    return held


def check_same_run(held: FolderRun | None, run_id: str, path: Path) -> None:
    """Refuse to resume the checkpoint at `path` (of run `run_id`) into a folder that holds another run."""
    if held is None or not held.run_ids or held.run_ids == (run_id,):
        return
    raise ValueError(f"{held.describe()}, run {', '.join(held.run_ids)}, but {path} is of run {run_id}: resuming "
                     f"into a folder continues the run it holds: pass --resume auto to continue that one, or another "
                     f"--out for run {run_id}")


def new_out(model: str, create: bool) -> Path:
    """A new folder `runs/train/<model>-<YYYYmmdd-HHMMSS>[-k]` for a run; created (claimed) when `create`."""
    stem = DEFAULT_OUT_ROOT / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, attempt = stem, 1
    while create:
        try:
            path.mkdir(parents=True)
            break
        except FileExistsError:  # another run started in the same second
            attempt += 1
            path = stem.with_name(f"{stem.name}-{attempt}")
    return path


class SetAside:
    """--overwrite: the replaced run's checkpoints and log, moved into `<out>/overwritten/` before the new run
    starts. `discard()` deletes them once the new run has written its first checkpoint; `restore()` puts them
    back (deleting what the new run wrote) when it fails before that."""

    def __init__(self, out: Path):
        self.out, self.folder = out, out / SET_ASIDE
        self.pending: list[str] = []

    def move(self) -> list[str]:
        """Move the run's files aside; returns their names."""
        names = [name for name in (*CHECKPOINT_FILES, LOG_FILE) if (self.out / name).is_file()]
        if names:
            self.folder.mkdir()
            for name in names:
                os.replace(self.out / name, self.folder / name)
        self.pending = names
        return names

    def discard(self) -> None:
        """Delete the files set aside (the new run has a checkpoint)."""
        if self.pending:
            shutil.rmtree(self.folder)
            self.pending = []

    def restore(self) -> None:
        """Put the files set aside back, replacing the new run's."""
        if not self.pending:
            return
        for name in (*CHECKPOINT_FILES, *(f"{name}.partial" for name in CHECKPOINT_FILES), LOG_FILE):
            (self.out / name).unlink(missing_ok=True)
        for name in self.pending:
            os.replace(self.folder / name, self.out / name)
        self.folder.rmdir()
        self.pending = []
