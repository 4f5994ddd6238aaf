"""What ONNX Runtime actually runs after its graph optimizations, and why a layer stays float.

A QDQ file only *allows* integer kernels: ONNX Runtime fuses ``DequantizeLinear → Conv →
QuantizeLinear`` into ``QLinearConv`` (and the like) only where the pattern around the layer
lets it. A residual ``Add`` left in float, a ``Relu`` it cannot drop, a per-group weight: the
layer then runs as a float ``Conv``/``FusedConv`` on a weight dequantized every run, which is
slower than the float model. ``deploy_graph`` builds a session of the written file with the
optimization level users get by default (``ORT_ENABLE_ALL``, CPU provider), reads back the graph
ORT saved, and reports, per quantized layer, the kernel that runs it and, for a float one, the
cause found in the graph around it, with the fix.

Layers are found through initializer names: the exporter keeps buffer names
(``layer1.conv1.weight.codes``, ``.weight.scale``, ``.int_bias.codes``), and ORT keeps most of
them through its fusions (a renamed or transposed copy keeps the prefix, e.g.
``fc.weight.scale_T``). Functional ops (``op_add``) are found through their input quantizers'
scale names, under every name a shared quantizer has.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from lowbit.deploy import (
    DeployBinary,
    DeployCat,
    DeployLayer,
    DynamicLinear,
    QuantizeDequantize,
)
from lowbit.export.float_layers import graph_float_layers, module_float_layers
from lowbit.export.ort_graph import (
    FLOAT_COMPUTE,
    INTEGER_COMPUTE,
    INTEGER_ELEMENTWISE,
    LAYOUT,
    QUANT_OPS,
    OnnxGraph,
    attr,
    integer_tensors,
    optimized_model,
)

FUNCTIONAL_OPS = {  # lowbit functional op → the ORT nodes that may run it
    "add": frozenset({"Add", "Sum", "QLinearAdd"}),
    "mul": frozenset({"Mul", "QLinearMul"}),
    "cat": frozenset({"Concat", "QLinearConcat"}),
    "matmul": frozenset({"MatMul", "FusedMatMul", "Gemm", "FusedGemm", "QLinearMatMul",
                         "MatMulInteger", "MatMulIntegerToFloat", "QGemm"}),
}
# Initializer-name suffixes that identify a weight layer, most specific first: codes are unique
# per layer, while the exporter merges equal initializers (zero points, all-zero biases) under
# one layer's name.
WEIGHT_KEYS = ("weight.codes", "weight_t", "float_weight", "weight.scale", "weight_scale",
               "int_bias.codes", "float_bias", "bias", "int_bias.scale")
# Functional layers whose float form is cheap, with the kernel ORT runs them on in integers.
ELEMENTWISE = {"add": "QLinearAdd", "mul": "QLinearMul", "cat": "QLinearConcat"}


def _quantize_op_fix(op: str) -> str:
    return f'add LayerRule(types=["{op}"], input=QuantSpec(bits=8, symmetric=False))'


ADD_FIX, CAT_FIX = _quantize_op_fix("add"), _quantize_op_fix("cat")
FIXES = {"Add": ADD_FIX, "Sum": ADD_FIX, "Concat": CAT_FIX}  # a float ONNX op → its rule
INPUT_FIX = "quantize its input (input=QuantSpec(bits=8, symmetric=False) in its rule)"


@dataclass(frozen=True)
class LayerKernel:
    """The kernel ONNX Runtime runs one quantized layer on."""

    name: str  # lowbit's layer name (the plan's)
    type: str  # Conv2d, Linear, add, matmul ...
    op: str  # ORT op type running it ("" when not located in ORT's graph)
    integer: bool | None  # None: the layer was not located in ORT's graph
    reason: str = ""  # why it runs in float (empty when integer)
    fix: str = ""  # what would let ORT fuse it

    @property
    def compute(self) -> bool:
        """A Conv/MatMul/Gemm-like layer (an ``add`` or ``cat`` is element-wise: its float
        form is cheap and expected when only its inputs are quantized)."""
        return self.type not in ELEMENTWISE


@dataclass(frozen=True)
class DeployGraph:
    """What ONNX Runtime runs: per quantized layer its kernel, kernel counts, float ops between
    quantized layers, and the float layers of the model and the graph, each with a reason."""

    layers: tuple[LayerKernel, ...] = ()
    integer_kernels: int = 0  # integer Conv/MatMul/Gemm nodes in ORT's optimized graph
    float_kernels: int = 0  # float Conv/MatMul/Gemm nodes there
    kernel_ops: Mapping[str, int] = field(default_factory=dict)  # op type → count
    float_ops_between: tuple[str, ...] = ()  # "Add 'add'": float ops between quantized layers
    float_layers: Mapping[str, str] = field(default_factory=dict)  # name → why float

    @property
    def float_quantized(self) -> list[LayerKernel]:
        """Quantized Conv/MatMul/Gemm layers that ONNX Runtime runs in float."""
        return [k for k in self.layers if k.compute and k.integer is False]

    @property
    def unlocated(self) -> list[LayerKernel]:
        return [k for k in self.layers if k.integer is None]

    def lines(self) -> list[str]:
        """The report section, one item per line (no labels column)."""
        total = self.integer_kernels + self.float_kernels
        ops = ", ".join(f"{op} x{n}" for op, n in self.kernel_ops.items())
        out = [f"ONNX Runtime (ORT_ENABLE_ALL, CPU): integer kernels {self.integer_kernels}/"
               f"{total}" + (f" ({ops})" if ops else "")]
        compute = [k for k in self.layers if k.compute]
        on_int = sum(1 for k in compute if k.integer)
        out.append(f"quantized layers on integer kernels {on_int}/{len(compute)}"
                   + ("" if not self.float_quantized else "; in float:"))
        for k in self.float_quantized:
            out.append(f"  {k.name}: {k.op} kept float by ORT: {k.reason}"
                       + (f"; fix: {k.fix}" if k.fix else ""))
        for k in self.layers:
            if not k.compute and k.integer is False:
                out.append(f"  {k.name} ({k.type}): float {k.op}, {k.reason}")
        for k in self.unlocated:
            out.append(f"  {k.name}: {k.reason}")
        if self.float_ops_between:
            counts = Counter(s.split(" ", 1)[0] for s in self.float_ops_between)
            out.append("float ops between quantized layers: "
                       + ", ".join(f"{op} x{n}" for op, n in sorted(counts.items())))
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def warning(self) -> str | None:
        """One message naming every quantized layer ORT runs in float and its fix, or None."""
        slow = self.float_quantized
        if not slow:
            return None
        items = "; ".join(f"{k.name} ({k.op}): {k.reason}" + (f" — fix: {k.fix}" if k.fix else "")
                          for k in slow)
        return (f"ONNX Runtime runs {len(slow)} quantized layer(s) on float kernels (with the "
                f"quantize/dequantize around them, often slower than the float model): {items}")


class DeployGraphWarning(UserWarning):
    """A quantized layer that ONNX Runtime runs in float."""


# --------------------------------------------------------------------------- the layers


@dataclass(frozen=True)
class _Layer:
    name: str  # reported name
    path: str  # prefix of its initializers in the file
    type: str
    aliases: frozenset[str] = frozenset()  # names its input quantizers are exported under

    @property
    def functional(self) -> bool:
        return self.type in FUNCTIONAL_OPS


def _equal_qdq_aliases(model: nn.Module) -> dict[int, list[str]]:
    """For each activation QDQ module, the paths of every QDQ module with the same parameters:
    a shared quantizer becomes one QDQ module per reader, and the exporter keeps one of their
    equal scale initializers under one of those names."""
    by_value: dict[tuple[bytes, bytes], list[str]] = {}
    keys: dict[int, tuple[bytes, bytes]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, QuantizeDequantize):
            key = (m.scale.detach().cpu().numpy().tobytes(),
                   m.zero_point.detach().cpu().numpy().tobytes())
            by_value.setdefault(key, []).append(path)
            keys[id(m)] = key
    return {i: by_value[key] for i, key in keys.items()}


def layers_of_model(model: nn.Module) -> list[_Layer]:
    """The quantized Conv/Linear/functional layers of a deploy model (embedding gathers and
    activation quantizers run no Conv/MatMul kernel and are not listed)."""
    aliases = _equal_qdq_aliases(model)
    out = []
    for path, m in model.named_modules():
        if isinstance(m, (DeployLayer, DynamicLinear, DeployBinary, DeployCat)):
            qdqs = (list(m.input_qdqs) if isinstance(m, DeployCat) else
                    [getattr(m, "input_qdq", None), getattr(m, "other_qdq", None)])
            names = frozenset(f"{a}.scale" for q in qdqs
                              if q is not None for a in aliases.get(id(q), []))
            out.append(_Layer(getattr(m, "layer_name", path) or path, path, m.layer_type, names))
    return out


def layers_of_params(params: Mapping[str, Any]) -> list[_Layer]:
    """The same from a ``quant_params.json`` (shared quantizers are found under their first
    name only)."""
    skip = {"Embedding", "ReLU", "ReLU6", "Hardtanh"}
    out = []
    for name, entry in params.get("layers", {}).items():
        kind = entry.get("type", "")
        if kind in skip:
            continue
        inputs = [k for k in entry if k in ("input", "other") or k.startswith("input_")]
        scales = ({f"{name}.input_qdqs.{i}.scale" for i in range(len(inputs))}
                  if kind == "cat" else {f"{name}.input_qdq.scale", f"{name}.other_qdq.scale"})
        out.append(_Layer(name, name, kind, frozenset(scales)))
    return out


def layers_of_graph(proto: Any) -> list[_Layer]:
    """Weight layers named by their initializers (``<layer>.weight.codes``, ``.weight_t``),
    for a file without its ``quant_params.json``."""
    out = []
    for init in proto.graph.initializer:
        for suffix in (".weight.codes", ".weight_t"):
            if init.name.endswith(suffix):
                path = init.name[: -len(suffix)]
                out.append(_Layer(path, path, "layer"))
    return out


def _weight_key_map(layers: Iterable[_Layer]) -> dict[str, tuple[int, _Layer]]:
    keys: dict[str, tuple[int, _Layer]] = {}
    for layer in layers:
        if not layer.functional:
            for rank, suffix in enumerate(WEIGHT_KEYS):
                keys.setdefault(f"{layer.path}.{suffix}", (rank, layer))
    return keys


def _key(name: str, keys: Mapping[str, tuple[int, _Layer]]) -> tuple[int, _Layer] | None:
    """The layer an initializer name belongs to: exact, or a key ORT decorated (``_T``)."""
    if name in keys:
        return keys[name]
    cut = name.rfind("_")
    while cut > 0:
        if name[:cut] in keys:
            return keys[name[:cut]]
        cut = name.rfind("_", 0, cut)
    return None


def locate(graph: OnnxGraph, layers: list[_Layer], ops: frozenset[str]) -> dict[str, list[Any]]:
    """``{layer name: [nodes]}``: the compute nodes (``ops``) running each layer."""
    keys = _weight_key_map(layers)
    found: dict[str, list[Any]] = {}
    claimed: set[int] = set()
    for node in graph.nodes:
        if node.op_type not in ops:
            continue
        hits = [k for k in (_key(n, keys) for n in graph.signature(node)) if k is not None]
        if hits:
            layer = min(hits, key=lambda h: h[0])[1]
            found.setdefault(layer.name, []).append(node)
            claimed.add(id(node))
    for layer in layers:
        if not layer.functional:
            continue
        best, score = None, 0
        for node in graph.nodes:
            if node.op_type in FUNCTIONAL_OPS[layer.type] and id(node) not in claimed:
                n = len(graph.signature(node) & layer.aliases)
                if n > score:
                    best, score = node, n
        if best is not None:
            found[layer.name] = [best]
            claimed.add(id(best))
    return found


# --------------------------------------------------------------------------- why float


def _weight_dq(graph: OnnxGraph, node: Any) -> tuple[Any | None, list[Any]]:
    if len(node.input) < 2:
        return None, []
    src, passed = graph.source(node.input[1])
    return (src, passed) if src is not None and src.op_type == "DequantizeLinear" else (None, [])


def _check_weight_layout(graph: OnnxGraph, node: Any, layer: _Layer) -> tuple[str, str] | None:
    dq, passed = _weight_dq(graph, node)
    if dq is None:
        if layer.functional:
            return None
        return ("its weight is not quantized (float initializer)",
                "quantize its weight (weight=QuantSpec(bits=8, granularity='per_channel'))")
    block = attr(dq, "block_size", 0)
    if block:
        return (f"its weight is per-group (block_size {block}): ORT's integer Conv/Gemm "
                "kernels take per-tensor or per-channel weights, and fuse blocked weights only "
                "into MatMulNBits (4-bit, float input)",
                "per-channel weights (granularity='per_channel') for an integer kernel")
    scale = graph.array(dq.input[1])
    if scale is not None and scale.ndim == 1 and scale.size > 1:
        axis = attr(dq, "axis", 1)
        want = _output_axis(node, passed, graph.array(dq.input[0]))
        if want is not None and axis != want:
            return (f"its weight is per-channel on axis {axis}, not the output-channel axis "
                    f"{want} that ORT's integer kernels take", "axis=0 in the weight spec")
    return None


def _output_axis(node: Any, passed: list[Any], codes: np.ndarray | None) -> int | None:
    """The axis of the stored weight that indexes the node's output channels."""
    if node.op_type in ("Conv", "ConvInteger"):
        return 0 if not passed else None
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    if node.op_type == "MatMul" and codes is not None:
        last = codes.ndim - 1
        transposes = [p for p in passed if p.op_type == "Transpose"]
        if len(passed) != len(transposes) or len(transposes) > 1:
            return None
        if not transposes:
            return last
        perm = attr(transposes[0], "perm") or list(reversed(range(codes.ndim)))
        return int(perm[last])
    return None


def _check_input(graph: OnnxGraph, node: Any, layer: _Layer) -> tuple[str, str] | None:
    slots = (0, 1) if layer.functional else (0,)
    for slot in slots:
        src, _ = graph.source(node.input[slot])
        if src is None or src.op_type not in ("DequantizeLinear", "DynamicQuantizeLinear"):
            what = "graph input" if src is None else f"{src.op_type} {src.name!r}"
            which = "input" if slot == 0 else "second input"
            return (f"its {which} is not quantized (it comes from the {what} in float), so "
                    "ORT dequantizes the weight every run and runs a float kernel",
                    INPUT_FIX if not layer.functional else
                    f"quantize both inputs of {layer.name}")
    return None


def _q_grid_min(graph: OnnxGraph, q: Any) -> tuple[int, int] | None:
    """``(zero point, storage minimum)`` of a QuantizeLinear."""
    if len(q.input) < 3:
        return None
    zp = graph.array(q.input[2])
    if zp is None:
        return None
    qmin = int(np.iinfo(zp.dtype).min) if np.issubdtype(zp.dtype, np.integer) else 0
    return int(zp.reshape(-1)[0]), qmin


def _check_output(graph: OnnxGraph, node: Any, layer: _Layer) -> tuple[str, str] | None:
    """A Conv fuses into QLinearConv only with a QuantizeLinear on its output (a Relu in
    between is dropped when the zero point is the grid's minimum). A Gemm may keep a float
    output (QGemm), but not behind a Relu/Clip with no QuantizeLinear after it: ORT then fuses
    the activation into a float FusedGemm instead."""
    if node.op_type not in ("Conv", "Gemm"):
        return None
    out, act = node.output[0], None
    users = graph.consumers.get(out, [])
    if len(users) == 1 and users[0].op_type in ("Relu", "Clip") and out not in graph.outputs:
        act = users[0]
        out = act.output[0]
        users = graph.consumers.get(out, [])
    after = f" (after {act.op_type})" if act is not None else ""
    floats = [u for u in users if u.op_type != "QuantizeLinear"]
    if node.op_type == "Gemm" and (act is None or not (floats or out in graph.outputs)):
        return None
    if out in graph.outputs:
        return (f"its output{after} is a model output in float (ORT's integer Conv needs a "
                "QuantizeLinear after it)",
                f"give {layer.name} an output spec (output=QuantSpec(bits=8, symmetric=False))")
    if floats:
        first = floats[0]
        also = " also" if len(floats) < len(users) else ""
        fix = FIXES.get(first.op_type) or (
            f"quantize that {first.op_type}'s input, or give {layer.name} an output spec "
            "(output=QuantSpec(bits=8, symmetric=False))")
        return (f"its output{after}{also} feeds a float {first.op_type} ({first.name!r}) with "
                "no QuantizeLinear after it", fix)
    scales = {tuple(np.asarray(graph.array(q.input[1])).reshape(-1).tolist()) for q in users}
    if len(scales) > 1:
        names = ", ".join(sorted({q.input[1] for q in users}))
        return (f"its output{after} is quantized twice with different scales ({names})",
                "give its consumers one input quantizer (the same QuantSpec) so they share it")
    if act is not None and act.op_type == "Relu" and users:
        grid = _q_grid_min(graph, users[0])
        if grid is not None and grid[0] != grid[1]:
            return (f"a Relu sits between it and its QuantizeLinear, which ORT drops only when "
                    f"the zero point is the grid's minimum ({grid[1]}), here {grid[0]}",
                    "quantize the next input asymmetric (QuantSpec(bits=8, symmetric=False))")
    return None


# Tried in order; the first cause found is reported.
CHECKS = (_check_weight_layout, _check_input, _check_output)


def _reason(graph: OnnxGraph, node: Any | None, layer: _Layer, ran: str) -> tuple[str, str]:
    if node is None:
        return ("not found in the exported graph under its initializer names; cause unknown",
                "")
    for check in CHECKS:
        found = check(graph, node, layer)
        if found is not None:
            return found
    ins = ", ".join(f"{s.op_type} {s.name!r}" if s is not None else "input"
                    for s in (graph.source(i)[0] for i in node.input[:2] if i))
    outs = ", ".join(f"{u.op_type} {u.name!r}" for u in graph.consumers.get(node.output[0], []))
    return (f"cause unknown: none of the known causes applies (exported {node.op_type} "
            f"{node.name!r} reads {ins or 'nothing'} and feeds {outs or 'the output'}; ORT ran "
            f"{ran})", "")


# --------------------------------------------------------------------------- the whole check


def deploy_graph(path: str | os.PathLike, *, model: nn.Module | None = None,
                 params: Mapping[str, Any] | None = None,
                 float_layers: Mapping[str, str] | None = None) -> DeployGraph:
    """What ONNX Runtime runs for the exported file ``path``.

    The quantized layers come from ``model`` (the deploy model that was exported), else from
    ``params`` (its ``quant_params.json``), else from the file's initializer names.
    ``float_layers`` (the plan's reasons) name why a float layer is float."""
    import onnx

    exported = OnnxGraph(onnx.load(str(path)))
    optimized = OnnxGraph(optimized_model(path))
    if model is not None:
        layers = layers_of_model(model)
    elif params is not None:
        layers = layers_of_params(params)
    else:
        layers = layers_of_graph(onnx.load(str(path), load_external_data=False))
    compute = INTEGER_COMPUTE | FLOAT_COMPUTE
    before = locate(exported, layers, FLOAT_COMPUTE | INTEGER_COMPUTE)
    after = locate(optimized, layers, compute | INTEGER_ELEMENTWISE)

    kernels = []
    for layer in layers:
        nodes = after.get(layer.name, [])
        ops = sorted({n.op_type for n in nodes})
        op = "/".join(ops)
        if not nodes:
            prefixes = tuple(f"{p}." for p in (layer.path, *layer.aliases))
            gone = not before.get(layer.name) and not any(
                name.startswith(prefixes) for name in exported.inits)
            kernels.append(LayerKernel(layer.name, layer.type, "", None,
                                       "no initializer of the file bears its name (a layer "
                                       "that runs on a constant is computed once at export: "
                                       "see report.folded)" if gone else
                                       "not located in ONNX Runtime's optimized graph (its "
                                       "initializers were renamed or folded)"))
            continue
        integer = all(n.op_type in INTEGER_COMPUTE | INTEGER_ELEMENTWISE for n in nodes)
        if integer:
            kernels.append(LayerKernel(layer.name, layer.type, op, True))
            continue
        node = (before.get(layer.name) or [None])[0]
        if layer.type in ELEMENTWISE and node is not None and not any(
                u.op_type == "QuantizeLinear" for u in exported.consumers.get(node.output[0], [])):
            reason = f"its output is not quantized ({ELEMENTWISE[layer.type]} needs an output spec)"
            fix = ""
        else:
            reason, fix = _reason(exported, node, layer, op)
        kernels.append(LayerKernel(layer.name, layer.type, op, False, reason, fix))

    counts = Counter(n.op_type for n in optimized.nodes if n.op_type in compute)
    mapped = {id(n) for nodes in after.values() for n in nodes}
    return DeployGraph(
        layers=tuple(kernels),
        integer_kernels=sum(n for op, n in counts.items() if op in INTEGER_COMPUTE),
        float_kernels=sum(n for op, n in counts.items() if op in FLOAT_COMPUTE),
        kernel_ops=dict(sorted(counts.items())),
        float_ops_between=tuple(_float_between(optimized, mapped)),
        float_layers=_merge_float_layers(model, exported, float_layers),
    )


def _merge_float_layers(model: nn.Module | None, graph: OnnxGraph,
                        reasons: Mapping[str, str] | None) -> dict[str, str]:
    out = module_float_layers(model, reasons) if model is not None else {}
    if model is None:
        out.update({n: why for n, why in (reasons or {}).items()})
    for name, why in graph_float_layers(graph, model).items():
        out.setdefault(name, why)
    return out


def _float_between(graph: OnnxGraph, layer_nodes: set[int]) -> list[str]:
    """Float ops on a path from one quantized layer's kernel to another's (not Q/DQ, layout
    ops, integer kernels, or the layers' own kernels)."""
    def reach(start: Iterable[Any], step: Any) -> set[int]:
        seen: set[int] = set()
        todo = list(start)
        while todo:
            node = todo.pop()
            for nxt in step(node):
                if id(nxt) not in seen:
                    seen.add(id(nxt))
                    todo.append(nxt)
        return seen

    starts = [n for n in graph.nodes if id(n) in layer_nodes]
    down = reach(starts, lambda n: [c for o in n.output for c in graph.consumers.get(o, [])])
    up = reach(starts, lambda n: [graph.producer[i] for i in n.input if i in graph.producer])
    integer = integer_tensors(graph)
    out = []
    for node in graph.nodes:
        if id(node) not in down or id(node) not in up or id(node) in layer_nodes:
            continue
        if node.op_type in QUANT_OPS | LAYOUT | INTEGER_COMPUTE | INTEGER_ELEMENTWISE:
            continue
        if node.input and node.input[0] in integer:
            continue  # on integer codes: a uint8 MaxPool, the Clip of a 4-bit grid
        out.append(f"{node.op_type} {node.name!r}")
    return out


def check_deploy_graph(model: nn.Module, path: str | os.PathLike,
                       float_layers: Mapping[str, str] | None = None) -> DeployGraph | None:
    """``deploy_graph`` for ``export_onnx``: warns once (``DeployGraphWarning``) naming every
    quantized layer ONNX Runtime runs in float and its fix; where ORT's graph cannot be read,
    warns so and returns None instead of failing the export."""
    import warnings

    try:
        graph = deploy_graph(path, model=model, float_layers=float_layers)
    except Exception as err:  # noqa: BLE001 - a failed check must not lose a written file
        warnings.warn(f"could not read the graph ONNX Runtime runs for {str(path)!r}, so the "
                      f"report does not say which layers run in float: {err}",
                      DeployGraphWarning, stacklevel=3)
        return None
    message = graph.warning()
    if message:
        warnings.warn(message, DeployGraphWarning, stacklevel=3)
    return graph
