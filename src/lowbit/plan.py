"""One editable entry per layer: the data ``quantize`` applies.

A ``Plan`` (made by ``lowbit.plan``, in ``lowbit.placement``) can be written to YAML/JSON,
edited by hand (change a layer's bits, keep one in float by setting its specs to ``null``) and
passed back to ``quantize``: the vendor DDK's "generate a template, edit it, apply it"
workflow. Pure data: this module knows layer types only by their registered names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lowbit.config import (
    TARGETS,
    LayerSpecs,
    QuantSpec,
    check_version,
    load_file,
    write_structured,
)
from lowbit.registry import LAYERS


def holds_weight(type_name: str) -> bool:
    """Whether layers of a registered type hold a weight (adds, cats, activations and pools
    do not: a float one is not a float *layer*)."""
    return bool(getattr(LAYERS.get(type_name), "holds_weight", True))


@dataclass(frozen=True, kw_only=True)
class LayerPlan:
    """One layer's resolved choice. All specs ``None`` keeps the layer in float."""

    name: str
    type: str
    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    output: QuantSpec | None = None
    # The model's own class where it differs from `type`: "Conv1D" for transformers' transposed
    # Linear, quantized as the "Linear" it is.
    module_type: str | None = None

    def __post_init__(self) -> None:
        if self.module_type is not None and not isinstance(self.module_type, str):
            raise TypeError(f"LayerPlan `module_type` of {self.name!r} must be a str or None, "
                            f"got {type(self.module_type).__name__}")

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.input is None and self.output is None

    @property
    def specs(self) -> LayerSpecs:
        return LayerSpecs(self.weight, self.input, self.output)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.module_type is not None:
            out["module_type"] = self.module_type
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
        """Every layer holding a weight that stays float, with the reason. Weightless entries
        (an add the presets leave float because no quantized layer reads it, a ReLU or pool
        a rule names) stay in the plan, to edit, but are not float *layers*."""
        out = {layer.name: "kept in float by the config" for layer in self.layers
               if layer.is_float and holds_weight(layer.type)}
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
            unknown = sorted(set(entry) - {"type", "module_type", *TARGETS})
            if unknown:
                raise ValueError(f"plan entry {name!r} has unknown field(s) {unknown}")
            specs = {t: None if entry.get(t) is None else QuantSpec.from_dict(entry[t])
                     for t in TARGETS}
            layers.append(LayerPlan(name=name, type=entry["type"],
                                    module_type=entry.get("module_type"), **specs))
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
            kind = layer.type if layer.module_type is None else f"{layer.type}({layer.module_type})"
            lines.append(f"{layer.name:<32} {kind:<8} " + " ".join(f"{c:<14}" for c in cells))
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
