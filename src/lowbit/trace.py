"""Who consumes what, traced once: the dataflow between a model's modules and functional ops.

BN folding (``fuse``), functional-op placement (``functional``, ``plan``) and input-quantizer
sharing (``share``) all ask the same question — which module or op reads which module's output —
and answer it from one ``ModelGraph``:

- ``torch.fx`` symbolic tracing where the model traces (no inputs needed; the graph is exact
  for every input);
- otherwise a **dispatch trace**: the model runs once on example inputs in eval mode with forward
  hooks on every leaf module and a ``TorchFunctionMode`` that records each functional call made
  outside a leaf (``a + b``, ``torch.cat``, ``F.relu``...). Tensors are matched by identity, with
  in-place ops (``x += y``) giving the tensor a new version. Hugging Face models mostly trace
  this way only. The graph is that of the one input it ran on (control flow frozen).

Nodes are leaf modules (modules without children, plus anything ``leaf`` accepts, such as
lowbit's own layers) and functional calls; values are the tensors between them.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

Method = Literal["fx", "dispatch"]

# Canonical names of functional ops, so that ``a + b``, ``torch.add`` and ``x.add_(y)`` are one.
_ALIASES: dict[str, str] = {
    "__add__": "add", "__radd__": "add", "__iadd__": "add", "add_": "add", "add": "add",
    "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul", "mul_": "mul", "mul": "mul",
    "__matmul__": "matmul", "matmul": "matmul", "bmm": "matmul",
    "cat": "cat", "concat": "cat", "concatenate": "cat",
    "relu_": "relu", "relu": "relu", "relu6": "relu6", "hardtanh_": "hardtanh",
}
_FUNCTIONS: dict[object, str] = {operator.add: "add", operator.iadd: "add", operator.mul: "mul",
                                 operator.matmul: "matmul", operator.getitem: "getitem"}


def op_name(target: object) -> str:
    """The canonical name of a functional call target (``operator.add`` → ``"add"``)."""
    if target in _FUNCTIONS:
        return _FUNCTIONS[target]
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return _ALIASES.get(name, name)


@dataclass
class Node:
    """One module call or functional call. ``inputs``/``outputs`` are value ids; an input's
    position is its index among the call's tensor arguments (positional first)."""

    index: int
    kind: Literal["module", "function"]
    target: str  # the module's qualified name, or the op's canonical name
    name: str  # unique: the module name, or ``<owner>.op_<op>[_k]`` for a functional call
    inputs: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()
    keeps_grid: bool = False  # a call that only picks among its input's values (and 0)


@dataclass
class ModelGraph:
    """The dataflow of one model: nodes in execution order, values by id."""

    method: Method
    nodes: list[Node] = field(default_factory=list)
    graph_inputs: tuple[int, ...] = ()
    graph_outputs: tuple[int, ...] = ()
    _producer: dict[int, Node] = field(default_factory=dict, repr=False)
    _consumers: dict[int, list[tuple[Node, int]]] = field(default_factory=dict, repr=False)

    def add(self, kind: Literal["module", "function"], target: str, name: str,
            inputs: Sequence[int], outputs: Sequence[int], keeps_grid: bool = False) -> Node:
        node = Node(len(self.nodes), kind, target, name, tuple(inputs), tuple(outputs),
                    keeps_grid)
        self.nodes.append(node)
        for pos, value in enumerate(node.inputs):
            self._consumers.setdefault(value, []).append((node, pos))
        for value in node.outputs:
            self._producer[value] = node
        return node

    def producer(self, value: int) -> Node | None:
        return self._producer.get(value)

    def consumers(self, value: int) -> list[tuple[Node, int]]:
        """``(node, input position)`` for every node reading ``value`` (graph outputs excluded)."""
        return list(self._consumers.get(value, ()))

    def users(self, node: Node) -> list[tuple[Node, int]]:
        return [c for v in node.outputs for c in self.consumers(v)]

    def module_calls(self) -> dict[str, list[Node]]:
        calls: dict[str, list[Node]] = {}
        for node in self.nodes:
            if node.kind == "module":
                calls.setdefault(node.target, []).append(node)
        return calls

    def functions(self, *names: str) -> Iterator[Node]:
        for node in self.nodes:
            if node.kind == "function" and (not names or node.target in names):
                yield node

    def is_output(self, value: int) -> bool:
        return value in self.graph_outputs


def default_leaf(module: nn.Module) -> bool:
    """Modules traced as one node: torch.nn's own layers (as torch.fx has it), modules lowbit
    quantizes as one of its layer types (subclasses of them such as EfficientNet's depthwise
    conv, transformers' ``Conv1D``), and lowbit's layers and quantizers. Containers and user
    modules are traced through."""
    from lowbit.nn import Add, Cat, MatMul, QuantLayer, quant_type_for
    from lowbit.quantizers import Quantizer

    if isinstance(module, (QuantLayer, Quantizer, Add, MatMul, Cat)) or quant_type_for(module):
        return True
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    return type(module).__module__.startswith("torch.nn") and not isinstance(module, containers)


def trace(
    model: nn.Module,
    example_inputs: Sequence[Any] | dict[str, Any] | None = None,
    *,
    leaf: Callable[[nn.Module], bool] = default_leaf,
) -> ModelGraph | None:
    """The model's dataflow graph: fx where it traces, else a dispatch trace on
    ``example_inputs`` (a tuple of positional inputs or a dict of keyword inputs; for a
    Hugging Face model without them, inputs made from its config); ``None`` when neither works
    (fx fails and there are no inputs, or the model fails on them)."""
    graph = _fx_graph(model, leaf)
    if graph is not None:
        return graph
    if example_inputs is None:
        example_inputs = guess_example_inputs(model)
    if example_inputs is None:
        return None
    try:
        return _dispatch_graph(model, example_inputs, leaf)
    except Exception as err:  # noqa: BLE001 - a model that fails on its inputs has no graph
        warnings.warn(f"lowbit could not trace the model on its example inputs "
                      f"({type(err).__name__}: {err})", stacklevel=3)
        return None


def guess_example_inputs(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Keyword inputs for a Hugging Face model, from its config: ``pixel_values`` of its image
    size, ``input_ids`` of a short sequence, or ``input_values`` / ``input_features`` for audio.
    ``None`` for anything else."""
    config = getattr(model, "config", None)
    name = getattr(model, "main_input_name", None)
    if config is None or not isinstance(name, str):
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if name == "pixel_values":
        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        channels = getattr(config, "num_channels", 3)
        return {name: torch.randn(1, channels, h, w, device=device)}
    if name == "input_ids":
        vocab = getattr(config, "vocab_size", 100) or 100
        return {name: torch.randint(0, vocab, (1, 8), device=device)}
    if name == "input_values":
        return {name: torch.randn(1, 4000, device=device)}
    if name == "input_features":
        bins = getattr(config, "num_mel_bins", 80)
        frames = 2 * getattr(config, "max_source_positions", 1500)
        return {name: torch.randn(1, bins, frames, device=device)}
    return None


# ---------------------------------------------------------------------------------- torch.fx


class LeafTracer(fx.Tracer):
    """torch.fx's tracer with lowbit's leaves, leaving the traced model as it found it."""

    def __init__(self, leaf: Callable[[nn.Module], bool]) -> None:
        super().__init__()
        self._leaf = leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._leaf(m) or super().is_leaf_module(m, qualname)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """Trace ``root`` and restore its modules' plain attributes afterwards: model code
        that caches values in ``forward`` (LeViT's attention-bias cache) would otherwise keep
        the tracer's proxies, which break the model and every later trace of it."""
        saved = _plain_state(root) if isinstance(root, nn.Module) else []
        try:
            return super().trace(root, concrete_args)
        finally:
            _restore(saved)


_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules"})
_CONTAINERS = (dict, list, set)
State = list[tuple[nn.Module, dict[str, Any], dict[int, Any]]]


def _plain_state(model: nn.Module) -> State:
    """Each module's attributes other than parameters, buffers and children, and a copy of the
    contents of each plain container among them (a trace may fill a cache dict in place)."""
    saved: State = []
    for m in model.modules():
        attrs = {k: v for k, v in m.__dict__.items() if k not in _MODULE_INTERNALS}
        contents = {id(v): type(v)(v) for v in attrs.values() if type(v) in _CONTAINERS}
        saved.append((m, attrs, contents))
    return saved


def _restore(saved: State) -> None:
    """Put every attribute back, and each container's contents back *in place*, so a cache
    that several modules share stays one object."""
    for module, attrs, contents in saved:
        for key in set(module.__dict__) - set(attrs) - _MODULE_INTERNALS:
            del module.__dict__[key]
        module.__dict__.update(attrs)
        for value in attrs.values():
            before = contents.get(id(value))
            if before is None:
                continue
            if isinstance(value, list):
                value[:] = before
            else:  # dict or set
                value.clear()
                value.update(before)


def _fx_graph(model: nn.Module, leaf: Callable[[nn.Module], bool]) -> ModelGraph | None:
    try:
        fx_graph = LeafTracer(leaf).trace(model)
    except Exception:  # noqa: BLE001 - any failure means: not fx-traceable
        return None
    graph = ModelGraph("fx")
    ids: dict[fx.Node, int] = {}
    inputs, outputs = [], []
    counts: dict[tuple[str, str], int] = {}
    for node in fx_graph.nodes:
        ids[node] = len(ids)
        args = [ids[a] for a in _flat_nodes((node.args, node.kwargs))]
        if node.op == "placeholder":
            inputs.append(ids[node])
        elif node.op == "output":
            outputs.extend(args)
        elif node.op == "call_module":
            graph.add("module", str(node.target), str(node.target), args, [ids[node]])
        elif node.op in ("call_function", "call_method"):
            op = op_name(node.target)
            owner = owner_of(node)
            k = counts.get((owner, op), 0)
            counts[owner, op] = k + 1
            graph.add("function", op, site_name(owner, op, k), args, [ids[node]],
                      call_keeps_grid(op, node.args, node.kwargs))
        # get_attr: a parameter/buffer read, not a value between nodes
    graph.graph_inputs, graph.graph_outputs = tuple(inputs), tuple(outputs)
    return graph


# The arguments after the input of the functional calls that may keep the grid, in order
# (``F.max_pool1d/2d`` and ``torch.max_pool1d/2d``, ``F.interpolate``, ``F.pad``).
_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
GRID_CALL_ARGS = {"max_pool1d": _POOL_ARGS, "max_pool2d": _POOL_ARGS,
                  "interpolate": ("size", "scale_factor", "mode", "align_corners",
                                  "recompute_scale_factor", "antialias"),
                  "pad": ("pad", "mode", "value")}


def call_arguments(op: str, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The arguments of a ``GRID_CALL_ARGS`` call after its input, by name; None for another
    op or a call of another form."""
    names = GRID_CALL_ARGS.get(op)
    if names is None or not args or len(args) - 1 > len(names) or set(kwargs) - set(names):
        return None
    return dict(zip(names, args[1:])) | dict(kwargs)


def call_keeps_grid(op: str, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """Whether a functional max pool / interpolation / pad only picks among its input's values
    (and zero, which every grid holds): a pool that returns no indices, a nearest interpolation
    without antialiasing or corner alignment, a pad with zeros (its output stays on the input's
    quantization grid, as ``lowbit.nn.keeps_grid`` says for modules)."""
    kw = call_arguments(op, args, kwargs)
    if kw is None:
        return False
    if op == "pad":  # Hugging Face's TF "same" padding before MobileNet / EfficientNet convs
        return kw.get("mode", "constant") == "constant" and not kw.get("value")
    if op == "interpolate":
        return (kw.get("mode", "nearest") == "nearest" and not kw.get("antialias")
                and kw.get("align_corners") is None)
    return not kw.get("return_indices")


def owner_of(node: fx.Node) -> str:
    """The qualified name of the module whose ``forward`` makes this call (``""``: the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


def site_name(owner: str, op: str, k: int) -> str:
    """The name of the ``k``-th ``op`` call in ``owner``'s forward: ``layer1.op_add``,
    ``layer1.op_add_1``... — the module ``functional.insert_functional`` puts there."""
    local = f"op_{op}" + (f"_{k}" if k else "")
    return f"{owner}.{local}" if owner else local


def _flat_nodes(obj: Any) -> Iterator[fx.Node]:
    if isinstance(obj, fx.Node):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _flat_nodes(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _flat_nodes(item)


# ---------------------------------------------------------------------------- dispatch trace


def _flat_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _flat_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _flat_tensors(item)
    elif hasattr(obj, "to_tuple"):  # transformers' ModelOutput
        yield from _flat_tensors(obj.to_tuple())


class _Recorder(TorchFunctionMode):
    """Gives every tensor a value id (a new one per in-place write) and records calls."""

    # In-place ops (``x += y``) need nothing special: every output gets a new value id.
    # Calls that read a tensor's metadata and make no value between nodes.
    _IGNORED = {"size", "dim", "shape", "numel", "__get__", "__len__", "is_floating_point",
                "__bool__", "__index__", "__format__", "__repr__", "__hash__", "__eq__",
                "item", "tolist", "__iter__", "type", "device", "dtype", "get_device",
                "element_size", "stride", "data_ptr", "is_contiguous", "requires_grad_",
                "__setstate__", "__reduce_ex__", "ndim", "__array__"}

    def __init__(self, graph: ModelGraph) -> None:
        super().__init__()
        self.graph = graph
        self.keep: list[torch.Tensor] = []  # keeps ids unique while tracing
        self.version: dict[int, int] = {}  # id(tensor) -> current value id
        self.leaf_depth = 0
        # The modules whose forward runs now (the innermost owns a functional call), and the
        # calls of each op counted per owner call, as an fx trace of that module counts them.
        self.owners: list[tuple[str, dict[str, int]]] = [("", {})]
        self.next_id = 0

    def value(self, t: torch.Tensor) -> int:
        """The current value id of ``t`` (a new one the first time it is seen)."""
        if id(t) not in self.version:
            return self.produce(t)
        return self.version[id(t)]

    def produce(self, t: torch.Tensor) -> int:
        """A fresh value for ``t`` (new tensor, or new version after an in-place write)."""
        if id(t) not in self.version:
            self.keep.append(t)
        self.next_id += 1
        self.version[id(t)] = self.next_id
        return self.next_id

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if self.leaf_depth or name in self._IGNORED:
            return func(*args, **kwargs)
        inputs = [self.value(t) for t in _flat_tensors((args, kwargs))]
        out = func(*args, **kwargs)
        tensors = list(_flat_tensors(out))
        if not tensors:
            return out
        canonical = op_name(name)
        owner, counts = self.owners[-1]
        k = counts.get(canonical, 0)
        counts[canonical] = k + 1
        outputs = [self.produce(t) for t in tensors]
        self.graph.add("function", canonical, site_name(owner, canonical, k), inputs, outputs,
                       call_keeps_grid(canonical, args, kwargs))
        return out


def _dispatch_graph(model: nn.Module, example_inputs: Any,
                    leaf: Callable[[nn.Module], bool]) -> ModelGraph:
    graph = ModelGraph("dispatch")
    recorder = _Recorder(graph)
    handles = []
    pending: dict[int, list[int]] = {}

    def pre_hook(module: nn.Module, args: Any, kwargs: Any) -> None:
        if recorder.leaf_depth == 0:
            pending[id(module)] = [recorder.value(t) for t in _flat_tensors((args, kwargs))]
        recorder.leaf_depth += 1

    def make_post(name: str) -> Callable[..., None]:
        def post_hook(module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            recorder.leaf_depth -= 1
            if recorder.leaf_depth == 0:
                outputs = [recorder.produce(t) for t in _flat_tensors(out)]
                graph.add("module", name, name, pending.pop(id(module)), outputs)
        return post_hook

    def make_enter(name: str) -> Callable[..., None]:
        def enter(module: nn.Module, args: Any) -> None:
            recorder.owners.append((name, {}))
        return enter

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        recorder.owners.pop()

    for name, module in model.named_modules():
        if name and leaf(module):
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(make_post(name), with_kwargs=True))
        elif name:  # a container: calls in its own forward are its sites
            handles.append(module.register_forward_pre_hook(make_enter(name)))
            handles.append(module.register_forward_hook(leave))
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), recorder:
            if isinstance(example_inputs, dict):
                graph.graph_inputs = tuple(recorder.value(t) for t in
                                           _flat_tensors(example_inputs))
                out = model(**example_inputs)
            else:
                graph.graph_inputs = tuple(recorder.value(t) for t in
                                           _flat_tensors(tuple(example_inputs)))
                out = model(*example_inputs)
        graph.graph_outputs = tuple(recorder.value(t) for t in _flat_tensors(out))
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
    return graph
