"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, written as an ImageFolder tree.

Needs only numpy and Pillow (``mbquant data`` imports nothing else).
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise DataError(f"'{path}' is not an unsigned-byte IDX file (magic {magic:#x}); reinstall {FASHION_MNIST_PACKAGE}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def ensure_fashion_mnist_package(source: Path = FASHION_MNIST_DIR) -> Path:
    """Make sure the Debian package's IDX files are present, installing the package with apt-get if needed."""
    wanted = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    if all((source / w).exists() for w in wanted):
        return source
    if source != FASHION_MNIST_DIR:
        raise DataError(f"'{source}' lacks the Fashion-MNIST IDX files {wanted}; point --source at the folder that has them")
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise DataError(f"Fashion-MNIST is not installed ({source} missing) and cannot be installed here "
                        f"({'apt-get not found' if apt is None else 'not root'}); run "
                        f"`sudo apt-get install {FASHION_MNIST_PACKAGE}` and try again")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    res = subprocess.run([apt, "install", "-y", "-q", FASHION_MNIST_PACKAGE], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True)
        res = subprocess.run([apt, "install", "-y", "-q", FASHION_MNIST_PACKAGE], env=env, capture_output=True, text=True)
    if res.returncode != 0 or not all((source / w).exists() for w in wanted):
        raise DataError(f"`apt-get install {FASHION_MNIST_PACKAGE}` failed: {res.stderr.strip()[-300:]}; "
                        f"install it by hand and try again")
    return source


def prepare_fashion_mnist(dest: Path | str, *, source: Path = FASHION_MNIST_DIR, progress: bool = True) -> dict:
    """Write Fashion-MNIST as ``dest/train/<class>/*.png`` (60,000) and ``dest/val/<class>/*.png`` (10,000).

    Idempotent: a complete split is left as is. Each split is written to a temporary folder
    and renamed when complete, so an interrupted run leaves no half-written split.
    """
    from tqdm import tqdm

    dest = Path(dest)
    source = ensure_fashion_mnist_package(source)
    counts: dict[str, int] = {}
    for split, prefix in (("train", "train"), ("val", "t10k")):
        final = dest / split
        marker = final / ".complete"
        if marker.exists():
            counts[split] = int(marker.read_text().split()[0])
            continue
        images = _read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
        if len(images) != len(labels):
            raise DataError(f"{prefix}: {len(images)} images but {len(labels)} labels; reinstall {FASHION_MNIST_PACKAGE}")
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{split}.", dir=dest))
        try:
            for c in FASHION_MNIST_CLASSES:
                (tmp / c).mkdir()
            for i, (img, lab) in enumerate(tqdm(zip(images, labels), total=len(images), disable=not progress,
                                                desc=f"fashion-mnist {split}", unit="img")):
                Image.fromarray(img, mode="L").save(tmp / FASHION_MNIST_CLASSES[lab] / f"{i:05d}.png", compress_level=1)
            (tmp / ".complete").write_text(f"{len(images)} images\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        counts[split] = len(images)
    return {"root": str(dest), "classes": list(FASHION_MNIST_CLASSES), **counts}
