"""Datasets: preprocessing presets, ImageFolder loading, and Fashion-MNIST preparation.

A :class:`Preset` travels with every checkpoint so that calibration, evaluation and the
exported artifact all see the same preprocessing the model was trained with.
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)
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


# --------------------------------------------------------------------------- Fashion-MNIST

def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise DataError(f"'{path}' is not an unsigned-byte IDX file (magic {magic:#x}); reinstall {FASHION_MNIST_PACKAGE}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def ensure_fashion_mnist_package(source: Path = FASHION_MNIST_DIR) -> Path:
    """Make sure the Debian package's IDX files are present, installing the package with apt-get if needed."""
    wanted = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    if all((source / w).exists() for w in wanted):
        return source
    if source != FASHION_MNIST_DIR:
        raise DataError(f"'{source}' lacks the Fashion-MNIST IDX files {wanted}; point --source at the folder that has them")
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise DataError(f"Fashion-MNIST is not installed ({source} missing) and cannot be installed here "
                        f"({'apt-get not found' if apt is None else 'not root'}); run "
                        f"`sudo apt-get install {FASHION_MNIST_PACKAGE}` and try again")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    res = subprocess.run([apt, "install", "-y", "-q", FASHION_MNIST_PACKAGE], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True)
        res = subprocess.run([apt, "install", "-y", "-q", FASHION_MNIST_PACKAGE], env=env, capture_output=True, text=True)
    if res.returncode != 0 or not all((source / w).exists() for w in wanted):
        raise DataError(f"`apt-get install {FASHION_MNIST_PACKAGE}` failed: {res.stderr.strip()[-300:]}; "
                        f"install it by hand and try again")
    return source


def prepare_fashion_mnist(dest: Path | str, *, source: Path = FASHION_MNIST_DIR, progress: bool = True) -> dict:
    """Write Fashion-MNIST as ``dest/train/<class>/*.png`` (60,000) and ``dest/val/<class>/*.png`` (10,000).

    Idempotent: a complete split is left as is. Each split is written to a temporary folder
    and renamed when complete, so an interrupted run leaves no half-written split.
    """
    from tqdm import tqdm

    dest = Path(dest)
    source = ensure_fashion_mnist_package(source)
    counts: dict[str, int] = {}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        final = dest / split
        marker = final / ".complete"
        if marker.exists():
            counts[split] = int(marker.read_text().split()[0])
            continue
        images = _read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
        if len(images) != len(labels):
            raise DataError(f"{prefix}: {len(images)} images but {len(labels)} labels; reinstall {FASHION_MNIST_PACKAGE}")
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{split}.", dir=dest))
        try:
            for c in FASHION_MNIST_CLASSES:
                (tmp / c).mkdir()
            for i, (img, lab) in enumerate(tqdm(zip(images, labels), total=len(images), disable=not progress,
                                                desc=f"fashion-mnist {split}", unit="img")):
                Image.fromarray(img, mode="L").save(tmp / FASHION_MNIST_CLASSES[lab] / f"{i:05d}.png", compress_level=1)
            (tmp / ".complete").write_text(f"{len(images)} images\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        counts[split] = len(images)
    return {"root": str(dest), "classes": list(FASHION_MNIST_CLASSES), **counts}
