"""The training loop of `python -m kw_ops train`: ImageFolder classification with the paper's recipes.

    from kw_ops.train import TrainConfig, train
    summary = train(TrainConfig(model="resnet18_kw1x", data="/data/imagenet", recipe="resnet", amp="bf16"))

Every iteration sets the temperature of the network's dynamic convs before the forward (KW's τ,
docs/semantics.md §5, or DY-Conv's / ODConv's T by their own schedule, docs/baselines.md §4: see
`temperatures.py`), then steps the optimizer and the per-iteration LR schedule. After every epoch (and when
--max-steps stops a run) rank 0 evaluates top-1/top-5 on val, appends a row to `<out>/log.csv` and saves
`<out>/last.pt` (`best.pt` when top-1 improves); `resume=` continues from such a checkpoint exactly, with the
same settings (or re-derived ones: `resume_override`, see `resume_settings.py`). A folder that already holds a
run's checkpoints is only written to when resuming that run or with `overwrite=True` (see `run_folder.py`).
"""
from __future__ import annotations

import csv
import dataclasses
import random
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .. import models
from . import distributed, run_folder
from .checkpoint import Position, check_train_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import ImageFolder, ResumableSampler, ShardSampler, class_folders
from .recipes import Recipe, build_lr_scheduler, build_optimizer, get_recipe
from .resume_settings import differences, rederive_position, refusal
from .run_folder import CSV_FIELDS, LOG_FILE
from .temperatures import BASELINE_TEMP_EPOCHS, SYMBOLS, build_schedule, read_temperature, temperature_kind

__all__ = ["TrainConfig", "StepInfo", "train", "build_model", "evaluate", "CSV_FIELDS"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOP_K = (1, 5)


@dataclasses.dataclass
class TrainConfig:
    """Settings of one run. The override fields (None: the recipe's value) change the recipe;
    batch_size is per process. `max_steps` stops the run after that many global iterations
    (the schedules still span the recipe's epochs). `temp_epochs` (None: the recipe's for KW, 10 for
    DY-Conv and ODConv) spans the temperature's anneal. `out`: the run's folder (None: a new folder
    `runs/train/<model>-<YYYYmmdd-HHMMSS>`); a folder holding checkpoints is refused unless resuming
    that run or `overwrite` (which moves its checkpoints and log into `<out>/overwritten/`, deleted at
    the new run's first checkpoint and put back if it fails before). `resume`: a checkpoint path or
    'auto' (`<out>/last.pt` if present; needs `out`); its settings must be the given ones unless
    `resume_override` (see `resume_settings.py`)."""

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
    resume_override: bool = False
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
        if self.resume_override and self.resume is None:
            raise ValueError("resume_override (--resume-override) accepts changed settings of a resumed run: it "
                             "needs resume (--resume)")

    def resolved_recipe(self) -> Recipe:
        return get_recipe(self.recipe, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                          temp_epochs=self.temp_epochs, image_size=self.image_size)


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What `train(..., on_step=)` receives after every iteration. `tau`: the temperature its forward used,
    read off the model (KW's τ, DY-Conv's / ODConv's T; None for a static network)."""

    step: int
    epoch: int
    loss: float
    tau: float | None
    lr: float


#: the running sums of an epoch in progress (global over ranks), carried by checkpoints across a resume
NO_SUMS = {"loss": 0.0, "samples": 0, "seconds": 0.0}


@dataclasses.dataclass
class _Run:
    """Everything a checkpoint holds, plus the wrapped network, the loaders and the folder's set-aside."""

    config: TrainConfig
    recipe: Recipe
    info: distributed.DistInfo
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    temperature_kind: str
    temperature: object
    position: Position
    classes: list[str]
    train_loader: DataLoader
    val_loader: DataLoader
    iters_per_epoch: int
    run_id: str
    epoch_sums: dict
    set_aside: run_folder.SetAside | None = None


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


def _new_run_id(info: distributed.DistInfo) -> str:
    """A new run id, the same on every rank (rank 0's)."""
    run_id = [run_folder.new_run_id()]
    if info.distributed:
        dist.broadcast_object_list(run_id, src=0)
    return run_id[0]


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
    kind = temperature_kind(model)
    if kind != "kw" and config.temp_epochs is None:  # DY-Conv and ODConv anneal over their papers' epochs
        recipe = recipe.replace(temp_epochs=BASELINE_TEMP_EPOCHS)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(config.seed + info.rank)  # ranks draw different dropout masks
    optimizer = build_optimizer(model, recipe)
    iters_per_epoch = len(train_loader)
    net = distributed.wrap(model, info)
    if config.compile:
        net = torch.compile(net)
    return _Run(config, recipe, info, model, net, optimizer, build_lr_scheduler(optimizer, recipe, iters_per_epoch),
                torch.amp.GradScaler(info.device.type, enabled=config.amp == "fp16"), kind,
                build_schedule(kind, iters_per_epoch, recipe.temp_epochs), Position(), classes,
                train_loader, val_loader, iters_per_epoch, _new_run_id(info), dict(NO_SUMS))


def _gather_rng(info: distributed.DistInfo) -> list[dict]:
    """Every rank's RNG state (index = rank)."""
    state = rng_state()
    if not info.distributed:
        return [state]
    states = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def _save(run: _Run, out: Path, best: bool) -> None:
    """Checkpoint the run (collective for the RNG states; rank 0 writes). The first checkpoint of an
    --overwrite run deletes the files of the run it replaces."""
    states = _gather_rng(run.info)
    if not run.info.is_main:
        return
    save_checkpoint(out / "last.pt", model=run.model.state_dict(), optimizer=run.optimizer.state_dict(),
                    scheduler=run.scheduler.state_dict(), scaler=run.scaler.state_dict(),
                    temperature=run.temperature.state_dict(), position=dataclasses.asdict(run.position),
                    rng=states, model_name=run.config.model, classes=run.classes, run_id=run.run_id,
                    recipe=dataclasses.asdict(run.recipe), config=dataclasses.asdict(run.config),
                    world_size=run.info.world_size, train_images=len(run.train_loader.dataset),
                    iters_per_epoch=run.iters_per_epoch, epoch_sums=dict(run.epoch_sums))
    if best:
        shutil.copyfile(out / "last.pt", out / "best.pt")
    if run.set_aside is not None:
        run.set_aside.discard()


def _names(names: list[str], shown: int = 5) -> str:
    """The first `shown` names, comma-separated, with '...' when there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _check_resumable(run: _Run, state: dict, path: Path) -> None:
    """Refuse a checkpoint of another model or class list."""
    if state["model_name"] != run.config.model:
        raise ValueError(f"checkpoint {path} is of model {state['model_name']!r}, not {run.config.model!r}")
    classes = list(state["classes"])
    if classes != run.classes:
        raise ValueError(f"checkpoint {path} was trained on {len(classes)} classes ({_names(classes)}), but "
                         f"{run.config.data} has {len(run.classes)} ({_names(run.classes)})")


def _check_left_to_train(run: _Run, done: Position, path: Path) -> None:
    """Refuse to resume a run with nothing left to train."""
    if done.epoch >= run.recipe.epochs:
        raise ValueError(f"checkpoint {path} is of a finished run ({done.epoch} of {run.recipe.epochs} epochs, "
                         f"step {done.step}): nothing to resume")
    if run.config.max_steps is not None and done.step >= run.config.max_steps:
        raise ValueError(f"checkpoint {path} is at step {done.step}, already at --max-steps {run.config.max_steps}: "
                         f"nothing to resume")


def _global_batch(recipe: dict | Recipe, world_size: int) -> int:
    """Samples per iteration over all ranks."""
    batch = recipe["batch_size"] if isinstance(recipe, dict) else recipe.batch_size
    return batch * world_size


def _override(run: _Run, state: dict, path: Path) -> tuple[Position, list[str]]:
    """--resume-override: the re-derived position and what else is recomputed (notes for the user); refuses a
    change of optimizer (its state would not carry over)."""
    old = state["recipe"]
    if old["optimizer"] != run.recipe.optimizer:
        raise ValueError(f"checkpoint {path} was trained with {old['optimizer']}, the given recipe has "
                         f"{run.recipe.optimizer}: --resume-override cannot change the optimizer (its state does not "
                         f"carry over)")
    old_batch, new_batch = _global_batch(old, state["world_size"]), _global_batch(run.recipe, run.info.world_size)
    position, note = Position(**state["position"]), None
    if (state["iters_per_epoch"], old_batch) != (run.iters_per_epoch, new_batch):
        position, note = rederive_position(position, old_batch, new_batch, run.iters_per_epoch)
    notes = [note] if note else []
    notes.append(f"the LR and {SYMBOLS[run.temperature_kind]} schedules of the given settings at step "
                 f"{position.step} ({run.iters_per_epoch} iterations per epoch)")
    notes.append("the optimizer's hyper-parameters from the given recipe (its momentum/moment state kept)")
    if state["config"].get("seed") != run.config.seed:
        notes.append("the rest of the epoch in the given seed's order (some of its samples seen twice, some not)")
    if state["config"].get("amp") != run.config.amp:
        notes.append("a fresh grad scaler")
    return position, notes


def _load_states(run: _Run, state: dict, overridden: bool) -> None:
    """Load model, optimizer, LR and temperature schedules and grad scaler; with `overridden` settings the
    optimizer takes the given recipe's hyper-parameters and the schedules are rebuilt at the run's step."""
    run.model.load_state_dict(state["model"])
    given = [{key: value for key, value in group.items() if key != "params"} for group in run.optimizer.param_groups]
    run.optimizer.load_state_dict(state["optimizer"])
    if not overridden:
        run.scheduler.load_state_dict(state["scheduler"])
        run.temperature.load_state_dict(state["temperature"])
        run.scaler.load_state_dict(state["scaler"])
        return
    for group, settings in zip(run.optimizer.param_groups, given):
        group.update(settings)
    run.scheduler = build_lr_scheduler(run.optimizer, run.recipe, run.iters_per_epoch, start=run.position.step)
    run.temperature.iteration = run.position.step
    if state["config"].get("amp") == run.config.amp:
        run.scaler.load_state_dict(state["scaler"])


def _resume(run: _Run, path: Path, held: run_folder.FolderRun | None) -> None:
    """Load a checkpoint into the run (every rank loads the same file) after checking it: a checkpoint of
    `python -m kw_ops train`, of the run the folder holds, the model and classes, the same settings (or
    --resume-override, whose changes and re-derivations are printed) and something left to train."""
    state = load_checkpoint(path, map_location="cpu")
    check_train_checkpoint(state, path)
    run_folder.check_same_run(held, state["run_id"], path)
    _check_resumable(run, state, path)
    found = differences(state, run.recipe, run.config.seed, run.config.amp, run.info.world_size,
                        len(run.train_loader.dataset))
    if found and not run.config.resume_override:
        raise ValueError(refusal(path, found))
    position, notes = _override(run, state, path) if found else (Position(**state["position"]), [])
    _check_left_to_train(run, position, path)
    same_epoch = position.epoch == state["position"]["epoch"]  # (a re-derived position may complete it)
    run.position, run.run_id = position, state["run_id"]
    run.epoch_sums = dict(state["epoch_sums"] if same_epoch else NO_SUMS)
    _load_states(run, state, overridden=bool(found))
    rng = state["rng"]
    set_rng_state(rng[min(run.info.rank, len(rng) - 1)])
    if found and run.info.is_main:
        print(f"kw_ops train: resuming {path} with changed settings (--resume-override): "
              f"{', '.join(d.change() for d in found)}; re-derived: {'; '.join(notes)}", file=sys.stderr, flush=True)


def _resume_path(config: TrainConfig) -> Path | None:
    if config.resume is None:
        return None
    if config.resume == "auto":
        path = Path(config.out) / "last.pt"
        return path if path.exists() else None
    return Path(config.resume)


class _Progress:
    """One text line per epoch: a bar, loss, the temperature, lr and images/s; redrawn in place on a terminal."""

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


def _train_step(run: _Run, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The temperature for this iteration, forward, backward, optimizer and LR step; returns the loss."""
    run.temperature.step(run.model)
    with _autocast(run):
        loss = F.cross_entropy(run.net(images), targets, label_smoothing=run.recipe.label_smoothing)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return loss.detach()


def _temperature_text(run: _Run) -> str:
    """' τ 0.9667' (or ' T 27.1000' for DY-Conv / ODConv) as the model has it; '' for a static network."""
    tau = read_temperature(run.model, run.temperature_kind)
    return "" if tau is None else f" {SYMBOLS[run.temperature_kind]} {tau:.4f}"


def _train_epoch(run: _Run, epoch: int, on_step: Callable[[StepInfo], None] | None) -> dict:
    """Train the rest of one epoch (or until max_steps); returns the epoch's loss and images/s (over the whole
    epoch: a resumed epoch starts from the running sums its checkpoint carries), lr, the model's temperature,
    the sums, and whether max_steps stopped it."""
    run.net.train()
    run.train_loader.dataset.set_epoch(epoch)
    run.train_loader.sampler.set_epoch(epoch, skip=run.position.batches * run.recipe.batch_size)
    bar = _Progress(f"epoch {epoch + 1}/{run.recipe.epochs}", len(run.train_loader) + run.position.batches,
                    run.config.progress and run.info.is_main, run.config.log_interval)
    carried = run.epoch_sums if run.info.is_main else NO_SUMS  # global sums: rank 0 adds them once
    loss_sum = torch.tensor(carried["loss"], dtype=torch.float32, device=run.info.device)
    count, new, stopped = carried["samples"], 0, False
    start = time.perf_counter()
    for images, targets in run.train_loader:
        images, targets = _to_device(images, targets, run)
        loss = _train_step(run, images, targets)
        loss_sum += loss.float() * targets.shape[0]
        count, new = count + targets.shape[0], new + targets.shape[0]
        run.position.batches += 1
        run.position.step += 1
        lr = run.optimizer.param_groups[0]["lr"]
        if on_step is not None:
            on_step(StepInfo(run.position.step, epoch, loss.item(), read_temperature(run.model, run.temperature_kind),
                             lr))
        if bar.due(run.position.batches):
            rate = new * run.info.world_size / max(time.perf_counter() - start, 1e-9)
            bar.show(run.position.batches, f"loss {loss.item():.4f}{_temperature_text(run)} lr {lr:.3g} "
                     f"{rate:.1f} img/s")
        if run.config.max_steps is not None and run.position.step >= run.config.max_steps:
            stopped = True
            break
    bar.close()
    seconds = max(run.epoch_sums["seconds"] + time.perf_counter() - start, 1e-9)
    totals = distributed.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(count), device=loss_sum.device)]),
                                        run.info)
    sums = {"loss": totals[0].item(), "samples": int(totals[1].item()), "seconds": seconds}
    return {"train_loss": (totals[0] / totals[1].clamp_min(1)).item(), "images_per_s": totals[1].item() / seconds,
            "lr": run.optimizer.param_groups[0]["lr"], "tau": read_temperature(run.model, run.temperature_kind),
            "sums": sums, "stopped": stopped}


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


def _summary(epoch: int, stats: dict, metrics: dict, run: _Run) -> str:
    """The line printed after an epoch."""
    tau = "" if stats["tau"] is None else f", {SYMBOLS[run.temperature_kind]} {stats['tau']:.4f}"
    return (f"epoch {epoch + 1}: train loss {stats['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}, "
            f"top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%{tau}, {stats['images_per_s']:.1f} img/s")


def _finish_epoch(run: _Run, epoch: int, stats: dict, out: Path) -> dict:
    """Evaluate, log, advance the position (or keep the running sums of an epoch cut short) and checkpoint;
    returns the logged row."""
    metrics = evaluate(run.model, run.val_loader, run.info, run.config.amp, run.config.channels_last)
    row = {"model": run.config.model, "run": run.run_id, "epoch": epoch + 1, "step": run.position.step,
           **{key: value for key, value in stats.items() if key != "sums"}, **metrics}
    if not stats["stopped"] or run.position.batches >= run.iters_per_epoch:  # the epoch is complete
        run.position.epoch, run.position.batches = epoch + 1, 0
        run.epoch_sums = dict(NO_SUMS)
    else:
        run.epoch_sums = stats["sums"]
    best = metrics["top1"] > run.position.best_top1
    run.position.best_top1 = max(run.position.best_top1, metrics["top1"])
    if run.info.is_main:
        _log_row(out, row)
        print(_summary(epoch, stats, metrics, run), file=sys.stderr, flush=True)
    _save(run, out, best)
    return row


def _prepare_out(run: _Run) -> Path:
    """The run's folder (a new one when `out` is None): for --overwrite, the run there is set aside (see
    `run_folder.SetAside`); created, announced on the main rank."""
    if run.config.out is None:
        out = run_folder.new_out(run.config.model, create=run.info.is_main)
        run.config = dataclasses.replace(run.config, out=str(out))
    out = Path(run.config.out)
    if run.info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        moved = []
        if run.config.overwrite:
            run.set_aside = run_folder.SetAside(out)
            moved = run.set_aside.move()
        aside = f" (the run there set aside in {run.set_aside.folder} until the first checkpoint)" if moved else ""
        print(f"{run.config.model}: {LOG_FILE} and checkpoints in {out}{aside}", file=sys.stderr, flush=True)
    return out


def _train(config: TrainConfig, info: distributed.DistInfo, on_step: Callable[[StepInfo], None] | None) -> dict:
    held = run_folder.check_out(config.out, config.model, config.resume, config.overwrite)
    run = _build(config, info)
    path = _resume_path(config)
    if path is not None:
        _resume(run, path, held)
    out = _prepare_out(run)
    try:
        history = []
        for epoch in range(run.position.epoch, run.recipe.epochs):
            stats = _train_epoch(run, epoch, on_step)
            history.append(_finish_epoch(run, epoch, stats, out))
            if stats["stopped"]:
                break
    except BaseException:
        if run.set_aside is not None:
            run.set_aside.restore()
        raise
    return {"history": history, "position": dataclasses.asdict(run.position), "out": str(out)}


def train(config: TrainConfig, on_step: Callable[[StepInfo], None] | None = None) -> dict:
    """Run (or resume) training; returns {'history': logged rows, 'position': Position as a dict, 'out': folder}.

    Everything is checked (output folder, data, checkpoint) before anything is written. Under torchrun the
    process group is left once the run (its DDP wrapper) is gone: see `distributed.cleanup`.
    """
    info = distributed.setup(config.device)
    try:
        return _train(config, info, on_step)
    except BaseException as error:
        if info.distributed:  # the traceback's frames would keep the run, and so the process group, alive
            traceback.clear_frames(error.__traceback__)
        raise
    finally:
        distributed.cleanup()

