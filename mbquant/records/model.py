"""The model and preset sections that reports, sidecars, baselines and sweeps carry, read with validation."""
from __future__ import annotations

from ..data.presets import MAX_RESOLUTION, MIN_RESOLUTION, PRESET_KINDS, Preset
from ..errors import ConfigError
from ..models.info import MAX_CLASSES, MAX_WIDTH_MULT, MODEL_NAMES, ModelInfo
from .base import Fields


def read_preset(f: Fields) -> Preset:
    kind = f.str("kind", choices=PRESET_KINDS)
    res = f.int("resolution", lo=MIN_RESOLUTION, hi=MAX_RESOLUTION)
    mean = f.numbers("mean", length=3)
    std = f.numbers("std", length=3, positive=True)
    resize = f.int("resize", lo=res, hi=4 * MAX_RESOLUTION, optional=True) or res
    try:
        return Preset(kind, res, tuple(mean), tuple(std), resize=resize)
    except ConfigError as exc:
        raise f.error("", f.data, f"a valid preset ({exc})") from exc


def read_model(f: Fields) -> ModelInfo:
    """A ``model`` section (:meth:`ModelInfo.to_dict`): name, classes (count = names), width, preset, weights."""
    name = f.str("name", choices=MODEL_NAMES)
    n = f.int("num_classes", lo=1, hi=MAX_CLASSES)
    width = f.number("width_mult", lo=1e-6, hi=MAX_WIDTH_MULT)
    preset = read_preset(f.sub("preset"))
    if f.has("resolution") and f.int("resolution") != preset.resolution:
        raise f.error("resolution", f.data["resolution"], f"the preset's resolution {preset.resolution}")
    classes = f.strs("classes", optional=True, max_items=MAX_CLASSES) or []
    if classes and len(classes) != n:
        raise f.error("classes", f"{len(classes)} names", f"{n} class names (num_classes), or none")
    return ModelInfo(name, n, float(width), preset, tuple(classes), f.str("weights", optional=True),
                     f.hexdigest("weights_sha256", length=64, optional=True))
