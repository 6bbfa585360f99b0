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

from .config import MAX_IMAGE_PIXELS
from .errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
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
            steps += [PadCrop(2), T.RandomHorizontalFlip()]
        steps.append(T.Resize((preset.resolution, preset.resolution), antialias=True))
    else:
        steps.append(T.RGB())
        if train:
            steps += [T.RandomResizedCrop(preset.resolution, antialias=True), T.RandomHorizontalFlip()]
        else:
            steps += [T.Resize(preset.resize, antialias=True), T.CenterCrop(preset.resolution)]
    steps += [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(preset.mean), list(preset.std))]
    return T.Compose(steps)


def preset_from_data(kind: str, resolution: int, root: Path, *, max_pixels: int = MAX_IMAGE_PIXELS
                     ) -> tuple[Preset, "ImageFolderDataset"]:
    """A training preset that fits the images in ``root`` and the training set with it (images cached).

    ``small``: grayscale at ``resolution``, normalised with the mean/std measured on these images (Fashion-MNIST:
    0.2860/0.3530); refused for colour images. ``imagenet``: RGB with ImageNet's mean/std (pretrained-style)."""
    preset = make_preset(kind, resolution)
    train_set = load_folder(root, preset, train=True, cache=True, max_pixels=max_pixels)
    if kind == "small":
        colour = _first_colour_image(train_set)
        if colour is not None:
            raise ConfigError(f"--preset small trains on grayscale, but '{colour}' is a colour image; pass --preset "
                              f"imagenet for colour data")
        mean, std = channel_stats(train_set, grayscale=True)
        preset = small_preset(resolution, mean[0], std[0])
        train_set.transform = build_transform(preset, train=True)
    return preset, train_set


def _first_colour_image(ds: "ImageFolderDataset", sample: int = 64) -> Path | None:
    import numpy as np

    for i in range(0, len(ds), max(1, len(ds) // sample)):
        img = ds._decode(i)
        if img is None or img.mode in ("1", "L", "LA", "I", "F") or img.mode.startswith("I;16"):
            continue
        a = np.asarray(img.convert("RGB"), dtype=np.int16)
        if (a[..., 0] != a[..., 1]).any() or (a[..., 1] != a[..., 2]).any():
            return ds.samples[i].path
    return None


class PadCrop:
    """Shift an image by up to ``padding`` pixels: edge padding, then a random crop of the image's own size
    (any input size; on 28x28 images it draws exactly what ``RandomCrop(28, padding=2)`` draws)."""

    def __init__(self, padding: int = 2):
        self.padding = padding

    def __call__(self, img: Image.Image) -> Image.Image:
        from torchvision.transforms import v2 as T

        w, h = img.size
        return T.RandomCrop((h, w), padding=self.padding, padding_mode="edge")(img)


def channel_stats(dataset: "ImageFolderDataset", *, grayscale: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the readable images' pixels in [0, 1] (grayscale: one value, repeated 3x),
    rounded to 4 decimals: the normalisation a preset derived from the data uses."""
    import numpy as np

    n = 0
    sums = np.zeros(3)
    squares = np.zeros(3)
    for i in range(len(dataset)):
        img = dataset._decode(i)
        if img is None:
            continue
        a = np.asarray(img.convert("L" if grayscale else "RGB"), dtype=np.float64).reshape(-1, 1 if grayscale else 3)
        a /= 255.0
        sums += a.sum(0)
        squares += (a * a).sum(0)
        n += a.shape[0]
    if n == 0:
        raise DataError(f"no readable images among {len(dataset)} to measure the preprocessing mean/std from")
    mean = sums / n
    std = np.sqrt(np.maximum(squares / n - mean ** 2, 1e-12))
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(max(s, 1e-4)), 4) for s in std)


def to_8bit(im: Image.Image, path: Path) -> Image.Image:
    """An 8-bit image of ``im``: 16-bit images are scaled (/257), float images in [0, 1] or [0, 255] are scaled or
    kept; anything else raises ValueError with the reason (the image is then skipped and counted)."""
    import numpy as np

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.int64)
        hi = int(a.max()) if a.size else 0
        if a.size and int(a.min()) < 0 or hi > 65535:
            raise ValueError(f"32-bit integer pixels in [{int(a.min())}, {hi}]; convert it to 8 or 16 bits")
        return Image.fromarray((a if im.mode == "I" and hi <= 255 else np.round(a / 257.0)).astype(np.uint8), "L")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not np.isfinite(a).all() or lo < 0 or hi > 255:
            raise ValueError(f"float pixels in [{lo:g}, {hi:g}] (expected [0, 1] or [0, 255])")
        return Image.fromarray(np.round(a * (255.0 if hi <= 1.0 else 1.0)).astype(np.uint8), "L")
    return im


class _PixelBound:
    """Decode with mbquant's own size bound instead of Pillow's process-wide one (restored after)."""

    def __enter__(self):
        self.before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None

    def __exit__(self, *exc):
        Image.MAX_IMAGE_PIXELS = self.before


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
    flat = [Sample(p, -1) for p in sorted(p for p in root.iterdir() if _is_image(p))]
    if not samples and allow_unlabeled:
        samples = flat
    if not samples and flat:
        raise DataError(f"image folder '{root}' has {len(flat)} images but no class subfolders; this needs labelled "
                        f"images: one subfolder per class ('{root}/<class>/image.png')")
    if not samples:
        raise DataError(f"image folder '{root}' has no images (looked for {exts}); expected one subfolder per class"
                        + (" or a flat folder of images" if allow_unlabeled else ""))
    return samples, classes


class ImageFolderDataset(Dataset):
    """Samples from :func:`scan_folder`. Unreadable images yield ``None`` and are counted in ``skipped`` (path ->
    reason): files Pillow cannot read, images over ``max_pixels`` (decompression bombs), pixels that cannot be
    converted to 8 bits. 16-bit and float images are converted (see :func:`to_8bit`).

    ``cache=True`` keeps decoded images in memory (for small datasets trained for several epochs).
    """

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], transform: Callable, *, cache: bool = False,
                 max_pixels: int = MAX_IMAGE_PIXELS):
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform
        self.max_pixels = max_pixels
        self._cache: dict[int, Image.Image] | None = {} if cache else None
        self.skipped: dict[Path, str] = {}

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
            with _PixelBound(), Image.open(path) as im:
                w, h = im.size
                if w * h > self.max_pixels:
                    raise ValueError(f"{w}x{h} pixels, more than the bound of {self.max_pixels} (a decompression "
                                     f"bomb?); raise it with --max-image-pixels if the image is genuine")
                im.load()
                img = to_8bit(im, path).copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            self.skipped[path] = f"{type(exc).__name__}: {str(exc)[:200]}"
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
                cache: bool = False, expected_classes: Sequence[str] | None = None,
                max_pixels: int = MAX_IMAGE_PIXELS) -> ImageFolderDataset:
    """An :class:`ImageFolderDataset` for ``root`` with the preset's transform.

    ``expected_classes`` (the model's class list) must match the folder's classes when it is labelled.
    """
    samples, classes = scan_folder(root, allow_unlabeled=allow_unlabeled)
    if expected_classes is not None and classes and list(classes) != list(expected_classes):
        raise DataError(
            f"folder '{root}' has {len(classes)} classes {_short(classes)} but the model was trained on "
            f"{len(expected_classes)} classes {_short(expected_classes)}; pass a folder with the model's classes "
            f"(one subfolder per class, same names) or weights trained on this folder")
    return ImageFolderDataset(samples, classes, build_transform(preset, train=train), cache=cache,
                              max_pixels=max_pixels)


def _short(names: Sequence[str], n: int = 4) -> str:
    names = list(names)
    return "[" + ", ".join(names[:n]) + (", ..." if len(names) > n else "") + "]"
