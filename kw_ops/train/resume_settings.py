"""What a resumed run must share with its checkpoint, and what `--resume-override` re-derives when it does not.

Compared (they change what the run computes): every field of the resolved recipe (`--recipe` and the
overrides `--epochs`, `--batch-size`, `--lr`, `--temp-epochs`, `--image-size`), `--seed`, `--amp`, the
number of processes (torchrun's world size) and the number of training images under `--data` (its class
list is checked on its own). Not compared (they do not change the maths): `--out`, `--workers`, `--device`,
`--channels-last`, `--compile`, `--max-steps`, `--log-interval`, `--no-progress` and where `--data` lies.

With `--resume-override` the given settings win: the position in the epoch is re-derived from the samples
seen in it (whole global batches of the new size; the rest of them is trained again), the global step from
it, and the LR and temperature schedules are rebuilt at that step; the optimizer keeps its state (momentum,
moments) but takes the given recipe's hyper-parameters; a changed `--amp` starts a fresh grad scaler.
"""
from __future__ import annotations

import dataclasses

from .checkpoint import Position
from .recipes import Recipe

__all__ = ["Difference", "differences", "rederive_position", "refusal"]

#: recipe fields with their own command-line flag (the others come with --recipe)
RECIPE_FLAGS = ("epochs", "batch_size", "lr", "temp_epochs", "image_size")


@dataclasses.dataclass(frozen=True)
class Difference:
    """One setting that differs: the option that sets it, the checkpoint's value and the given one."""

    option: str
    checkpoint: object
    given: object

    def __str__(self) -> str:
        return f"{self.option} {self.checkpoint} (given {self.given})"

    def change(self) -> str:
        """'<option> <checkpoint value> -> <given value>'."""
        return f"{self.option} {self.checkpoint} -> {self.given}"


def _recipe_option(field: str) -> str:
    return "--" + field.replace("_", "-") if field in RECIPE_FLAGS else f"the recipe's {field}"


def differences(saved: dict, recipe: Recipe, seed: int, amp: str | None, world_size: int,
                train_images: int) -> list[Difference]:
    """The compared settings (see the module's docstring) where the checkpoint `saved` differs from the given."""
    found = []
    old_recipe = saved["recipe"]
    for field in dataclasses.fields(Recipe):
        old, new = old_recipe.get(field.name), getattr(recipe, field.name)
        if field.name == "betas" and old is not None:
            old = tuple(old)
        if old != new:
            found.append(Difference("--recipe" if field.name == "name" else _recipe_option(field.name), old, new))
    config = saved["config"]
    for option, old, new in (("--seed", config.get("seed"), seed), ("--amp", config.get("amp"), amp),
                             ("processes (torchrun --nproc_per_node)", saved["world_size"], world_size),
                             ("training images under --data", saved["train_images"], train_images)):
        if old != new:
            found.append(Difference(option, old, new))
    return found


def refusal(path, found: list[Difference]) -> str:
    """The one-line refusal of a resume whose settings differ."""
    return (f"checkpoint {path} was trained with other settings: {', '.join(str(d) for d in found)}; pass the "
            f"checkpoint's values, or --resume-override to continue with the given ones (the position in the "
            f"epoch and the schedules are then re-derived)")


def rederive_position(position: Position, old_global_batch: int, new_global_batch: int,
                      iters_per_epoch: int) -> tuple[Position, str | None]:
    """The position in the same epoch after a change of the global batch or of the epoch's length: as many
    whole new global batches as the samples already seen in the epoch fill (an epoch whose samples are all
    seen is complete), and the global step from it. Returns (position, a note; None when unchanged)."""
    seen = position.batches * old_global_batch
    batches = min(seen // new_global_batch, iters_per_epoch)
    epoch = position.epoch + (batches == iters_per_epoch)
    batches %= iters_per_epoch
    step = epoch * iters_per_epoch + batches
    new = Position(epoch, batches, step, position.best_top1)
    if (new.epoch, new.batches, new.step) == (position.epoch, position.batches, position.step):
        return new, None
    again = seen - batches * new_global_batch if epoch == position.epoch else 0
    note = (f"the position from the {seen} samples seen in epoch {position.epoch + 1}: epoch {epoch + 1}, batch "
            f"{batches} of {iters_per_epoch} (step {step}, was {position.step}"
            f"{f'; {again} samples trained again' if again > 0 else ''})")
    return new, note
