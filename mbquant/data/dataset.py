"""Labelled image datasets for torch: :class:`ImageFolderDataset` (decoded safely, preprocessed by the contract),
loaders that drop unreadable images, and training augmentation.

Evaluation and calibration images go through the contract (:func:`mbquant.data.contract.apply`) and nothing else.
Training adds augmentation in front of the contract's last steps: small (grayscale) presets shift by up to 2
pixels and flip before the stretch; ImageNet presets take a random resized crop and a flip instead of the
shorter-side resize and centre crop. Both end in the contract's normalisation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..config import check_decode_workers
from ..errors import ConfigError, DataError
from ..records.preprocess import PreprocessSpec
from . import contract
from .folders import Sample, scan_folder
from .images import MAX_IMAGE_PIXELS, Unreadable, decode
from .presets import Preset, make_preset, small_preset


class PadCrop:
    """Shift an image by up to ``padding`` pixels: edge padding, then a random crop of the image's own size
    (any input size; on 28x28 images it draws exactly what ``RandomCrop(28, padding=2)`` draws)."""

    def __init__(self, padding: int = 2):
        self.padding = padding

    def __call__(self, img: Image.Image) -> Image.Image:
        from torchvision.transforms import v2 as T

        w, h = img.size
        return T.RandomCrop((h, w), padding=self.padding, padding_mode="edge")(img)


def train_transform(spec: PreprocessSpec) -> Callable[[Image.Image], np.ndarray]:
    """Augmentation in front of the contract (see the module doc); draws from torch's global RNG."""
    from torchvision.transforms import v2 as T

    if spec.policy == "stretch":
        aug = T.Compose([PadCrop(2), T.RandomHorizontalFlip()])

        def small(im: Image.Image) -> np.ndarray:
            return contract.normalize(contract.geometry(aug(contract.color(im, spec)), spec), spec)
        return small
    crop = T.Compose([T.RandomResizedCrop((spec.height, spec.width), antialias=True), T.RandomHorizontalFlip()])

    def imagenet(im: Image.Image) -> np.ndarray:
        return contract.normalize(crop(contract.color(im, spec)), spec)
    return imagenet


def eval_transform(spec: PreprocessSpec) -> Callable[[Image.Image], np.ndarray]:
    return lambda im: contract.apply(im, spec)


class ImageFolderDataset(Dataset):
    """Samples from :func:`~mbquant.data.folders.scan_folder`, decoded with :func:`~mbquant.data.images.decode` and
    preprocessed by ``spec`` (``train``: with augmentation). Unreadable images yield ``None`` and are counted in
    ``skipped`` (path -> reason). ``cache=True`` keeps decoded images in memory (small sets trained for epochs)."""

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], spec: PreprocessSpec, *,
                 train: bool = False, cache: bool = False, max_pixels: int = MAX_IMAGE_PIXELS):
        self.samples = list(samples)
        self.classes = list(classes)
        spec = contract.as_spec(spec)
        self.spec, self.train, self.max_pixels = spec, train, max_pixels
        self.transform = train_transform(spec) if train else eval_transform(spec)
        self._cache: dict[int, Image.Image] | None = {} if cache else None
        self.skipped: dict[Path, str] = {}

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: Sequence[int] | None) -> "ImageFolderDataset":
        """The same images' subset (``None``: self), sharing nothing mutable."""
        if indices is None:
            return self
        return ImageFolderDataset([self.samples[i] for i in indices], self.classes, self.spec, train=self.train,
                                  max_pixels=self.max_pixels)

    def decoded(self, i: int) -> Image.Image | None:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        path = self.samples[i].path
        try:
            img = decode(path, self.max_pixels)
        except Unreadable as exc:
            self.skipped[path] = str(exc)
            return None
        if self._cache is not None:
            self._cache[i] = img
        return img

    def __getitem__(self, i: int):
        img = self.decoded(i)
        if img is None:
            return Skipped(self.samples[i].path, self.skipped[self.samples[i].path])
        return torch.from_numpy(self.transform(img)), self.samples[i].label

    def readable_samples(self) -> list[Sample]:
        return [s for s in self.samples if s.path not in self.skipped]


@dataclass(frozen=True)
class Skipped:
    """What ``__getitem__`` returns for an unreadable image (kept picklable: loader workers send it back)."""

    path: Path
    reason: str


def collate_skip(batch):
    """Collate that sets unreadable samples aside: ``(images, labels, skipped)``; images and labels are None when
    the whole batch was unreadable."""
    good = [b for b in batch if not isinstance(b, Skipped)]
    skipped = [b for b in batch if isinstance(b, Skipped)]
    if not good:
        return None, None, skipped
    xs, ys = zip(*good)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long), skipped


class Loader:
    """Batches ``(images, labels)`` of a dataset (None for a batch with no readable image), decoded in ``workers``
    processes when asked (0: here); the unreadable images are counted in ``dataset.skipped`` either way."""

    def __init__(self, dataset: Dataset, inner: DataLoader):
        self.dataset, self._inner = dataset, inner

    def __len__(self) -> int:
        return len(self._inner)

    def __iter__(self):
        owner = self.dataset.dataset if isinstance(self.dataset, torch.utils.data.Subset) else self.dataset
        for x, y, skipped in self._inner:
            for s in skipped:
                owner.skipped[s.path] = s.reason
            yield None if x is None else (x, y)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                sampler=None, drop_last: bool = False, workers: int = 0) -> Loader:
    """A loader that sets unreadable images aside and counts them; ``workers`` decode in other processes (the
    order of images is the same)."""
    check_decode_workers(workers)
    gen = torch.Generator().manual_seed(seed)
    inner = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                       generator=gen, collate_fn=collate_skip, num_workers=workers, drop_last=drop_last,
                       persistent_workers=False, prefetch_factor=4 if workers else None)
    return Loader(dataset, inner)


def load_folder(root: Path | str, spec: PreprocessSpec | Preset, *, train: bool = False, allow_unlabeled: bool = False,
                cache: bool = False, expected_classes: Sequence[str] | None = None,
                max_pixels: int = MAX_IMAGE_PIXELS) -> ImageFolderDataset:
    """An :class:`ImageFolderDataset` of ``root`` preprocessed by ``spec`` (a contract, or the preset it comes
    from); ``expected_classes`` (the model's class list) must equal the folder's classes when it is labelled."""
    samples, classes = scan_folder(root, allow_unlabeled=allow_unlabeled, expected_classes=expected_classes)
    return ImageFolderDataset(samples, classes, spec, train=train, cache=cache, max_pixels=max_pixels)


def _first_colour_image(ds: ImageFolderDataset, sample: int = 64) -> Path | None:
    for i in range(0, len(ds), max(1, len(ds) // sample)):
        img = ds.decoded(i)
        if img is None or img.mode in ("1", "L", "LA", "I", "F") or img.mode.startswith("I;16"):
            continue
        a = np.asarray(img.convert("RGB"), dtype=np.int16)
        if (a[..., 0] != a[..., 1]).any() or (a[..., 1] != a[..., 2]).any():
            return ds.samples[i].path
    return None


def channel_stats(dataset: ImageFolderDataset, *, grayscale: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the readable images' pixels in [0, 1] (grayscale: one value, repeated 3x),
    rounded to 4 decimals: the normalisation a preset derived from the data uses."""
    n = 0
    sums = np.zeros(3)
    squares = np.zeros(3)
    for i in range(len(dataset)):
        img = dataset.decoded(i)
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


def preset_from_data(kind: str, resolution: int, root: Path, *, max_pixels: int = MAX_IMAGE_PIXELS
                     ) -> tuple[Preset, ImageFolderDataset]:
    """A training preset that fits the images in ``root`` and the training set with it (images cached).

    ``small``: grayscale at ``resolution``, normalised with the mean/std measured on these images (Fashion-MNIST:
    0.2860/0.3530); refused for colour images. ``imagenet``: RGB with ImageNet's mean/std (pretrained-style)."""
    preset = make_preset(kind, resolution)
    train_set = load_folder(root, contract.spec_of(preset), train=True, cache=True, max_pixels=max_pixels)
    if kind == "small":
        colour = _first_colour_image(train_set)
        if colour is not None:
            raise ConfigError(f"--preset small trains on grayscale, but '{colour}' is a colour image; pass --preset "
                              f"imagenet for colour data")
        mean, std = channel_stats(train_set, grayscale=True)
        preset = small_preset(resolution, mean[0], std[0])
        train_set.spec = contract.spec_of(preset)
        train_set.transform = train_transform(train_set.spec)
    return preset, train_set


def samples_digest(ds: ImageFolderDataset) -> str:
    """:func:`~mbquant.data.folders.files_digest` of a dataset's samples."""
    from .folders import files_digest

    return files_digest((s.path, s.label) for s in ds.samples)


def eval_set(root: Path | str, spec: PreprocessSpec | Preset, *, classes: Sequence[str] | None = None,
             limit: int | None = None, seed: int = 0, max_pixels: int = MAX_IMAGE_PIXELS) -> ImageFolderDataset:
    """The labelled evaluation images of ``root`` (the model's ``classes``); with ``limit``, the seeded
    class-stratified slice every ``--limit`` of mbquant selects (:func:`~mbquant.data.slicing.eval_indices`)."""
    from .slicing import eval_indices

    ds = load_folder(root, spec, expected_classes=list(classes) if classes else None, max_pixels=max_pixels)
    if not ds.labelled:
        raise DataError(f"evaluation folder '{root}' has no class subfolders; pass a labelled ImageFolder")
    return ds.subset(eval_indices([s.label for s in ds.samples], limit, seed))
