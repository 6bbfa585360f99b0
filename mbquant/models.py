"""The model zoo: MobileNetV1 (own implementation), torchvision MobileNetV2/V3 and ResNets.

``create(name, num_classes=..., width_mult=..., weights=...)`` builds a float ``nn.Module``.
``weights`` is a local mbquant checkpoint (or plain state dict) loaded with ``weights_only=True``,
a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``) loaded through torchvision's own API,
or the name of a checkpoint shipped with mbquant (see :mod:`mbquant.checkpoints`).
"""
from __future__ import annotations

import difflib
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import MODEL_NAMES
from .data import Preset, imagenet_preset
from .errors import ModelError

CHECKPOINT_FORMAT = "mbquant-checkpoint/1"


# --------------------------------------------------------------------------- MobileNetV1

class ConvBNAct(nn.Sequential):
    """Conv2d -> BatchNorm2d -> ReLU6 (or ReLU): the unit that quantization fuses."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1, act: str = "relu6"):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True) if act == "relu6" else nn.ReLU(inplace=True),
        )


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 block: 3x3 depthwise conv-BN-act, then 1x1 pointwise conv-BN-act."""

    def __init__(self, cin: int, cout: int, stride: int, act: str = "relu6"):
        super().__init__()
        self.dw = ConvBNAct(cin, cin, 3, stride, groups=cin, act=act)
        self.pw = ConvBNAct(cin, cout, 1, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


# (output channels, stride) of the 13 depthwise-separable blocks, Table 1 of the paper
_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
              (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al., 2017) with width multiplier ``alpha`` and resolution multiplier ``rho``.

    ``rho`` does not change the weights; it sets ``default_resolution = round(224 * rho)``.
    """

    def __init__(self, num_classes: int = 1000, alpha: float = 1.0, rho: float = 1.0,
                 dropout: float = 0.001, act: str = "relu6"):
        super().__init__()
        if not 0 < alpha <= 4:
            raise ModelError(f"mobilenet_v1 width multiplier alpha={alpha} is out of range; use 0 < alpha <= 4 (e.g. 0.25, 0.5, 1.0)")
        if not 0 < rho <= 4:
            raise ModelError(f"mobilenet_v1 resolution multiplier rho={rho} is out of range; use 0 < rho <= 4 (e.g. 96/224)")
        self.alpha, self.rho = alpha, rho
        self.default_resolution = round(224 * rho)

        def ch(c: int) -> int:
            return max(8, int(c * alpha))

        layers: list[nn.Module] = [ConvBNAct(3, ch(32), 3, 2, act=act)]
        cin = ch(32)
        for cout, stride in _V1_BLOCKS:
            layers.append(DepthwiseSeparable(cin, ch(cout), stride, act=act))
            cin = ch(cout)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class ZooEntry:
    build: Callable[..., nn.Module]
    has_width: bool
    torchvision_name: str | None  # name for torchvision.models.get_model_weights


def _tv(name: str, has_width: bool) -> ZooEntry:
    def build(num_classes: int, width_mult: float, **_: Any) -> nn.Module:
        import torchvision

        kwargs: dict[str, Any] = {"num_classes": num_classes}
        if has_width:
            kwargs["width_mult"] = width_mult
        return torchvision.models.get_model(name, weights=None, **kwargs)

    return ZooEntry(build, has_width, name)


def _v1(num_classes: int, width_mult: float, rho: float = 1.0, **_: Any) -> nn.Module:
    return MobileNetV1(num_classes=num_classes, alpha=width_mult, rho=rho)


ZOO: dict[str, ZooEntry] = {
    "mobilenet_v1": ZooEntry(_v1, True, None),
    "mobilenet_v2": _tv("mobilenet_v2", True),
    "mobilenet_v3_small": _tv("mobilenet_v3_small", True),
    "mobilenet_v3_large": _tv("mobilenet_v3_large", True),
    "resnet18": _tv("resnet18", False),
    "resnet50": _tv("resnet50", False),
}


def available_models() -> list[str]:
    return list(MODEL_NAMES)


def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ModelError(f"unknown model '{name}'; available: {', '.join(ZOO)}")
    return ZOO[name]


# --------------------------------------------------------------------------- metadata

@dataclass(frozen=True)
class ModelInfo:
    """What travels with a model: how to rebuild it and how to feed it."""

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

    def to_dict(self) -> dict:
        return {"name": self.name, "num_classes": self.num_classes, "width_mult": self.width_mult,
                "resolution": self.resolution, "preset": self.preset.to_dict(), "classes": list(self.classes),
                "weights": self.weights, "weights_sha256": self.weights_sha256}


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- create / load

def create(name: str, *, num_classes: int = 1000, width_mult: float = 1.0, weights: str | Path | None = None,
           rho: float = 1.0) -> nn.Module:
    """Build a zoo model in float, optionally loading ``weights`` (see module doc)."""
    return create_with_info(name, num_classes=num_classes, width_mult=width_mult, weights=weights, rho=rho)[0]


def create_with_info(name: str, *, num_classes: int | None = None, width_mult: float = 1.0,
                     weights: str | Path | None = None, rho: float = 1.0,
                     preset: Preset | None = None) -> tuple[nn.Module, ModelInfo]:
    """``num_classes`` None: 1000 for a new model, read from the classifier of a plain state dict. ``preset``: how
    a plain state dict's model was fed (default: ImageNet's at the model's resolution); mbquant checkpoints carry
    their own."""
    entry = _entry(name)
    guess = num_classes is None
    num_classes = 1000 if guess else num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
        raise ModelError(f"num_classes={num_classes!r} is invalid; pass the number of classes of your dataset "
                         f"(1..{MAX_CLASSES}, --num-classes)")
    if not (isinstance(width_mult, (int, float)) and math.isfinite(width_mult) and 0 < width_mult <= MAX_WIDTH_MULT):
        raise ModelError(f"width_mult={width_mult!r} is invalid; pass a width multiplier in (0, {MAX_WIDTH_MULT}] "
                         f"(--width-mult, e.g. 0.35, 0.5, 1.0)")
    if not entry.has_width and width_mult != 1.0:
        raise ModelError(f"model '{name}' has no width multiplier (got width_mult={width_mult}); "
                         f"leave it at 1.0 or pick one of: {', '.join(n for n, e in ZOO.items() if e.has_width)}")
    if weights is None:
        model = entry.build(num_classes=num_classes, width_mult=width_mult, rho=rho)
        res = getattr(model, "default_resolution", 224)
        return model.eval(), ModelInfo(name, num_classes, width_mult, imagenet_preset(res))
    from .checkpoints import resolve_shipped

    shipped = resolve_shipped(str(weights))
    if shipped is not None:
        return load_checkpoint(shipped, expect_name=name)
    path = Path(weights)
    if path.suffix in (".pth", ".pt", ".ckpt", ".bin") or path.exists():
        return load_checkpoint(path, expect_name=name, num_classes=None if guess else num_classes,
                               width_mult=width_mult, rho=rho, preset=preset)
    return _load_torchvision_weights(name, entry, str(weights), num_classes, width_mult)  # 1000 unless given


def _load_torchvision_weights(name: str, entry: ZooEntry, wname: str, num_classes: int, width_mult: float):
    import torchvision

    if entry.torchvision_name is None:
        from .checkpoints import shipped_names

        close = difflib.get_close_matches(wname, shipped_names(), n=2, cutoff=0.6)
        raise ModelError(f"--weights '{wname}' is not a file or a shipped checkpoint, and model '{name}' has no "
                         f"torchvision weights; {'did you mean ' + ' or '.join(close) + '? ' if close else ''}shipped: "
                         f"{', '.join(shipped_names())}; or a checkpoint written by `mbquant train`")
    enum = torchvision.models.get_model_weights(entry.torchvision_name)
    try:
        w = enum.DEFAULT if wname == "DEFAULT" else enum[wname]
    except KeyError:
        from .checkpoints import shipped_names

        known = [*shipped_names(), "DEFAULT", *(m.name for m in enum)]
        close = difflib.get_close_matches(wname, known, n=2, cutoff=0.6)
        raise ModelError(f"--weights '{wname}' is not a file, a shipped checkpoint or a torchvision weights name for "
                         f"{name}; {'did you mean ' + ' or '.join(close) + '? ' if close else ''}shipped: "
                         f"{', '.join(shipped_names())}; torchvision: DEFAULT, {', '.join(m.name for m in enum)}; "
                         f"or a path to a .pth file") from None
    if width_mult != 1.0:
        raise ModelError(f"torchvision weights {w} exist only for width_mult=1.0 (got {width_mult}); "
                         f"train your own with `mbquant train`")
    n = len(w.meta["categories"])
    if num_classes not in (n, 1000):
        raise ModelError(f"{w} has {n} classes but num_classes={num_classes}; pass num_classes={n} and fine-tune after")
    try:
        model = torchvision.models.get_model(entry.torchvision_name, weights=w)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
        raise ModelError(f"could not load torchvision weights {w} ({type(exc).__name__}: {exc}); offline, place "
                         f"{Path(w.url).name} at {hub} (from {w.url}) or pass a local checkpoint") from exc
    t = w.transforms()
    preset = imagenet_preset(int(t.crop_size[0]))
    return model.eval(), ModelInfo(name, n, 1.0, preset, tuple(w.meta["categories"]), weights=str(w))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
MAX_WIDTH_MULT = 4.0
MAX_CLASSES = 100_000


def _read_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise ModelError(f"weights file '{path}' does not exist; pass a checkpoint written by `mbquant train`, a shipped "
                         f"checkpoint name or a torchvision weights name (IMAGENET1K_V1, DEFAULT)")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a pipe or device?)"
        raise ModelError(f"weights file '{path}' is {kind}; pass the path of a checkpoint file (.pth)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsafe globals
        text = _ANSI.sub("", str(exc))
        if "Weights only load failed" in text or "Unsupported global" in text:
            raise ModelError(f"weights file '{path}' holds pickled Python objects (a whole model?), which mbquant does not "
                             f"load because unpickling can run code; save `model.state_dict()` (or use `mbquant train`) "
                             f"and pass that file") from exc
        first = text.strip().splitlines()[0][:200] if text.strip() else ""
        raise ModelError(f"cannot read weights file '{path}' ({type(exc).__name__}: {first}); pass a checkpoint saved "
                         f"with torch.save (a state dict or `mbquant train` output)") from exc
    if not isinstance(obj, dict):
        raise ModelError(f"weights file '{path}' holds a {type(obj).__name__}, not a state dict; "
                         f"save `model.state_dict()` rather than the model object")
    return obj


def _require(ck: dict, path: Path, key: str, kinds: tuple[type, ...], what: str) -> Any:
    if key not in ck:
        raise ModelError(f"checkpoint '{path}' lacks '{key}' ({what}); it was not written by `mbquant train`: pass "
                         f"the file to --weights as a plain state dict with --width-mult and --num-classes, or retrain")
    value = ck[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise ModelError(f"checkpoint '{path}': '{key}' is {value!r} ({type(value).__name__}), expected {what}; fix or "
                         f"rewrite the checkpoint with `mbquant train`")
    return value


def _check_mbquant_checkpoint(ck: dict, path: Path) -> None:
    """Schema of an mbquant checkpoint: every key present, of its type, in a sane range (before building)."""
    name = _require(ck, path, "model", (str,), "a zoo model name")
    _entry(name)
    n = _require(ck, path, "num_classes", (int,), f"a number of classes in [1, {MAX_CLASSES}]")
    w = _require(ck, path, "width_mult", (int, float), f"a width multiplier in (0, {MAX_WIDTH_MULT}]")
    rho = ck.get("rho", 1.0)
    if not 1 <= n <= MAX_CLASSES:
        raise ModelError(f"checkpoint '{path}': num_classes {n} is out of range [1, {MAX_CLASSES}]; the file is damaged")
    if not (isinstance(w, (int, float)) and math.isfinite(w) and 0 < w <= MAX_WIDTH_MULT):
        raise ModelError(f"checkpoint '{path}': width_mult {w} is out of range (0, {MAX_WIDTH_MULT}]; the file is "
                         f"damaged")
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and 0 < rho <= 1):
        raise ModelError(f"checkpoint '{path}': rho {rho!r} is out of range (0, 1]; the file is damaged")
    _require(ck, path, "preset", (dict,), "the preprocessing preset (a dict)")
    classes = ck.get("classes", [])
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes) \
            or len(classes) not in (0, n):
        raise ModelError(f"checkpoint '{path}': 'classes' must be a list of {n} class names, got {str(classes)[:80]}")
    state = _require(ck, path, "state_dict", (dict,), "the weights (a state dict)")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"checkpoint '{path}': 'state_dict' holds non-tensor values; the file is damaged")


def _preset_of(ck: dict, path: Path) -> Preset:
    from dataclasses import fields

    d = ck["preset"]
    unknown = sorted(set(d) - {f.name for f in fields(Preset)})
    if unknown:
        raise ModelError(f"checkpoint '{path}': preset has unknown keys {unknown}; known: "
                         f"{sorted(f.name for f in fields(Preset))}; fix the file or retrain")
    try:
        return Preset.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"checkpoint '{path}': preset {d} is invalid ({exc}); fix the file or retrain") from exc


def check_finite(state: dict, path: Path) -> None:
    """Weights with NaN or infinity give meaningless outputs (10 % top-1 on 10 classes) without any error."""
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise ModelError(f"weights '{path}' hold non-finite values in '{k}' ({bad} of {v.numel()}); the training "
                             f"diverged or the file is damaged: retrain (e.g. with a lower --lr) or use another checkpoint")


def read_checkpoint_info(path: Path | str) -> dict:
    """The metadata of an mbquant checkpoint (without building the model)."""
    ck = _read_checkpoint(Path(path))
    return {k: v for k, v in ck.items() if k != "state_dict"}


def load_checkpoint(path: Path | str, *, expect_name: str | None = None, num_classes: int | None = None,
                    width_mult: float = 1.0, rho: float = 1.0,
                    preset: Preset | None = None) -> tuple[nn.Module, ModelInfo]:
    """Rebuild a model from a checkpoint. mbquant checkpoints carry their own architecture and preset;
    a plain state dict needs ``expect_name``/``num_classes``/``width_mult``."""
    path = Path(path)
    ck = _read_checkpoint(path)
    digest = file_sha256(path)
    if ck.get("format") == CHECKPOINT_FORMAT:
        _check_mbquant_checkpoint(ck, path)
        name = ck["model"]
        if expect_name is not None and name != expect_name:
            raise ModelError(f"checkpoint '{path}' holds a {name}, not a {expect_name}; "
                             f"run `mbquant ... {name}` or pass {expect_name} weights")
        model = _entry(name).build(num_classes=ck["num_classes"], width_mult=ck["width_mult"], rho=ck.get("rho", 1.0))
        info = ModelInfo(name, ck["num_classes"], ck["width_mult"], _preset_of(ck, path),
                         tuple(ck.get("classes", ())), weights=str(path), weights_sha256=digest)
        state = ck["state_dict"]
    else:
        if expect_name is None:
            raise ModelError(f"'{path}' is a plain state dict; name the model it belongs to")
        state = ck.get("state_dict", ck) if isinstance(ck.get("state_dict"), dict) else ck
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelError(f"'{path}' is neither an mbquant checkpoint nor a state dict of tensors; pass a checkpoint "
                             f"written by `mbquant train` or torch.save(model.state_dict())")
        n = num_classes if num_classes is not None else _guess_num_classes(state)
        model = _entry(expect_name).build(num_classes=n, width_mult=width_mult, rho=rho)
        res = getattr(model, "default_resolution", 224)
        info = ModelInfo(expect_name, n, width_mult, preset or imagenet_preset(res), weights=str(path),
                         weights_sha256=digest)
    check_finite(state, path)
    _load_state(model, state, path, info)
    return model.eval(), info


def _guess_num_classes(state: dict) -> int:
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    return int(tensors[-1].shape[0]) if tensors else 1000


def _load_state(model: nn.Module, state: dict, path: Path, info: ModelInfo) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    file_classes = _guess_num_classes(state)
    if not missing and not unexpected and wrong and file_classes != info.num_classes \
            and all(k.split(".")[0] == wrong[0][0].split(".")[0] for k, _, _ in wrong):
        raise ModelError(f"weights '{path}' were trained for {file_classes} classes but the model has "
                         f"{info.num_classes}; pass --num-classes {file_classes} (num_classes={file_classes} in Python)")
    if missing or unexpected or wrong:
        detail = []
        if wrong:
            k, got, want = wrong[0]
            detail.append(f"{len(wrong)} shape mismatches (first: {k} is {list(got)} in the file, {list(want)} in the model)")
        if missing:
            detail.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise ModelError(f"weights '{path}' do not fit {info.name} (width {info.width_mult:g}, {info.num_classes} "
                         f"classes): {'; '.join(detail)}; pass --width-mult and --num-classes as the weights were "
                         f"trained, or weights for this model")
    model.load_state_dict(state)


def save_checkpoint(model: nn.Module, info: ModelInfo, path: Path | str, *, recipe: dict | None = None,
                    metrics: dict | None = None, rho: float = 1.0) -> Path:
    """Write an mbquant checkpoint atomically (weights + everything needed to rebuild and feed the model)."""
    from . import __version__
    from ._io import atomic_path

    ck = {"format": CHECKPOINT_FORMAT, "model": info.name, "num_classes": info.num_classes,
          "width_mult": info.width_mult, "rho": rho, "resolution": info.resolution, "preset": info.preset.to_dict(),
          "classes": list(info.classes), "recipe": recipe or {}, "metrics": metrics or {},
          "mbquant_version": __version__,
          "state_dict": {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}}
    with atomic_path(Path(path)) as tmp:
        torch.save(ck, tmp)
    return Path(path)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, resolution: int) -> int:
    """Multiply-accumulates of one forward pass (conv and linear layers) at ``resolution``."""
    macs = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal macs
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        macs += out.numel() // out.shape[0] * k

    def lin_hook(m: nn.Linear, _inp, out):
        nonlocal macs
        macs += m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(lin_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, resolution, resolution))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return macs
