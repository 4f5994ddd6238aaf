"""Functional ``a + b`` / ``torch.matmul(a, b)`` calls: find them, and turn them into modules.

Module swapping cannot see functional ops, so the plan finds their call sites in the model's
traced dataflow (``lowbit.trace``) and, where a rule gives them quantizers, ``quantize`` rewrites
the model with ``torch.fx`` so that each call becomes an ``Add`` / ``MatMul`` module named after
its site (``op_add``, ``op_add_1``...) that the normal swap then quantizes. Models that do not
trace with fx can use ``lowbit.nn.Add`` / ``lowbit.nn.MatMul`` directly instead.

``between_quantized`` tells which sites sit between quantized layers — an input produced by a
quantized layer, the output read by one, with only ops ONNX Runtime runs on integers or folds
away in between (ReLU, pooling, reshapes, a folded BatchNorm). There, quantizing the op's inputs
lets ONNX Runtime give the producing layer a quantized output and run it on an integer kernel.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import fx, nn

from lowbit.nn import Add, MatMul
from lowbit.trace import LeafTracer, ModelGraph, Node, default_leaf, op_name

MODULES: dict[str, type[nn.Module]] = {"add": Add, "matmul": MatMul}
FUNCTIONAL_TYPES = set(MODULES)

# Calls that read metadata: their results (and arithmetic on them) are not activations.
_METADATA = {"size", "dim", "numel", "getattr", "len", "shape"}

# Between a quantized layer and a functional op (or the op and a quantized layer), these keep
# the integer path: ONNX Runtime folds them into a neighbouring quantized node or runs them on
# integers (QDQ propagation across pooling and reshapes, ReLU/Clip fused into QuantizeLinear).
# Average pooling is not among them: it exports as ReduceMean/AveragePool, which ORT neither
# runs on integers here nor propagates quantization across.
PASS_MODULES = (nn.Identity, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Dropout, nn.Flatten,
                nn.MaxPool1d, nn.MaxPool2d)
PASS_FUNCTIONS = {"relu", "relu6", "hardtanh", "flatten", "view", "reshape", "permute",
                  "transpose", "contiguous", "dropout", "max_pool2d", "getitem", "clone",
                  "squeeze", "unsqueeze"}


def activation_values(graph: ModelGraph) -> set[int]:
    """Values that are activation tensors: graph inputs and what modules and tensor ops make
    (not parameters read in ``forward``, nor sizes and arithmetic on them)."""
    values = set(graph.graph_inputs)
    for node in graph.nodes:
        if node.kind == "module" or (node.target not in _METADATA
                                     and any(v in values for v in node.inputs)):
            values.update(node.outputs)
    return values


def find_functional(graph: ModelGraph, types: Iterable[str]) -> list[Node]:
    """The call sites of the wanted kinds whose two inputs are both activations."""
    wanted = set(types) & FUNCTIONAL_TYPES
    tensors = activation_values(graph)
    return [node for node in graph.functions(*wanted)
            if len(node.inputs) == 2 and all(v in tensors for v in node.inputs)]


def between_quantized(graph: ModelGraph, node: Node, modules: dict[str, nn.Module],
                      producers: set[str], readers: set[str]) -> bool:
    """Whether an input of ``node`` comes from a layer in ``producers`` and its output reaches
    a layer in ``readers`` (layers with an input quantizer), through pass-through ops only."""
    return (any(_from_layer(graph, v, modules, producers) for v in node.inputs)
            and reaches(graph, node, modules, readers, through_adds=True))


def _passes(node: Node, modules: dict[str, nn.Module]) -> bool:
    if node.kind == "module":
        return isinstance(modules.get(node.target), PASS_MODULES)
    return node.target in PASS_FUNCTIONS


def _from_layer(graph: ModelGraph, value: int, modules: dict[str, nn.Module],
                layers: set[str], depth: int = 0) -> bool:
    """Whether ``value`` comes from a layer in ``layers`` through pass-through ops."""
    node = graph.producer(value)
    if node is None or depth > 8:
        return False
    if node.kind == "module" and node.target in layers:
        return True
    return bool(_passes(node, modules) and node.inputs
                and _from_layer(graph, node.inputs[0], modules, layers, depth + 1))


def reaches_output(graph: ModelGraph, node: Node, modules: dict[str, nn.Module],
                   depth: int = 0) -> bool:
    """Whether ``node``'s output is (through pass-through ops) an output of the model."""
    if any(graph.is_output(v) for v in node.outputs):
        return True
    return depth < 8 and any(_passes(user, modules) and reaches_output(graph, user, modules,
                                                                        depth + 1)
                             for user, _ in graph.users(node))


def reaches(graph: ModelGraph, node: Node, modules: dict[str, nn.Module], layers: set[str],
            *, through_adds: bool, depth: int = 0) -> bool:
    """Whether ``node``'s output is read by a layer in ``layers`` through pass-through ops
    (and functional adds, with ``through_adds``)."""
    if depth > 8:
        return False
    for user, _ in graph.users(node):
        if user.name in layers:  # a module, or a functional site named as its module
            return True
        through = _passes(user, modules) or (
            through_adds and user.kind == "function" and user.target == "add")
        if through and reaches(graph, user, modules, layers, through_adds=through_adds,
                               depth=depth + 1):
            return True
    return False


def insert_functional(model: nn.Module, names: set[str]) -> fx.GraphModule:
    """A traced copy of ``model`` whose listed functional calls (``op_<fx node>``, as
    ``lowbit.trace`` names them) are ``Add``/``MatMul`` modules."""
    try:
        traced = fx.GraphModule(model, LeafTracer(default_leaf).trace(model))
    except Exception as err:  # noqa: BLE001 - report any tracing failure the same way
        raise NotImplementedError(
            "rules for 'add'/'matmul' need a model that torch.fx can trace, and this one does "
            f"not ({type(err).__name__}: {err}); use lowbit.nn.Add / lowbit.nn.MatMul modules "
            "in the model instead"
        ) from None
    picked = [node for node in traced.graph.nodes if f"op_{node.name}" in names
              and node.op in ("call_function", "call_method") and not node.kwargs
              and len(node.args) == 2 and op_name(node.target) in MODULES]
    missing = names - {f"op_{node.name}" for node in picked}
    if missing:
        raise ValueError(f"the plan names functional op(s) {sorted(missing)}, which the model "
                         "does not call (or not as a two-tensor add/matmul)")
    for node in picked:
        name = f"op_{node.name}"
        traced.add_submodule(name, MODULES[op_name(node.target)]().train(model.training))
        with traced.graph.inserting_after(node):
            new = traced.graph.call_module(name, args=node.args)
        node.replace_all_uses_with(new)
        traced.graph.erase_node(node)
    traced.recompile()
    return traced
