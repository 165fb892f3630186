"""The paper's training setups (Appendix A.1) as data, and the optimizer / LR schedule they build.

    recipe = get_recipe("resnet", epochs=10, lr=0.05)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_lr_scheduler(optimizer, recipe, iters_per_epoch=len(loader))   # step it every iteration

Temperature epochs follow docs/semantics.md §5 (20 for ResNet and ConvNeXt, 15 for MobileNetV2); the paper's
appendix says 10 for the traditional ResNet and MobileNetV2 setups: pass `temp_epochs=10` for those.
The 'convnext' recipe keeps AdamW, the cosine schedule, warmup and label smoothing of the advanced
setup; RandAugment, mixup, cutmix and random erasing are not implemented here.
The 'deit' recipe (DeiT's, for Table 11's DeiT models) has AdamW 5e-4 x batch/512, weight decay 0.05,
300 epochs, 5 warm-up epochs, cosine and label smoothing 0.1 (stochastic depth 0.1 is the deit_*
builders' default); of its augmentations only random-resized-crop and flip are here: RandAugment,
mixup, cutmix, random erasing and repeated augmentation are missing.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

__all__ = ["Recipe", "RECIPES", "get_recipe", "param_groups", "build_optimizer", "build_lr_scheduler", "lr_factor"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One training setup. `batch_size` is per process (the global batch is batch_size x world size).

    optimizer: 'sgd' (with momentum, Nesterov off) or 'adamw' (with `betas`).
    schedule:  'step' (x step_gamma every step_epochs epochs) or 'cosine' (to zero at the last
               iteration), both after `warmup_epochs` of linear warmup; evaluated per iteration.
    temp_epochs: epochs over which τ falls linearly from 1 to 0 (docs/semantics.md §5).
    """

    name: str
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    epochs: int = 100
    batch_size: int = 256
    schedule: str = "step"
    step_epochs: int = 30
    step_gamma: float = 0.1
    warmup_epochs: float = 0.0
    temp_epochs: float = 20.0
    label_smoothing: float = 0.0
    image_size: int = 224

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"Recipe {self.name!r}: optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"Recipe {self.name!r}: schedule must be 'step' or 'cosine', got {self.schedule!r}")
        for field, least, strict in (("epochs", 1, False), ("batch_size", 1, False), ("lr", 0, True),
                                     ("temp_epochs", 0, False), ("image_size", 1, False)):
            self._check_number(field, least, strict)

    def _check_number(self, field: str, least: float, strict: bool) -> None:
        """ValueError naming the field (and its command-line flag) unless it is finite and >= (or >) least."""
        value = getattr(self, field)
        if not (math.isfinite(value) and (value > least if strict else value >= least)):
            flag = "--" + field.replace("_", "-")
            raise ValueError(f"Recipe {self.name!r}: {field} ({flag}) must be a finite number "
                             f"{'>' if strict else '>='} {least}, got {value}")

    def replace(self, **changes) -> Recipe:
        """A copy with some fields changed; None values are ignored (unset command-line overrides)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


RECIPES = {
    # ResNet, traditional strategy: SGD 0.1, momentum 0.9, wd 1e-4, 100 epochs, x0.1 every 30.
    "resnet": Recipe("resnet"),
    # MobileNetV2: SGD 0.1, wd 4e-5, 150 epochs, cosine.
    "mobilenetv2": Recipe("mobilenetv2", weight_decay=4e-5, epochs=150, schedule="cosine", temp_epochs=15),
    # ResNet / ConvNeXt, advanced strategy (ConvNeXt's): AdamW 4e-3, wd 0.05, 300 epochs, batch 4096,
    # cosine after 20 warmup epochs, label smoothing 0.1.
    "convnext": Recipe("convnext", optimizer="adamw", lr=4e-3, weight_decay=0.05, epochs=300, batch_size=4096,
                       schedule="cosine", warmup_epochs=20, label_smoothing=0.1),
    # DeiT (Touvron et al. 2021): AdamW 5e-4 x 1024 / 512, wd 0.05, 300 epochs, batch 1024, cosine after 5
    # warmup epochs, label smoothing 0.1; τ over 20 epochs as in the other advanced-strategy runs.
    "deit": Recipe("deit", optimizer="adamw", lr=1e-3, weight_decay=0.05, epochs=300, batch_size=1024,
                   schedule="cosine", warmup_epochs=5, label_smoothing=0.1),
}


def get_recipe(name: str, **overrides) -> Recipe:
    """A named recipe with overrides (None values ignored): `get_recipe('resnet', epochs=2)`."""
    if name not in RECIPES:
        raise ValueError(f"get_recipe: unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name].replace(**overrides)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight decay on tensors of 2+ dims (weights, warehouse cells), none on 1-D ones
    (biases, norm weights, scalars). Shared tensors (warehouse cells) appear once."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim > 1 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD or AdamW of the recipe over `param_groups(model, recipe.weight_decay)`."""
    groups = param_groups(model, recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum)
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas)


def lr_factor(iteration: int, recipe: Recipe, iters_per_epoch: int) -> float:
    """Multiplier of the base LR at the 0-based iteration (linear warmup, then step or cosine)."""
    warmup = int(recipe.warmup_epochs * iters_per_epoch)
    if iteration < warmup:
        return (iteration + 1) / warmup
    if recipe.schedule == "step":
        return recipe.step_gamma ** ((iteration // iters_per_epoch) // recipe.step_epochs)
    total = recipe.epochs * iters_per_epoch
    progress = min(1.0, (iteration - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, iters_per_epoch: int,
                       start: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration LambdaLR of `lr_factor` (call `step()` after every optimizer step).
    start: iterations already done (a resumed run whose schedule is re-derived; the groups then need their
    'initial_lr', the base the factor multiplies); the groups' lr is set for iteration `start`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, recipe, iters_per_epoch),
                                             last_epoch=start - 1)
