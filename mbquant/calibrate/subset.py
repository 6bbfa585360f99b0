"""CalibrationSet: a seeded, class-stratified subset of real images, counted in samples, streamed: each pass decodes
the images batch by batch, so memory does not grow with the number of calibration images."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ..data.dataset import ImageFolderDataset, make_loader
from ..data.folders import scan_folder
from ..data.images import MAX_IMAGE_PIXELS
from ..data.slicing import shuffled_head, stratified_indices
from ..errors import ConfigError, DataError
from ..records.preprocess import PreprocessSpec

if TYPE_CHECKING:
    from ..config import QuantConfig
    from ..models.info import ModelInfo

__all__ = ["CalibrationSet", "calibration_set", "from_folder", "stratified_indices"]


@dataclass
class CalibrationSet:
    """The images calibration (and bias correction, equalization and QAT range init) will see.

    :meth:`batches` decodes and preprocesses them batch by batch on every pass (never all at once); after the first
    pass ``used`` and ``skipped`` say how many were readable and how many were not."""

    root: Path
    dataset: ImageFolderDataset
    requested: int
    seed: int
    stratified: bool
    available: int
    workers: int = 0
    _used: int | None = field(default=None, repr=False)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Every readable selected image, preprocessed, in batches of ``batch_size`` (the last one smaller)."""
        seen, pending = 0, []
        for b in make_loader(self.dataset, batch_size, workers=self.workers):
            if b is None:
                continue
            pending.append(b[0])
            have = sum(len(p) for p in pending)
            while have >= batch_size:      # whole batches even when some images were unreadable
                cat = torch.cat(pending)
                out, rest = cat[:batch_size], cat[batch_size:]
                pending, have = ([rest] if len(rest) else []), len(rest)
                seen += len(out)
                yield out
        if pending:
            out = torch.cat(pending)
            seen += len(out)
            yield out
        if seen == 0:
            first = next(iter(self.dataset.skipped.items()), None)
            raise DataError(f"no readable calibration images in '{self.root}' ({len(self.dataset.skipped)} "
                            f"unreadable" + (f"; first: {first[0].name}: {first[1]}" if first else "") +
                            "); pass a folder of valid images (.jpg .jpeg .png .bmp .webp .tif)")
        self._used = seen

    def source(self, batch_size: int, limit: int | None = None):
        """A callable giving a fresh pass over the batches (for stages that read them more than once); with
        ``limit``, over the first ``limit`` images only (the last batch cut)."""
        if limit is None:
            return lambda: self.batches(batch_size)

        def first() -> Iterator[torch.Tensor]:
            left = limit
            for b in self.batches(batch_size):
                if left <= 0:
                    return
                yield b[:left]
                left -= len(b)

        return first

    @property
    def images(self) -> torch.Tensor:
        """All readable selected images in one tensor (for small sets and tests; the stages stream)."""
        return torch.cat(list(self.batches(64)))

    @property
    def used(self) -> int:
        """How many images calibration sees (readable ones among those selected); counted by a pass if none ran."""
        if self._used is None:
            for _ in self.batches(64):
                pass
        return self._used

    @property
    def skipped(self) -> int:
        self.used  # noqa: B018 - a pass is what finds the unreadable files
        return len(self.dataset.skipped)

    def to_dict(self) -> dict:
        return {"root": str(self.root), "requested": self.requested, "selected": len(self.dataset),
                "available": self.available, "seed": self.seed, "stratified": self.stratified,
                "labelled": self.dataset.labelled}


def from_folder(root: Path | str, spec, num_samples: int, *, seed: int = 0,
                expected_classes: Sequence[str] | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> CalibrationSet:
    """Pick ``num_samples`` images from an ImageFolder (stratified by class) or a flat folder (seeded shuffle),
    preprocessed by the contract ``spec`` (or the preset it comes from)."""
    root = Path(root)
    samples, classes = scan_folder(root, allow_unlabeled=True)
    if classes and expected_classes and len(classes) != len(expected_classes):
        raise DataError(f"calibration folder '{root}' has {len(classes)} classes but the model has "
                        f"{len(expected_classes)}; pass a folder of the model's classes (or a flat folder of images)")
    if classes:
        idx = stratified_indices([s.label for s in samples], num_samples, seed)
    else:
        idx = shuffled_head(len(samples), num_samples, seed)
    ds = ImageFolderDataset([samples[i] for i in idx], classes, spec, max_pixels=max_pixels)   # spec or preset
    return CalibrationSet(root, ds, num_samples, seed, bool(classes), len(samples))


def calibration_set(calib: CalibrationSet | Path | str, info: "ModelInfo", config: "QuantConfig", *,
                    max_pixels: int = MAX_IMAGE_PIXELS) -> CalibrationSet:
    """``calib`` as a CalibrationSet of ``config.num_calib`` samples drawn with ``config.seed``, preprocessed by
    the model's contract."""
    from ..data.contract import spec_of

    if isinstance(calib, CalibrationSet):
        if (calib.requested, calib.seed) != (config.num_calib, config.seed):
            raise ConfigError(f"the calibration set holds {calib.requested} samples drawn with seed {calib.seed}, but "
                              f"the config asks for num_calib={config.num_calib}, seed={config.seed}; pass the folder "
                              f"instead (it is sampled from the config) or a matching set")
        return calib
    return from_folder(calib, spec_of(info.preset), config.num_calib, seed=config.seed,
                       expected_classes=list(info.classes) or None, max_pixels=max_pixels)
