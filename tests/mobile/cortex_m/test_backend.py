"""pte-cortex-m: every op a cortex_m:: INT8 kernel, the memory report and budgets, the host reference (batched
kernels identical to ExecuTorch's), int8 input, the firmware header."""
from __future__ import annotations

import re
from types import SimpleNamespace
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mbquant.config import QuantConfig, RunConfig
from mbquant.mobile import table
from mbquant.models import load_checkpoint
from mbquant.pipeline import quantize_with
from mbquant.quant.export import FloatModel
from tests.conftest import needs

pytestmark = pytest.mark.usefixtures("one_thread")


def _backend(int8_input: bool):
    run = RunConfig(target="mcu", formats=("pte",), options={"cpu": "cortex-m4", "int8_input": int8_input})
    return table.load("pte-cortex-m", run)


def _open(backend, w):
    """What ``open`` reads of a sidecar: the written program's details."""
    return backend.open(w.path, SimpleNamespace(details=w.details))


@pytest.fixture(scope="module")
def programs(tiny_ckpt, tmp_path_factory):
    """The tiny MobileNetV1 (0.25, 32x32) quantized once, written with a float and with an int8 input."""
    from mbquant import calibrate

    root, ck = tiny_ckpt
    model, info = load_checkpoint(ck)
    calib = calibrate.from_folder(root / "train", info.preset, 32, seed=0)   # the preset's contract
    spec = table.get_spec("pte-cortex-m")
    cfg = table.resolve(QuantConfig(num_calib=32, batch_size=16), spec)
    q = quantize_with(_backend(False), FloatModel(model, info.resolution), cfg, calib)
    out = tmp_path_factory.mktemp("mcu")
    made = {}
    for int8_input in (False, True):
        backend = _backend(int8_input)
        (w,) = backend.write(q.int8, out / f"m_{int8_input}", resolution=info.resolution)
        made[int8_input] = (backend, w)
    from mbquant.data.dataset import load_folder, make_loader

    images = torch.cat([b[0] for b in make_loader(load_folder(root / "val", info.preset), 50) if b is not None])
    return q, made, images, info, out


def test_every_op_is_a_cortex_m_int8_kernel(programs):
    _, made, *_ = programs
    for backend, w in made.values():
        ops = w.details["operators"]
        assert w.details["non_int8_ops"] == [] and all(op.startswith("cortex_m::") for op in ops), ops
        assert "cortex_m::quantized_conv2d.out" in ops and "cortex_m::quantized_depthwise_conv2d.out" in ops
    assert "cortex_m::quantize_per_tensor.out" not in made[True][1].details["operators"]   # the caller quantizes


def test_memory_report_reads_the_program(programs):
    _, made, *_ = programs
    mem = made[False][1].details["memory"]
    assert mem["flash"]["program_bytes"] == made[False][1].bytes
    assert mem["flash"]["constants_by_dtype"]["char"] > 10_000 and "float" not in mem["flash"]["constants_by_dtype"]
    ram = mem["ram"]
    assert ram["input"] == {"dtype": "float", "shape": [1, 3, 32, 32], "bytes": 12288}
    assert made[True][1].details["memory"]["ram"]["input"]["bytes"] == 3072   # int8: a quarter
    assert ram["peak_live_bytes"] <= ram["arena_bytes"] and ram["peak_tensors"]


def test_best_fit_plan_never_overlaps_live_tensors(programs):
    """Re-plan the program and check every pair of tensors alive at the same time sits at disjoint offsets."""
    from executorch.exir.memory_planning import get_node_tensor_specs

    q, _, _, info, _ = programs
    from executorch.backends.cortex_m.edge_compile_config import cortex_m_edge_compile_config
    from executorch.backends.cortex_m.passes.cortex_m_pass_manager import CortexMPassManager
    from executorch.backends.cortex_m.target_config import CortexMTargetConfig
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.memory_planning import MemoryPlanningAlgorithmSuite
    from executorch.exir.passes import MemoryPlanningPass

    from mbquant.mobile.cortex_m.memory import best_fit

    x = torch.zeros(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    edge = to_edge_transform_and_lower(torch.export.export(q.int8, (x,)), compile_config=cortex_m_edge_compile_config())
    edge._edge_programs["forward"] = CortexMPassManager(
        edge.exported_program(), target_config=CortexMTargetConfig.from_target_string("cortex-m4")).transform()
    et = edge.to_executorch(ExecutorchBackendConfig(
        memory_planning_pass=MemoryPlanningPass(memory_planning_algo=MemoryPlanningAlgorithmSuite([best_fit]))))
    specs = {id(s): s for n in et.exported_program().graph_module.graph.nodes for s in get_node_tensor_specs(n)
             if s.mem_id is not None and not s.const and s.storage_base is None}
    specs = list(specs.values())
    for i, a in enumerate(specs):
        for b in specs[i + 1:]:
            if a.lifetime[1] < b.lifetime[0] or b.lifetime[1] < a.lifetime[0]:
                continue
            assert a.mem_offset + a.allocated_memory <= b.mem_offset or b.mem_offset + b.allocated_memory <= a.mem_offset
    planned = et.executorch_program.execution_plan[0].non_const_buffer_sizes[1]
    assert planned == max(s.mem_offset + s.allocated_memory for s in specs)


def test_batched_kernels_equal_executorchs_reference_implementations(programs):
    """Both run the .pte's own instructions from its bytes: mbquant's batched conv kernels and ExecuTorch's shipped
    reference implementations give the same integers."""
    from mbquant.mobile.cortex_m import HostProgram

    q, made, images, _, _ = programs
    backend, w = made[False]
    fast = _open(backend, w)
    shipped = HostProgram(w.path.read_bytes(), w.details["input_qparams"], source=str(w.path), vectorised=False)
    assert fast.operators == shipped.operators == w.details["operators"]
    x = images[:12]
    assert torch.equal(fast(x), shipped(x))
    assert torch.equal(fast(x)[3:4], fast(x[3:4]))          # a batch gives what single images give
    agree = (fast(images).argmax(1) == q.int8(images).argmax(1)).float().mean()
    assert agree >= 0.95                                    # the program is the PT2E INT8 model, on a kernel family


def test_int8_input_programs_predict_what_float_input_programs_predict(programs):
    _, made, images, *_ = programs
    (b0, w0), (b1, w1) = made[False], made[True]
    assert w1.details["input_qparams"] == w0.details["input_qparams"] and w1.details["input_qparams"]["scale"] > 0
    assert torch.equal(_open(b0, w0)(images), _open(b1, w1)(images))


def test_the_program_is_opened_from_its_bytes_and_a_damaged_one_is_refused(programs, tmp_path):
    """``open`` reads the file: a truncated or random-bytes program fails with a message that says so, and a
    sidecar of another program (other operators) is refused."""
    from mbquant.errors import VerificationError

    _, made, *_ = programs
    (backend, w), (_, w_int8) = made[False], made[True]
    cut = tmp_path / "cut.pte"
    cut.write_bytes(w.path.read_bytes()[:1000])
    with pytest.raises(VerificationError, match=r"'.*cut.pte' is not a readable ExecuTorch program .* truncated or "
                                                r"damaged"):
        backend.open(cut, SimpleNamespace(details=w.details))
    noise = tmp_path / "noise.pte"
    noise.write_bytes(bytes(range(256)) * 100)
    with pytest.raises(VerificationError, match=r"'.*noise.pte' is not an ExecuTorch program"):
        backend.open(noise, SimpleNamespace(details=w.details))
    with pytest.raises(VerificationError, match="its sidecar describes a program of"):
        backend.open(w_int8.path, SimpleNamespace(details=w.details))


def test_firmware_header_holds_the_program_and_its_contract(programs, tmp_path):
    _, made, _, info, _ = programs
    backend, w = made[True]
    (h,) = backend.companions(w.path, info, w.details)
    text = h.read_text()
    data = bytes(int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})", text.split("_pte[")[1]))
    assert data == w.path.read_bytes()
    assert re.search(r"#define M_TRUE_INPUT_INT8 1", text) and "__attribute__((aligned(16)))" in text
    assert f"INPUT_ZERO_POINT {w.details['input_qparams']['zero_point']}" in text and '"ankle_boot"' in text
    gcc = shutil.which("arm-none-eabi-gcc")
    needs("arm-none-eabi-gcc", gcc is not None, "run `make toolchains` (Debian's gcc-arm-none-eabi)")
    src = tmp_path / "use.c"
    src.write_text(f'#include "{h}"\nint main(void) {{ return (int)m_true_pte[0] + M_TRUE_PTE_SIZE; }}\n')
    subprocess.run([gcc, "-mcpu=cortex-m4", "-mthumb", "-std=c99", "-Wall", "-Werror", "-fsyntax-only", str(src)],
                   check=True)


def test_budgets_fail_naming_what_is_largest(programs):
    """--flash-kb / --ram-kb judged on the written program's memory report (a failed gate keeps only the report:
    tests/test_safety.py; a QAT run within its budgets: test_qat.py)."""
    _, made, *_ = programs
    _, w = made[False]
    run = RunConfig(target="mcu", formats=("pte",), options={"flash_kb": 8, "ram_kb": 4})
    result = SimpleNamespace(file=w.path.name, backend="pte-cortex-m", details=w.details)
    flash, ram = table.load("pte-cortex-m", run).gate_failures(result, run)
    assert re.search(r"the program is [\d,]+ B, over --flash-kb 8 \(8,192 B\); largest constants: char \[", flash)
    assert re.search(r"RAM peak .* over --ram-kb 4 \(4,096 B\); at the peak, set by \S+: \w+ \[1, 3, 32, 32\]", ram)
    assert "shrink the resolution or the width, or pass --int8-input" in ram
    assert w.details["memory"]["flash"]["program_bytes"] > 8192
    roomy = RunConfig(target="mcu", formats=("pte",), options={"flash_kb": 1e6, "ram_kb": 1e6})
    assert table.load("pte-cortex-m", roomy).gate_failures(result, roomy) == []


def test_firmware_sketch_compiles_against_the_wheels_runtime_headers(programs, tmp_path):
    """examples/mcu/main.cpp with a header mbquant wrote, syntax-checked for a Cortex-M4 (not linked: the runtime
    and CMSIS-NN for Cortex-M are not available here)."""
    gxx = shutil.which("arm-none-eabi-g++")
    needs("arm-none-eabi-g++", gxx is not None, "run `make toolchains` (Debian's gcc-arm-none-eabi)")
    import executorch

    _, made, _, info, _ = programs
    backend, w = made[True]
    pte = tmp_path / "model_int8.pte"
    shutil.copy(w.path, pte)
    (h,) = backend.companions(pte, info, w.details)
    shutil.copy(h, tmp_path / "model_pte.h")
    inc = Path(list(executorch.__path__)[0]) / "include"
    proc = subprocess.run([gxx, "-mcpu=cortex-m4", "-mthumb", "-std=c++17", "-Wall", "-Werror", "-fsyntax-only",
                           "-DC10_USING_CUSTOM_GENERATED_MACROS", f"-I{inc}",
                           f"-I{inc}/executorch/runtime/core/portable_type/c10", f"-I{tmp_path}",
                           str(Path(__file__).parents[3] / "examples" / "mcu" / "main.cpp")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


class _MobileNetV3Pieces(torch.nn.Module):
    """What MobileNetV3 adds to a Cortex-M program: hardswish after a conv and after a linear layer, and the
    squeeze-excitation gate (average pool, two 1x1 convs, hardsigmoid, a multiply broadcast over the channels),
    built from torchvision's own blocks."""

    def __init__(self):
        from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

        super().__init__()
        self.stem = Conv2dNormActivation(3, 16, stride=2, activation_layer=torch.nn.Hardswish)
        self.se = SqueezeExcitation(16, 8, scale_activation=torch.nn.Hardsigmoid)
        self.head = Conv2dNormActivation(16, 32, kernel_size=1, activation_layer=torch.nn.Hardswish)
        self.classifier = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Hardswish(), torch.nn.Linear(16, 10))

    def forward(self, x):
        x = self.head(self.se(self.stem(x)))
        return self.classifier(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_hardswish_and_the_squeeze_excitation_gate_run_as_int8_kernels(programs, tiny_ckpt, tmp_path):
    """The graph is quantized with a dynamic batch and lowered at batch 1: the SE multiply (a channel broadcast)
    is an INT8 ``quantized_mul`` like every hardswish, no float island (it was ``aten::mul.out`` in float), and the
    batched host kernels give what ExecuTorch's reference kernels give image by image."""
    from mbquant import calibrate
    from mbquant.mobile.cortex_m import HostProgram

    _, _, images, info, _ = programs
    torch.manual_seed(0)
    model = _MobileNetV3Pieces().eval()
    calib = calibrate.from_folder(tiny_ckpt[0] / "train", info.preset, 32, seed=0)
    cfg = table.resolve(QuantConfig(num_calib=32, batch_size=16), table.get_spec("pte-cortex-m"))
    backend = _backend(False)
    q = quantize_with(backend, FloatModel(model, 32), cfg, calib)
    (w,) = backend.write(q.int8, tmp_path / "v3", resolution=32)
    ops = w.details["operators"]
    assert w.details["non_int8_ops"] == [] and "aten::mul.out" not in ops, ops
    assert "cortex_m::quantized_mul.out" in ops
    fast = _open(backend, w)
    shipped = HostProgram(w.path.read_bytes(), w.details["input_qparams"], source=str(w.path), vectorised=False)
    x = images[:6]
    assert torch.equal(fast(x), torch.cat([shipped(x[i:i + 1]) for i in range(len(x))]))


def test_an_out_variant_runs_the_functional_overload_of_the_same_arguments():
    """A float op left in a --no-strict program (``aten::mul.out``) runs ``mul.Tensor``, not ``mul.default``
    (two Python numbers); a ``cortex_m::`` kernel's out variant runs its ``default``."""
    from mbquant.mobile.cortex_m.program import _functional, _ops_registered

    _ops_registered()
    mul = torch.ops.aten.mul
    assert _functional(mul, mul.out._schema, "aten::mul.out", "x") is mul.Tensor
    add = torch.ops.cortex_m.quantized_add
    assert _functional(add, add.out._schema, "cortex_m::quantized_add.out", "x") is add.default
