"""`python -m kw_ops train` / `python -m kw_ops.train`: train a registered model on an ImageFolder.

Runs in one process, or in several under `torchrun --nproc_per_node N` (DistributedDataParallel,
NCCL on CUDA, gloo on CPU; --batch-size is per process; rank 0 logs and saves).
"""
from __future__ import annotations

import argparse
import sys

from .loop import TrainConfig, train
from .recipes import RECIPES


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m kw_ops train`."""
    p = argparse.ArgumentParser(prog="python -m kw_ops train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registered model name (python -m kw_ops describe NAME)")
    p.add_argument("--data", required=True, help="folder with train/<class>/* and val/<class>/* images")
    p.add_argument("--recipe", default="resnet", choices=sorted(RECIPES), help="the paper's training setup")
    overrides = p.add_argument_group("recipe overrides")
    overrides.add_argument("--epochs", type=int)
    overrides.add_argument("--batch-size", type=int, help="per process")
    overrides.add_argument("--lr", type=float)
    overrides.add_argument("--temp-epochs", type=float, help="epochs over which KW's τ falls from 1 to 0 (default: "
                           "the recipe's), or DY-Conv's / ODConv's T from 30 to 1 (default 10)")
    overrides.add_argument("--image-size", type=int)
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast dtype (fp16 adds a GradScaler)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--out", help="folder for log.csv, last.pt and best.pt (default: a new runs/train/MODEL-TIME); "
                   "one holding checkpoints is refused unless --resume or --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out (its checkpoints and log wait "
                   "in OUT/overwritten until the new run's first checkpoint, and come back if it fails before)")
    p.add_argument("--resume", help="checkpoint to continue from, or 'auto' for OUT/last.pt if present; --out must "
                   "be empty or hold that run, and the settings must be the checkpoint's")
    p.add_argument("--resume-override", action="store_true", help="resume with settings that differ from the "
                   "checkpoint's: the changes are printed, the position in the epoch and the schedules re-derived")
    p.add_argument("--max-steps", type=int, help="stop after this many iterations (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--log-interval", type=int, default=10, help="progress line every N iterations")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        train(TrainConfig(**vars(args)))
    except (ValueError, FileNotFoundError) as error:
        print(f"kw_ops train: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
