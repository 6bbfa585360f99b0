"""The eager engine stages (mbquant.mobile.torchscript.engine): engine handling, per-channel weights, ReLU6, QAT."""
import pytest
import torch
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.quantized as nnq
from torch import nn

from mbquant import calibrate
from mbquant.config import QuantConfig
from mbquant.data import small_preset
from mbquant.errors import ConfigError, QuantizationError
from mbquant.mobile import table
from mbquant.mobile.torchscript import engine as eager
from mbquant.models import create
from tests.mobile.torchscript.test_fuse import nontrivial

RES = 32


def resolved(**changes) -> QuantConfig:
    """The ts-qnnpack recipe (histogram observer, ReLU6 fused) with ``changes``."""
    return table.resolve(QuantConfig(num_calib=20, batch_size=20, **changes), table.get_spec("ts-qnnpack"))


CFG = resolved()


def quantize_eager(model, calib, config, engine):
    prepared = eager.prepare(model, config, engine)
    with eager.quantized_engine(engine):
        calibrate.run(prepared, calib, batch_size=config.batch_size, to_eval=torch.nn.Module.eval)
    return eager.convert(prepared)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calib(small_folder):
    return calibrate.from_folder(small_folder, small_preset(RES), 20, seed=0)


@pytest.fixture(scope="module")
def images(calib):
    return calib.images


@pytest.fixture(scope="module")
def v2():
    torch.manual_seed(0)
    return nontrivial(create("mobilenet_v2", num_classes=10, width_mult=0.35))


@pytest.fixture(scope="module")
def quantized(v2, calib):
    cache = {}

    def get(relu6="clamp", granularity="per-channel", engine="qnnpack"):
        key = (relu6, granularity, engine)
        if key not in cache:
            cfg = resolved(granularity=granularity, fuse_relu6=relu6 == "clamp")
            cache[key] = quantize_eager(v2, calib, cfg, engine)
        return cache[key]

    return get


def test_quantized_engine_is_restored_also_on_errors():
    before = torch.backends.quantized.engine
    other = "qnnpack" if before != "qnnpack" else "x86"
    with eager.quantized_engine(other) as name:
        assert torch.backends.quantized.engine == other == name
    assert torch.backends.quantized.engine == before
    with pytest.raises(RuntimeError, match="boom"):
        with eager.quantized_engine(other):
            raise RuntimeError("boom")
    assert torch.backends.quantized.engine == before


def test_bad_engine_is_a_config_error():
    with pytest.raises(ConfigError, match="engine 'tpu' is not available.*supported: .*qnnpack"):
        with eager.quantized_engine("tpu"):
            pass
    with pytest.raises(ConfigError, match="engine 'tpu' is not supported by mbquant's eager path"):
        eager.qconfig("tpu", CFG)


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions")
def test_qnnpack_runs_per_channel_depthwise_conv_exactly():
    """The measurement behind per-channel weights on the phone engine: a depthwise conv with per-channel weights
    whose scales span three decades gives the float result on the dequantized operands to within rounding."""
    torch.manual_seed(0)
    x = torch.rand(2, 16, 9, 9) * 4 - 1
    w = torch.randn(16, 1, 3, 3) * torch.logspace(-2, 1, 16).view(-1, 1, 1, 1)
    b = torch.randn(16)
    with eager.quantized_engine("qnnpack"):
        qx = torch.quantize_per_tensor(x, 4 / 255, 64, torch.quint8)
        qw = torch.quantize_per_channel(w, w.abs().flatten(1).amax(1) / 127, torch.zeros(16, dtype=torch.long), 0,
                                        torch.qint8)
        ref = nn.functional.conv2d(qx.dequantize(), qw.dequantize(), b, padding=1, groups=16)
        conv = nnq.Conv2d(16, 16, 3, padding=1, groups=16)
        conv.set_weight_bias(qw, b)
        conv.scale, conv.zero_point = float(ref.abs().max() / 120), 128
        out = conv(qx).dequantize()
    assert (out - ref).abs().max() <= 0.51 * conv.scale


@pytest.mark.parametrize("granularity,schemes", [("per-channel", (torch.per_channel_affine, torch.per_channel_symmetric)),
                                                 ("per-tensor", (torch.per_tensor_affine, torch.per_tensor_symmetric))])
def test_weight_granularity_of_the_converted_model(quantized, granularity, schemes):
    q = quantized(granularity=granularity)
    layers = [m for m in q.modules() if isinstance(m, (nnq.Conv2d, nnq.Linear))]
    assert len(layers) == 53 and all(m.weight().qscheme() in schemes for m in layers)
    assert all(int(m.weight().int_repr().min()) >= -127 for m in layers)  # symmetric [-127, 127]
    report = eager.weight_granularity(q)
    assert report.granularity == granularity and report.per_channel_layers + report.per_tensor_layers == 53


def _relu6_outputs(q, images, cls):
    outs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outs.append(o.dequantize())) for m in q.modules() if type(m) is cls]
    with eager.quantized_engine(eager.engine_of(q)):
        q(images)
    for h in hooks:
        h.remove()
    return outs


def test_clamp_mode_quantizes_after_relu6_and_never_exceeds_six(quantized, images):
    q = quantized("clamp")
    outs = _relu6_outputs(q, images, eager.QuantizedConvReLU62d)
    assert len(outs) == 35 and not any(type(m) is nn.ReLU or "ReLU2d" in type(m).__name__ for m in q.modules())
    assert all(o.min() >= 0 and o.max() <= 6.0 + 1e-4 for o in outs)
    scales = [m.scale * (255 - m.zero_point) for m in q.modules() if type(m) is eager.QuantizedConvReLU62d]
    assert all(s <= 6.0 + 1e-4 for s in scales)  # the INT8 grid itself ends at (or before) 6


def test_separate_mode_keeps_a_quantized_relu6_that_never_exceeds_six(quantized, images):
    outs = _relu6_outputs(quantized("separate"), images, eager.QuantizedReLU6)
    assert len(outs) == 35 and all(o.min() >= 0 and o.max() <= 6.0 + 1e-4 for o in outs)
    assert max(float(o.max()) for o in outs) > 1.0


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions")
def test_relu6_is_right_on_channels_last_tensors():
    """qnnpack's quantized clamp kernel scrambles channels-last inputs on this build; relu6_any_layout does not."""
    x = torch.randn(2, 16, 5, 5) * 4
    for engine in ("qnnpack", "x86"):
        with eager.quantized_engine(engine):
            q = torch.quantize_per_tensor(x, 0.05, 128, torch.quint8).contiguous(memory_format=torch.channels_last)
            out = eager.relu6_any_layout(q).dequantize()
        assert torch.equal(out, q.dequantize().clamp(0, 6))


@pytest.mark.parametrize("relu6", ["clamp", "separate"])
def test_int8_model_tracks_the_float_model(v2, quantized, images, relu6):
    with torch.no_grad():
        ref = v2(images)
    with eager.quantized_engine("qnnpack"):
        out = quantized(relu6)(images)
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum())
    assert sqnr > 25 and (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_x86_engine_clamps_relu6_units_whose_grid_passes_six(v2, calib, images):
    import copy

    loud = copy.deepcopy(v2)
    with torch.no_grad():
        loud.features[0][0].weight.mul_(20)  # the first ReLU6 saturates: observed range [0, 6]
    q = quantize_eager(loud, calib, CFG, "x86")
    wide = [n for n, m in q.named_modules() if type(m) is eager.QuantizedConvReLU62dWide]
    assert "module.features.0.0" in wide  # a 7-bit grid for [0, 6] reaches 12 in 8-bit codes
    outs = _relu6_outputs(q, images * 3, eager.QuantizedConvReLU62dWide)
    assert max(float(o.max()) for o in outs) == pytest.approx(6.0, abs=0.05) and all(o.max() <= 6.0 + 1e-4 for o in outs)


def test_prepare_leaves_the_model_alone_and_calibration_needs_every_observer(v2, calib):
    before = {k: v.clone() for k, v in v2.state_dict().items()}
    eager.prepare(v2, CFG, "qnnpack")
    assert all(torch.equal(before[k], v) for k, v in v2.state_dict().items())

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(QuantizationError, match="1 of 3 observers saw no data after 20 calibration samples.*unused"):
        quantize_eager(Branchy().eval(), calib, CFG, "qnnpack")


def _train_step(qat, images, labels, lr=0.05):
    opt = torch.optim.SGD(qat.module.parameters(), lr=lr)
    qat.set_mode(True)
    loss = nn.functional.cross_entropy(qat.module(images), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _bn_means(module):
    return [m.bn.running_mean.clone() for m in module.modules() if isinstance(m, nniqat.ConvBn2d)]


def _act_scales(module):
    return [m.scale.clone() for n, m in module.named_modules()
            if n.endswith("activation_post_process") and hasattr(m, "scale")]


def test_eager_qat_freezes_bn_and_observers_and_converts(v2, calib, images):
    images = images[:8]
    labels = torch.arange(len(images)) % 10
    qat = eager.EagerQat(v2, CFG, "qnnpack")
    assert qat.module.training and any(type(m) is eager.QatConvBnReLU62d for m in qat.module.modules())
    assert qat.init_ranges([images]) == len(images)  # QatModel's range init works on the eager fake-quants
    assert all(float(s.min()) != 1.0 for s in _act_scales(qat.module))
    means0 = _bn_means(qat.module)
    _train_step(qat, images, labels)
    assert any(not torch.equal(a, b) for a, b in zip(means0, _bn_means(qat.module)))  # BN statistics move
    qat.freeze_bn()
    assert qat.bn_frozen
    means1, scales1 = _bn_means(qat.module), _act_scales(qat.module)
    _train_step(qat, images.flip(0), labels)
    assert all(torch.equal(a, b) for a, b in zip(means1, _bn_means(qat.module)))  # ours and torch's ConvBn frozen
    assert any(not torch.equal(a, b) for a, b in zip(scales1, _act_scales(qat.module)))  # observers still move
    qat.freeze_observers()
    scales2 = _act_scales(qat.module)
    _train_step(qat, images * 0.5, labels)
    assert all(torch.equal(a, b) for a, b in zip(scales2, _act_scales(qat.module)))
    qat.enable_fake_quant(False)
    assert all(int(m.fake_quant_enabled[0]) == 0 for m in qat.module.modules() if hasattr(m, "fake_quant_enabled"))
    qat.enable_fake_quant(True)
    with torch.no_grad():
        qat.module.eval()(images)                   # the forward's own weight scales, as training used them
    trained = [m.weight_fake_quant.scale.clone() for m in qat.module.modules() if hasattr(m, "weight_fake_quant")]
    qat.module.train()
    int8 = qat.convert()
    assert not int8.training and qat.module.training
    assert sum(type(m) is eager.QuantizedConvReLU62d for m in int8.modules()) == 35
    # each converted weight sits on the grid its fake-quantize trained on (the fused kernel's was 0.4 % off)
    weights = [m.weight() for m in int8.modules() if callable(getattr(m, "weight", None))]
    assert len(weights) == len(trained) > 35
    for w, scale in zip(weights, trained):
        got = w.q_per_channel_scales() if w.qscheme() == torch.per_channel_affine else torch.tensor([w.q_scale()])
        torch.testing.assert_close(got.float(), scale.flatten().float(), rtol=1e-6, atol=0)
    with eager.quantized_engine("qnnpack"):
        assert torch.isfinite(int8(images)).all()
