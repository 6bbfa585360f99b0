"""The one data layer: the contract is the only preprocessing, the slicing rule is torch's seeded permutation
reproduced torch-free, and the torch-free client picks the same images as the pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mbquant.data import imagenet_preset, small_preset
from mbquant.data.contract import apply, normalize, spec_of
from mbquant.data.dataset import eval_set, load_folder
from mbquant.data.slicing import Shuffler, check_seed, eval_indices, stratified_indices
from mbquant.errors import ConfigError


def _torchvision_eval(preset):
    """The evaluation transform mbquant used before the contract was the only preprocessing (torchvision v2)."""
    from torchvision.transforms import v2 as T

    p = preset
    steps = [T.Grayscale(num_output_channels=3), T.Resize((p.resolution, p.resolution), antialias=True)] \
        if p.kind == "small" else [T.RGB(), T.Resize(p.resize, antialias=True), T.CenterCrop(p.resolution)]
    return T.Compose([*steps, T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(p.mean), list(p.std))])


@pytest.mark.parametrize("preset", [small_preset(64), small_preset(96), imagenet_preset(56), imagenet_preset(96)],
                         ids=["small64", "small96", "imagenet56", "imagenet96"])
def test_the_contract_is_torchvisions_transform_bit_for_bit(preset, small_folder):
    """Grayscale and RGB, stretch and shorter-side-then-crop: the contract computes exactly what torchvision's
    transforms computed before it was mbquant's only preprocessing (so every figure measured then stays)."""
    rng = np.random.default_rng(0)
    images = [Image.open(p) for p in sorted(small_folder.rglob("*.png"))[:20]]
    images += [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((57, 83), (200, 130))]
    tv, spec = _torchvision_eval(preset), spec_of(preset)
    for im in images:
        assert np.array_equal(apply(im, spec), tv(im).numpy())


@pytest.mark.parametrize("preset", [small_preset(16), imagenet_preset(16)], ids=["grayscale", "rgb"])
def test_normalize_looks_up_what_torchvision_computes_for_every_level(preset):
    """The per-channel table of the 256 levels gives torchvision's ToDtype(scale=True) + Normalize, every level in
    every channel (a 16 x 16 image holds each level once, a different permutation per channel)."""
    from torchvision.transforms import v2 as T

    rng = np.random.default_rng(1)
    levels = np.stack([rng.permutation(256).astype(np.uint8).reshape(16, 16) for _ in range(3)], -1)
    spec = spec_of(preset)
    tv = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(spec.mean), list(spec.std))])
    for im in (Image.fromarray(levels), Image.fromarray(levels[..., 0])):
        rgb = im.convert("RGB")
        out = normalize(im, spec)
        assert out.dtype == np.float32 and out.shape == (3, 16, 16) and out.flags.c_contiguous
        assert np.array_equal(out, tv(rgb).numpy())


def test_datasets_apply_the_contract_and_nothing_else(small_folder):
    spec = spec_of(small_preset(32))
    ds = load_folder(small_folder, spec)
    for i in (0, 7, 50):
        x, _ = ds[i]
        assert np.array_equal(x.numpy(), apply(Image.open(ds.samples[i].path), spec))


def test_the_slicing_rule_is_torchs_seeded_permutation():
    """The selections made before the rule went torch-free (and the baselines recorded on them) stay the same."""
    for seed in (0, 1, 7, 123456, 2 ** 32 - 1):
        g, rng = torch.Generator().manual_seed(seed), Shuffler(seed)
        for n in (0, 1, 2, 10, 600, 6000):
            assert rng.permutation(n) == torch.randperm(n, generator=g).tolist(), (seed, n)
    labels = [i % 10 for i in range(1000)] + [3] * 50
    assert stratified_indices(labels, 100, 0) == _stratified_with_torch(labels, 100, 0)
    assert eval_indices(labels, None) is None and eval_indices(labels, 5000) is None


def _stratified_with_torch(labels, n, seed):
    from collections import defaultdict

    g = torch.Generator().manual_seed(seed)
    by = defaultdict(list)
    for i, lab in enumerate(labels):
        by[lab].append(i)
    queues = {c: [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()] for c, idx in sorted(by.items())}
    out, depth = [], 0
    while len(out) < n:
        for c in sorted(queues):
            if depth < len(queues[c]) and len(out) < n:
                out.append(queues[c][depth])
        depth += 1
    return sorted(out)


def test_seeds_are_32_bit():
    with pytest.raises(ConfigError, match=r"seed 1180591620717411303424 is out of range \[0, 4294967295\]"):
        check_seed(2 ** 70)
    with pytest.raises(ConfigError, match="out of range"):
        check_seed(-1)


def test_the_client_and_the_pipeline_pick_the_same_slice(fmnist):
    """`verify-arm --limit`, `check --limit` and `--eval-limit` evaluate the same images."""
    from mbquant.mobile.xnnpack.client import labelled_images

    spec = spec_of(small_preset(64))
    ds = eval_set(fmnist / "val", spec, limit=300)
    classes = sorted(p.name for p in (fmnist / "val").iterdir() if p.is_dir())
    items = labelled_images(fmnist / "val", classes, 300)
    assert [(s.path, s.label) for s in ds.samples] == items and len(items) == 300
