"""Mean KW attentions over a dataset, one heatmap per warehouse (the paper's Figure 3).

For each warehouse the map has one row per linear mixture of every layer sharing it, in member
(cell) order, and one column per cell: entry [j, k] is the mean over the dataset of α[j, k].

    python -m kw_ops attention-map --model resnet18_kw1x --checkpoint runs/train/best.pt \\
        --data /data/imagenet --out attention.png

    maps = collect_attention(model, batches)          # [WarehouseAttention(name, layers, mean [Σm, n])]
    plot_attention(maps, "attention.png")
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn as nn

from .nn import KWAttention, set_temperature, warehouses

__all__ = ["WarehouseAttention", "AttentionRecorder", "collect_attention", "plot_attention", "main"]

#: figure inches per warehouse panel (width) and of the figure (height)
PANEL_WIDTH, FIGURE_HEIGHT = 4.0, 6.0


@dataclasses.dataclass
class WarehouseAttention:
    """Mean attentions of one warehouse: `mean` [Σm, n] (rows: the layers' mixtures in member order),
    `layers` [(module path, m)] in the same order, `samples` the number of inputs averaged."""

    name: str
    layers: list[tuple[str, int]]
    mean: torch.Tensor
    samples: int


class AttentionRecorder:
    """Forward hooks summing α [B, m, n] over the batch for every KWAttention of a model.

    with AttentionRecorder(model) as recorder:
        model(x)
    recorder.mean(module)   # [m, n]
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self._handles = []

    def _hook(self, module: nn.Module, inputs, alpha: torch.Tensor) -> None:
        key = id(module)
        batch_sum = alpha.detach().double().sum(dim=0).cpu()
        self.sums[key] = self.sums.get(key, 0) + batch_sum
        self.counts[key] = self.counts.get(key, 0) + alpha.shape[0]

    def __enter__(self) -> AttentionRecorder:
        for module in self.model.modules():
            if isinstance(module, KWAttention):
                self._handles.append(module.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def mean(self, module: KWAttention) -> torch.Tensor:
        """Mean α [m, n] of one attention module over everything recorded."""
        key = id(module)
        if key not in self.sums:
            raise ValueError("AttentionRecorder: this attention module never ran (is it used in forward?)")
        return self.sums[key] / self.counts[key]


def _maps(model: nn.Module, recorder: AttentionRecorder) -> list[WarehouseAttention]:
    """Stack the recorded means of each warehouse's members, in member order."""
    names = {id(module): name for name, module in model.named_modules()}
    maps = []
    for warehouse in warehouses(model):
        rows = [recorder.mean(member.attention) for member in warehouse.members]
        layers = [(names.get(id(member), "?"), member.attention.m) for member in warehouse.members]
        samples = recorder.counts[id(warehouse.members[0].attention)]
        maps.append(WarehouseAttention(warehouse.name, layers, torch.cat(rows), samples))
    return maps


@torch.no_grad()
def collect_attention(model: nn.Module, batches: Iterable, device: torch.device | str | None = None,
                      max_batches: int | None = None) -> list[WarehouseAttention]:
    """Mean α per warehouse over `batches` (tensors or (images, targets) pairs), in eval mode.

    The model's τ is used as it is (a trained model has τ = 0). Returns one WarehouseAttention per
    warehouse, in the order of `kw_ops.warehouses(model)`. `max_batches`: None (every batch) or >= 1.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"collect_attention: max_batches must be None or >= 1, got {max_batches}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with AttentionRecorder(model) as recorder:
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                images = batch[0] if isinstance(batch, (list, tuple)) else batch
                model(images.to(device))
        return _maps(model, recorder)
    finally:
        model.train(was_training)


def _layer_ticks(layers: list[tuple[str, int]]) -> Iterator[tuple[float, float, str]]:
    """(first row, centre row, name) of each layer's block of rows."""
    start = 0
    for name, m in layers:
        yield start, start + (m - 1) / 2, name
        start += m


def plot_attention(maps: list[WarehouseAttention], path, title: str | None = None) -> Path:
    """One heatmap per warehouse (rows: mixtures, columns: cells) side by side, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not maps:
        raise ValueError("plot_attention: the model has no warehouses")
    figure, axes = plt.subplots(1, len(maps), figsize=(PANEL_WIDTH * len(maps), FIGURE_HEIGHT), squeeze=False)
    for axis, item in zip(axes[0], maps):
        image = axis.imshow(item.mean.float().numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        ticks = list(_layer_ticks(item.layers))
        for first, _, _ in ticks[1:]:
            axis.axhline(first - 0.5, color="white", linewidth=0.8)
        axis.set_yticks([centre for _, centre, _ in ticks], [name for _, _, name in ticks], fontsize=6)
        axis.set_xlabel(f"cell (n = {item.mean.shape[1]})")
        axis.set_title(f"{item.name}: {item.mean.shape[0]} mixtures", fontsize=9)
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    figure.suptitle(title or f"mean attention α over {maps[0].samples} images")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kw_ops attention-map", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registered model name")
    p.add_argument("--checkpoint", help="a `python -m kw_ops train` checkpoint, a kw_ops state_dict or the "
                   "authors' checkpoint (default: the freshly built model)")
    p.add_argument("--data", required=True, help="an ImageFolder root (uses its --split folder if present)")
    p.add_argument("--split", default="val")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int, help="average over the first N batches only (default: every batch)")
    p.add_argument("--num-classes", type=int, help="default: the checkpoint's classes, else the dataset's")
    p.add_argument("--temperature", type=float, help="set τ before collecting (default: the model's)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p


def _read_checkpoint(path) -> Mapping:
    """A checkpoint or state_dict file; ValueError naming the file if it is unreadable or holds something else."""
    from .train.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"--checkpoint {path} holds a {type(checkpoint).__name__}, not a state_dict or checkpoint")
    return checkpoint


def _load_model(args, dataset_classes: int, device: torch.device) -> nn.Module:
    """The registered model, with the checkpoint's weights (and class count) if one is given."""
    from .models import load_pretrained
    from .train import build_model

    checkpoint = _read_checkpoint(args.checkpoint) if args.checkpoint else None
    num_classes = args.num_classes
    if num_classes is None and checkpoint is not None and "classes" in checkpoint:
        num_classes = len(checkpoint["classes"])
    model = build_model(args.model, num_classes or dataset_classes)
    if checkpoint is not None:
        load_pretrained(model, checkpoint)
    if args.temperature is not None:
        set_temperature(model, args.temperature)
    return model.to(device)


def main(argv=None) -> int:
    """`python -m kw_ops attention-map ...`; returns the exit status."""
    from torch.utils.data import DataLoader

    from .train.data import ImageFolder
    from .train.distributed import parse_device

    args = _parser().parse_args(argv)
    try:
        if args.max_batches is not None and args.max_batches < 1:
            raise ValueError(f"--max-batches must be an integer >= 1 (or left out: every batch), "
                             f"got {args.max_batches}")
        device = parse_device(args.device)
        split = args.split if (Path(args.data) / args.split).is_dir() else ""
        dataset = ImageFolder(args.data, split, args.image_size, train=False)
        model = _load_model(args, len(dataset.classes), device)
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
        maps = collect_attention(model, loader, device, args.max_batches)
        samples = maps[0].samples if maps else 0
        path = plot_attention(maps, args.out, title=f"{args.model}: mean α over {samples} images")
    except (ValueError, FileNotFoundError) as error:
        print(f"kw_ops attention-map: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({len(maps)} warehouses)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
