import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from mbquant.data import Preset, imagenet_preset, make_preset, scan_folder, small_preset
from mbquant.data.contract import spec_of
from mbquant.data.dataset import load_folder, make_loader
from mbquant.data.fashion_mnist import FASHION_MNIST_CLASSES, prepare_fashion_mnist
from mbquant.errors import ConfigError, DataError
from tests.conftest import copy_subset


def _load(root, preset, **kw):
    return load_folder(root, spec_of(preset), **kw)


def test_prepared_fashion_mnist_counts_and_classes(fmnist):
    for split, n in (("train", 60000), ("val", 10000)):
        samples, classes = scan_folder(fmnist / split)
        assert len(samples) == n
        assert classes == sorted(FASHION_MNIST_CLASSES)
        counts = np.bincount([s.label for s in samples])
        assert (counts == n // 10).all()  # Fashion-MNIST is exactly balanced


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = (0x0800 | arr.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_prepare_from_idx_files_is_idempotent(tmp_path, fmnist):
    from mbquant.data.fashion_mnist import FASHION_MNIST_DIR, _read_idx

    src = tmp_path / "src"
    src.mkdir()
    for prefix, n in (("train", 30), ("t10k", 20)):
        imgs = _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")[:n]
        labs = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")[:n]
        _write_idx(src / f"{prefix}-images-idx3-ubyte.gz", imgs)
        _write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", labs)
    res = prepare_fashion_mnist(tmp_path / "out", source=src, progress=False)
    assert (res["train"], res["val"]) == (30, 20)
    samples, classes = scan_folder(tmp_path / "out" / "val")
    assert len(samples) == 20 and set(classes) <= set(FASHION_MNIST_CLASSES)
    first = sorted((tmp_path / "out" / "train").rglob("00000.png"))[0]
    mtime = first.stat().st_mtime_ns
    prepare_fashion_mnist(tmp_path / "out", source=src, progress=False)  # second run: nothing rewritten
    assert first.stat().st_mtime_ns == mtime


def test_prepare_rejects_folder_without_idx(tmp_path):
    with pytest.raises(DataError, match="lacks the Fashion-MNIST IDX files"):
        prepare_fashion_mnist(tmp_path / "out", source=tmp_path)


def test_presets_shapes_and_normalisation(small_folder):
    ds = _load(small_folder, small_preset(64))
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grayscale replicated
    assert -1.0 < x.min() < 0 and x.max() > 1.0                 # normalised with mean .286 std .353
    ds = _load(small_folder, imagenet_preset(96))
    assert ds[0][0].shape == (3, 96, 96)
    assert imagenet_preset(224).resize == 256
    assert Preset.from_dict(small_preset(96).to_dict()) == small_preset(96)


def test_bad_presets():
    with pytest.raises(ConfigError, match="unknown preprocessing preset 'tiny'"):
        make_preset("tiny")
    with pytest.raises(ConfigError, match="resolution 4 is out of range"):
        small_preset(4)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "nope")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match=r"class folder '.*cls' holds no images \(looked for .jpg .jpeg .png .bmp "
                                        r".webp .tif .tiff\)"):
        scan_folder(tmp_path / "empty")


def test_flat_folder_only_when_allowed(tmp_path, small_folder):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(small_folder.rglob("*.png"))[:5]:
        (flat / p.name).write_bytes(p.read_bytes())
    with pytest.raises(DataError, match="has 5 images but no class subfolders; this needs labelled images"):
        scan_folder(flat)
    samples, classes = scan_folder(flat, allow_unlabeled=True)
    assert len(samples) == 5 and classes == [] and all(s.label == -1 for s in samples)


def test_corrupt_images_are_skipped_and_counted(tmp_path, small_folder):
    root = copy_subset(small_folder, tmp_path / "imgs", 3, classes=["bag", "coat"])
    (root / "bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (root / "coat" / "notes.jpg").write_text("plain text")
    ds = _load(root, small_preset(32))
    assert len(ds) == 8
    batches = [b for b in make_loader(ds, 4) if b is not None]
    assert sum(len(b[0]) for b in batches) == 6
    assert {p.name for p in ds.skipped} == {"broken.png", "notes.jpg"}


def test_class_mismatch_is_an_error(small_folder):
    with pytest.raises(DataError, match=r"has 10 classes .* the model has 3 classes"):
        _load(small_folder, small_preset(32), expected_classes=["a", "b", "c"])


def test_an_empty_class_folder_is_refused_by_every_path(tmp_path, small_folder):
    """One scanner: an empty class folder would shift every later label (or change the class count) depending on
    which path read the folder; every path refuses it, naming the folder."""
    from mbquant import calibrate
    from mbquant.mobile.xnnpack.client import labelled_images

    root = copy_subset(small_folder, tmp_path / "imgs", 2)
    (root / "aaa-empty").mkdir()
    for call in (lambda: scan_folder(root), lambda: _load(root, small_preset(32)),
                 lambda: calibrate.from_folder(root, spec_of(small_preset(32)), 8),
                 lambda: labelled_images(root, sorted(p.name for p in root.iterdir()))):
        with pytest.raises(DataError, match=r"class folder '.*aaa-empty' holds no images"):
            call()


def test_decode_workers_give_the_same_batches_and_count_the_same_unreadable_images(tmp_path, small_folder):
    """Images decoded in worker processes: the same tensors in the same order as decoding here, and the unreadable
    ones recorded in the parent's dataset (a worker's own copy of it would lose them)."""
    from mbquant.evaluate import compare_dataset

    root = copy_subset(small_folder, tmp_path / "imgs", 6, classes=["bag", "coat", "dress"])
    (root / "bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (root / "dress" / "notes.jpg").write_text("plain text")
    here, there = _load(root, small_preset(32)), _load(root, small_preset(32))
    a = [b for b in make_loader(here, 5) if b is not None]
    b = [b for b in make_loader(there, 5, workers=2) if b is not None]
    assert len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert here.skipped == there.skipped and {p.name for p in there.skipped} == {"broken.png", "notes.jpg"}
    w = torch.randn(3, 3 * 32 * 32, generator=torch.Generator().manual_seed(0))
    preds = {"a": lambda x: x.flatten(1) @ w.T, "b": lambda x: (x.flatten(1) @ w.T).round()}
    one, two = compare_dataset(preds, _load(root, small_preset(32)), 4), compare_dataset(preds, there, 4, workers=2)
    assert one.count == two.count == 18 and torch.equal(one.labels, two.labels)
    assert all(torch.equal(one.preds[n], two.preds[n]) and torch.equal(one.margins[n], two.margins[n]) for n in preds)


def test_a_bad_number_of_decode_workers_is_refused_naming_the_flag(small_folder):
    from mbquant.config import RunConfig

    ds = _load(small_folder, small_preset(32))
    for bad in (-1, 65, 1.5, True):
        with pytest.raises(ConfigError, match=r"decode workers .* pass --decode-workers N \(0: decode in this process\)"):
            make_loader(ds, 4, workers=bad)
        with pytest.raises(ConfigError, match=r"--decode-workers"):
            RunConfig(decode_workers=bad)
