from pathlib import Path

import pytest
import torch

from mbquant import models
from mbquant.data import small_preset
from mbquant.errors import ModelError
from mbquant.models import MobileNetV1, ModelInfo, count_params, create, load_checkpoint, save_checkpoint


@pytest.mark.parametrize("name", models.available_models())
def test_forward_shape_at_default_resolution(name):
    width = 0.5 if name.startswith("mobilenet") else 1.0
    m = create(name, num_classes=7, width_mult=width)
    res = getattr(m, "default_resolution", 224)
    with torch.no_grad():
        assert m(torch.zeros(1, 3, res, res)).shape == (1, 7)


def test_mobilenet_v1_parameter_count_alpha_1():
    # 4,231,976 with BatchNorm affine parameters (the paper reports 4.2 M)
    assert count_params(create("mobilenet_v1", num_classes=1000)) == 4_231_976


def test_mobilenet_v1_width_and_resolution_multipliers():
    small = MobileNetV1(num_classes=10, alpha=0.25, rho=96 / 224)
    assert small.default_resolution == 96
    assert small.features[0][0].out_channels == 8 and small.classifier[1].in_features == 256
    assert count_params(small) < count_params(MobileNetV1(num_classes=10, alpha=0.5)) / 3
    with pytest.raises(ModelError, match="alpha=0 is out of range"):
        MobileNetV1(alpha=0)


def test_unknown_model_is_not_a_near_match():
    with pytest.raises(ModelError, match="unknown model 'mobilenet_v4'; available: mobilenet_v1, mobilenet_v2"):
        create("mobilenet_v4")


def test_resnet_has_no_width():
    with pytest.raises(ModelError, match="has no width multiplier"):
        create("resnet18", width_mult=0.5)


def test_checkpoint_round_trip(tmp_path):
    m = create("mobilenet_v2", num_classes=10, width_mult=0.35)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    info = ModelInfo("mobilenet_v2", 10, 0.35, small_preset(64), tuple("abcdefghij"))
    path = save_checkpoint(m, info, tmp_path / "m.pth", recipe={"epochs": 1})
    m2, info2 = load_checkpoint(path)
    assert info2.name == "mobilenet_v2" and info2.width_mult == 0.35 and info2.preset == small_preset(64)
    assert info2.classes == tuple("abcdefghij") and len(info2.weights_sha256) == 64
    x = torch.zeros(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m.eval()(x), m2(x))
    m3 = create("mobilenet_v2", num_classes=10, width_mult=0.35, weights=path)
    assert torch.equal(m3.state_dict()["classifier.1.weight"], m.state_dict()["classifier.1.weight"])
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file


def test_plain_state_dict_and_shape_errors(tmp_path):
    m = create("mobilenet_v2", num_classes=10, width_mult=0.5)
    torch.save(m.state_dict(), tmp_path / "sd.pth")
    ok = create("mobilenet_v2", num_classes=10, width_mult=0.5, weights=tmp_path / "sd.pth")
    assert isinstance(ok, torch.nn.Module)
    with pytest.raises(ModelError, match=r"do not fit mobilenet_v2 \(width 1, 10 classes\).*shape mismatches.*pass --width-mult"):
        create("mobilenet_v2", num_classes=10, width_mult=1.0, weights=tmp_path / "sd.pth")
    with pytest.raises(ModelError, match=r"trained for 10 classes but the model has 5; pass --num-classes 10"):
        create("mobilenet_v2", num_classes=5, width_mult=0.5, weights=tmp_path / "sd.pth")


def test_checkpoint_of_another_model(tmp_path):
    info = ModelInfo("mobilenet_v1", 10, 0.25, small_preset(96))
    path = save_checkpoint(create("mobilenet_v1", num_classes=10, width_mult=0.25), info, tmp_path / "v1.pth")
    with pytest.raises(ModelError, match="holds a mobilenet_v1, not a mobilenet_v2"):
        create("mobilenet_v2", weights=path)


def test_weights_loading_never_runs_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match=r"holds pickled Python objects \(a whole model\?\), which mbquant does not load"):
        create("mobilenet_v2", weights=tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="does not exist"):
        create("mobilenet_v2", weights=tmp_path / "missing.pth")


def test_torchvision_weights_names(monkeypatch):
    with pytest.raises(ModelError, match="'IMAGENET9K' is not a file, a shipped checkpoint or a torchvision weights "
                                         "name.*shipped: mobilenet_v1_w0.25.*torchvision: DEFAULT, IMAGENET1K_V1"):
        create("mobilenet_v2", weights="IMAGENET9K")
    with pytest.raises(ModelError, match="no torchvision weights"):
        create("mobilenet_v1", weights="IMAGENET1K_V1")

    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    import torchvision.models._api as api
    monkeypatch.setattr(api, "load_state_dict_from_url", offline, raising=False)
    with pytest.raises(ModelError, match=r"could not load torchvision weights .*offline, pass the weight file itself "
                                         r"\(--weights mobilenet_v2-b0353104.pth"):
        create("mobilenet_v2", weights="IMAGENET1K_V1")


@pytest.mark.parametrize("file,resize", [("mobilenet_v2-b0353104.pth", 256), ("mobilenet_v2-7ebf99e0.pth", 232)])
def test_torchvision_weight_files_load_offline_with_their_own_preprocessing(tmp_path, file, resize):
    """torchvision's own file (here: the right name and shapes, random values) -> the model with the weights'
    transforms (resize, crop, mean/std) and their 1000 class names; a plain state dict's flags are refused."""
    import torchvision

    from mbquant.models import resolve_model

    sd = torchvision.models.mobilenet_v2().state_dict()
    torch.save(sd, tmp_path / file)
    model, info = resolve_model("mobilenet_v2", str(tmp_path / file))
    assert (info.num_classes, len(info.classes), info.classes[0]) == (1000, 1000, "tench")
    assert (info.preset.kind, info.preset.resolution, info.preset.resize) == ("imagenet", 224, resize)
    assert info.preset.mean == (0.485, 0.456, 0.406) and len(info.weights_sha256) == 64
    assert torch.equal(model.state_dict()["classifier.1.weight"], sd["classifier.1.weight"])
    with pytest.raises(ModelError, match="carries its own width, classes and preprocessing"):
        resolve_model("mobilenet_v2", str(tmp_path / file), preset="small", resolution=64)
