"""The preprocessing contract of a bundle (``preprocess.json``) and its reference implementation.

The one source of the preprocessing constants an app needs: input size and layout, colour rule, resize policy,
scale, mean and std. :func:`spec_of` writes it from a model's preset; :func:`preprocess` applies it with numpy
and Pillow only (no torch), computing exactly what mbquant's evaluation transform computes (torchvision's v2
transforms on a Pillow image: Pillow's convert and bilinear resize, then /255 and normalisation in float32).
The Android app's plain-Kotlin ``Preprocessor`` implements the same contract; a test checks both agree.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

FORMAT = "mbquant-preprocess/1"


def spec_of(preset: dict[str, Any]) -> dict[str, Any]:
    """``preprocess.json`` for a model preset (``Preset.to_dict()``)."""
    r = int(preset["resolution"])
    if preset["kind"] == "small":
        color = {"mode": "grayscale", "rule": "luma = (19595 R + 38470 G + 7471 B + 32768) >> 16 (Pillow 'L'), "
                                              "replicated to 3 channels"}
        resize = {"policy": "stretch", "size": [r, r], "filter": "bilinear (Pillow)"}
    else:
        color = {"mode": "rgb", "rule": "alpha dropped; grayscale replicated to 3 channels (Pillow 'RGB')"}
        resize = {"policy": "shorter-side-then-center-crop", "shorter_side": int(preset["resize"]), "crop": [r, r],
                  "filter": "bilinear (Pillow)"}
    return {"format": FORMAT,
            "input": {"shape": [1, 3, r, r], "layout": "NCHW", "dtype": "float32", "channel_order": "RGB"},
            "color": color, "resize": resize, "scale": 1.0 / 255.0,
            "mean": [float(m) for m in preset["mean"]], "std": [float(s) for s in preset["std"]],
            "formula": "x[c, y, x] = (pixel[c] / 255 - mean[c]) / std[c]"}


def check_spec(spec: Any) -> list[str]:
    """What is wrong with a ``preprocess.json`` (empty when it is valid)."""
    problems = []
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        return [f"format is {spec.get('format') if isinstance(spec, dict) else type(spec).__name__!r}, expected {FORMAT}"]
    shape = spec.get("input", {}).get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and shape[:2] == [1, 3] and all(isinstance(v, int) and v > 0
                                                                                      for v in shape)):
        problems.append(f"input.shape {shape!r} is not [1, 3, H, W]")
    if spec.get("color", {}).get("mode") not in ("grayscale", "rgb"):
        problems.append(f"color.mode {spec.get('color', {}).get('mode')!r} is not grayscale or rgb")
    if spec.get("resize", {}).get("policy") not in ("stretch", "shorter-side-then-center-crop"):
        problems.append(f"resize.policy {spec.get('resize', {}).get('policy')!r} is unknown")
    for key in ("mean", "std"):
        v = spec.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            problems.append(f"{key} {v!r} is not 3 numbers")
    if isinstance(spec.get("std"), list) and any(isinstance(x, (int, float)) and x <= 0 for x in spec["std"]):
        problems.append("std must be positive")
    return problems


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


def preprocess(im: Image.Image, spec: dict[str, Any]) -> np.ndarray:
    """One image as the model's input (3 x H x W float32), by the contract."""
    _, _, h, w = spec["input"]["shape"]
    if spec["color"]["mode"] == "grayscale":
        im = im.convert("L")
    else:
        im = im.convert("RGB")
    if spec["resize"]["policy"] == "stretch":
        im = im.resize((w, h), Image.BILINEAR)
    else:
        im = _center_crop(_resize_shorter(im, spec["resize"]["shorter_side"]), h, w)
    a = np.asarray(im, dtype=np.uint8)
    a = np.repeat(a[None], 3, 0) if a.ndim == 2 else a.transpose(2, 0, 1)
    x = a.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(3, 1, 1)
    return ((x - mean) / std).astype(np.float32)
