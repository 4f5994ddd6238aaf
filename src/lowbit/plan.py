"""Resolve a config's rules against a model: one editable entry per layer.

A ``Plan`` is what ``quantize`` applies. It can be written to YAML/JSON, edited by hand (change
a layer's bits, keep one in float by setting its specs to ``null``) and passed back to
``quantize``: the vendor DDK's "generate a template, edit it, apply it" workflow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.config import (
    TARGETS,
    QuantConfig,
    QuantSpec,
    check_version,
    load_file,
    warn_unmatched_names,
    write_structured,
)
from lowbit.functional import FUNCTIONAL_TYPES, find_functional
from lowbit.fuse import NORMS, find_chains
from lowbit.nn import ACTIVATION_TYPES, OPT_IN_TYPES, LayerSpecs, quant_type_for
from lowbit.registry import LAYERS

# Float layers with weights that lowbit cannot quantize (yet): listed, never skipped silently.
WEIGHTED_FLOAT_TYPES = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                        nn.EmbeddingBag, nn.LSTM, nn.GRU, nn.RNN, nn.Bilinear,
                        nn.MultiheadAttention)


@dataclass(frozen=True, kw_only=True)
class LayerPlan:
    """One layer's resolved choice. All specs ``None`` keeps the layer in float."""

    name: str
    type: str
    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    output: QuantSpec | None = None

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.input is None and self.output is None

    @property
    def specs(self) -> LayerSpecs:
        return LayerSpecs(self.weight, self.input, self.output)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        for t in TARGETS:
            spec = getattr(self, t)
            out[t] = None if spec is None else spec.to_dict()
        return out


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Per-layer choices (``layers``), BN fusions to apply first (``fusions``) and the float
    layers lowbit found but cannot quantize, each with the reason (``skipped``)."""

    # Lists are accepted; __post_init__ stores tuples (of tuples, for fusions).
    layers: Sequence[LayerPlan] = ()
    fusions: Sequence[Sequence[str]] = ()
    skipped: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "fusions", tuple(tuple(c) for c in self.fusions))
        for layer in self.layers:
            if not isinstance(layer, LayerPlan):
                raise TypeError(f"Plan.`layers` must hold LayerPlan, got {type(layer).__name__}")
            LAYERS.get(layer.type, field=f"type of layer {layer.name!r}")
        names = [layer.name for layer in self.layers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"Plan lists these layers more than once: {dupes}")

    def __getitem__(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in the plan; layers: {[x.name for x in self.layers]}")

    @property
    def quantized(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if not layer.is_float]

    @property
    def float_layers(self) -> dict[str, str]:
        """Every layer that stays float, with the reason."""
        out = {layer.name: "kept in float by the config" for layer in self.layers
               if layer.is_float}
        out.update(self.skipped)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "fusions": [list(c) for c in self.fusions],
            "layers": {layer.name: layer.to_dict() for layer in self.layers},
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict):
            raise TypeError(f"a Plan must be a mapping, got {type(data).__name__}")
        check_version(data, "Plan")
        unknown = sorted(set(data) - {"version", "fusions", "layers", "skipped"})
        if unknown:
            raise ValueError(f"unknown Plan field(s) {unknown}; allowed: "
                             "['fusions', 'layers', 'skipped', 'version']")
        layers_data = data.get("layers") or {}
        if not isinstance(layers_data, dict):
            raise TypeError("Plan `layers` must map layer names to entries")
        layers = []
        for name, entry in layers_data.items():
            if not isinstance(entry, dict) or "type" not in entry:
                raise ValueError(f"plan entry {name!r} must be a mapping with a `type`")
            unknown = sorted(set(entry) - {"type", *TARGETS})
            if unknown:
                raise ValueError(f"plan entry {name!r} has unknown field(s) {unknown}")
            specs = {t: None if entry.get(t) is None else QuantSpec.from_dict(entry[t])
                     for t in TARGETS}
            layers.append(LayerPlan(name=name, type=entry["type"], **specs))
        return cls(layers=layers, fusions=data.get("fusions") or (),
                   skipped=dict(data.get("skipped") or {}))

    def to_file(self, path: str | os.PathLike) -> None:
        """Write the plan as YAML or JSON (by suffix), atomically."""
        write_structured(path, self.to_dict())

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Plan:
        return load_file(path, cls.from_dict)

    def summary(self) -> str:
        lines = [f"{'layer':<32} {'type':<8} {'weight':<14} {'input':<14} {'output':<14}"]
        for layer in self.layers:
            cells = [_short(getattr(layer, t)) for t in TARGETS]
            lines.append(f"{layer.name:<32} {layer.type:<8} " + " ".join(f"{c:<14}" for c in cells))
        for name, why in self.skipped.items():
            lines.append(f"{name:<32} float    ({why})")
        return "\n".join(lines)


def _short(spec: QuantSpec | None) -> str:
    if spec is None:
        return "float"
    kind = "int" if spec.is_signed else "uint"
    gran = {"per_tensor": "T", "per_channel": "C", "per_group": f"G{spec.group_size}"}
    extra = "dyn" if spec.dynamic else spec.observer
    return f"{kind}{spec.bits}/{gran[spec.granularity]}/{extra}"


def plan(
    model: nn.Module,
    config: QuantConfig,
    example_inputs: Sequence[object] | None = None,
) -> Plan:
    """Resolve ``config`` against ``model``: one ``LayerPlan`` per quantizable layer.

    ``example_inputs`` (a tuple of positional inputs) is only needed to tell tensor
    ``add``/``matmul`` calls from arithmetic on sizes when a rule asks for those ops.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"`config` must be a QuantConfig, got {type(config).__name__}")
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        raise TypeError("`example_inputs` must be a tuple of the model's positional inputs, "
                        f"got {type(example_inputs).__name__}; write (x,)")

    layers: list[LayerPlan] = []
    skipped: dict[str, str] = {}
    found: list[tuple[str, str]] = []
    named = {t for rule in config.rules for t in rule.types}
    for name, module in model.named_modules():
        type_name = quant_type_for(module)
        if type_name in OPT_IN_TYPES and type_name not in named:
            if type_name == "Embedding":
                skipped[name] = "Embedding is quantized only where a rule names the type"
            continue  # activations and embeddings take part only where a rule names the type
        if type_name is None:
            if isinstance(module, WEIGHTED_FLOAT_TYPES):
                skipped[name] = f"{type(module).__name__} is not supported yet"
            continue
        found.append((name, type_name))
    weighted = [name for name, type_name in found
                if type_name not in FUNCTIONAL_TYPES | OPT_IN_TYPES]
    for name, type_name in found:
        positions = frozenset(p for p, n in (("first", weighted[:1]), ("last", weighted[-1:]))
                              if name in n)
        layers.append(_resolve(config, name, type_name, positions))

    wanted = {t for rule in config.rules for t in rule.types} & FUNCTIONAL_TYPES
    if wanted:
        with torch.no_grad():
            calls = find_functional(model, wanted, example_inputs)
        layers.extend(_resolve(config, name, kind) for name, kind in calls)

    fusions = find_chains(model) if config.fuse_bn else []
    for name, module in model.named_modules():
        if isinstance(module, NORMS) and config.fuse_bn and not any(name in c for c in fusions):
            skipped[name] = "BatchNorm not directly after a Conv/Linear: left in float"
    warn_unmatched_names(config, [n for n, _ in model.named_modules()] + [x.name for x in layers])
    return Plan(layers=layers, fusions=fusions, skipped=skipped)


def _resolve(config: QuantConfig, name: str, type_name: str,
             positions: frozenset[str] = frozenset()) -> LayerPlan:
    rule = config.resolve(name, type_name, positions)
    if rule is None:
        return LayerPlan(name=name, type=type_name)
    # add/matmul and activations hold no weight
    weight = None if type_name in FUNCTIONAL_TYPES | ACTIVATION_TYPES else rule.weight
    return LayerPlan(name=name, type=type_name, weight=weight, input=rule.input,
                     output=rule.output)
