"""The fast quantize/dequantize give the PT2E ops' results bit for bit, and a graph using them the same outputs."""
import operator

import pytest
import torch

from mbquant.quant import fast_qdq
from mbquant.quant.ops import DEQUANTIZE_OPS, QUANTIZE_OPS, _Q
from tests.conftest import quantize_pt2e

Q, DQ = _Q.quantize_per_tensor.default, _Q.dequantize_per_tensor.default


def _values(scale: float, zp: int) -> torch.Tensor:
    """Exact half steps (where rounding decides), their float neighbours, values past both ends, and noise."""
    half = (torch.arange(-400, 400, dtype=torch.float64) + 0.5) * scale
    half = half.float()
    near = torch.cat([torch.nextafter(half, half + 1), torch.nextafter(half, half - 1)])
    noise = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 200 * scale
    return torch.cat([half, near, noise, torch.tensor([0.0, -0.0, 1e9, -1e9])]) + zp * 0.0


@pytest.mark.parametrize("scale,zp,lo,hi,dtype", [
    (0.0234567, -3, -128, 127, torch.int8), (1.0 / 255, 0, -128, 127, torch.int8), (0.1, 7, -127, 127, torch.int8),
    (3.3e-5, 100, 0, 255, torch.uint8), (0.0123, 0, -(2 ** 31), 2 ** 31 - 1, torch.int32)])
def test_same_numbers_as_the_ops(scale, zp, lo, hi, dtype):
    x = _values(scale, zp).reshape(2, -1, 1, 2)
    q = Q(x, scale, zp, lo, hi, dtype)
    fq = fast_qdq.quantize_per_tensor(x, scale, zp, lo, hi, dtype)
    assert fq.dtype == q.dtype and torch.equal(fq, q)
    own = x.clone()
    fq_ = fast_qdq.quantize_per_tensor_(own, scale, zp, lo, hi, dtype)      # in its input's buffer
    assert fq_.dtype == q.dtype and torch.equal(fq_, q) and not torch.equal(own, x)
    d = DQ(q, scale, zp, lo, hi, dtype)
    fd = fast_qdq.dequantize_per_tensor(q, scale, zp, lo, hi, dtype)
    assert fd.dtype == d.dtype and torch.equal(fd, d)
    assert torch.equal(x, _values(scale, zp).reshape(2, -1, 1, 2))         # the input is left as it was


@pytest.mark.parametrize("dtype,lo,hi", [(torch.int8, -128, 127), (torch.uint8, 0, 255), (torch.int32, -2 ** 31, 2 ** 31 - 1)])
def test_fused_pair_same_numbers(dtype, lo, hi):
    scale, zp = 0.0234567, (3 if dtype is torch.uint8 else -3)
    x = _values(scale, zp)
    want = DQ(Q(x, scale, zp, lo, hi, dtype), scale, zp, lo, hi, dtype)
    got = fast_qdq.quantize_dequantize(x, scale, zp, lo, hi, dtype)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_other_cases_run_the_op():
    x = torch.randn(64, requires_grad=True)
    with torch.enable_grad():
        y = fast_qdq.quantize_per_tensor(x, 0.05, 0, -128, 127, torch.int8)
    assert torch.equal(y, Q(x.detach(), 0.05, 0, -128, 127, torch.int8))
    xb = torch.randn(64).bfloat16()
    assert torch.equal(fast_qdq.quantize_per_tensor(xb, 0.05, 0, -128, 127, torch.int8),
                       Q(xb, 0.05, 0, -128, 127, torch.int8))
    q = torch.randint(-128, 128, (64,), dtype=torch.int8)
    out = fast_qdq.dequantize_per_tensor(q, 0.05, 3, -128, 127, torch.int8, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, DQ(q, 0.05, 3, -128, 127, torch.int8,
                                                               out_dtype=torch.bfloat16))
    with pytest.raises(Exception):                    # a dtype mismatch is the op's error, not a silent answer
        fast_qdq.dequantize_per_tensor(q, 0.05, 3, -128, 127, torch.uint8)


def test_a_converted_graph_gives_the_same_outputs(small_folder):
    from mbquant import calibrate
    from mbquant.data.contract import spec_of
    from mbquant.models import resolve_model

    model, info = resolve_model("mobilenet_v2", "mobilenet_v2_w0.35_r64_fmnist")
    calib = calibrate.from_folder(small_folder, spec_of(info.preset), 40, seed=0)
    int8 = quantize_pt2e(model, info.resolution, calib, bias_correction=False).int8
    targets = [n.target for n in int8.graph.nodes]
    fast = fast_qdq.with_fast_qdq(int8)
    assert [n.target for n in int8.graph.nodes] == targets                    # the lowered graph is untouched
    fused = [n for n in fast.graph.nodes if n.target is fast_qdq.quantize_dequantize]
    assert len(fused) > 20
    kept = {n.name for n in fast.graph.nodes}
    assert {n.name for n in int8.graph.nodes if n.target is DQ} <= kept     # per-layer SQNR finds its values by name
    left = {n.target for n in fast.graph.nodes if n.op == "call_function"} & (QUANTIZE_OPS | DEQUANTIZE_OPS)
    assert Q not in left and DQ not in left
    x = torch.cat(list(calib.batches(32)))
    with torch.no_grad():
        before = int8(x)
        assert torch.equal(fast(x), before) and before.std(0).min() > 0          # logits that differ per image
        attrs = [operator.attrgetter(n.target)(int8) for n in int8.graph.nodes if n.op == "get_attr"]
        bias = next(t for t in attrs if t.is_floating_point() and t.dim() == 1)
        bias.add_(0.5)                                                          # shared weights: both see a change
        assert torch.equal(fast(x), int8(x)) and not torch.equal(int8(x), before)
    assert fast_qdq.with_fast_qdq(torch.nn.Linear(2, 2)).__class__ is torch.nn.Linear
