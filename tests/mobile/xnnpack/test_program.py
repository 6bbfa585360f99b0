"""Structure and numerics of the PT2E INT8 graph and its XNNPACK program, for every zoo family."""
import pytest
import torch

from mbquant.data import load_folder, make_loader, small_preset
from mbquant.mobile.xnnpack import PteModel
from mbquant.quant.graph import summarize
from tests.mobile.xnnpack.conftest import RES, ZOO_CASES

# conv(-BN)-ReLU6 units each family must fuse: V1 has 27 (first conv + 13 dw + 13 pw), V2 35
EXPECTED_FUSED_RELU6 = {"mobilenet_v1": 27, "mobilenet_v2": 35, "mobilenet_v3_small": 0,
                        "mobilenet_v3_large": 0, "resnet18": 0}


# Every zoo model's program, one lowering each: `make test-slow`. `make test` checks MobileNetV2's structure on the
# shipped checkpoint (tests/test_pipeline.py), V3's classifier in tests/quant/test_keep_float.py, and every run's
# program against its INT8 module (parity) and its delegation (--min-delegated) on real images
CASES = [pytest.param(n, marks=pytest.mark.slow) for n in ZOO_CASES]


@pytest.mark.parametrize("name", CASES)
def test_int8_graph_structure(zoo_case, name):
    case = zoo_case(name)
    s = summarize(case.int8)
    assert s.batch_norm == 0, "BN must be folded into the convs at convert"
    assert s.fused_conv_relu6 == EXPECTED_FUSED_RELU6[name]
    assert s.unfused_relu6 == 0
    assert s.float_ops == [], f"ops left in float: {s.float_ops}"
    assert s.quantize > 0 and s.dequantize > s.quantize


@pytest.mark.parametrize("name", CASES)
def test_program_is_one_delegate_and_matches_the_int8_module(zoo_case, small_val, name):
    case = zoo_case(name)
    d = case.lowered.delegation
    assert d.delegate_calls == 1, f"expected one XNNPACK delegate call, got {d.delegate_calls}"
    assert d.ratio >= 0.99 and d.ops_outside_delegate == {}
    pte = PteModel(case.pte)
    ds = load_folder(small_val, small_preset(RES))
    x = torch.cat([b[0] for b in make_loader(ds, 25)])
    assert len(x) == 100
    # Untrained weights give near-tied logits, so compare values in units of the output's INT8 step.
    # XNNPACK's integer kernels round differently from PT2E's simulated quantization and the
    # difference drifts over depth: measured on ResNet18 here, max 5 steps, mean 0.45 step, 88 % of
    # logits within one step (the trained phone model: max 7 steps over 10,000 images). A systematic
    # error would move the mean.
    with torch.no_grad():
        steps = (case.int8(x) - pte(x)).abs() / _output_scale(case.int8)
    assert float(steps.mean()) <= 1.0
    assert float(steps.max()) <= 8.0


def _output_scale(gm) -> float:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    node = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    assert "dequantize_per_tensor" in str(node.target), "the logits leave the graph dequantized from INT8"
    return float(node.args[1])


@pytest.mark.slow   # lowers V3-small (about a minute); V3's classifier and hardswish: tests/quant/test_keep_float.py
def test_v3_hardswish_and_squeeze_excite_are_quantized_and_delegated(zoo_case):
    case = zoo_case("mobilenet_v3_small")
    counts = {}
    for n in case.int8.graph.nodes:
        if n.op == "call_function":
            counts[str(n.target)] = counts.get(str(n.target), 0) + 1
    assert counts.get("aten.hardswish_.default", 0) + counts.get("aten.hardswish.default", 0) >= 10
    assert counts["aten.hardsigmoid.default"] == 9 and counts["aten.mul.Tensor"] == 9  # 9 SE blocks
    assert summarize(case.int8).float_ops == []
    assert case.lowered.delegation.ratio == 1.0
    # inside the delegate XNNPACK runs hardswish and the decomposed hardsigmoid in fp32; the SE multiply is INT8
    islands = case.lowered.delegation.float_islands
    assert islands["hardswish"]["islands"] >= 10 and islands["add+clamp+clamp+div"]["islands"] == 9
    assert not any("mul" in k for k in islands)


def test_delegation_figures_are_executorchs_own_without_getitem(calib32):
    """delegation_of reads executorch.devtools' get_delegation_info; the figures equal a count of the lowered
    graph's nodes (tuple unpacking with getitem excluded on both sides)."""
    import operator

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from torch import nn

    from mbquant.mobile.xnnpack import delegation_of
    from tests.conftest import quantize_pt2e

    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 3, 1, 1, groups=8),
                        nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    q = quantize_pt2e(net, RES, calib32, bias_correction=False)
    ep = torch.export.export(q.int8, (torch.zeros(1, 3, RES, RES),))
    gm = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).exported_program().graph_module
    inside = outside = calls = 0
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.name.startswith("lowered_module_"):
            calls += 1
            inside += sum(1 for m in getattr(gm, n.name).original_module.graph.nodes
                          if m.op == "call_function" and m.target is not operator.getitem)
        elif n.op == "call_function" and n.target is not operator.getitem \
                and "executorch_call_delegate" not in str(n.target):
            outside += 1
    d = delegation_of(gm)
    assert (d.delegated_ops, d.outside_ops, d.delegate_calls) == (inside, outside, calls) and inside > 10
    # XNNPACK has no INT8 hardswish: it runs in fp32 inside the delegate, on the depthwise conv's 8 x 16 x 16
    # output; the other island is the logits layer the recipe keeps in float
    assert d.float_islands == {"hardswish": {"islands": 1, "fp32_values_per_image": 8 * (RES // 2) ** 2},
                               "linear": {"islands": 1, "fp32_values_per_image": 10}}
    assert d.int8_regions >= 3                  # conv+relu6, depthwise conv, the pool


def test_a_loaded_program_survives_threadpool_changes(phone_run):
    """Replacing the runtime's threadpool frees the pool every loaded XNNPACK method captured (executing such a
    method afterwards aborts the process); PteModel reloads its method then, and the pool size is restored."""
    from executorch.extension.pybindings import portable_lib

    from mbquant.mobile.xnnpack import runtime_threads

    (path,) = phone_run[0].glob("*_int8.pte")                   # the default recipe's program (64x64 input)
    pte = PteModel(path)
    x = torch.zeros(1, 3, 64, 64)
    ref = pte(x)
    before = portable_lib._threadpool_get_thread_count()
    for n in (1, 2, 1, 3):
        with runtime_threads(n):
            assert portable_lib._threadpool_get_thread_count() == n and torch.equal(pte(x), ref)
        assert torch.equal(pte(x), ref)
    assert portable_lib._threadpool_get_thread_count() == before
