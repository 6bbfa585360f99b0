"""--keep-float: exactly the named layers run in fp32 on their dequantized INT8 inputs; names are validated."""
import pytest
import torch

from mbquant.errors import ConfigError
from mbquant.models import create
from mbquant.quant.export import FloatModel
from mbquant.quant.graph import summarize
from mbquant.quant.keep_float import output_layers, resolve_names
from tests.conftest import quantize_pt2e


def _int8(name, width, calib, keep):
    torch.manual_seed(0)
    model = create(name, num_classes=10, width_mult=width)
    return quantize_pt2e(model, 32, calib, keep_float=keep, observer="minmax", bias_correction=False).int8


def test_logits_keeps_only_the_classifier_of_mobilenet_v2_in_float(calib32):
    q = _int8("mobilenet_v2", 0.35, calib32, ("logits",))
    s = summarize(q)
    assert s.float_layers == ["classifier.1"]
    assert len(s.float_ops) == 1 and s.float_ops[0].startswith("linear")
    out = next(n for n in q.graph.nodes if n.op == "output").args[0][0]
    assert "linear" in str(out.target)              # logits come straight from the fp32 classifier
    assert out.args[1].op == "get_attr"              # its weights are fp32, not dequantized INT8
    assert "dequantize" in str(out.args[0].target)   # ... and it reads the dequantized INT8 features


def test_mobilenet_v3_keeps_exactly_the_last_linear_and_quantizes_the_hardswish_before_it(calib32):
    s = summarize(_int8("mobilenet_v3_small", 0.25, calib32, ("logits",)))
    assert s.float_layers == ["classifier.3"], s.float_ops   # the hardswish in classifier.1 stays INT8


def test_a_named_inner_layer_stays_float_and_its_neighbours_stay_int8(calib32):
    s = summarize(_int8("mobilenet_v2", 0.35, calib32, ("features.3.conv.1.0",)))
    assert s.float_layers == ["features.3.conv.1.0"]
    assert len(s.float_ops) == 1 and "(conv2d" in s.float_ops[0]   # the ReLU6 after it reads INT8 again


def test_names_are_validated_with_a_fix():
    model = create("mobilenet_v2", num_classes=10, width_mult=0.35)
    fm = FloatModel(model, 32)
    assert output_layers(fm.graph) == ["classifier.1"]
    assert resolve_names(("logits", "classifier.1"), model, fm.graph) == ("classifier.1",)
    with pytest.raises(ConfigError, match=r"'classifier\.2' is not a layer of MobileNetV2; did you mean classifier"):
        resolve_names(("classifier.2",), model, fm.graph)
