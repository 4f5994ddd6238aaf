"""Which weighted layer feeds which, through what (a private helper).

A *link* is a Conv/Linear whose output reaches exactly one other Conv/Linear through modules
that act on each channel alone (ReLU, pooling, flatten, identity...). Found with ``torch.fx``
where the model traces, else from adjacent children of ``nn.Sequential`` containers (as
``lowbit.fuse`` does). This is a stand-in until the package has one shared tracer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)

# Kinds of the modules a link may pass through. All are per-channel and commute with a
# positive per-channel scale (ReLU6 does not: its clip at 6 stays put; see equalize.py).
_MODULE_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Identity, "identity"), (nn.Dropout, "identity"), (nn.Dropout1d, "identity"),
    (nn.Dropout2d, "identity"),
    (nn.ReLU6, "relu6"), (nn.ReLU, "relu"), (nn.LeakyReLU, "leaky_relu"),
    (nn.MaxPool1d, "maxpool"), (nn.MaxPool2d, "maxpool"),
    (nn.AdaptiveAvgPool1d, "avgpool"), (nn.AdaptiveAvgPool2d, "avgpool"),
)
_FUNCTION_KINDS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}


@dataclass(frozen=True)
class Link:
    """``producer`` feeds ``consumer`` (qualified names) through ``through`` (kinds, in
    order: ``"identity"``, ``"relu"``, ``"relu6"``, ``"leaky_relu"``, ``"maxpool"``,
    ``"avgpool"``, ``"avgpool_padded"``, ``"flatten"``)."""

    producer: str
    consumer: str
    through: tuple[str, ...]


def module_kind(module: nn.Module) -> str | None:
    """The pass-through kind of ``module``, or ``None`` where a link must stop."""
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d)):
        pad = module.padding if isinstance(module.padding, tuple) else (module.padding,)
        return "avgpool_padded" if any(pad) and module.count_include_pad else "avgpool"
    if isinstance(module, nn.Flatten):
        return "flatten" if module.start_dim == 1 and module.end_dim == -1 else None
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    return None


def find_links(model: nn.Module) -> list[Link]:
    """Every producer → consumer link of ``model``, in model order."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any trace failure: fall back to Sequential order
        return _sequential_links(model)
    return _graph_links(model, graph)


def _graph_links(model: nn.Module, graph: fx.Graph) -> list[Link]:
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1

    links = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), WEIGHTED):
            continue
        if calls[str(node.target)] != 1:
            continue  # a layer called twice has two inputs to balance: leave it
        kinds: list[str] = []
        cur = node
        while True:
            users = list(cur.users)
            if len(users) != 1 or not users[0].args or users[0].args[0] is not cur:
                break
            user = users[0]
            if user.op == "call_module":
                mod = modules[str(user.target)]
                if isinstance(mod, WEIGHTED):
                    if calls[str(user.target)] == 1:
                        links.append(Link(str(node.target), str(user.target), tuple(kinds)))
                    break
                kind = module_kind(mod)
            else:
                kind = _node_kind(user)
            if kind is None:
                break
            kinds.append(kind)
            cur = user
    return links


def _node_kind(node: fx.Node) -> str | None:
    if node.op == "call_function":
        if node.target in (torch.flatten,) and tuple(node.args[1:]) == (1,) and not node.kwargs:
            return "flatten"
        if len(node.args) == 1 and not node.kwargs:
            return _FUNCTION_KINDS.get(node.target)  # type: ignore[call-overload, arg-type]
    if node.op == "call_method" and node.target == "relu" and len(node.args) == 1:
        return "relu"
    return None


def _sequential_links(model: nn.Module) -> list[Link]:
    links = []
    for prefix, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        items: list[tuple[str, Any]] = list(container.named_children())
        for i, (name, layer) in enumerate(items):
            if not isinstance(layer, WEIGHTED):
                continue
            kinds: list[str] = []
            for other_name, other in items[i + 1:]:
                if isinstance(other, WEIGHTED):
                    links.append(Link(_join(prefix, name), _join(prefix, other_name),
                                      tuple(kinds)))
                    break
                kind = module_kind(other)
                if kind is None:
                    break
                kinds.append(kind)
    return links


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
