"""ImageFolder data without torchvision: Pillow decodes, torch crops, resizes, flips and normalises.

Layout: `root/train/<class>/<image>` and `root/val/<class>/<image>`; classes are the sorted folder
names of `train/`. Training augmentation is random-resized-crop + horizontal flip; evaluation
resizes the shorter side to size / EVAL_CROP_FRACTION and takes the centre crop.

Augmentation draws from a generator seeded by (seed, epoch, index), so a sample's crop does not
depend on the worker count, the rank or where a run was resumed: `set_epoch(epoch)` before each
epoch (the DataLoader copies the dataset into its workers when an epoch's iterator starts).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, DistributedSampler, Sampler

__all__ = ["ImageFolder", "UnreadableImageError", "class_folders", "ResumableSampler", "ShardSampler",
           "random_resized_crop_box", "write_synthetic_image_folder", "IMAGE_EXTENSIONS",
           "IMAGENET_MEAN", "IMAGENET_STD", "EVAL_CROP_FRACTION"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: evaluation crop: resize the shorter side to size / 0.875 (256 for 224), then centre-crop `size`
EVAL_CROP_FRACTION = 0.875
#: random-resized-crop ranges of the crop's area fraction and aspect ratio (Inception / torchvision)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
#: attempts at a random crop inside the image before falling back to the centre crop
CROP_ATTEMPTS = 10
_SEED_STRIDE = 1_000_003  # mixes (seed, epoch, index) into one generator seed


class UnreadableImageError(ValueError):
    """An image file Pillow cannot decode. The message is one line naming the file, also when a
    DataLoader worker raised it (the traceback text the worker sends back is cut to that line)."""

    def __init__(self, message: str):
        if "Original Traceback" in message:
            message = message.strip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def _load_rgb(path: Path) -> torch.Tensor:
    """Decode an image with Pillow -> uint8 [3, H, W]; UnreadableImageError naming the file if it cannot."""
    from PIL import Image  # soft import: `import kw_ops.train` works without Pillow

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            width, height = image.size
            data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise UnreadableImageError(f"cannot decode image {path}: {type(error).__name__}: {error}") from error
    return data.view(height, width, 3).permute(2, 0, 1)


def class_folders(folder: Path) -> list[str]:
    """The sorted names of the sub-folders of `folder`: the classes of one ImageFolder split."""
    return sorted(p.name for p in Path(folder).iterdir() if p.is_dir())


def random_resized_crop_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop with area in CROP_SCALE and log-uniform aspect ratio in CROP_RATIO."""
    area = height * width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(CROP_ATTEMPTS):
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        target = area * (CROP_SCALE[0] + u[0] * (CROP_SCALE[1] - CROP_SCALE[0]))
        ratio = math.exp(log_lo + u[1] * (log_hi - log_lo))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
    ratio = width / height  # fallback: the largest centre crop with a ratio inside the range
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float [3, H, W] -> [3, *size], bilinear with antialiasing."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


class ImageFolder(Dataset):
    """`root/<split>/<class>/<image>` as (float32 [3, size, size] normalised, class index) pairs.

    train=True: random-resized-crop + flip (seeded per (seed, epoch, index)); False: resize + centre crop.
    classes: the class names to index by (default: the sorted folders of this split).
    """

    def __init__(self, root, split: str, image_size: int, train: bool, classes: list[str] | None = None,
                 seed: int = 0):
        self.root = Path(root) / split
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: no folder {self.root} (expected {Path(root)}/{split}/<class>/...)")
        self.classes = classes if classes is not None else class_folders(self.root)
        self.samples = [(path, index) for index, name in enumerate(self.classes)
                        for path in sorted((self.root / name).rglob("*"))
                        if path.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise FileNotFoundError(f"ImageFolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        empty = self.empty_classes() if classes is None else []
        if empty:
            raise ValueError(f"ImageFolder: class folders without images under {self.root}: {', '.join(empty)} "
                             f"(each class needs an image: {', '.join(IMAGE_EXTENSIONS)})")
        self.image_size, self.train, self.seed, self.epoch = image_size, train, seed, 0
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def empty_classes(self) -> list[str]:
        """The classes without any image in this split."""
        found = {index for _, index in self.samples}
        return [name for index, name in enumerate(self.classes) if index not in found]

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation draws of this epoch."""
        self.epoch = epoch

    def _augment(self, image: torch.Tensor, index: int) -> torch.Tensor:
        seed = (self.seed * _SEED_STRIDE + self.epoch) * _SEED_STRIDE + index
        generator = torch.Generator().manual_seed(seed % (2**63))
        top, left, h, w = random_resized_crop_box(image.shape[1], image.shape[2], generator)
        image = _resize(image[:, top:top + h, left:left + w].float(), (self.image_size, self.image_size))
        if torch.rand((), generator=generator) < 0.5:
            image = image.flip(-1)
        return image

    def _centre(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[1:]
        short = round(self.image_size / EVAL_CROP_FRACTION)
        scale = short / min(height, width)
        size = (max(short, round(height * scale)), max(short, round(width * scale)))
        image = _resize(image.float(), size)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        return image[:, top:top + self.image_size, left:left + self.image_size]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        image = _load_rgb(path)
        image = self._augment(image, index) if self.train else self._centre(image)
        image = (image.clamp(0, 255) / 255 - self.mean) / self.std
        return image.contiguous(), target


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled per seed + epoch) that can skip the first `skip` indices of an
    epoch, to resume a run in the middle of an epoch. Works without a process group."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ShardSampler(Sampler):
    """Indices rank, rank + world, ... in order: every sample evaluated exactly once across ranks."""

    def __init__(self, dataset, num_replicas: int, rank: int):
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def write_synthetic_image_folder(root, classes: int = 3, train_per_class: int = 8, val_per_class: int = 4,
                                 size: int = 16, seed: int = 0) -> Path:
    """Write a learnable toy ImageFolder (PNG): class c is a noisy image around its own colour.

    For smoke tests of `python -m kw_ops train` / `attention-map`; returns `root`.
    """
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    colours = torch.rand(classes, 3, 1, 1, generator=generator) * 255
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = Path(root) / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = torch.randn(3, size, size, generator=generator) * 40
                pixels = (colours[c] + noise).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
                Image.frombytes("RGB", (size, size), bytes(pixels.flatten().tolist())).save(folder / f"{i}.png")
    return Path(root)
