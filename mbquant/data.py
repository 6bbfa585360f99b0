"""Datasets: preprocessing presets and ImageFolder loading (Fashion-MNIST preparation: :mod:`mbquant.fashion_mnist`).

A :class:`Preset` travels with every checkpoint so that calibration, evaluation and the
exported artifact all see the same preprocessing the model was trained with.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESET_KINDS = ("imagenet", "small")


@dataclass(frozen=True)
class Preset:
    """How an image file becomes a model input tensor (3 x resolution x resolution)."""

    kind: str = "imagenet"
    resolution: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: int = 256  # imagenet: shorter side before the center crop

    def __post_init__(self) -> None:
        if self.kind not in PRESET_KINDS:
            raise ConfigError(f"unknown preprocessing preset '{self.kind}'; choose one of {', '.join(PRESET_KINDS)}")
        if not 8 <= int(self.resolution) <= 1024:
            raise ConfigError(f"resolution {self.resolution} is out of range; use 8..1024 (e.g. 64, 96, 224)")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"preset needs 3 means and 3 positive stds, got mean={self.mean} std={self.std}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preset":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def imagenet_preset(resolution: int = 224) -> Preset:
    return Preset("imagenet", resolution, IMAGENET_MEAN, IMAGENET_STD, resize=round(resolution / 0.875))


def small_preset(resolution: int = 64, mean: float = 0.2860, std: float = 0.3530) -> Preset:
    """Grayscale small images (28x28 Fashion-MNIST) replicated to 3 channels at ``resolution``."""
    return Preset("small", resolution, (mean,) * 3, (std,) * 3, resize=resolution)


def make_preset(name: str, resolution: int | None = None) -> Preset:
    if name == "imagenet":
        return imagenet_preset(resolution or 224)
    if name == "small":
        return small_preset(resolution or 64)
    raise ConfigError(f"unknown preprocessing preset '{name}'; choose one of {', '.join(PRESET_KINDS)}")


def build_transform(preset: Preset, train: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """The torchvision transform of a preset. ``train`` adds light augmentation (flip, shift/crop)."""
    from torchvision.transforms import v2 as T

    steps: list = []
    if preset.kind == "small":
        steps.append(T.Grayscale(num_output_channels=3))
        if train:
            steps += [T.RandomCrop(28, padding=2, padding_mode="edge"), T.RandomHorizontalFlip()]
        steps.append(T.Resize((preset.resolution, preset.resolution), antialias=True))
    else:
        steps.append(T.RGB())
        if train:
            steps += [T.RandomResizedCrop(preset.resolution, antialias=True), T.RandomHorizontalFlip()]
        else:
            steps += [T.Resize(preset.resize, antialias=True), T.CenterCrop(preset.resolution)]
    steps += [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(preset.mean), list(preset.std))]
    return T.Compose(steps)


# --------------------------------------------------------------------------- folders

@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # -1 when unlabeled


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def scan_folder(root: Path | str, *, allow_unlabeled: bool = False) -> tuple[list[Sample], list[str]]:
    """List an ImageFolder (``root/<class>/*.png``) or, if allowed, a flat folder of images.

    Returns the samples (sorted, so every run sees the same order) and the class names.
    """
    root = Path(root)
    exts = " ".join(IMAGE_EXTENSIONS)
    if not root.exists():
        raise DataError(f"image folder '{root}' does not exist; pass a folder with one subfolder per class"
                        f" (e.g. prepare one with `mbquant data fashion-mnist data`)")
    if not root.is_dir():
        raise DataError(f"'{root}' is not a folder; pass a folder with one subfolder per class")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples: list[Sample] = []
    classes: list[str] = []
    if class_dirs:
        for d in class_dirs:
            files = sorted(p for p in d.rglob("*") if _is_image(p))
            if files:
                samples += [Sample(p, len(classes)) for p in files]
                classes.append(d.name)
    if not samples and allow_unlabeled:
        samples = [Sample(p, -1) for p in sorted(p for p in root.iterdir() if _is_image(p))]
    if not samples:
        raise DataError(f"image folder '{root}' has no images (looked for {exts}); expected one subfolder per class"
                        + (" or a flat folder of images" if allow_unlabeled else ""))
    return samples, classes


class ImageFolderDataset(Dataset):
    """Samples from :func:`scan_folder`. Unreadable images yield ``None`` and are counted in ``skipped``.

    ``cache=True`` keeps decoded images in memory (for small datasets trained for several epochs).
    """

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], transform: Callable, *, cache: bool = False):
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform
        self._cache: dict[int, Image.Image] | None = {} if cache else None
        self.skipped: set[Path] = set()

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, i: int) -> Image.Image | None:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        path = self.samples[i].path
        try:
            with Image.open(path) as im:
                im.load()
                img = im.copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            self.skipped.add(path)
            return None
        if self._cache is not None:
            self._cache[i] = img
        return img

    def __getitem__(self, i: int):
        img = self._decode(i)
        if img is None:
            return None
        return self.transform(img), self.samples[i].label


def collate_skip(batch):
    """Collate that drops unreadable samples (``None``); returns ``None`` for an all-bad batch."""
    good = [b for b in batch if b is not None]
    if not good:
        return None
    xs, ys = zip(*good)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                sampler=None, drop_last: bool = False) -> DataLoader:
    """A single-process loader (so the skipped-image count is exact) that drops unreadable images."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=gen, collate_fn=collate_skip, num_workers=0, drop_last=drop_last)


def load_folder(root: Path | str, preset: Preset, *, train: bool = False, allow_unlabeled: bool = False,
                cache: bool = False, expected_classes: Sequence[str] | None = None) -> ImageFolderDataset:
    """An :class:`ImageFolderDataset` for ``root`` with the preset's transform.

    ``expected_classes`` (the model's class list) must match the folder's classes when it is labelled.
    """
    samples, classes = scan_folder(root, allow_unlabeled=allow_unlabeled)
    if expected_classes is not None and classes and list(classes) != list(expected_classes):
        raise DataError(
            f"folder '{root}' has {len(classes)} classes {_short(classes)} but the model was trained on "
            f"{len(expected_classes)} classes {_short(expected_classes)}; pass a folder with the model's classes "
            f"(one subfolder per class, same names) or weights trained on this folder")
    return ImageFolderDataset(samples, classes, build_transform(preset, train=train), cache=cache)


def _short(names: Sequence[str], n: int = 4) -> str:
    names = list(names)
    return "[" + ", ".join(names[:n]) + (", ..." if len(names) > n else "") + "]"
