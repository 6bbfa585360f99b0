"""The one folder scanner (torch-free): an ImageFolder tree (``root/<class>/**/image``) or a flat folder of images.

Every subfolder whose name does not start with '.' is a class, in sorted order (labels are those indices); a class
folder that holds no image is an error, as in torchvision's ``ImageFolder``: it would shift every later label or
change the class count depending on which path read it. Files are sorted, so every run sees the same order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import DataError
from .images import IMAGE_EXTENSIONS, is_image


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # -1 when unlabelled


def _short(names: Sequence[str], n: int = 4) -> str:
    names = list(names)
    return "[" + ", ".join(names[:n]) + (", ..." if len(names) > n else "") + "]"


def _name(p: Path) -> str:
    """A file or folder name as text, even when it is not valid UTF-8 (shown with escapes)."""
    return p.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def scan_folder(root: Path | str, *, allow_unlabeled: bool = False,
                expected_classes: Sequence[str] | None = None) -> tuple[list[Sample], list[str]]:
    """The samples (sorted) and class names of ``root``. ``expected_classes`` (the model's classes, in output
    order) must equal the folder's class names when it is labelled."""
    root = Path(root)
    exts = " ".join(IMAGE_EXTENSIONS)
    if not root.exists():
        raise DataError(f"image folder '{root}' does not exist; pass a folder with one subfolder per class"
                        f" (e.g. prepare one with `mbquant data fashion-mnist data`)")
    if not root.is_dir():
        raise DataError(f"'{root}' is not a folder; pass a folder with one subfolder per class")
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise DataError(f"cannot list image folder '{root}': {exc.strerror}; pass a readable folder") from exc
    class_dirs = [d for d in entries if d.is_dir() and not d.name.startswith(".")]
    samples: list[Sample] = []
    classes: list[str] = []
    for d in class_dirs:
        files = sorted(p for p in d.rglob("*") if is_image(p) and not any(part.startswith(".") for part in
                                                                            p.relative_to(d).parts))
        if not files:
            raise DataError(f"class folder '{d}' holds no images (looked for {exts}); every subfolder of '{root}' is "
                            f"a class and needs images: add them, or move the folder out of '{root}'")
        samples += [Sample(p, len(classes)) for p in files]
        classes.append(_name(d))
    flat = [Sample(p, -1) for p in entries if is_image(p)]
    if not samples and allow_unlabeled:
        samples = flat
    if not samples and flat:
        raise DataError(f"image folder '{root}' has {len(flat)} images but no class subfolders; this needs labelled "
                        f"images: one subfolder per class ('{root}/<class>/image.png')")
    if not samples:
        raise DataError(f"image folder '{root}' has no images (looked for {exts}); expected one subfolder per class"
                        + (" or a flat folder of images" if allow_unlabeled else ""))
    if expected_classes is not None and classes and list(classes) != list(expected_classes):
        raise DataError(f"folder '{root}' has {len(classes)} classes {_short(classes)} but the model has "
                        f"{len(expected_classes)} classes {_short(expected_classes)}; pass a folder with the model's "
                        f"classes (one subfolder per class, same names) or weights trained on this folder")
    return samples, classes


def files_digest(items) -> str:
    """A short hash of which labelled files ``items`` of (path, label) are (name, label, size; in order): names the
    data in reports, sidecars and baselines."""
    import hashlib

    h = hashlib.sha256()
    for path, label in items:
        h.update(f"{Path(path).name}:{label}:{Path(path).stat().st_size}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]
