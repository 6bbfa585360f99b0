"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, written as an ImageFolder tree.

Needs only numpy and Pillow (``mbquant data`` imports nothing else).
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError

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


MARKER = ".complete"


def _split_done(final: Path, expected: int) -> bool:
    """Whether ``final`` is a split mbquant finished writing: its marker says ``<expected> images``."""
    marker = final / MARKER
    try:
        words = marker.read_text(errors="replace").split()
    except OSError:
        return False
    return len(words) >= 2 and words[0] == str(expected) and words[1] == "images"


def _check_dest(dest: Path, splits: dict[str, int]) -> None:
    """Refuse, before writing anything, a DEST that is a file or holds folders mbquant did not (fully) write."""
    if dest.exists() and not dest.is_dir():
        raise DataError(f"DEST '{dest}' is a file; pass a folder (it will hold DEST/train and DEST/val)")
    for split, n in splits.items():
        final = dest / split
        if not final.exists() or _split_done(final, n):
            continue
        if final.is_dir() and not any(final.iterdir()):
            continue
        why = ("its .complete marker is damaged or from an unfinished run" if (final / MARKER).exists()
               else "it holds files mbquant did not write")
        raise DataError(f"'{final}' exists and {why}; mbquant never deletes what it did not create: move it away (or "
                        f"remove it if it is a broken earlier download) or pass another DEST")


def prepare_fashion_mnist(dest: Path | str, *, source: Path = FASHION_MNIST_DIR, progress: bool = True) -> dict:
    """Write Fashion-MNIST as ``dest/train/<class>/*.png`` (60,000) and ``dest/val/<class>/*.png`` (10,000).

    Idempotent: a split mbquant completed (marker ``.complete``: "<N> images") is left as is. A DEST that holds
    anything else is refused before any work; nothing the user owns is deleted. Each split is written to a
    staging folder ``DEST/.mbquant-staging-<split>-<pid>`` and renamed when complete, under a lock
    (``DEST/.mbquant.lock``); staging folders of killed runs are removed by the next run.
    """
    from tqdm import tqdm

    from ..atomic import Lock, ensure_writable_dir, pid_alive

    dest = Path(dest)
    source = ensure_fashion_mnist_package(source)
    sizes = {split: len(_read_idx(source / f"{prefix}-labels-idx1-ubyte.gz"))
             for split, prefix in (("train", "train"), ("val", "t10k"))}
    _check_dest(dest, sizes)
    if all(_split_done(dest / split, n) for split, n in sizes.items()):
        return {"root": str(dest), "classes": list(FASHION_MNIST_CLASSES), **sizes}
    ensure_writable_dir(dest, "data folder DEST")
    counts: dict[str, int] = {}
    with Lock(dest / ".mbquant.lock", f"'{dest}'"):
        for stale in dest.glob(".mbquant-staging-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        _check_dest(dest, sizes)  # again, under the lock
        for split, prefix in (("train", "train"), ("val", "t10k")):
            final = dest / split
            if _split_done(final, sizes[split]):
                counts[split] = sizes[split]
                continue
            images = _read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
            labels = _read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
            if len(images) != len(labels):
                raise DataError(f"{prefix}: {len(images)} images but {len(labels)} labels; reinstall "
                                f"{FASHION_MNIST_PACKAGE}")
            tmp = dest / f".mbquant-staging-{split}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                for c in FASHION_MNIST_CLASSES:
                    (tmp / c).mkdir(parents=True)
                for i, (img, lab) in enumerate(tqdm(zip(images, labels), total=len(images), disable=not progress,
                                                    desc=f"fashion-mnist {split}", unit="img")):
                    Image.fromarray(img, mode="L").save(tmp / FASHION_MNIST_CLASSES[lab] / f"{i:05d}.png",
                                                        compress_level=1)
                (tmp / MARKER).write_text(f"{len(images)} images (mbquant fashion-mnist)\n")
                if final.exists():
                    final.rmdir()  # checked above: an empty folder
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            counts[split] = len(images)
    return {"root": str(dest), "classes": list(FASHION_MNIST_CLASSES), **counts}
