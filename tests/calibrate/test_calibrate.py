from collections import Counter

import pytest
import torch

from mbquant import calibrate
from mbquant.calibrate import from_folder, percentile_observer, stratified_indices
from mbquant.config import QuantConfig
from mbquant.data import small_preset
from mbquant.errors import ConfigError, DataError, QuantizationError
from mbquant.mobile import table
from mbquant.models import create
from mbquant.quant.export import FloatModel


def _prepared(model, config: QuantConfig):
    spec = table.get_spec("pte-xnnpack")
    return table.load(spec).prepare(FloatModel(model, 32), table.resolve(config, spec))


def _percentile(**kwargs):
    from torchao.quantization.pt2e import HistogramObserver

    return percentile_observer(HistogramObserver)(dtype=torch.int8, quant_min=-128, quant_max=127,
                                                  qscheme=torch.per_tensor_affine, **kwargs)


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
    with pytest.raises(ConfigError, match=r"num_calib \(calibration samples\) 0 is out of range \[1, inf\]"):
        QuantConfig(num_calib=0)


def test_observer_choices_are_validated():
    with pytest.raises(ConfigError, match="observer 'kl' is not supported; choose one of: histogram, minmax"):
        QuantConfig(observer="kl")


def test_percentile_observer_clips_outliers():
    obs = _percentile(percentile=99.0)
    x = torch.cat([torch.linspace(0, 1, 10000), torch.tensor([100.0])])
    obs(x)
    lo, hi = obs._non_linear_param_search()
    assert float(lo) == 0.0 and 0.9 < float(hi) < 1.2   # the single 100.0 is clipped; 0 stays 0


@pytest.mark.parametrize("observer", ["histogram", "minmax", "percentile", "moving-average"])
def test_calibration_counts_samples_and_fills_observers(small_folder, observer):
    model = create("mobilenet_v2", num_classes=10, width_mult=0.35)
    cfg = QuantConfig(observer=observer, num_calib=30, batch_size=8)
    prepared = _prepared(model, cfg)
    cs = from_folder(small_folder, small_preset(32), cfg.num_calib)
    res = calibrate.run(prepared, cs, batch_size=cfg.batch_size)
    assert (res.samples, res.batches, res.skipped_unreadable) == (30, 4, 0)
    assert res.observers == len(calibrate.observers_of(prepared)) > 50


def test_observer_that_saw_no_data_fails():
    prepared = _prepared(create("mobilenet_v2", num_classes=10, width_mult=0.35), QuantConfig())
    with pytest.raises(QuantizationError, match=r"observers saw no data after 0 calibration samples"):
        calibrate.check_observers(prepared, 0)


def test_all_unreadable_calibration_images(tmp_path):
    (tmp_path / "c" / "x").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "c" / "x" / f"{i}.png").write_bytes(b"garbage")
    prepared = _prepared(create("mobilenet_v2", num_classes=10, width_mult=0.35), QuantConfig())
    cs = from_folder(tmp_path / "c", small_preset(32), 3)
    with pytest.raises(DataError, match=r"no readable calibration images .*\(3 unreadable; first: 0.png: "):
        calibrate.run(prepared, cs)


def test_empty_observers_are_detected():
    from mbquant.calibrate.loop import _empty

    obs = _percentile()
    assert _empty(obs)
    obs(torch.ones(3))
    assert not _empty(obs)


def test_one_percentile_rule_for_both_observer_families():
    """The eager engine's percentile observer is the same rule on torch.ao's histogram observer."""
    import torch.ao.quantization as tq

    from mbquant.calibrate.observers import PercentileRange, activation_observer

    x = torch.cat([torch.linspace(0, 1, 10000), torch.tensor([100.0])])
    ranges = []
    for ns in (None, tq):
        obs = activation_observer(QuantConfig(observer="percentile", percentile=99.0), ns, dtype=torch.quint8,
                                  qscheme=torch.per_tensor_affine, quant_min=0, quant_max=255)()
        assert isinstance(obs, PercentileRange)
        obs(x)
        ranges.append(tuple(float(v) for v in obs._non_linear_param_search()))
    assert ranges[0] == ranges[1] and ranges[0][0] == 0.0 and 0.9 < ranges[0][1] < 1.2


def test_calibration_streams_whole_batches_the_same_on_every_pass(small_folder, monkeypatch):
    """Nothing is kept between passes (memory does not grow with the set); each pass sees the same images."""
    cs = from_folder(small_folder, small_preset(32), 20, seed=0)
    calls = []
    decode = type(cs.dataset).decoded
    monkeypatch.setattr(type(cs.dataset), "decoded", lambda self, i: calls.append(i) or decode(self, i))
    first = list(cs.batches(8))
    again = torch.cat(list(cs.batches(5)))
    assert [len(b) for b in first] == [8, 8, 4] and torch.equal(torch.cat(first), again)
    assert again.shape == (20, 3, 32, 32) and len(calls) == 40 and cs.used == 20 and cs.skipped == 0
    assert cs.dataset._cache is None


def test_calibration_batches_stay_whole_when_images_are_unreadable(small_folder, tmp_path):
    import shutil

    root = tmp_path / "calib"
    shutil.copytree(small_folder, root)
    cs = from_folder(root, small_preset(32), 20, seed=0)
    for s in cs.dataset.samples[1:7:2]:
        s.path.write_bytes(b"not an image")
    sizes = [len(b) for b in cs.batches(8)]
    assert sizes == [8, 8, 1] and cs.used == 17 and cs.skipped == 3


def test_a_limited_source_reads_the_first_images_in_whole_batches(small_folder):
    calib = calibrate.from_folder(small_folder, small_preset(32), 40, seed=0)
    every = torch.cat(list(calib.batches(16)))
    for limit, sizes in ((40, [16, 16, 8]), (20, [16, 4]), (16, [16]), (1, [1]), (1000, [16, 16, 8])):
        got = list(calib.source(16, limit)())
        assert [len(b) for b in got] == sizes
        assert torch.equal(torch.cat(got), every[:limit])
        assert [len(b) for b in calib.source(16, limit)()] == sizes          # a fresh pass each call


def test_bias_correction_reads_only_the_images_it_is_given(small_folder):
    from tests.conftest import quantize_pt2e

    calib = calibrate.from_folder(small_folder, small_preset(32), 40, seed=0)
    q = quantize_pt2e(create("mobilenet_v2", num_classes=10, width_mult=0.35), 32, calib, bias_correction_images=20)
    assert q.bias_correction.samples == 20 and q.bias_correction.layers_corrected > 0
    spec = table.get_spec("pte-xnnpack")
    assert table.resolve(QuantConfig(), spec).bias_correction_images is None              # by the input resolution
    assert table.resolve(QuantConfig(num_calib=2048, bias_correction_images=2048), spec).bias_correction_images == 2048
    assert table.resolve(QuantConfig(recipe="stock"), spec).bias_correction_images is None     # no correction
    assert quantize_pt2e(create("mobilenet_v2", num_classes=10, width_mult=0.35), 32, calib).bias_correction.samples == 40
    with pytest.raises(ConfigError, match="--bias-correction-images 8 with --no-bias-correction"):
        table.resolve(QuantConfig(bias_correction=False, bias_correction_images=8), table.get_spec("pte-xnnpack"))
    with pytest.raises(ConfigError, match="QAT learns the correction"):
        table.resolve(QuantConfig(bias_correction_images=8), table.get_spec("pte-xnnpack"), qat=True)


@pytest.mark.parametrize("resolution,images", [(32, 512), (64, 512), (96, 512), (97, 502), (128, 288), (160, 185),
                                               (192, 128), (224, 128), (512, 128)])
def test_bias_correction_reads_fewer_images_only_above_96_px(resolution, images):
    """512 images up to 96 px (every shipped checkpoint), the same pixels above, never fewer than 128."""
    from mbquant.config import bias_correction_images

    assert bias_correction_images(resolution) == images
    assert bias_correction_images(resolution) * resolution ** 2 >= min(512 * 96 ** 2, 128 * resolution ** 2)


def test_quantization_at_224_px_corrects_biases_on_the_pixel_rules_images(fmnist):
    """At 224 px the pipeline's bias correction reads bias_correction_images(224) = 128 of 160 calibration images,
    with the float means recorded by the calibration pass over those same 128."""
    from mbquant.config import bias_correction_images
    from tests.conftest import quantize_pt2e

    calib = from_folder(fmnist / "train", small_preset(224), 160, seed=0)
    q = quantize_pt2e(create("mobilenet_v2", num_classes=10, width_mult=0.35), 224, calib)
    assert q.calibration.samples == 160 and q.config.bias_correction_images is None
    assert q.bias_correction.samples == bias_correction_images(224) == 128
    assert q.bias_correction.reference == "calibration pass" and q.bias_correction.layers_corrected > 0
