"""CalibrationSet: a seeded, class-stratified subset of real images, counted in samples, decoded once."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..data import MAX_IMAGE_PIXELS, ImageFolderDataset, Preset, build_transform, make_loader, scan_folder
from ..errors import DataError


@dataclass
class CalibrationSet:
    """The images calibration (and bias correction, and QAT range init) will see.

    The images are decoded once, on first use, and kept as one tensor; ``skipped`` counts the unreadable ones.
    """

    root: Path
    dataset: ImageFolderDataset
    requested: int
    seed: int
    stratified: bool
    available: int
    _images: torch.Tensor | None = field(default=None, repr=False)

    @property
    def images(self) -> torch.Tensor:
        """Every readable selected image, decoded and preprocessed (N x 3 x H x W)."""
        if self._images is None:
            chunks = [b[0] for b in make_loader(self.dataset, 64) if b is not None]
            if not chunks:
                first = next(iter(self.dataset.skipped.items()), None)
                raise DataError(f"no readable calibration images in '{self.root}' ({len(self.dataset.skipped)} "
                                f"unreadable" + (f"; first: {first[0].name}: {first[1]}" if first else "") +
                                "); pass a folder of valid images (.jpg .jpeg .png .bmp .webp .tif)")
            self._images = torch.cat(chunks)
        return self._images

    @property
    def skipped(self) -> int:
        self.images  # noqa: B018 - decoding is what finds the unreadable files
        return len(self.dataset.skipped)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        yield from self.images.split(batch_size)

    def to_dict(self) -> dict:
        return {"root": str(self.root), "requested": self.requested, "selected": len(self.dataset),
                "available": self.available, "seed": self.seed, "stratified": self.stratified,
                "labelled": self.dataset.labelled}


def stratified_indices(labels: Sequence[int], n: int, seed: int) -> list[int]:
    """``n`` indices spread evenly over classes (round-robin over per-class shuffles), seeded."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        by_class[lab].append(i)
    queues = {c: [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()] for c, idx in sorted(by_class.items())}
    out: list[int] = []
    depth = 0
    while len(out) < n:
        progressed = False
        for c in sorted(queues):
            if depth < len(queues[c]) and len(out) < n:
                out.append(queues[c][depth])
                progressed = True
        if not progressed:
            break
        depth += 1
    return sorted(out)


def from_folder(root: Path | str, preset: Preset, num_samples: int, *, seed: int = 0,
                expected_classes: Sequence[str] | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> CalibrationSet:
    """Pick ``num_samples`` images from an ImageFolder (stratified by class) or a flat folder (seeded shuffle)."""
    root = Path(root)
    samples, classes = scan_folder(root, allow_unlabeled=True)
    if classes and expected_classes and len(classes) != len(expected_classes):
        raise DataError(f"calibration folder '{root}' has {len(classes)} classes but the model has "
                        f"{len(expected_classes)}; pass a folder of the model's classes (or a flat folder of images)")
    if classes:
        idx = stratified_indices([s.label for s in samples], num_samples, seed)
    else:
        g = torch.Generator().manual_seed(seed)
        idx = sorted(torch.randperm(len(samples), generator=g)[:num_samples].tolist())
    chosen = [samples[i] for i in idx]
    ds = ImageFolderDataset(chosen, classes, build_transform(preset, train=False), max_pixels=max_pixels)
    return CalibrationSet(root, ds, num_samples, seed, bool(classes), len(samples))
