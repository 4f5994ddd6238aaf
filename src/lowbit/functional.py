"""Functional ``a + b`` / ``a * b`` / ``torch.matmul(a, b)`` / ``torch.cat`` calls, and
functional max pools and nearest upsamplings (``F.max_pool2d``, ``F.interpolate``): find them,
and turn them into modules.

Module swapping cannot see functional ops, so the plan finds their call sites in the model's
traced dataflow (``lowbit.trace``) and, where a rule gives them quantizers, ``quantize`` rewrites
the model with ``torch.fx`` so that each call becomes an ``Add`` / ``Mul`` / ``MatMul`` /
``Cat`` module named after its site (``op_add``, ``op_add_1``, ``op_cat``...) that the normal
swap then quantizes. A functional pool becomes the ``nn.MaxPool1d/2d`` / ``nn.Upsample`` it
stands for (``op_max_pool2d``, ``op_interpolate``), placed like one written as a module. Models
that do not trace with fx can use ``lowbit.nn.Add`` / ``Mul`` / ``MatMul`` / ``Cat`` directly
instead.

``between_quantized`` tells which sites sit between quantized layers — an input produced by a
quantized layer, the output read by one, with only ops ONNX Runtime runs on integers or folds
away in between (ReLU, pooling, reshapes, a folded BatchNorm). There, quantizing the op's inputs
lets ONNX Runtime give the producing layer a quantized output and run it on an integer kernel.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Iterator

from torch import fx, nn

from lowbit.nn import Add, Cat, MatMul, Mul, keeps_grid
from lowbit.trace import (
    LeafTracer,
    ModelGraph,
    Node,
    call_arguments,
    call_keeps_grid,
    op_name,
    owner_of,
    site_name,
)

MODULES: dict[str, type[nn.Module]] = {"add": Add, "mul": Mul, "matmul": MatMul, "cat": Cat}
FUNCTIONAL_TYPES = set(MODULES)
# Functional calls with a grid-keeping module equivalent: the op's name → the module type.
GRID_KEEPING_FUNCTIONS = {"max_pool1d": "MaxPool1d", "max_pool2d": "MaxPool2d",
                          "interpolate": "Upsample"}

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
    """The call sites of the wanted kinds whose inputs are all activations: two for
    add/mul/matmul, two or more for cat."""
    wanted = set(types) & FUNCTIONAL_TYPES
    tensors = activation_values(graph)
    return [node for node in graph.functions(*wanted)
            if (len(node.inputs) >= 2 if node.target == "cat" else len(node.inputs) == 2)
            and all(v in tensors for v in node.inputs)]


def find_grid_keeping_calls(graph: ModelGraph, types: Iterable[str]) -> list[Node]:
    """Functional max pools / upsamplings of the wanted module types (``"MaxPool2d"``...) that
    read one activation; whether each can become a module is decided when it is rewritten."""
    ops = {op for op, t in GRID_KEEPING_FUNCTIONS.items() if t in set(types)}
    tensors = activation_values(graph)
    return [node for node in graph.functions(*ops)
            if len(node.inputs) == 1 and node.inputs[0] in tensors]


def between_quantized(graph: ModelGraph, node: Node, modules: dict[str, nn.Module],
                      producers: set[str], readers: set[str], *, every_input: bool = False
                      ) -> bool:
    """Whether an input of ``node`` (each input, with ``every_input``) comes from a layer in
    ``producers`` and its output reaches a layer in ``readers`` (layers with an input
    quantizer), through pass-through ops only."""
    made = (all if every_input else any)(_from_layer(graph, v, modules, producers)
                                           for v in node.inputs)
    return made and reaches(graph, node, modules, readers, through_adds=True)


def before_global_pool(graph: ModelGraph, node: Node, modules: dict[str, nn.Module],
                       producers: set[str]) -> bool:
    """Whether ``node`` takes an input from a layer in ``producers`` and its output reaches a
    global average pool (``AdaptiveAvgPool*d`` to size 1) through pass-through ops: the last
    residual add of a CNN, before its classifier or as its pooled features. ONNX Runtime runs
    that add on integers (``QLinearAdd``) when its inputs *and output* are quantized, as in its
    own ``quantize_static`` files."""
    if not any(_from_layer(graph, v, modules, producers) for v in node.inputs):
        return False
    return bool(_pools_after(graph, node, modules))


def _pools_after(graph: ModelGraph, node: Node, modules: dict[str, nn.Module],
                 depth: int = 0) -> list[Node]:
    """Global average pools reading ``node``'s output through pass-through ops."""
    if depth > 8:
        return []
    found = []
    for user, _ in graph.users(node):
        if user.kind == "module" and _is_global_pool(modules.get(user.target)):
            found.append(user)
        elif _passes(user, modules):
            found += _pools_after(graph, user, modules, depth + 1)
    return found


def _is_global_pool(module: nn.Module | None) -> bool:
    if not isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        return False
    size = module.output_size
    return all(s == 1 for s in (size if isinstance(size, tuple) else (size,)))


def _passes(node: Node, modules: dict[str, nn.Module]) -> bool:
    if node.kind == "module":
        module = modules.get(node.target)
        return isinstance(module, PASS_MODULES) or keeps_grid(module)
    return node.target in PASS_FUNCTIONS or node.keeps_grid


def comes_from(graph: ModelGraph, node: Node, modules: dict[str, nn.Module],
               layers: set[str]) -> bool:
    """Whether ``node``'s first input is made by a layer in ``layers`` through pass-through ops."""
    return bool(node.inputs) and _from_layer(graph, node.inputs[0], modules, layers)


def _from_layer(graph: ModelGraph, value: int, modules: dict[str, nn.Module],
                layers: set[str], depth: int = 0) -> bool:
    """Whether ``value`` comes from a layer in ``layers`` through pass-through ops."""
    node = graph.producer(value)
    if node is None or depth > 8:
        return False
    if node.name in layers:  # a module, or a functional site named as its module
        return True
    return bool(_passes(node, modules) and node.inputs
                and _from_layer(graph, node.inputs[0], modules, layers, depth + 1))


def reaches_float_op(graph: ModelGraph, node: Node, modules: dict[str, nn.Module],
                     readers: set[str], depth: int = 0) -> bool:
    """Whether an op outside ``readers`` (quantized layers and ops) reads ``node``'s output,
    looking through pass-through ops; the model's output does not count."""
    if depth > 8:
        return False
    for user, _ in graph.users(node):
        if user.name in readers:
            continue
        if not _passes(user, modules) or reaches_float_op(graph, user, modules, readers,
                                                          depth + 1):
            return True
    return False


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


class OwnerTracer:
    """Whether the module at a qualified name traces on its own with torch.fx (cached): the
    condition for ``insert_functional`` to rewrite the calls in its forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.graphs: dict[str, fx.Graph | None] = {}

    def __call__(self, owner: str) -> bool:
        return self.graph(owner) is not None

    def graph(self, owner: str) -> fx.Graph | None:
        if owner not in self.graphs:
            try:
                self.graphs[owner] = own_forward(self.model.get_submodule(owner))
            except Exception:  # noqa: BLE001 - any tracing failure means "cannot rewrite"
                self.graphs[owner] = None
        return self.graphs[owner]

    def becomes_module(self, name: str) -> bool:
        """Whether ``insert_functional`` can turn the call at site ``name`` into a module."""
        owner, _, local = name.rpartition(".")
        graph = self.graph(owner)
        return graph is not None and any(site == local and _as_module_call(op, node) is not None
                                         for site, op, node in _own_calls(graph))


def own_forward(module: nn.Module) -> fx.Graph:
    """``module``'s own ``forward`` as an fx graph, every submodule one opaque call: only the
    calls that forward makes itself are rewritten, so a child fx cannot trace (Hugging Face's
    MobileNet convs compute their TF padding from the input's shape) does not stop its
    parent's residual add from being quantized."""
    return LeafTracer(lambda child: True).trace(module)


def insert_functional(model: nn.Module, names: set[str]) -> None:
    """Make the listed functional calls (``layer1.op_add``, as ``lowbit.trace`` names them)
    ``Add``/``MatMul`` modules, in place.

    Each module that makes such a call is traced on its own with torch.fx, the calls become
    submodules of it (``layer1.op_add``), and its ``forward`` is replaced by the rewritten one.
    Everything else — the model's class, its containers, attributes and other modules — stays as
    it was (rewriting the whole model into one ``fx.GraphModule`` would turn ``nn.Sequential``
    containers into plain modules that can no longer be indexed)."""
    by_owner: dict[str, set[str]] = {}
    for name in names:
        owner, _, local = name.rpartition(".")
        by_owner.setdefault(owner, set()).add(local)
    for owner, locals_ in by_owner.items():
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            raise ValueError(f"the plan names functional op(s) {sorted(locals_)} in module "
                             f"{owner!r}, which the model lacks") from None
        _rewrite(module, owner, locals_)


def _rewrite(module: nn.Module, owner: str, names: set[str]) -> None:
    try:
        graph = own_forward(module)
    except Exception as err:  # noqa: BLE001 - report any tracing failure the same way
        raise NotImplementedError(
            f"rules for 'add'/'mul'/'matmul'/'cat' need a model that torch.fx can trace, and "
            f"{owner or 'the model'!r} does not ({type(err).__name__}: {err}); use "
            "lowbit.nn.Add / Mul / MatMul / Cat modules in the model instead") from None
    picked = [(name, op, node) for name, op, node in _own_calls(graph)
              if name in names and _as_module_call(op, node) is not None]
    missing = names - {name for name, _, _ in picked}
    if missing:
        where = f" in {owner!r}" if owner else ""
        raise ValueError(f"the plan names functional op(s) {sorted(missing)}{where}, which the "
                         "model does not call as a two-tensor add/mul/matmul, a cat of tensors, a "
                         "max pool with constant arguments or a nearest upsampling")
    for name, op, node in picked:
        # Read the arguments now: an earlier replacement may have rewired them.
        new_module, args = _as_module_call(op, node)  # type: ignore[misc]
        module.add_module(name, new_module.train(module.training))
        with graph.inserting_after(node):
            new = graph.call_module(name, args=args)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    rewritten = fx.GraphModule(module, graph)
    for node in graph.nodes:  # constants the tracer lifted into attributes of its own
        if node.op == "get_attr" and not _resolves(module, str(node.target)):
            setattr(module, str(node.target), _resolve_attr(rewritten, str(node.target)))
    module.forward = types.MethodType(type(rewritten).forward, module)  # type: ignore[method-assign]


def _own_calls(graph: fx.Graph) -> Iterator[tuple[str, str, fx.Node]]:
    """``(site name, op, node)`` of each call the traced module's own ``forward`` makes, named
    as ``lowbit.trace`` names them (``op_add``, ``op_add_1``...)."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method") or owner_of(node):
            continue  # a call inside a submodule
        op = op_name(node.target)
        k = counts.get(op, 0)
        counts[op] = k + 1
        yield site_name("", op, k), op, node


def _as_module_call(op: str, node: fx.Node) -> tuple[nn.Module, tuple[fx.Node, ...]] | None:
    """The module that replaces a functional call and the arguments it takes, or None when the
    call has another form (a constant operand, extra keyword arguments)."""
    if op in GRID_KEEPING_FUNCTIONS:
        return _grid_keeping_module(op, node)
    if op in ("add", "mul", "matmul"):
        if (not node.kwargs and len(node.args) == 2
                and all(isinstance(a, fx.Node) for a in node.args)):
            return MODULES[op](), tuple(node.args)  # type: ignore[arg-type]
        return None
    if op != "cat" or not node.args:
        return None
    tensors, rest = node.args[0], node.args[1:]
    dim = rest[0] if rest else node.kwargs.get("dim", 0)
    if (not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or len(rest) > 1
            or set(node.kwargs) - {"dim"} or isinstance(dim, bool) or not isinstance(dim, int)
            or not all(isinstance(t, fx.Node) for t in tensors)):
        return None
    return Cat(dim, len(tensors)), tuple(tensors)  # type: ignore[arg-type]


def _grid_keeping_module(op: str, node: fx.Node) -> tuple[nn.Module, tuple[fx.Node, ...]] | None:
    """``F.max_pool2d(x, 2)`` → ``nn.MaxPool2d(2)``, ``F.interpolate(x, scale_factor=2)`` →
    ``nn.Upsample(scale_factor=2)``; None unless the call keeps the grid
    (``trace.call_keeps_grid``) and every argument but the input is a constant."""
    kw = call_arguments(op, node.args, dict(node.kwargs))
    if (kw is None or not isinstance(node.args[0], fx.Node)
            or not call_keeps_grid(op, node.args, dict(node.kwargs))):
        return None
    if any(isinstance(v, fx.Node) or (isinstance(v, (list, tuple))
                                      and any(isinstance(x, fx.Node) for x in v))
           for v in kw.values()):
        return None  # a size computed at run time
    if op == "interpolate":
        module: nn.Module = nn.Upsample(size=kw.get("size"), scale_factor=kw.get("scale_factor"),
                                        mode="nearest",
                                        recompute_scale_factor=kw.get("recompute_scale_factor"))
    elif "kernel_size" not in kw:
        return None
    else:
        pool = nn.MaxPool1d if op == "max_pool1d" else nn.MaxPool2d
        stride = kw.get("stride")
        module = pool(kw["kernel_size"], stride=stride if stride not in ((), []) else None,
                      padding=kw.get("padding", 0), dilation=kw.get("dilation", 1),
                      ceil_mode=bool(kw.get("ceil_mode", False)))
    return module, (node.args[0],)


def _resolve_attr(obj: object, path: str) -> object:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _resolves(obj: object, path: str) -> bool:
    """Whether a dotted attribute path (``norm.weight``) exists on ``obj``."""
    try:
        _resolve_attr(obj, path)
    except AttributeError:
        return False
    return True
