"""The preprocessing contract applied: the ONE implementation of how an image becomes a model input.

Calibration, evaluation, ``mbquant check``, the bundle's reference client and (in Kotlin, tested equal) the Android
app all run :func:`apply` with the model's :class:`~mbquant.records.PreprocessSpec` (``preprocess.json``), so what
is measured is what the app computes, pixel for pixel. numpy and Pillow only (no torch): colour by Pillow's
``convert`` ("L" luma or "RGB"), Pillow's bilinear resize (stretch, or the shorter side then a centre crop, sizes
as torchvision computes them), then ``(pixel * (1 / 255) - mean) / std`` in float32: bit for bit what
torchvision's transforms compute, so figures measured before this module existed stay the same.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ..records.preprocess import PreprocessSpec


def spec_of(preset: Any) -> PreprocessSpec:
    """The contract of a model preset (a :class:`~mbquant.data.presets.Preset` or its dict)."""
    return PreprocessSpec.from_preset(preset)


def as_spec(preset_or_spec: Any) -> PreprocessSpec:
    """A contract given as itself or as the preset it comes from."""
    return preset_or_spec if isinstance(preset_or_spec, PreprocessSpec) else spec_of(preset_or_spec)


def color(im: Image.Image, spec: PreprocessSpec) -> Image.Image:
    return im.convert("L" if spec.color == "grayscale" else "RGB")


def _resize_shorter(im: Image.Image, shorter: int) -> Image.Image:
    """torchvision's resize of the shorter side (the longer one truncated, as it computes it)."""
    w, h = im.size
    if w <= h:
        return im.resize((shorter, int(shorter * h / w)), Image.BILINEAR)
    return im.resize((int(shorter * w / h), shorter), Image.BILINEAR)


def _center_crop(im: Image.Image, th: int, tw: int) -> Image.Image:
    w, h = im.size
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return im.crop((left, top, left + tw, top + th))


def geometry(im: Image.Image, spec: PreprocessSpec) -> Image.Image:
    if spec.policy == "stretch":
        return im.resize((spec.width, spec.height), Image.BILINEAR)
    return _center_crop(_resize_shorter(im, spec.shorter_side), spec.height, spec.width)


def normalize(im: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """3 x H x W float32: ``(pixel / 255 - mean) / std`` (a grayscale image replicated to 3 channels)."""
    a = np.asarray(im, dtype=np.uint8)
    a = np.repeat(a[None], 3, 0) if a.ndim == 2 else a.transpose(2, 0, 1)
    x = a.astype(np.float32) * np.float32(1.0 / 255.0)        # as torchvision's ToDtype(scale=True), bit for bit
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def apply(im: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """One decoded image as the model's input (3 x H x W float32), by the contract."""
    return normalize(geometry(color(im, spec), spec), spec)
