"""Turn functional ``a + b`` / ``torch.matmul(a, b)`` calls into ``Add`` / ``MatMul`` modules.

Module swapping cannot see functional ops, so when a rule names the types ``"add"`` or
``"matmul"`` the model is traced with ``torch.fx`` and each such call becomes a module named
``op_<node>`` (``op_add``, ``op_add_1``...) that the normal swap then quantizes. Models that do
not trace can use ``lowbit.nn.Add`` / ``lowbit.nn.MatMul`` directly instead.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import fx, nn

from lowbit.nn import Add, MatMul

FUNCTIONS: dict[object, tuple[str, type[nn.Module]]] = {
    operator.add: ("add", Add),
    torch.add: ("add", Add),
    operator.matmul: ("matmul", MatMul),
    torch.matmul: ("matmul", MatMul),
}
FUNCTIONAL_TYPES = {"add", "matmul"}


class _Tracer(fx.Tracer):
    """Keeps ``Add``/``MatMul`` modules whole, so their own ``a + b`` is not found again."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (Add, MatMul)) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module, example_inputs: Sequence[object] | None) -> fx.GraphModule:
    try:
        traced = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as err:  # noqa: BLE001 - report any tracing failure the same way
        raise NotImplementedError(
            "rules for 'add'/'matmul' need a model that torch.fx can trace, and this one does "
            f"not ({type(err).__name__}: {err}); use lowbit.nn.Add / lowbit.nn.MatMul modules "
            "in the model instead"
        ) from None
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        ShapeProp(traced).propagate(*example_inputs)
    return traced


def _is_tensor_call(node: fx.Node, shaped: bool) -> bool:
    if node.op != "call_function" or node.target not in FUNCTIONS or node.kwargs:
        return False
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    if not shaped:
        return True
    return all("tensor_meta" in a.meta for a in node.args)  # type: ignore[union-attr]


def find_functional(
    model: nn.Module, types: set[str], example_inputs: Sequence[object] | None = None
) -> list[tuple[str, str]]:
    """``[(module_name, type_name)]`` for each tensor add/matmul call of the wanted types."""
    traced = _trace(model, example_inputs)
    found = []
    for node in traced.graph.nodes:
        if _is_tensor_call(node, example_inputs is not None):
            kind = FUNCTIONS[node.target][0]
            if kind in types:
                found.append((f"op_{node.name}", kind))
    return found


def insert_functional(
    model: nn.Module, names: set[str], example_inputs: Sequence[object] | None = None
) -> fx.GraphModule:
    """A traced copy of ``model`` whose listed functional calls are ``Add``/``MatMul`` modules."""
    traced = _trace(model, example_inputs)
    # Pick the calls before rewriting: a new node carries no shape metadata of its own.
    picked = [node for node in traced.graph.nodes if f"op_{node.name}" in names
              and _is_tensor_call(node, example_inputs is not None)]
    for node in picked:
        name = f"op_{node.name}"
        traced.add_submodule(name, FUNCTIONS[node.target][1]().train(model.training))
        with traced.graph.inserting_after(node):
            new = traced.graph.call_module(name, args=node.args)
        node.replace_all_uses_with(new)
        traced.graph.erase_node(node)
    traced.recompile()
    return traced
