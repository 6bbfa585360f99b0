"""Preprocessing presets: how a model was fed when it was trained. A :class:`Preset` travels inside every mbquant
checkpoint; :func:`mbquant.data.contract.spec_of` turns it into the contract every stage applies. Torch-free."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESET_KINDS = ("imagenet", "small")
MIN_RESOLUTION, MAX_RESOLUTION = 8, 1024


@dataclass(frozen=True)
class Preset:
    """How an image file becomes a model input tensor (3 x resolution x resolution)."""

    kind: str = "imagenet"
    resolution: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: int = 256  # imagenet: shorter side before the center crop

    def __post_init__(self) -> None:
        import math

        if self.kind not in PRESET_KINDS:
            raise ConfigError(f"unknown preprocessing preset '{self.kind}'; choose one of {', '.join(PRESET_KINDS)}")
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or \
                not MIN_RESOLUTION <= self.resolution <= MAX_RESOLUTION:
            raise ConfigError(f"resolution {self.resolution!r} is out of range; use {MIN_RESOLUTION}..{MAX_RESOLUTION} "
                              f"(e.g. 64, 96, 224)")
        nums = [*self.mean, *self.std]
        if len(self.mean) != 3 or len(self.std) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                 and math.isfinite(v) for v in nums) \
                or min(self.std) <= 0:
            raise ConfigError(f"preset needs 3 finite means and 3 positive stds, got mean={self.mean} std={self.std}")
        if isinstance(self.resize, bool) or not isinstance(self.resize, int) or \
                not self.resolution <= self.resize <= 4 * MAX_RESOLUTION:
            raise ConfigError(f"preset resize {self.resize!r} must be an integer >= the resolution {self.resolution}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preset":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def imagenet_preset(resolution: int = 224, *, resize: int | None = None, mean=IMAGENET_MEAN,
                    std=IMAGENET_STD) -> Preset:
    """ImageNet-style: RGB, the shorter side to ``resize`` (default resolution / 0.875), a centre crop."""
    return Preset("imagenet", resolution, tuple(mean), tuple(std), resize=resize or round(resolution / 0.875))


def small_preset(resolution: int = 64, mean: float = 0.2860, std: float = 0.3530) -> Preset:
    """Grayscale small images (28x28 Fashion-MNIST) replicated to 3 channels at ``resolution``."""
    return Preset("small", resolution, (mean,) * 3, (std,) * 3, resize=resolution)


def make_preset(name: str, resolution: int | None = None) -> Preset:
    if name == "imagenet":
        return imagenet_preset(resolution or 224)
    if name == "small":
        return small_preset(resolution or 64)
    raise ConfigError(f"unknown preprocessing preset '{name}'; choose one of {', '.join(PRESET_KINDS)}")
