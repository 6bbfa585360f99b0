"""The one data layer: how image files become model inputs, for every stage.

    presets.py     Preset: how a model was fed (travels in checkpoints)             torch-free
    contract.py    the preprocessing contract applied (preprocess.json)             torch-free (numpy, Pillow)
    images.py      which files are images; safe decoding (bounds, 16-bit, float)    torch-free
    folders.py     the one folder scanner (ImageFolder or flat)                     torch-free
    slicing.py     the one seeded subset rule (calibration, --eval-limit, --limit)  torch-free (numpy)
    dataset.py     ImageFolderDataset, loaders, training augmentation               torch
    fashion_mnist.py   Fashion-MNIST from Debian's package -> ImageFolder          torch-free

Names are imported on first use (PEP 562), so the torch-free parts stay torch-free.
"""
from __future__ import annotations

import importlib
from typing import Any

_API = {
    "Preset": "presets", "imagenet_preset": "presets", "small_preset": "presets", "make_preset": "presets",
    "PRESET_KINDS": "presets", "IMAGENET_MEAN": "presets", "IMAGENET_STD": "presets",
    "spec_of": "contract",
    "IMAGE_EXTENSIONS": "images", "MAX_IMAGE_PIXELS": "images", "decode": "images", "Unreadable": "images",
    "Sample": "folders", "scan_folder": "folders",
    "stratified_indices": "slicing", "eval_indices": "slicing",
    "ImageFolderDataset": "dataset", "load_folder": "dataset", "make_loader": "dataset", "collate_skip": "dataset",
    "channel_stats": "dataset", "preset_from_data": "dataset", "PadCrop": "dataset",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'mbquant.data' has no attribute '{name}'")
