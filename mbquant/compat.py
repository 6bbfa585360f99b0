"""Every private API of torch, torchao and ExecuTorch that mbquant relies on, behind one door.

Private names (a leading underscore, or a module that is not part of a package's documented surface) may be
renamed or changed by any upstream release, and some of them fail *silently* when they move: if
``HistogramObserver._non_linear_param_search`` were renamed, mbquant's percentile observer would quietly become a
histogram observer. So mbquant reaches them only through the functions below, and :data:`PROBES` holds one check
per API that exercises the behaviour mbquant depends on (not just that the name exists).
``tests/test_compat.py`` runs every probe; :func:`run_probes` names the package, its installed version and what
changed when one fails. Nothing here is imported at ``mbquant --help`` time: each function imports what it wraps
when it is called.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import types
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Iterator

# --------------------------------------------------------------------------- torch


def register_decomposed_quant_ops() -> None:
    """Register the ``quantized_decomposed`` ops PT2E graphs are made of (``torch.ops.quantized_decomposed.*``)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - importing registers the ops


def load_for_lite_interpreter(path: str):
    """The PyTorch Mobile runtime's loader (``torch.jit.mobile._load_for_lite_interpreter``)."""
    from torch.jit.mobile import _load_for_lite_interpreter

    return _load_for_lite_interpreter(path)


def save_for_lite_interpreter(script_module, path: str) -> None:
    """``ScriptModule._save_for_lite_interpreter``: the lite-interpreter (.ptl) serialisation."""
    script_module._save_for_lite_interpreter(path)


def quantized_conv_base() -> type:
    """The eager engine's quantized conv base class (``torch.ao.nn.quantized.modules.conv._ConvNd``)."""
    from torch.ao.nn.quantized.modules.conv import _ConvNd

    return _ConvNd


def qat_conv_bn_base() -> type:
    """The eager engine's QAT conv-BN base class (``torch.ao.nn.intrinsic.qat.modules.conv_fused._ConvBnNd``)."""
    from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd

    return _ConvBnNd


# --------------------------------------------------------------------------- torchao (PT2E)

ANNOTATED_FIELD = "_annotated"   # QuantizationAnnotation's flag that tells later annotators to skip a node


def annotation_key() -> str:
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    return Q_ANNOTATION_KEY


def new_annotation(**kwargs):
    """A ``QuantizationAnnotation`` marked as annotated (later annotators of a composed quantizer skip it)."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    return QuantizationAnnotation(**kwargs, **{ANNOTATED_FIELD: True})


def is_annotated(node) -> bool:
    ann = node.meta.get(annotation_key())
    return bool(ann is not None and getattr(ann, ANNOTATED_FIELD))


def mark_annotated(node) -> None:
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    key = annotation_key()
    if key not in node.meta:
        node.meta[key] = QuantizationAnnotation()
    setattr(node.meta[key], ANNOTATED_FIELD, True)


def fuse_conv_bn(graph_module) -> None:
    """Fold every BatchNorm of an exported eval graph into its conv, in place, exactly as ``prepare_pt2e`` does
    (so node names stay those of the prepared graph)."""
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    with pattern_graphs_once():
        _fuse_conv_bn_(graph_module)


def replace_batchnorm(graph_module, *, train_to_eval: bool) -> None:
    """Rewrite an exported graph's batch_norm ops between their train and eval forms, in place."""
    from torchao.quantization.pt2e.export_utils import _replace_batchnorm

    with pattern_graphs_once():
        _replace_batchnorm(graph_module, train_to_eval=train_to_eval)


def _bn_constant_positions() -> dict:
    import torch

    a = torch.ops.aten
    return {a.batch_norm.default: (6, 7), a._native_batch_norm_legit.default: (6, 7),
            a._native_batch_norm_legit_no_training.default: (5, 6), a.cudnn_batch_norm.default: (6, 7)}


def _bn_key(node) -> str | None:
    mean = node.args[3] if len(node.args) > 3 else None
    return mean.target if getattr(mean, "op", None) == "get_attr" else None


def bn_constants(graph_module) -> dict[str, tuple[float, float]]:
    """Each batch norm's (momentum, eps), keyed by its running-mean buffer.

    torchao's QAT conv-BN fusion (``prepare_qat_pt2e``) and its train/eval rewrites (``_replace_batchnorm``: "fails to
    support custom momentum and eps value") rebuild every batch_norm with PyTorch's defaults, 0.1 and 1e-5.
    torchvision's MobileNetV3 uses 0.01 and 0.001: its fake-quantized graph then computes another function than the
    float model (logits off by tens on the shipped V3-Small), and convert folds BN with the wrong eps.
    :func:`restore_mode_constants` puts the recorded values back after each rewrite."""
    positions = _bn_constant_positions()
    out = {}
    for n in graph_module.graph.nodes:
        if n.op == "call_function" and n.target in positions and _bn_key(n) is not None:
            i, j = positions[n.target]
            if len(n.args) > j:
                out[_bn_key(n)] = (float(n.args[i]), float(n.args[j]))
    return out


def _set_bn_constants(graph_module, constants: dict[str, tuple[float, float]]) -> int:
    """Give every batch_norm of ``graph_module`` the momentum and eps :func:`bn_constants` recorded for its running
    mean, and the ``running_var + eps`` of the QAT conv-BN pattern its eps; returns how many ops changed (the caller
    recompiles)."""
    import torch

    positions = _bn_constant_positions()
    adds = {torch.ops.aten.add.Tensor, torch.ops.aten.add.Scalar}
    changed = 0
    for n in graph_module.graph.nodes:
        if n.op != "call_function" or n.target not in positions or _bn_key(n) not in constants:
            continue
        i, j = positions[n.target]
        if len(n.args) <= j:
            continue
        momentum, eps = constants[_bn_key(n)]
        if (n.args[i], n.args[j]) != (momentum, eps):
            args = list(n.args)
            args[i], args[j] = momentum, eps
            n.args = tuple(args)
            changed += 1
        # the QAT conv-BN pattern scales the conv weight by weight / sqrt(running_var + eps), eps a literal too
        for u in list(n.args[4].users) if hasattr(n.args[4], "users") else []:
            if u.op == "call_function" and u.target in adds and len(u.args) == 2 and u.args[0] is n.args[4] \
                    and isinstance(u.args[1], float) and u.args[1] != eps:
                u.args = (u.args[0], eps)
                changed += 1
    return changed


def _dropout_ops() -> set:
    import torch

    a = torch.ops.aten
    return {a.dropout.default, a.dropout_.default, a.native_dropout.default}


def _dropouts(graph_module) -> list:
    return [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target in _dropout_ops()
            and len(n.args) > 1 and isinstance(n.args[1], float)]


@dataclass(frozen=True)
class ModeConstants:
    """What torchao's train/eval rewrites reset and mbquant puts back after each: every batch norm's (momentum,
    eps) by its running-mean buffer (:func:`bn_constants`), every dropout's p in graph order (the rewrite writes
    0.5; torchvision's MobileNets use 0.2). Open upstream: pytorch/ao#4107, pull requests #4758 and #4790."""

    bn: dict[str, tuple[float, float]]
    dropout: tuple[float, ...]


def mode_constants(graph_module) -> ModeConstants:
    return ModeConstants(bn_constants(graph_module), tuple(float(n.args[1]) for n in _dropouts(graph_module)))


def restore_mode_constants(graph_module, constants: ModeConstants) -> int:
    """Put ``constants`` back into ``graph_module`` (after a torchao rewrite); returns how many ops changed."""
    changed = _set_bn_constants(graph_module, constants.bn)
    drops = _dropouts(graph_module)
    if constants.dropout and len(drops) != len(constants.dropout):
        raise RuntimeError(f"the graph has {len(drops)} dropout ops, {len(constants.dropout)} were recorded: "
                           f"a rewrite added or removed some; their probabilities cannot be restored")
    for n, p in zip(drops, constants.dropout):
        if n.args[1] != p:
            n.args = (n.args[0], p, *n.args[2:])
            changed += 1
    if changed:
        graph_module.recompile()
    return changed


TORCHAO_FOLD_EPS = 1e-5   # the eps torchao's QAT conv-BN fold (convert_pt2e) writes into the BN it folds


def eps_into_running_var(graph_module, constants: dict[str, tuple[float, float]]) -> int:
    """Before ``convert_pt2e`` folds a QAT graph's BN into its convs: its fold rebuilds each conv-BN with eps
    ``TORCHAO_FOLD_EPS`` and folds with that. Move each BN's own eps into its running variance (``running_var +
    eps - TORCHAO_FOLD_EPS``, the same ``sqrt(running_var + eps)``) and give the graph that eps, so the folded weights
    and biases are the float model's. Eval-mode arithmetic is unchanged; the graph is for converting only after
    this. Returns how many BNs moved."""
    import torch

    positions = _bn_constant_positions()
    moved = 0
    for n in graph_module.graph.nodes:
        key = _bn_key(n) if n.op == "call_function" and n.target in positions else None
        if key is None or key not in constants or constants[key][1] == TORCHAO_FOLD_EPS:
            continue
        var = n.args[4]
        buf = graph_module.get_buffer(var.target) if var.op == "get_attr" else None
        if buf is None:
            continue
        with torch.no_grad():
            buf.add_(constants[key][1] - TORCHAO_FOLD_EPS)
        constants = {**constants, key: (constants[key][0], TORCHAO_FOLD_EPS)}
        moved += 1
    if _set_bn_constants(graph_module, constants):
        graph_module.recompile()
    return moved


def exported_training(graph_module) -> bool:
    """Whether an exported graph is in train mode (torchao records it in a private attribute)."""
    from torchao.quantization.pt2e.export_utils import _EXPORTED_TRAINING_ATTR

    return bool(getattr(graph_module, _EXPORTED_TRAINING_ATTR, True))


PATTERN_EXPORT = "_get_aten_graph_module_for_pattern"   # torchao's torch.export of one pattern its passes match
# torchao's modules that call it (imported first, so that none binds the memo while it is active); a backend's
# quantizer module that imports it by name is already loaded when its quantizer is built, and is found by scanning
PATTERN_USERS = ("torchao.quantization.pt2e.utils", "torchao.quantization.pt2e.export_utils",
                 "torchao.quantization.pt2e.qat_utils", "torchao.quantization.pt2e.reference_representation_rewrite")
_PATTERN_GRAPHS: dict[tuple, Any] = {}   # a memo of a pure function: pattern key -> its exported graph


def _frozen(v: Any) -> Any:
    """A hashable value that determines what exporting a pattern with ``v`` traces (tensors by shape, dtype, device;
    functions by their code and what they close over); TypeError for anything else (then nothing is cached)."""
    import torch

    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype, v.device.type, v.requires_grad)
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype)):
        return (type(v).__name__, v)
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_frozen(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted((str(k), _frozen(x)) for k, x in v.items())))
    if isinstance(v, (types.BuiltinFunctionType, torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return ("builtin", v)
    if isinstance(v, types.FunctionType):
        cells = tuple(_frozen(c.cell_contents) for c in (v.__closure__ or ()))
        return ("function", v.__code__, _frozen(v.__defaults__), _frozen(v.__kwdefaults__), cells)
    if isinstance(v, torch.nn.Module) and set(vars(v)) - set(vars(torch.nn.Module())) == {"fn"} \
            and not any(True for _ in v.parameters()) and not any(True for _ in v.buffers()):
        return ("wrapper", type(v), v.training, _frozen(v.fn))      # torchao's WrapperModule(fn)
    raise TypeError(f"no cache key for {type(v).__name__}")


def _cached(original: Callable) -> Callable:
    def export_pattern(pattern, example_inputs, is_cuda=False, **kwargs):
        try:
            key = (_frozen(pattern), _frozen(tuple(example_inputs)), bool(is_cuda), _frozen(kwargs))
        except TypeError:
            return original(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERN_GRAPHS:
            _PATTERN_GRAPHS[key] = original(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_PATTERN_GRAPHS[key])      # callers rewrite the pattern graphs they get

    export_pattern.__wrapped__ = original
    return export_pattern


def _binding(fn: Callable) -> list[types.ModuleType]:
    """Every loaded module whose namespace binds ``fn`` by name (read from ``vars``: no lazy-module hooks run)."""
    return [m for m in list(sys.modules.values())
            if isinstance(m, types.ModuleType) and vars(m).get(PATTERN_EXPORT) is fn]


@contextlib.contextmanager
def pattern_graphs_once() -> Iterator[None]:
    """Inside, torchao's pattern export (``torchao.quantization.pt2e.utils._get_aten_graph_module_for_pattern``)
    exports each pattern once per process and hands out copies of that graph.

    Every ``prepare_pt2e`` / ``prepare_qat_pt2e`` / ``convert_pt2e`` and ExecuTorch's XNNPACK annotators call it
    two dozen times (each conv/BN/ReLU/dropout pattern, through ``torch.export``: about 0.3 s each, 5-8 s per
    quantization whatever the model's size), always with the same patterns. The graphs are identical (tested:
    the same INT8 graph and weights with and without); patterns that cannot be keyed safely are exported as
    before. The modules' own function is restored on exit."""
    import importlib

    mods = [importlib.import_module(name) for name in PATTERN_USERS]
    original = getattr(mods[0], PATTERN_EXPORT)
    if hasattr(original, "__wrapped__"):           # already inside
        yield
        return
    holders = _binding(original)
    cached = _cached(original)
    for m in holders:
        setattr(m, PATTERN_EXPORT, cached)
    try:
        yield
    finally:
        for m in holders:
            setattr(m, PATTERN_EXPORT, original)


QAT_FOLD = "_fold_conv_bn_qat_helper"   # torchao's conv-BN fold of a QAT graph, once per conv kind
_CONV_KINDS = {"conv1d": "aten.conv1d", "conv2d": "aten.conv2d", "conv_transpose1d": "aten.conv_transpose1d",
               "conv_transpose2d": "aten.conv_transpose2d"}


@contextlib.contextmanager
def fold_present_convs_only(gm) -> Iterator[None]:
    """Inside, torchao's QAT convert folds conv-BN only for the conv kinds ``gm`` holds.

    ``convert_pt2e`` of a QAT graph calls its fold once for each of conv1d, conv2d, conv_transpose1d and
    conv_transpose2d, and each call exports 24 pattern graphs (0.3-0.4 s each: 25-40 s per convert, whatever the
    model's size) though a MobileNet holds conv2d alone. A fold whose conv op the graph does not call cannot match;
    it is skipped. A graph with the generic ``aten.convolution`` (or an op of unknown kind) folds every kind."""
    import importlib

    qat_utils = importlib.import_module("torchao.quantization.pt2e.qat_utils")
    original = getattr(qat_utils, QAT_FOLD)
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    generic = any(t.startswith("aten.convolution") for t in called)

    def fold(m, conv_fn, example_inputs, is_cuda, *args, **kwargs):
        op = _CONV_KINDS.get(getattr(conv_fn, "__name__", ""))
        if op is not None and not generic and not any(t.startswith(op + ".") for t in called):
            return m
        return original(m, conv_fn, example_inputs, is_cuda, *args, **kwargs)

    setattr(qat_utils, QAT_FOLD, fold)
    try:
        yield
    finally:
        setattr(qat_utils, QAT_FOLD, original)


PARAM_SEARCH = "_non_linear_param_search"   # HistogramObserver's range search, which the percentile rule replaces


def combine_histograms(observer, orig_hist, orig_min, orig_max, update_hist, update_min, update_max):
    """``HistogramObserver._combine_histograms``: the running histogram merged with a batch's when the range grew
    (mbquant's counted histogram observer keeps the base class's merge)."""
    return observer._combine_histograms(orig_hist, orig_min, orig_max, update_hist, update_min, update_max)


# --------------------------------------------------------------------------- ExecuTorch


def deserialize_program(data: bytes):
    """The ``Program`` (flatbuffer schema objects, constants restored from their segments) of a ``.pte``."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    return deserialize_pte_binary(data).program


def edge_ops():
    """``executorch.exir.dialects._ops.ops``: the edge dialect's op namespace (``edge_ops().edge.aten...``)."""
    from executorch.exir.dialects._ops import ops

    return ops


def drop_constant(exported_program, target: str) -> None:
    """Remove a constant (parameter, buffer or lifted tensor) from an ExportedProgram's private stores."""
    exported_program._state_dict.pop(target, None)
    exported_program._constants.pop(target, None)


def set_edge_program(edge_manager, exported_program, method: str = "forward") -> None:
    """Replace a method's program inside an ``EdgeProgramManager`` (after a pass that returns a new one)."""
    edge_manager._edge_programs[method] = exported_program


def drop_config_methods(edge_manager) -> None:
    """Forget the config methods an input-quantizing pass records (the qparams travel elsewhere)."""
    edge_manager._config_methods = None


def reset_threadpool(threads: int) -> None:
    """Replace the ExecuTorch runtime's (process-global) threadpool with one of ``threads`` threads."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(int(threads))


def threadpool_size() -> int:
    from executorch.extension.pybindings import portable_lib

    return int(portable_lib._threadpool_get_thread_count())


# --------------------------------------------------------------------------- probes

@dataclass(frozen=True)
class Probe:
    api: str
    package: str
    check: Callable[[], None]      # raises (anything) when the API no longer does what mbquant relies on


def _probe_decomposed() -> None:
    import torch

    register_decomposed_quant_ops()
    q = torch.ops.quantized_decomposed.quantize_per_tensor(torch.tensor([0.5, -1.0]), 0.5, 0, -128, 127, torch.int8)
    assert q.tolist() == [1, -2], q


def _probe_lite() -> None:
    import tempfile

    import torch

    class M(torch.nn.Module):
        def forward(self, x):
            return x * 2

    with tempfile.TemporaryDirectory() as tmp:
        save_for_lite_interpreter(torch.jit.script(M()), f"{tmp}/m.ptl")
        assert load_for_lite_interpreter(f"{tmp}/m.ptl")(torch.ones(1)).item() == 2.0


def _probe_annotation() -> None:
    import torch

    gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    node = next(n for n in gm.graph.nodes if n.op not in ("placeholder", "output"))
    assert not is_annotated(node)
    mark_annotated(node)
    assert is_annotated(node) and is_annotated(type("N", (), {"meta": {annotation_key(): new_annotation()}})())


def _probe_param_search(family: str = "torchao") -> None:
    """HistogramObserver must still compute its range through the method the percentile rule overrides."""
    import torch

    if family == "torchao":
        from torchao.quantization.pt2e import HistogramObserver
    else:
        from torch.ao.quantization import HistogramObserver
    called = []

    class Spy(HistogramObserver):
        pass

    def spy(self):
        called.append(True)
        return self.min_val, self.max_val

    setattr(Spy, PARAM_SEARCH, spy)
    obs = Spy(dtype=torch.int8, quant_min=-128, quant_max=127)
    obs(torch.linspace(-1, 1, 1000))
    obs.calculate_qparams()
    assert called, f"HistogramObserver.calculate_qparams no longer calls {PARAM_SEARCH}"


def _probe_counted_histogram(family: str = "torchao") -> None:
    """mbquant's counted histogram observer (``calibrate.histogram``) restates HistogramObserver.forward with a
    faster count and the base class's ``_combine_histograms``: it must end in the same state as the installed
    observer over batches that start it, keep its range and grow it on both sides (merges included), and bin the
    last edge and half-bin values the same."""
    import torch

    if family == "torchao":
        from torchao.quantization.pt2e import HistogramObserver
    else:
        from torch.ao.quantization import HistogramObserver
    from .calibrate.observers import histogram_observer

    counted = histogram_observer(HistogramObserver)     # the class calibration uses
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 8, 16, 16, generator=g).clamp(-1, 2), torch.randn(4, 8, 16, 16, generator=g) * 0.5,
               torch.randn(4, 8, 16, 16, generator=g) * 3, torch.linspace(-5, 7, 2049 * 3),
               torch.randn(2, 8, 16, 16, generator=g).relu() * 9]
    for bins in (2048, 100):
        ours, theirs = counted(bins=bins), HistogramObserver(bins=bins)
        for x in batches:
            ours(x), theirs(x)
            assert torch.equal(ours.histogram, theirs.histogram), "histograms differ"
            assert torch.equal(ours.min_val, theirs.min_val) and torch.equal(ours.max_val, theirs.max_val)
        assert ours.calculate_qparams() == theirs.calculate_qparams()


def _probe_fuse_bn() -> None:
    import torch

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    m[1].running_mean.fill_(0.5)
    x = torch.randn(2, 3, 8, 8)
    gm = torch.export.export(m, (x,)).module()
    fuse_conv_bn(gm)
    gm.recompile()
    assert not [n for n in gm.graph.nodes if "batch_norm" in str(n.target)]
    assert torch.allclose(gm(x), m(x), atol=1e-5)


def _probe_batchnorm_modes() -> None:
    import torch

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    gm = torch.export.export(m, (torch.randn(2, 3, 8, 8),)).module()
    replace_batchnorm(gm, train_to_eval=True)
    targets = [str(n.target) for n in gm.graph.nodes if "batch_norm" in str(n.target)]
    assert targets and all("no_training" in t or "batch_norm.default" in t for t in targets), targets
    assert exported_training(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())) is True


def _probe_threadpool() -> None:
    before = threadpool_size()
    reset_threadpool(1)
    try:
        assert threadpool_size() == 1
    finally:
        reset_threadpool(before)


def _probe_program() -> None:
    import torch
    from executorch.exir import to_edge

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.arange(1.0, 3.0))

        def forward(self, x):
            return x + self.w

    program = deserialize_program(to_edge(torch.export.export(M(), (torch.zeros(2),))).to_executorch().buffer)
    ops = [o.name for o in program.execution_plan[0].operators]
    assert "aten::add" in ops, ops
    assert any(len(b.storage) for b in program.constant_buffer), "constants were not restored from their segment"


def _probe_edge_ops() -> None:
    assert edge_ops().edge.aten.view_copy.default is not None


def _probe_exported_program_stores() -> None:
    import torch

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return x * self.w

    ep = torch.export.export(M(), (torch.zeros(2),))
    assert "w" in ep._state_dict and isinstance(ep._constants, dict)
    drop_constant(ep, "w")
    assert "w" not in ep._state_dict


def _probe_edge_manager() -> None:
    import torch
    from executorch.exir import to_edge

    edge = to_edge(torch.export.export(torch.nn.ReLU(), (torch.zeros(2),)))
    assert "forward" in edge._edge_programs and hasattr(edge, "_config_methods")
    set_edge_program(edge, edge.exported_program())
    drop_config_methods(edge)


def _probe_eager_bases() -> None:
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.nn.quantized as nnq

    assert issubclass(nnq.Conv2d, quantized_conv_base()) and hasattr(quantized_conv_base(), "from_float")
    assert issubclass(nniqat.ConvBn2d, qat_conv_bn_base()) and hasattr(qat_conv_bn_base(), "freeze_bn_stats")


def _probe_pattern_export() -> None:
    import importlib
    import inspect

    import torch
    import torch.nn.functional as F

    fn = getattr(importlib.import_module(PATTERN_USERS[0]), PATTERN_EXPORT)
    assert list(inspect.signature(fn).parameters)[:3] == ["pattern", "example_inputs", "is_cuda"]
    for name in PATTERN_USERS[1:]:       # each binds it by name (or imports it from utils when called)
        mod = importlib.import_module(name)
        assert vars(mod).get(PATTERN_EXPORT, fn) is fn, f"{name} has its own {PATTERN_EXPORT}"

    from torchao.quantization.pt2e.export_utils import WrapperModule

    def relu_of_conv(x, w):
        return F.relu(F.conv2d(x, w))

    conv_relu = WrapperModule(relu_of_conv)       # the form torchao's passes hand it
    args = (torch.randn(1, 3, 4, 4), torch.randn(2, 3, 1, 1))
    fresh = fn(conv_relu, args)
    users = _binding(fn)
    assert len(users) >= 2, "torchao's passes no longer import it by name from utils"
    with pattern_graphs_once():
        cached = getattr(importlib.import_module(PATTERN_USERS[0]), PATTERN_EXPORT)
        assert cached is not fn and not _binding(fn) and set(_binding(cached)) == set(users)
        first, again = cached(conv_relu, args), cached(conv_relu, args)
    assert not _binding(cached) and set(_binding(fn)) == set(users)
    assert first is not again and fresh.code == first.code == again.code


def _probe_qat_fold() -> None:
    import importlib
    import inspect

    import torch.nn.functional as F

    qat_utils = importlib.import_module("torchao.quantization.pt2e.qat_utils")
    fold = getattr(qat_utils, QAT_FOLD)
    assert list(inspect.signature(fold).parameters)[:4] == ["m", "conv_fn", "example_inputs", "is_cuda"]
    source = inspect.getsource(qat_utils._fold_conv_bn_qat)
    assert f"{QAT_FOLD}(" in source, "the QAT convert no longer folds through it"
    assert all(getattr(F, kind).__name__ == kind for kind in _CONV_KINDS)


PROBES: tuple[Probe, ...] = (
    Probe("torch.ao.quantization.fx._decomposed (quantized_decomposed ops)", "torch", _probe_decomposed),
    Probe("torch.jit.mobile._load_for_lite_interpreter / _save_for_lite_interpreter", "torch", _probe_lite),
    Probe("torch.ao.nn eager bases _ConvNd / _ConvBnNd (the TorchScript backend)", "torch", _probe_eager_bases),
    Probe("QuantizationAnnotation._annotated", "torchao", _probe_annotation),
    Probe(f"torchao HistogramObserver.{PARAM_SEARCH} (the percentile observer's hook)", "torchao",
          _probe_param_search),
    Probe(f"torch.ao.quantization HistogramObserver.{PARAM_SEARCH} (the eager engine's percentile hook)", "torch",
          lambda: _probe_param_search("torch.ao")),
    Probe("torchao HistogramObserver.forward / _combine_histograms (the counted histogram observer)", "torchao",
          _probe_counted_histogram),
    Probe("torch.ao.quantization HistogramObserver.forward / _combine_histograms (the eager engine's counted "
          "histogram observer)", "torch", lambda: _probe_counted_histogram("torch.ao")),
    Probe("torchao.quantization.pt2e.utils._fuse_conv_bn_", "torchao", _probe_fuse_bn),
    Probe("torchao.quantization.pt2e.export_utils._replace_batchnorm / _EXPORTED_TRAINING_ATTR", "torchao",
          _probe_batchnorm_modes),
    Probe("portable_lib._unsafe_reset_threadpool / _threadpool_get_thread_count", "executorch", _probe_threadpool),
    Probe("executorch.exir._serialize._program.deserialize_pte_binary", "executorch", _probe_program),
    Probe("executorch.exir.dialects._ops.ops", "executorch", _probe_edge_ops),
    Probe("ExportedProgram._state_dict / _constants", "torch", _probe_exported_program_stores),
    Probe("EdgeProgramManager._edge_programs / _config_methods", "executorch", _probe_edge_manager),
    Probe(f"torchao.quantization.pt2e.utils.{PATTERN_EXPORT} (pattern graphs exported once)", "torchao",
          _probe_pattern_export),
    Probe(f"torchao.quantization.pt2e.qat_utils.{QAT_FOLD} (conv-BN folds of the conv kinds a graph holds)",
          "torchao", _probe_qat_fold),
)


def installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def run_probe(probe: Probe) -> str | None:
    """None when the API behaves as mbquant relies on; else a message naming the package, its version and what
    changed."""
    try:
        probe.check()
    except Exception as exc:  # any failure is a changed API
        return (f"{probe.package} {installed(probe.package)}: {probe.api} no longer works as mbquant relies on it "
                f"({type(exc).__name__}: {str(exc)[:300]}); mbquant pins torch==2.14.1, torchao==0.18.0, "
                f"executorch==1.5.1: install those, or port mbquant/compat.py to this release")
    return None


def run_probes() -> list[str]:
    return [m for m in (run_probe(p) for p in PROBES) if m is not None]


def describe() -> dict[str, Any]:
    return {p.api: p.package for p in PROBES}
