"""``preprocess.json`` (the preprocessing contract: how an image becomes the model's input tensor) and
``labels.txt`` (class names in output order). The contract is applied by :mod:`mbquant.data.contract`; the
Android app's ``PreprocessSpec``/``Preprocessor`` read the same file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import Fields, Record, RecordError

COLORS = ("grayscale", "rgb")
POLICIES = ("stretch", "shorter-side-then-center-crop")
MAX_SIDE = 4096
_COLOR_RULES = {"grayscale": "luma = (19595 R + 38470 G + 7471 B + 32768) >> 16 (Pillow 'L'), replicated to 3 "
                             "channels",
                "rgb": "alpha dropped; grayscale replicated to 3 channels (Pillow 'RGB')"}


@dataclass(frozen=True)
class PreprocessSpec(Record):
    """Input ``height`` x ``width`` (NCHW float32, RGB order), the colour rule, the resize policy (``stretch`` to the
    input size, or ``shorter-side-then-center-crop`` with ``shorter_side``), then (pixel / 255 - mean) / std."""

    height: int
    width: int
    color: str
    policy: str
    shorter_side: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    KIND = "mbquant-preprocess"
    VERSION = 1
    READS = (1,)
    WHAT = "preprocessing contract"
    FIX = "write it again with `mbquant bundle RUN_DIR --out DIR` (or fix the value)"

    def __post_init__(self) -> None:
        problems = []
        if self.color not in COLORS:
            problems.append(f"color {self.color!r} is not one of {', '.join(COLORS)}")
        if self.policy not in POLICIES:
            problems.append(f"resize policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if not all(isinstance(v, int) and 1 <= v <= MAX_SIDE for v in (self.height, self.width)):
            problems.append(f"input size {self.height}x{self.width} is not in [1, {MAX_SIDE}]")
        if self.policy == POLICIES[1] and not (isinstance(self.shorter_side, int)
                                               and max(self.height, self.width) <= self.shorter_side <= 4 * MAX_SIDE):
            problems.append(f"shorter_side {self.shorter_side!r} must be an integer >= the crop size")
        if problems:
            raise RecordError(f"invalid preprocessing contract: {'; '.join(problems)}")

    @classmethod
    def from_preset(cls, preset: Any) -> "PreprocessSpec":
        """The contract of a model preset (a ``Preset`` or its dict): small presets are grayscale, stretched;
        ImageNet presets are RGB, shorter side then a centre crop."""
        p = preset.to_dict() if hasattr(preset, "to_dict") else dict(preset)
        r = int(p["resolution"])
        if p["kind"] == "small":
            return cls(r, r, "grayscale", "stretch", None, tuple(p["mean"]), tuple(p["std"]))
        return cls(r, r, "rgb", "shorter-side-then-center-crop", int(p["resize"]), tuple(p["mean"]), tuple(p["std"]))

    @property
    def shape(self) -> list[int]:
        return [1, 3, self.height, self.width]

    def to_dict(self) -> dict[str, Any]:
        if self.policy == "stretch":
            resize = {"policy": self.policy, "size": [self.height, self.width], "filter": "bilinear (Pillow)"}
        else:
            resize = {"policy": self.policy, "shorter_side": self.shorter_side, "crop": [self.height, self.width],
                      "filter": "bilinear (Pillow)"}
        return {"input": {"shape": self.shape, "layout": "NCHW", "dtype": "float32", "channel_order": "RGB"},
                "color": {"mode": self.color, "rule": _COLOR_RULES[self.color]}, "resize": resize,
                "scale": 1.0 / 255.0, "mean": list(self.mean), "std": list(self.std),
                "formula": "x[c, y, x] = (pixel[c] / 255 - mean[c]) / std[c]"}

    @classmethod
    def from_fields(cls, f: Fields, version: int) -> "PreprocessSpec":
        shape = f.sub("input").numbers("shape", integer=True, positive=True, length=4)
        if shape[:2] != [1, 3] or max(shape[2:]) > MAX_SIDE:
            raise f.error("input.shape", shape, f"[1, 3, H, W] with H, W in [1, {MAX_SIDE}]")
        color = f.sub("color").str("mode", choices=COLORS)
        resize = f.sub("resize")
        policy = resize.str("policy", choices=POLICIES)
        shorter = None
        if policy == POLICIES[1]:
            shorter = resize.int("shorter_side", lo=max(shape[2:]), hi=4 * MAX_SIDE)
        mean = f.numbers("mean", length=3)
        std = f.numbers("std", length=3, positive=True)
        if any(abs(m) > 1e3 for m in mean) or any(s > 1e3 or s < 1e-6 for s in std):
            raise f.error("mean/std", (mean, std), "means in [-1000, 1000] and stds in [1e-6, 1000] (pixels are in "
                                                   "[0, 1] after scaling)")
        return cls(shape[2], shape[3], color, policy, shorter, tuple(float(m) for m in mean),
                   tuple(float(s) for s in std))


MAX_LABEL = 200


def read_labels(path: Path | str, *, expected: int | None = None) -> list[str]:
    """``labels.txt``: one class name per line (blank lines ignored), unique, at most :data:`MAX_LABEL`
    characters each; ``expected`` is the number of outputs of the model they name."""
    path = Path(path)
    fix = "write the bundle again with `mbquant bundle RUN_DIR --out DIR`"
    if not path.is_file():
        raise RecordError(f"labels '{path}' do not exist; {fix}")
    if path.stat().st_size > 64 << 20:
        raise RecordError(f"labels '{path}' are {path.stat().st_size:,} bytes; {fix}")
    try:
        lines = [line.strip("\r") for line in path.read_bytes().decode("utf-8").split("\n")]
    except UnicodeDecodeError as exc:
        raise RecordError(f"labels '{path}' are not UTF-8 text ({exc}); {fix}") from exc
    labels = [line for line in lines if line.strip()]
    if not labels:
        raise RecordError(f"labels '{path}' hold no class name; {fix}")
    long = next((lab for lab in labels if len(lab) > MAX_LABEL), None)
    if long is not None:
        raise RecordError(f"labels '{path}': a class name of {len(long)} characters ({long[:40]!r}...); {fix}")
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise RecordError(f"labels '{path}' name {dup[0]!r} twice; class names must be unique; {fix}")
    if expected is not None and len(labels) != expected:
        raise RecordError(f"labels '{path}' hold {len(labels)} class names but the model has {expected} outputs; the "
                          f"bundle mixes files of different models: {fix}")
    return labels


def labels_text(labels: list[str]) -> str:
    return "".join(f"{c}\n" for c in labels)
