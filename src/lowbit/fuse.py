"""Find and fold Conv/Linear → BatchNorm (→ ReLU) chains before quantization.

Inference folding (docs/algorithms.md §1): ``W' = W·γ/σ``, ``b' = β + (b − μ)·γ/σ`` with
``σ = sqrt(running_var + eps)``. A folded ReLU moves into the quant wrapper (``activation``) so
that the output quantizer, if any, sees post-ReLU values.

Chains are found in the model's traced dataflow (``lowbit.trace``: torch.fx, or a dispatch
trace on example inputs), so a conv and a BN that are siblings in a custom module fold as well
as neighbours in an ``nn.Sequential``; without a graph, from adjacent ``nn.Sequential`` children.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from lowbit.float_modules import is_reparametrized
from lowbit.trace import ModelGraph, Node, trace

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
ACTIVATIONS = (nn.ReLU, nn.ReLU6)

Chain = tuple[str, ...]


def find_chains(model: nn.Module, graph: ModelGraph | None = None) -> list[Chain]:
    """Qualified names of (layer, bn) or (layer, bn, relu) chains to fold, in model order.

    From the model's traced dataflow (``lowbit.trace``: any wiring, siblings in custom modules
    included, as long as the BN is the only reader of the layer's output); from adjacent
    children of ``nn.Sequential`` containers when there is no graph."""
    if graph is None:
        graph = trace(model)
    if graph is None:
        return _sequential_chains(model)
    return _graph_chains(model, graph)


def _graph_chains(model: nn.Module, graph: ModelGraph) -> list[Chain]:
    modules = dict(model.named_modules())
    calls = {name: len(nodes) for name, nodes in graph.module_calls().items()}

    def only_module_user(node: Node, types: tuple[type, ...]) -> Node | None:
        users = graph.users(node)
        if len(users) != 1 or any(graph.is_output(v) for v in node.outputs):
            return None
        user = users[0][0]
        # A module called from several places (a shared ReLU) cannot move into one layer.
        if user.kind != "module" or calls[user.target] != 1:
            return None
        return user if isinstance(modules.get(user.target), types) else None

    chains: list[Chain] = []
    for node in graph.nodes:
        layer = modules.get(node.target) if node.kind == "module" else None
        if not isinstance(layer, FOLDABLE) or calls[node.target] != 1:
            continue
        bn = only_module_user(node, NORMS)
        if bn is None or not _compatible(layer, modules[bn.target]):
            continue
        act = only_module_user(bn, ACTIVATIONS)
        chain = (node.target, bn.target) + ((act.target,) if act is not None else ())
        chains.append(chain)
    return _unique(chains)


def _sequential_chains(model: nn.Module) -> list[Chain]:
    chains: list[Chain] = []
    for prefix, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        items = list(container.named_children())
        for i, (name, layer) in enumerate(items[:-1]):
            bn_name, bn = items[i + 1]
            if not isinstance(layer, FOLDABLE) or not isinstance(bn, NORMS):
                continue
            if not _compatible(layer, bn):
                continue
            chain = [name, bn_name]
            if i + 2 < len(items) and isinstance(items[i + 2][1], ACTIVATIONS):
                chain.append(items[i + 2][0])
            chains.append(tuple(f"{prefix}.{c}" if prefix else c for c in chain))
    return chains


def _unique(chains: list[Chain]) -> list[Chain]:
    # A BN shared by two paths (module reuse) must not be folded twice.
    seen: set[str] = set()
    out = []
    for chain in chains:
        if not seen.intersection(chain):
            out.append(chain)
            seen.update(chain)
    return out


def _compatible(layer: Any, bn: Any) -> bool:
    # Called with a FOLDABLE layer and a NORMS module (checked by both callers).
    out = layer.out_channels if isinstance(layer, (nn.Conv1d, nn.Conv2d)) else layer.out_features
    # A computed weight (weight norm, weight standardization) would not keep a folded scale.
    return (bn.num_features == out and bn.track_running_stats and bn.running_mean is not None
            and not is_reparametrized(layer))


@torch.no_grad()
def fold_bn(
    layer: nn.Conv1d | nn.Conv2d | nn.Linear, bn: nn.BatchNorm1d | nn.BatchNorm2d
) -> None:
    """Fold an inference-mode BatchNorm into ``layer``'s weight and bias, in place."""
    # Optional in torch's types: None only with track_running_stats=False (see _compatible).
    running_mean = cast(torch.Tensor, bn.running_mean)
    running_var = cast(torch.Tensor, bn.running_var)
    std = torch.sqrt(running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    k = gamma / std  # (C_out,)
    weight = layer.weight
    layer.weight = nn.Parameter(weight * k.reshape(-1, *([1] * (weight.dim() - 1))))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(running_mean)
    layer.bias = nn.Parameter(beta + (bias - running_mean) * k)


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_chains(
    model: nn.Module, chains: Sequence[Sequence[str]], take_activation: set[str],
    keep_bn: bool = False,
) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """Fold each chain in ``model`` (in place); the BN becomes ``nn.Identity``.

    For chains whose layer is in ``take_activation`` the ReLU is detached too (replaced by
    ``nn.Identity``) and returned as ``{layer_name: relu}``, for the quant wrapper to own —
    unless the ReLU is itself in ``take_activation`` (a rule quantizes it as a layer).
    With ``keep_bn`` (quantization-aware training) chains of those layers are not folded: the
    BN is detached and returned as ``{layer_name: bn}`` for the wrapper to fold while training,
    and chains of other layers stay as they are (a float layer keeps a trainable BN).
    """
    activations: dict[str, nn.Module] = {}
    norms: dict[str, nn.Module] = {}
    folded_in_training = False
    for chain in chains:
        if keep_bn and chain[0] not in take_activation:
            continue
        try:
            layer, bn = get_module(model, chain[0]), get_module(model, chain[1])
        except AttributeError as err:
            raise ValueError(f"fusion {list(chain)} names a module the model lacks: {err}") from None
        if not isinstance(layer, FOLDABLE) or not isinstance(bn, NORMS):
            raise ValueError(
                f"fusion {list(chain)} must start with a Conv1d/Conv2d/Linear followed by a "
                f"BatchNorm, got {type(layer).__name__} and {type(bn).__name__}"
            )
        if keep_bn:
            norms[chain[0]] = bn
        else:
            folded_in_training |= bn.training
            fold_bn(layer, bn)
        set_module(model, chain[1], nn.Identity().train(bn.training))
        if len(chain) > 2 and chain[0] in take_activation and chain[2] not in take_activation:
            act = get_module(model, chain[2])
            activations[chain[0]] = act
            set_module(model, chain[2], nn.Identity().train(act.training))
    if folded_in_training:
        warnings.warn("BatchNorm layers were folded with their running statistics although the "
                      "model is in training mode; for training use lowbit.prepare_qat",
                      stacklevel=4)
    return activations, norms
