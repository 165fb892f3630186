"""Training tools: `python -m kw_ops train` (ImageFolder classification with the paper's recipes,
the τ schedule, AMP, DDP under torchrun, exact resume) and the pieces it is made of.

    python -m kw_ops train --model resnet18_kw1x --data /data/imagenet --recipe resnet --amp bf16
    torchrun --nproc_per_node 8 -m kw_ops train --model resnet18_kw4x --data /data/imagenet

    from kw_ops.train import TrainConfig, train
    train(TrainConfig(model="tiny_kw1x", data="folder", epochs=2, batch_size=8, image_size=32))

Importing this package registers the tiny smoke-test networks (`tiny_kw1x`, ...; see `tiny.py`).
"""
from . import tiny
from .data import ImageFolder
from .loop import StepInfo, TrainConfig, build_model, evaluate, train
from .recipes import RECIPES, Recipe, build_lr_scheduler, build_optimizer, get_recipe, lr_factor, param_groups

__all__ = [
    "ImageFolder", "RECIPES", "Recipe", "StepInfo", "TrainConfig", "build_lr_scheduler", "build_model",
    "build_optimizer", "evaluate", "get_recipe", "lr_factor", "param_groups", "tiny", "train",
]
