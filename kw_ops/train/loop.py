"""The training loop of `python -m kw_ops train`: ImageFolder classification with the paper's recipes.

    from kw_ops.train import TrainConfig, train
    summary = train(TrainConfig(model="resnet18_kw1x", data="/data/imagenet", recipe="resnet", amp="bf16"))

Every iteration sets τ (TemperatureSchedule, docs/semantics.md §5) before the forward, then steps the optimizer
and the per-iteration LR schedule. After every epoch (and when --max-steps stops a run) rank 0
evaluates top-1/top-5 on val, appends a row to `<out>/log.csv` and saves `<out>/last.pt`
(`best.pt` when top-1 improves); `resume=` continues from such a checkpoint exactly. A folder that
already holds a run's checkpoints is only written to when resuming it or with `overwrite=True`.
"""
from __future__ import annotations

import csv
import dataclasses
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .. import models
from ..nn import TemperatureSchedule
from . import distributed
from .checkpoint import Position, check_train_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import ImageFolder, ResumableSampler, ShardSampler, class_folders
from .recipes import Recipe, build_lr_scheduler, build_optimizer, get_recipe

__all__ = ["TrainConfig", "StepInfo", "train", "build_model", "evaluate", "CSV_FIELDS"]

CSV_FIELDS = ("model", "epoch", "step", "train_loss", "val_loss", "top1", "top5", "lr", "tau", "images_per_s")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOP_K = (1, 5)
#: parent of the default output folder of a run, `<model>-<local time>` (see `TrainConfig.out`)
DEFAULT_OUT_ROOT = Path("runs") / "train"
#: the files a run writes into its output folder
CHECKPOINT_FILES = ("last.pt", "best.pt")
LOG_FILE = "log.csv"


@dataclasses.dataclass
class TrainConfig:
    """Settings of one run. The override fields (None: the recipe's value) change the recipe;
    batch_size is per process. `max_steps` stops the run after that many global iterations
    (the schedules still span the recipe's epochs). `out`: the run's folder (None: a new folder
    `runs/train/<model>-<YYYYmmdd-HHMMSS>`); a folder holding checkpoints is refused unless resuming
    that run or `overwrite` (which deletes its checkpoints and log first). `resume`: a checkpoint
    path or 'auto' (`<out>/last.pt` if present; needs `out`)."""

    model: str
    data: str
    recipe: str = "resnet"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    temp_epochs: float | None = None
    image_size: int | None = None
    workers: int = 4
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    out: str | None = None
    overwrite: bool = False
    resume: str | None = None
    max_steps: int | None = None
    seed: int = 0
    device: str | None = None
    log_interval: int = 10
    progress: bool = True

    def __post_init__(self):
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps (--max-steps) must be >= 1, got {self.max_steps}: a run of no step trains "
                             f"and saves nothing")
        if self.resume is not None and self.overwrite:
            raise ValueError(f"resume (--resume {self.resume}) continues a run and overwrite (--overwrite) replaces "
                             f"it: pass one of them")
        if self.resume == "auto" and self.out is None:
            raise ValueError("resume='auto' (--resume auto) needs out (--out), the folder of the run to continue")

    def resolved_recipe(self) -> Recipe:
        return get_recipe(self.recipe, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                          temp_epochs=self.temp_epochs, image_size=self.image_size)


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What `train(..., on_step=)` receives after every iteration (τ is the value used by its forward)."""

    step: int
    epoch: int
    loss: float
    tau: float
    lr: float


@dataclasses.dataclass
class _Run:
    """Everything a checkpoint holds, plus the wrapped network and the loaders."""

    config: TrainConfig
    recipe: Recipe
    info: distributed.DistInfo
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    temperature: TemperatureSchedule
    position: Position
    classes: list[str]
    train_loader: DataLoader
    val_loader: DataLoader
    iters_per_epoch: int


def check_model(name: str) -> None:
    """Raise ValueError unless `name` is registered (`kw_ops.models.list_models()` or a tiny_* net)."""
    from . import tiny  # noqa: F401  (registers tiny_*)

    if not models.is_model(name):
        raise ValueError(f"unknown model {name!r}; known: {', '.join(models.list_models())}")


def build_model(name: str, num_classes: int) -> nn.Module:
    """A registered model (`kw_ops.models.list_models()`, plus the tiny smoke-test nets) for num_classes."""
    check_model(name)
    return models.create(name, num_classes=num_classes)


def _loaders(config: TrainConfig, recipe: Recipe, info: distributed.DistInfo):
    """Train loader (shuffled shards, drop_last) and val loader (disjoint shards, in order)."""
    train_set = ImageFolder(config.data, "train", recipe.image_size, train=True, seed=config.seed)
    val_set = ImageFolder(config.data, "val", recipe.image_size, train=False, classes=train_set.classes)
    val_only = sorted(set(class_folders(val_set.root)) - set(train_set.classes))
    if val_only:
        raise ValueError(f"classes only in {val_set.root}, not in {train_set.root}: {_names(val_only)} (their "
                         f"images would never be evaluated)")
    if len(train_set) < recipe.batch_size * info.world_size:
        raise ValueError(f"{len(train_set)} training images, fewer than one global batch of "
                         f"{recipe.batch_size} x {info.world_size} processes")
    common = {"batch_size": recipe.batch_size, "num_workers": config.workers,
              "pin_memory": info.device.type == "cuda", "generator": torch.Generator().manual_seed(config.seed)}
    sampler = ResumableSampler(train_set, info.world_size, info.rank, seed=config.seed)
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=True, **common)
    val_loader = DataLoader(val_set, sampler=ShardSampler(val_set, info.world_size, info.rank), **common)
    return train_loader, val_loader


def _build(config: TrainConfig, info: distributed.DistInfo) -> _Run:
    recipe = config.resolved_recipe()
    check_model(config.model)
    if config.amp not in (None, *AMP_DTYPES):
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {config.amp!r}")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    train_loader, val_loader = _loaders(config, recipe, info)
    classes = train_loader.dataset.classes
    model = build_model(config.model, len(classes)).to(info.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(config.seed + info.rank)  # ranks draw different dropout masks
    optimizer = build_optimizer(model, recipe)
    iters_per_epoch = len(train_loader)
    net = distributed.wrap(model, info)
    if config.compile:
        net = torch.compile(net)
    return _Run(config, recipe, info, model, net, optimizer, build_lr_scheduler(optimizer, recipe, iters_per_epoch),
                torch.amp.GradScaler(info.device.type, enabled=config.amp == "fp16"),
                TemperatureSchedule(iters_per_epoch, recipe.temp_epochs), Position(), classes,
                train_loader, val_loader, iters_per_epoch)


def _gather_rng(info: distributed.DistInfo) -> list[dict]:
    """Every rank's RNG state (index = rank)."""
    state = rng_state()
    if not info.distributed:
        return [state]
    states = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def _save(run: _Run, out: Path, best: bool) -> None:
    """Checkpoint the run (collective for the RNG states; rank 0 writes)."""
    states = _gather_rng(run.info)
    if not run.info.is_main:
        return
    save_checkpoint(out / "last.pt", model=run.model.state_dict(), optimizer=run.optimizer.state_dict(),
                    scheduler=run.scheduler.state_dict(), scaler=run.scaler.state_dict(),
                    temperature=run.temperature.state_dict(), position=dataclasses.asdict(run.position),
                    rng=states, model_name=run.config.model, classes=run.classes,
                    recipe=dataclasses.asdict(run.recipe), config=dataclasses.asdict(run.config))
    if best:
        shutil.copyfile(out / "last.pt", out / "best.pt")


def _names(names: list[str], shown: int = 5) -> str:
    """The first `shown` names, comma-separated, with '...' when there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _check_resumable(run: _Run, state: dict, path: Path) -> None:
    """Refuse a checkpoint of another model or class list, or of a run with nothing left to train."""
    if state["model_name"] != run.config.model:
        raise ValueError(f"checkpoint {path} is of model {state['model_name']!r}, not {run.config.model!r}")
    classes = list(state["classes"])
    if classes != run.classes:
        raise ValueError(f"checkpoint {path} was trained on {len(classes)} classes ({_names(classes)}), but "
                         f"{run.config.data} has {len(run.classes)} ({_names(run.classes)})")
    done = Position(**state["position"])
    if done.epoch >= run.recipe.epochs:
        raise ValueError(f"checkpoint {path} is of a finished run ({done.epoch} of {run.recipe.epochs} epochs, "
                         f"step {done.step}): nothing to resume")
    if run.config.max_steps is not None and done.step >= run.config.max_steps:
        raise ValueError(f"checkpoint {path} is at step {done.step}, already at --max-steps {run.config.max_steps}: "
                         f"nothing to resume")


def _resume(run: _Run, path: Path) -> None:
    """Load a checkpoint into the run (every rank loads the same file)."""
    state = load_checkpoint(path, map_location="cpu")
    check_train_checkpoint(state, path)
    _check_resumable(run, state, path)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.temperature.load_state_dict(state["temperature"])
    run.position = Position(**state["position"])
    rng = state["rng"]
    set_rng_state(rng[min(run.info.rank, len(rng) - 1)])


def _recorded_model(path: Path) -> str | None:
    """The model name a checkpoint file records; None if it cannot be read or records none."""
    try:
        state = load_checkpoint(path)
    except ValueError:
        return None
    return state.get("model_name") if isinstance(state, dict) else None


def _check_run(config: TrainConfig, out: Path, found: list[str]) -> None:
    """Refuse to write where `found` checkpoints belong to another run: unless resuming it, never into a run
    of another model, and not `resume='auto'` where only best.pt is left (starting afresh would overwrite it)."""
    model = _recorded_model(out / found[0])
    holder = f"{out} holds a run of {repr(model) if model else 'an unknown model'} ({', '.join(found)})"
    if config.resume is None:
        raise ValueError(f"{holder}: pass --resume auto to continue it, --overwrite to replace it, or another --out")
    if config.resume == "auto" and "last.pt" not in found:
        raise ValueError(f"{holder} but no last.pt to resume from (starting afresh would overwrite best.pt): pass "
                         f"--overwrite to start over there, or another --out")
    if model != config.model:
        raise ValueError(f"{holder}, not of {config.model!r}: pass --overwrite to replace it, or another --out")


def _check_log(out: Path) -> None:
    """Refuse to append to a log.csv with other columns than CSV_FIELDS (one written before the model column)."""
    path = out / LOG_FILE
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        header = tuple(next(csv.reader(handle), ()))
    if header and header != CSV_FIELDS:
        raise ValueError(f"{path} has the columns {','.join(header)}, not {','.join(CSV_FIELDS)}: move it away, or "
                         f"pass another --out")


def _check_out(config: TrainConfig) -> None:
    """Check the run's folder before anything is written (nothing to check for a new folder, out=None, or
    with `overwrite`): its checkpoints (`_check_run`) and its log (`_check_log`)."""
    if config.out is None or config.overwrite:
        return
    out = Path(config.out)
    found = [name for name in CHECKPOINT_FILES if (out / name).is_file()]
    if found:
        _check_run(config, out, found)
    _check_log(out)


def _new_out(model: str, create: bool) -> Path:
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


def _clear_out(out: Path) -> None:
    """Delete the checkpoints and log of the run in `out` (--overwrite)."""
    for name in (*CHECKPOINT_FILES, LOG_FILE):
        (out / name).unlink(missing_ok=True)


def _resume_path(config: TrainConfig) -> Path | None:
    if config.resume is None:
        return None
    if config.resume == "auto":
        path = Path(config.out) / "last.pt"
        return path if path.exists() else None
    return Path(config.resume)


class _Progress:
    """One text line per epoch: a bar, loss, τ, lr and images/s; redrawn in place on a terminal."""

    WIDTH = 24

    def __init__(self, label: str, total: int, enabled: bool, every: int):
        self.label, self.total, self.enabled, self.every = label, max(total, 1), enabled, max(every, 1)
        self.tty = sys.stderr.isatty()

    def due(self, done: int) -> bool:
        """Whether iteration `done` (1-based) gets a line: every `every` iterations and the last."""
        return self.enabled and (done % self.every == 0 or done == self.total)

    def show(self, done: int, text: str) -> None:
        filled = int(self.WIDTH * done / self.total)
        line = f"{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total} {text}"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)


def _to_device(images: torch.Tensor, targets: torch.Tensor, run: _Run):
    memory_format = torch.channels_last if run.config.channels_last else torch.contiguous_format
    images = images.to(run.info.device, non_blocking=True, memory_format=memory_format)
    return images, targets.to(run.info.device, non_blocking=True)


def _autocast(run: _Run):
    amp = run.config.amp
    return torch.autocast(run.info.device.type, dtype=AMP_DTYPES.get(amp, torch.float32), enabled=amp is not None)


def _train_step(run: _Run, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
    """τ for this iteration, forward, backward, optimizer and LR step; returns (loss, τ)."""
    tau = run.temperature.step(run.model)
    with _autocast(run):
        loss = F.cross_entropy(run.net(images), targets, label_smoothing=run.recipe.label_smoothing)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return loss.detach(), tau


def _train_epoch(run: _Run, epoch: int, on_step: Callable[[StepInfo], None] | None) -> dict:
    """Train the rest of one epoch (or until max_steps); returns loss, images/s, lr, τ, stopped."""
    run.net.train()
    run.train_loader.dataset.set_epoch(epoch)
    run.train_loader.sampler.set_epoch(epoch, skip=run.position.batches * run.recipe.batch_size)
    bar = _Progress(f"epoch {epoch + 1}/{run.recipe.epochs}", len(run.train_loader) + run.position.batches,
                    run.config.progress and run.info.is_main, run.config.log_interval)
    loss_sum, count, tau, stopped = torch.zeros((), device=run.info.device), 0, 0.0, False
    start = time.perf_counter()
    for images, targets in run.train_loader:
        images, targets = _to_device(images, targets, run)
        loss, tau = _train_step(run, images, targets)
        loss_sum += loss.float() * targets.shape[0]
        count += targets.shape[0]
        run.position.batches += 1
        run.position.step += 1
        lr = run.optimizer.param_groups[0]["lr"]
        if on_step is not None:
            on_step(StepInfo(run.position.step, epoch, loss.item(), tau, lr))
        if bar.due(run.position.batches):
            rate = count * run.info.world_size / max(time.perf_counter() - start, 1e-9)
            bar.show(run.position.batches, f"loss {loss.item():.4f} τ {tau:.4f} lr {lr:.3g} {rate:.1f} img/s")
        if run.config.max_steps is not None and run.position.step >= run.config.max_steps:
            stopped = True
            break
    bar.close()
    seconds = max(time.perf_counter() - start, 1e-9)
    totals = distributed.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(count), device=loss_sum.device)]),
                                        run.info)
    return {"train_loss": (totals[0] / totals[1].clamp_min(1)).item(), "images_per_s": totals[1].item() / seconds,
            "lr": run.optimizer.param_groups[0]["lr"], "tau": tau, "stopped": stopped}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, info: distributed.DistInfo, amp: str | None = None,
             channels_last: bool = False) -> dict:
    """Loss, top-1 and top-5 accuracy (%) over the loader, summed over ranks."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss sum, top1, top5, count
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, targets in loader:
        images = images.to(info.device, memory_format=memory_format)
        targets = targets.to(info.device)
        with torch.autocast(info.device.type, dtype=AMP_DTYPES.get(amp, torch.float32), enabled=amp is not None):
            logits = model(images).float()
        ranked = logits.topk(min(max(TOP_K), logits.shape[1]), dim=1).indices
        hits = ranked == targets[:, None]
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                               hits[:, :1].sum().double(), hits.sum().double(),
                               torch.tensor(float(targets.shape[0]), dtype=torch.float64, device=info.device)])
    totals = distributed.all_reduce_sum(totals, info)
    count = max(totals[3].item(), 1.0)
    return {"val_loss": totals[0].item() / count, "top1": 100 * totals[1].item() / count,
            "top5": 100 * totals[2].item() / count}


def _log_row(out: Path, row: dict) -> None:
    """Append one row to <out>/log.csv (header on creation)."""
    path = out / LOG_FILE
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({key: (f"{row[key]:.6g}" if isinstance(row[key], float) else row[key]) for key in CSV_FIELDS})


def _finish_epoch(run: _Run, epoch: int, stats: dict, out: Path) -> dict:
    """Evaluate, log, advance the position and checkpoint; returns the logged row."""
    metrics = evaluate(run.model, run.val_loader, run.info, run.config.amp, run.config.channels_last)
    row = {"model": run.config.model, "epoch": epoch + 1, "step": run.position.step, **stats, **metrics}
    if not stats["stopped"] or run.position.batches >= run.iters_per_epoch:  # the epoch is complete
        run.position.epoch, run.position.batches = epoch + 1, 0
    best = metrics["top1"] > run.position.best_top1
    run.position.best_top1 = max(run.position.best_top1, metrics["top1"])
    if run.info.is_main:
        _log_row(out, row)
        print(f"epoch {epoch + 1}: train loss {stats['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}, "
              f"top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%, τ {stats['tau']:.4f}, "
              f"{stats['images_per_s']:.1f} img/s", file=sys.stderr, flush=True)
    _save(run, out, best)
    return row


def _prepare_out(run: _Run) -> Path:
    """The run's folder (a new one when `out` is None): emptied for --overwrite, created, announced on the
    main rank."""
    if run.config.out is None:
        run.config = dataclasses.replace(run.config, out=str(_new_out(run.config.model, create=run.info.is_main)))
    out = Path(run.config.out)
    if run.info.is_main:
        if run.config.overwrite:
            _clear_out(out)
        out.mkdir(parents=True, exist_ok=True)
        print(f"{run.config.model}: {LOG_FILE} and checkpoints in {out}", file=sys.stderr, flush=True)
    return out


def train(config: TrainConfig, on_step: Callable[[StepInfo], None] | None = None) -> dict:
    """Run (or resume) training; returns {'history': logged rows, 'position': Position as a dict, 'out': folder}.

    Everything is checked (output folder, data, checkpoint) before anything is written.
    """
    info = distributed.setup(config.device)
    try:
        _check_out(config)
        run = _build(config, info)
        path = _resume_path(config)
        if path is not None:
            _resume(run, path)
        out = _prepare_out(run)
        history = []
        for epoch in range(run.position.epoch, run.recipe.epochs):
            stats = _train_epoch(run, epoch, on_step)
            history.append(_finish_epoch(run, epoch, stats, out))
            if stats["stopped"]:
                break
        return {"history": history, "position": dataclasses.asdict(run.position), "out": str(out)}
    finally:
        distributed.cleanup()

