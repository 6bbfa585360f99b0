from collections import Counter

import pytest
import torch

from mbquant import calibrate
from mbquant.calibrate import PercentileObserver, from_folder, stratified_indices
from mbquant.config import QuantConfig
from mbquant.data import small_preset
from mbquant.errors import ConfigError, DataError, QuantizationError
from mbquant.models import create
from mbquant.quant import ptq
from mbquant.quant.targets import get_target


def test_stratified_indices_are_balanced_and_seeded():
    labels = [i % 10 for i in range(1000)]
    idx = stratified_indices(labels, 50, seed=3)
    assert len(idx) == 50 and len(set(idx)) == 50
    assert set(Counter(labels[i] for i in idx).values()) == {5}
    assert idx == stratified_indices(labels, 50, seed=3)
    assert idx != stratified_indices(labels, 50, seed=4)
    assert len(stratified_indices(labels, 5000, seed=0)) == 1000  # never more than there is


def test_calibration_set_from_imagefolder(small_folder):
    cs = from_folder(small_folder, small_preset(32), 20, seed=0)
    assert len(cs.dataset) == 20 and cs.stratified and cs.available == 120
    assert set(Counter(s.label for s in cs.dataset.samples).values()) == {2}


def test_num_calib_zero_is_rejected():
    with pytest.raises(ConfigError, match="num_calib must be a positive number of samples, got 0"):
        QuantConfig(num_calib=0)


def test_observer_choices_are_validated():
    with pytest.raises(ConfigError, match="observer 'kl' is not supported; choose one of: histogram, minmax"):
        QuantConfig(observer="kl")


def test_percentile_observer_clips_outliers():
    obs = PercentileObserver(percentile=99.0, dtype=torch.int8, quant_min=-128, quant_max=127,
                             qscheme=torch.per_tensor_affine)
    x = torch.cat([torch.linspace(0, 1, 10000), torch.tensor([100.0])])
    obs(x)
    lo, hi = obs._non_linear_param_search()
    assert float(lo) == 0.0 and 0.9 < float(hi) < 1.2   # the single 100.0 is clipped; 0 stays 0


@pytest.mark.parametrize("observer", ["histogram", "minmax", "percentile", "moving-average"])
def test_calibration_counts_samples_and_fills_observers(small_folder, observer):
    model = create("mobilenet_v2", num_classes=10, width_mult=0.35)
    cfg = QuantConfig(observer=observer, num_calib=30, batch_size=8)
    prepared = ptq.prepare(model, 32, cfg, get_target("phone"))
    cs = from_folder(small_folder, small_preset(32), cfg.num_calib)
    res = calibrate.run(prepared, cs, batch_size=cfg.batch_size)
    assert (res.samples, res.batches, res.skipped) == (30, 4, 0)
    assert res.observers == len(calibrate.observers_of(prepared)) > 50


def test_observer_that_saw_no_data_fails():
    prepared = ptq.prepare(create("mobilenet_v2", num_classes=10, width_mult=0.35), 32, QuantConfig(), get_target("phone"))
    with pytest.raises(QuantizationError, match=r"observers saw no data after 0 calibration samples"):
        calibrate.check_observers(prepared, 0)


def test_all_unreadable_calibration_images(tmp_path):
    (tmp_path / "c" / "x").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "c" / "x" / f"{i}.png").write_bytes(b"garbage")
    prepared = ptq.prepare(create("mobilenet_v2", num_classes=10, width_mult=0.35), 32, QuantConfig(), get_target("phone"))
    cs = from_folder(tmp_path / "c", small_preset(32), 3)
    with pytest.raises(DataError, match=r"no readable calibration images .*\(3 unreadable\)"):
        calibrate.run(prepared, cs)


def test_empty_observers_are_detected():
    from mbquant.calibrate.loop import _empty

    obs = PercentileObserver(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)
    assert _empty(obs)
    obs(torch.ones(3))
    assert not _empty(obs)
