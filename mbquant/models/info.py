"""What travels with a model (torch-free): how to rebuild it and how to feed it."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..data.presets import Preset, imagenet_preset

MODEL_NAMES = ("mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet50")
MAX_WIDTH_MULT = 4.0
MAX_CLASSES = 100_000


@dataclass(frozen=True)
class ModelInfo:
    """A zoo model's name, classes, width and preprocessing preset, and where its weights came from."""

    name: str
    num_classes: int
    width_mult: float = 1.0
    preset: Preset = field(default_factory=imagenet_preset)
    classes: tuple[str, ...] = ()
    weights: str | None = None  # where the weights came from
    weights_sha256: str | None = None

    @property
    def resolution(self) -> int:
        return self.preset.resolution

    def describe(self) -> str:
        return f"{self.name} w{self.width_mult:g} {self.resolution}x{self.resolution}"

    def to_dict(self) -> dict:
        return {"name": self.name, "num_classes": self.num_classes, "width_mult": self.width_mult,
                "resolution": self.resolution, "preset": self.preset.to_dict(), "classes": list(self.classes),
                "weights": self.weights, "weights_sha256": self.weights_sha256}
