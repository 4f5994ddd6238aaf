"""One quantizer per tensor: consumers of the same tensor share their input quantizer.

When one tensor feeds two quantized layers (a ReLU output feeding a conv and a residual add),
each layer would otherwise quantize it with its own scale, the export would hold two different
QuantizeLinear nodes on that tensor, and ONNX Runtime could not fuse the producer into an integer
kernel. Sharing is found with torch.fx (Quant layers kept whole); consumers whose input specs
describe a different grid keep their own quantizer. Models that do not trace are left as they are.
"""

from __future__ import annotations

from torch import fx, nn

from lowbit.nn import QuantLayer
from lowbit.quantizers import Quantizer

INPUT_SLOTS = ("input_quant", "other_quant")  # positional argument i → attribute


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantLayer, Quantizer)) or super().is_leaf_module(m, qualname)


def _grid_key(q: Quantizer) -> tuple[object, ...]:
    s = q.spec
    return (s.method, s.bits, q.grid.signed, q.grid.narrow, s.symmetric, s.granularity, q.axis,
            s.dynamic)


def _consumers(node: fx.Node, modules: dict[str, nn.Module]) -> list[tuple[fx.Node, fx.Node]]:
    """``(quant layer node, the argument it reads)`` for every Quant layer that reads ``node``'s
    value, looking through ``nn.Identity`` (what BN folding and identity shortcuts leave)."""
    found = []
    for user in node.users:
        module = modules.get(str(user.target)) if user.op == "call_module" else None
        if isinstance(module, QuantLayer):
            found.append((user, node))
        elif isinstance(module, nn.Identity):
            found.extend(_consumers(user, modules))
    return found


def share_input_quantizers(model: nn.Module) -> list[tuple[str, ...]]:
    """Make consumers of one tensor share an input quantizer; returns the shared groups."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable models keep one quantizer per consumer
        return []
    modules = dict(model.named_modules())
    groups: list[tuple[str, ...]] = []
    for node in graph.nodes:
        slots: list[tuple[str, nn.Module, str]] = []
        for user, source in _consumers(node, modules):
            layer = modules[str(user.target)]
            for i, arg in enumerate(user.args[:len(INPUT_SLOTS)]):
                if arg is source and getattr(layer, INPUT_SLOTS[i], None) is not None:
                    slots.append((str(user.target), layer, INPUT_SLOTS[i]))
        by_grid: dict[tuple[object, ...], list[tuple[str, nn.Module, str]]] = {}
        for name, layer, slot in slots:
            by_grid.setdefault(_grid_key(getattr(layer, slot)), []).append((name, layer, slot))
        for members in by_grid.values():
            if len(members) < 2:
                continue
            first = getattr(members[0][1], members[0][2])
            for _, layer, slot in members[1:]:
                setattr(layer, slot, first)
            groups.append(tuple(f"{name}.{slot}" for name, _, slot in members))
    return groups
