"""Declarative quantization configs: ``QuantSpec`` (how one tensor is quantized), ``LayerRule``
(which layers get which specs) and ``QuantConfig`` (an ordered list of rules plus presets).

All three are frozen keyword-only dataclasses validated at construction: a wrong type is a
``TypeError``, a wrong value a ``ValueError``, each naming the field, the value and what is
allowed. They round-trip exactly through ``to_dict``/``from_dict`` and YAML/JSON files.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from lowbit.io import (  # noqa: F401 - atomic_write_* re-exported for compat front ends
    MissingFileError,
    atomic_write_bytes,
    atomic_write_text,
)
from lowbit.registry import LAYERS, OBSERVERS, QUANTIZERS, WEIGHT_ALGORITHMS

Granularity = Literal["per_tensor", "per_channel", "per_group"]
GRANULARITIES = ("per_tensor", "per_channel", "per_group")
TARGETS = ("weight", "input", "output")
POSITIONS = ("first", "last", "between", "before_pool", "feeds_float", "gate")
# QuantSpec fields that only some algorithms read (each quantizer class lists its ``options``).
METHOD_OPTIONS = ("alpha_init", "xnor")
CONFIG_VERSION = 1


def _check_type(owner: str, name: str, value: Any, types: type | tuple[type, ...]) -> None:
    # bool is an int subclass; `bits=True` must not pass as 1.
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _as_tuple(types))
    if not ok:
        allowed = " or ".join(t.__name__ for t in _as_tuple(types))
        raise TypeError(f"{owner}.`{name}` must be {allowed}, got {type(value).__name__} {value!r}")


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How one tensor (a weight, an input or an output) is quantized.

    ``bits`` 1..8 (methods narrow it further); ``symmetric`` fixes the zero point at the grid's
    middle; ``signed`` picks int vs uint codes (default: signed iff symmetric, so activations
    default to uint8, the fast path of x86 integer kernels); ``granularity`` is one scale per
    tensor, per channel (``axis``, default 0 for weights, 1 for activations) or per block of
    ``group_size`` input channels (weights only). ``observer`` estimates ranges; its parameters
    use PaddleSlim's names and defaults. ``dynamic`` quantizes an activation from its own
    min/max at run time (ONNX ``DynamicQuantizeLinear``: uint8, affine, per tensor).

    ``method`` picks the algorithm (``"ste"``, ``"lsq"``, ``"pact"``, ``"dorefa"``,
    ``"binary"``, ``"slb"``; ``QUANTIZERS`` lists them). ``quant_delay`` keeps the tensor in
    float for its first training steps (MindSpore ``quant_delay``, NNI ``quant_start_step``;
    counted in training forwards of the quantizer). ``alpha_init`` is PACT's initial clip
    (``None``: from the first batch); ``xnor`` gives binary weights a per-filter scale mean|W|.

    Calibration with data (``lowbit.calibrate``), for post-training quantization:
    ``smoothing`` (on a Linear's ``input``) is SmoothQuant's migration strength α: per input
    channel the activation is divided and the weight multiplied by
    ``s = max|X|^α / max|W|^(1-α)`` before ranges are taken. ``algorithm`` (on a ``weight``)
    picks how weights are rounded: ``"rtn"`` (nearest), ``"gptq"``, ``"awq"`` or ``"awq-gptq"``
    (``WEIGHT_ALGORITHMS``; docs/algorithms.md §10, §11).
    """

    bits: int = 8
    symmetric: bool = True
    signed: bool | None = None
    granularity: Granularity = "per_tensor"
    axis: int | None = None
    group_size: int | None = None
    narrow_range: bool = False
    observer: str = "minmax"
    method: str = "ste"
    dynamic: bool = False
    bins: int = 1024
    upsample_bins: int = 64
    hist_percent: float = 0.99999
    moving_rate: float = 0.9
    quant_delay: int = 0
    alpha_init: float | None = None
    xnor: bool = False
    smoothing: float | None = None
    algorithm: str = "rtn"

    def __post_init__(self) -> None:
        o = "QuantSpec"
        _check_type(o, "bits", self.bits, int)
        for name in ("symmetric", "narrow_range", "dynamic", "xnor"):
            _check_type(o, name, getattr(self, name), bool)
        if self.signed is not None:
            _check_type(o, "signed", self.signed, bool)
        for name in ("granularity", "observer", "method", "algorithm"):
            _check_type(o, name, getattr(self, name), str)
        for name in ("axis", "group_size"):
            if getattr(self, name) is not None:
                _check_type(o, name, getattr(self, name), int)
        for name in ("bins", "upsample_bins", "quant_delay"):
            _check_type(o, name, getattr(self, name), int)
        for name in ("alpha_init", "smoothing"):
            if getattr(self, name) is not None:
                _check_type(o, name, getattr(self, name), (float, int))
        for name in ("hist_percent", "moving_rate"):
            _check_type(o, name, getattr(self, name), (float, int))

        if not 1 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.`bits` must be an integer in 1..8, got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.`granularity` must be one of {list(GRANULARITIES)}, "
                f"got {self.granularity!r}"
            )
        OBSERVERS.get(self.observer, field="QuantSpec.observer")
        method = QUANTIZERS.get(self.method, field="QuantSpec.method")
        allowed_bits = getattr(method, "supported_bits", range(1, 9))
        if self.bits not in allowed_bits:
            raise ValueError(
                f"QuantSpec.`bits` must be one of {list(allowed_bits)} for method "
                f"{self.method!r}, got {self.bits}"
            )
        self._check_method_options(method)
        if self.smoothing is not None and not 0.0 <= self.smoothing <= 1.0:
            raise ValueError(f"QuantSpec.`smoothing` must be in [0, 1] or None, got {self.smoothing}")
        WEIGHT_ALGORITHMS.get(self.algorithm, field="QuantSpec.algorithm")
        if self.algorithm != "rtn" and (self.method != "ste" or self.dynamic):
            raise ValueError(
                f"QuantSpec.`algorithm` {self.algorithm!r} rounds post-training weights of "
                f"method 'ste', got method={self.method!r}"
            )
        if self.quant_delay < 0:
            raise ValueError(f"QuantSpec.`quant_delay` must be >= 0 training steps, got {self.quant_delay}")
        if self.alpha_init is not None and not self.alpha_init > 0:
            raise ValueError(f"QuantSpec.`alpha_init` must be > 0 or None, got {self.alpha_init}")
        if self.granularity == "per_group":
            if self.group_size is None or self.group_size < 1:
                raise ValueError(
                    "QuantSpec.`group_size` must be a positive int with granularity='per_group', "
                    f"got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"QuantSpec.`group_size` is only used with granularity='per_group', got "
                f"group_size={self.group_size} with granularity={self.granularity!r}"
            )
        if self.narrow_range and not self.is_signed:
            raise ValueError("QuantSpec.`narrow_range` needs signed codes (signed=True)")
        if self.bins < 16:
            raise ValueError(f"QuantSpec.`bins` must be >= 16, got {self.bins}")
        if self.upsample_bins < 1:
            raise ValueError(f"QuantSpec.`upsample_bins` must be >= 1, got {self.upsample_bins}")
        if not 0.0 < self.hist_percent <= 1.0:
            raise ValueError(f"QuantSpec.`hist_percent` must be in (0, 1], got {self.hist_percent}")
        if not 0.0 <= self.moving_rate < 1.0:
            raise ValueError(f"QuantSpec.`moving_rate` must be in [0, 1), got {self.moving_rate}")
        if self.dynamic and (self.bits != 8 or self.symmetric or self.is_signed
                             or self.granularity != "per_tensor"):
            raise ValueError(
                "QuantSpec with `dynamic=True` must be 8-bit, unsigned, affine and per_tensor "
                "(ONNX DynamicQuantizeLinear); set bits=8, symmetric=False, "
                "granularity='per_tensor'"
            )

    def _check_method_options(self, method: Any) -> None:
        # Options that only one algorithm reads must not be set for another: honour every field.
        used = set(getattr(method, "options", ()))
        for name in METHOD_OPTIONS:
            default = next(f.default for f in fields(self) if f.name == name)
            if getattr(self, name) != default and name not in used:
                users = sorted(m for m in QUANTIZERS
                               if name in getattr(QUANTIZERS.get(m), "options", ()))
                raise ValueError(
                    f"QuantSpec.`{name}` is only used by method(s) {users}, got "
                    f"{name}={getattr(self, name)!r} with method={self.method!r}"
                )

    @property
    def is_signed(self) -> bool:
        """Signed codes? Defaults to ``symmetric`` when ``signed`` is not given."""
        return self.symmetric if self.signed is None else self.signed

    def replace(self, **changes: Any) -> QuantSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Fields that differ from the defaults, plus ``bits`` (compact and editable)."""
        out: dict[str, Any] = {"bits": self.bits}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "bits" and value != f.default:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        if not isinstance(data, dict):
            raise TypeError(f"a QuantSpec must be a mapping, got {type(data).__name__} {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantSpec field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)


def _spec_or_none(data: Any) -> QuantSpec | None:
    return None if data is None else QuantSpec.from_dict(data)


@dataclass(frozen=True)
class LayerSpecs:
    """The resolved specs of one layer (what a plan entry says)."""

    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    output: QuantSpec | None = None


@dataclass(frozen=True, kw_only=True)
class LayerRule:
    """Which layers a rule selects and the specs it gives them.

    A layer matches when its type is in ``types`` (empty: any type), its qualified name
    matches one of ``names`` (empty: any name) and, if ``positions`` is given, it is the
    ``"first"`` or ``"last"`` layer with a weight in model order (the usual place for a low-bit
    recipe to keep 8 bits), or, for a functional op (``add``, ``cat``), ``"between"`` quantized
    layers: an input made by a quantized layer and the output read by one (where quantizing the
    op lets ONNX Runtime run its producer on an integer kernel), ``"before_pool"``: an add or cat
    made by a quantized layer whose output a global average pool reads (a CNN's last residual add),
    or, for a conv, ``"feeds_float"``: its
    output goes to float ops only (quantizing that output lets ONNX Runtime fuse the conv), or,
    for a ``Sigmoid`` / ``SiLU``, ``"gate"``: its input is a quantized layer's quantized output
    (quantizing the sigmoid lets ONNX Runtime run it and the product after it on uint8).
    Name patterns are globs (``"features.*"``) or,
    with a ``"re:"`` prefix, regular expressions matched against the whole name. The last
    matching rule of a config decides all three specs; a rule whose specs are all ``None``
    keeps the layers it matches in float.
    """

    # Lists are accepted; __post_init__ stores tuples.
    types: Sequence[str] = ()
    names: Sequence[str] = ()
    positions: Sequence[str] = ()
    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    output: QuantSpec | None = None

    def __post_init__(self) -> None:
        for name in ("types", "names", "positions"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(
                    f"LayerRule.`{name}` must be a list of strings, got the string {value!r}; "
                    f"write [{value!r}]"
                )
            if not isinstance(value, (list, tuple)):
                raise TypeError(
                    f"LayerRule.`{name}` must be a list of strings, got {type(value).__name__}"
                )
            for item in value:
                _check_type("LayerRule", name, item, str)
            object.__setattr__(self, name, tuple(value))
        for t in self.types:
            LAYERS.get(t, field="LayerRule.types")
        for position in self.positions:
            if position not in POSITIONS:
                raise ValueError(
                    f"LayerRule.`positions` must hold values of {list(POSITIONS)}, got {position!r}"
                )
        for pattern in self.names:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise ValueError(
                        f"LayerRule.`names` has an invalid regex {pattern!r}: {err}"
                    ) from None
        for target in TARGETS:
            spec = getattr(self, target)
            if spec is not None and not isinstance(spec, QuantSpec):
                raise TypeError(
                    f"LayerRule.`{target}` must be a QuantSpec or None, got {type(spec).__name__}"
                )
        for target in TARGETS:
            spec = getattr(self, target)
            role = "weight" if target == "weight" else "activation"
            roles = getattr(QUANTIZERS.get(spec.method), "roles", ("weight", "activation")) \
                if spec is not None else ()
            if spec is not None and role not in roles:
                raise ValueError(
                    f"LayerRule.`{target}`: method {spec.method!r} quantizes "
                    f"{' and '.join(r + 's' for r in roles)} only, not {role}s"
                )
        for target in ("input", "output"):
            spec = getattr(self, target)
            if spec is not None and spec.algorithm != "rtn":
                raise ValueError(f"LayerRule.`{target}`: `algorithm` {spec.algorithm!r} is for "
                                 "weights; activations are rounded to nearest")
        for target in ("weight", "output"):
            spec = getattr(self, target)
            if spec is not None and spec.smoothing is not None:
                raise ValueError(f"LayerRule.`{target}`: `smoothing` belongs on the `input` "
                                 "spec of a Linear (it moves input outliers into the weight)")
        if self.input is not None and self.input.smoothing is not None and self.weight is None:
            raise ValueError("LayerRule.`input`: `smoothing` needs a `weight` spec to move the "
                             "outliers into")
        if self.weight is not None and self.weight.dynamic:
            raise ValueError("LayerRule.`weight` cannot be dynamic; `dynamic` is for activations")
        if self.output is not None and self.output.dynamic:
            raise ValueError(
                "LayerRule.`output` cannot be dynamic: a dynamic range is only worth computing "
                "where an integer kernel consumes it, i.e. on a layer's `input`"
            )

    def matches(self, name: str, type_name: str, positions: frozenset[str] = frozenset()) -> bool:
        if self.types and type_name not in self.types:
            return False
        if self.positions and not positions.intersection(self.positions):
            return False
        return not self.names or any(_name_matches(p, name) for p in self.names)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.types:
            out["types"] = list(self.types)
        if self.names:
            out["names"] = list(self.names)
        if self.positions:
            out["positions"] = list(self.positions)
        for target in TARGETS:
            spec = getattr(self, target)
            out[target] = None if spec is None else spec.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerRule:
        if not isinstance(data, dict):
            raise TypeError(f"a LayerRule must be a mapping, got {type(data).__name__}")
        allowed = {"types", "names", "positions", *TARGETS}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown LayerRule field(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(
            types=data.get("types", ()),
            names=data.get("names", ()),
            positions=data.get("positions", ()),
            **{t: _spec_or_none(data.get(t)) for t in TARGETS},
        )


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """An ordered list of ``LayerRule`` (later rules win) and model-level switches.

    ``fuse_bn`` folds Conv→BatchNorm(→ReLU) chains before quantizing, so the quantized weight
    is the one that will run.
    """

    rules: Sequence[LayerRule] = field(default_factory=tuple)  # a list is stored as a tuple
    fuse_bn: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rules, LayerRule):
            raise TypeError("QuantConfig.`rules` must be a list of LayerRule; wrap it: [rule]")
        if not isinstance(self.rules, (list, tuple)):
            raise TypeError(
                f"QuantConfig.`rules` must be a list of LayerRule, got {type(self.rules).__name__}"
            )
        for rule in self.rules:
            if not isinstance(rule, LayerRule):
                raise TypeError(
                    f"QuantConfig.`rules` must hold LayerRule objects, got {type(rule).__name__}"
                )
        object.__setattr__(self, "rules", tuple(self.rules))
        _check_type("QuantConfig", "fuse_bn", self.fuse_bn, bool)

    def resolve(self, name: str, type_name: str,
                positions: frozenset[str] = frozenset()) -> LayerRule | None:
        """The last rule that matches a layer, or ``None``."""
        for rule in reversed(self.rules):
            if rule.matches(name, type_name, positions):
                return rule
        return None

    @classmethod
    def preset(cls, name: str) -> QuantConfig:
        """A named ready-made config; ``QuantConfig.presets()`` lists them."""
        from lowbit.presets import PRESETS

        if not isinstance(name, str):
            raise TypeError(f"preset name must be a str, got {type(name).__name__}")
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
        return PRESETS[name]()

    @staticmethod
    def presets() -> list[str]:
        from lowbit.presets import PRESETS

        return sorted(PRESETS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CONFIG_VERSION,
            "fuse_bn": self.fuse_bn,
            "rules": [r.to_dict() for r in self.rules],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        if not isinstance(data, dict):
            raise TypeError(f"a QuantConfig must be a mapping, got {type(data).__name__}")
        check_version(data, "QuantConfig")
        unknown = sorted(set(data) - {"version", "fuse_bn", "rules"})
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s) {unknown}")
        return cls(
            rules=[LayerRule.from_dict(r) for r in data.get("rules", [])],
            fuse_bn=data.get("fuse_bn", True),
        )

    def to_file(self, path: str | os.PathLike) -> None:
        """Write YAML (``.yaml``/``.yml``) or JSON (``.json``), atomically."""
        write_structured(path, self.to_dict())

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> QuantConfig:
        return load_file(path, cls.from_dict)


class ConfigFileError(ValueError):
    """A config or plan file that cannot be used: names the file and, where known, the line
    and key."""


class ConfigFileTypeError(ConfigFileError, TypeError):
    """A config or plan file holding a value of the wrong type (also a ``TypeError``)."""


class LocatedDict(dict):
    """A mapping read from a file, remembering the file and the line of each key."""

    source: str = ""
    line: int = 0
    lines: dict[str, int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lines = {}


def _key_in_message(message: str, data: LocatedDict) -> str | None:
    message = message.split("; allowed")[0]  # the allowed names are not the culprit
    for key in data:
        if isinstance(key, str) and (f"`{key}`" in message or f"'{key}'" in message
                                     or f"{key}=" in message):
            return key
    return None


def located_error(err: Exception, data: Any, source: str) -> Exception:
    """``err`` as a ``ConfigFileError`` naming ``source``, the line and the key it concerns
    (searched in ``data``'s mappings, innermost first)."""
    message = str(err)
    found: tuple[int, str | None] | None = None

    def walk(node: Any) -> None:
        nonlocal found
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
            if found is None and isinstance(node, LocatedDict):
                key = _key_in_message(message, node)
                if key is not None:
                    found = (node.lines.get(key, node.line), key)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(data)
    where = source
    if found is not None:
        line, key = found
        where = f"{source}:{line}" if line else source
        if key is not None and f"`{key}`" not in message:
            message = f"key {key!r}: {message}"
    cls = ConfigFileTypeError if isinstance(err, TypeError) else ConfigFileError
    return cls(f"{where}: {message}")


class _Loader:
    """Builds the YAML loader class on first use (yaml is imported lazily)."""

    cls: Any = None

    @classmethod
    def get(cls, source: str) -> Any:
        import yaml

        if cls.cls is None:
            class Loader(yaml.SafeLoader):
                source = ""

                def construct_mapping(self, node: Any, deep: bool = False) -> Any:
                    seen: dict[Any, int] = {}
                    for key_node, _ in node.value:
                        key = self.construct_object(key_node, deep=True)
                        line = key_node.start_mark.line + 1
                        if isinstance(key, (str, int, float, bool)) and key in seen:
                            raise ConfigFileError(
                                f"{self.source}:{line}: duplicate key {key!r} (first at line "
                                f"{seen[key]}); each key may appear once")
                        if isinstance(key, (str, int, float, bool)):
                            seen[key] = line
                    return super().construct_mapping(node, deep)

            def construct_map(loader: Any, node: Any) -> Any:
                data = LocatedDict()
                data.source, data.line = loader.source, node.start_mark.line + 1
                yield data
                data.update(loader.construct_mapping(node))
                data.lines = {k.value: k.start_mark.line + 1 for k, _ in node.value
                              if hasattr(k, "value") and isinstance(k.value, str)}

            Loader.add_constructor("tag:yaml.org,2002:map", construct_map)
            cls.cls = Loader
        loader_cls = type("SourceLoader", (cls.cls,), {"source": source})
        return loader_cls


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML safely; syntax errors and duplicate keys name the file and line."""
    import yaml

    try:
        loader = _Loader.get(source)(text)
    except yaml.YAMLError as err:  # the reader rejects control characters up front
        raise ConfigFileError(f"{source}: invalid YAML: {' '.join(str(err).split())}") from None
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = " ".join(p for p in (err.context, err.problem) if p)
        raise ConfigFileError(f"{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{source}: invalid YAML: {err}") from None
    finally:
        loader.dispose()


def parse_json(text: str, source: str) -> Any:
    """Parse JSON; syntax errors and duplicate keys name the file and line."""

    def pairs(items: list[tuple[str, Any]]) -> LocatedDict:
        data = LocatedDict()
        data.source = source
        for key, value in items:
            if key in data:
                raise ConfigFileError(f"{source}:{_json_line(text, key, 2)}: duplicate key "
                                      f"{key!r} (first at line {_json_line(text, key, 1)}); "
                                      "each key may appear once")
            data[key] = value
            data.lines[key] = _json_line(text, key, 1)
        return data

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as err:
        raise ConfigFileError(f"{source}:{err.lineno}:{err.colno}: invalid JSON: "
                              f"{err.msg}") from None


def _json_line(text: str, key: str, nth: int) -> int:
    """The line of the ``nth`` occurrence of ``"key":`` in ``text`` (0 if not found)."""
    pattern = re.compile(re.escape(json.dumps(key)) + r"\s*:")
    for i, match in enumerate(pattern.finditer(text), start=1):
        if i == nth:
            return text.count("\n", 0, match.start()) + 1
    return 0


def warn_unmatched_names(config: QuantConfig, names: Sequence[str]) -> None:
    """Warn for each ``LayerRule.names`` pattern that matches none of ``names``: a typo there
    would otherwise leave the layers it meant untouched without a word."""
    import warnings

    names = list(dict.fromkeys(names))
    for i, rule in enumerate(config.rules):
        dead = [p for p in rule.names if not any(_name_matches(p, n) for n in names)]
        if dead:
            sample = [n for n in names if n][:8]
            warnings.warn(f"rule {i} of the config: name pattern(s) {dead} match no layer of the "
                          f"model, so the rule does nothing for them (layers are named like "
                          f"{sample}{' ...' if len(names) > 9 else ''})", stacklevel=3)


def check_version(data: dict[str, Any], what: str) -> None:
    version = data.get("version", CONFIG_VERSION)
    if isinstance(version, bool) or version != CONFIG_VERSION:
        raise ValueError(f"{what} file version {version!r} is not supported; expected {CONFIG_VERSION}")


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".json":
        return "json"
    raise ValueError(f"`path` must end in .yaml, .yml or .json, got {str(path)!r}")


def write_structured(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write a dict as YAML or JSON (by suffix) through a temp file and a rename."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    fmt = _format_of(path)
    if fmt == "yaml":
        import yaml

        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    else:
        text = json.dumps(data, indent=2) + "\n"
    atomic_write_text(path, text)


def read_structured(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML/JSON file's top-level mapping; every mapping in it is a ``LocatedDict`` that
    knows its file and the line of each key, so later errors can point at them."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    fmt = _format_of(path)
    if not path.is_file():
        raise MissingFileError(f"{str(path)!r} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigFileError(f"{path}: not a UTF-8 text file ({err.reason} at byte "
                              f"{err.start})") from None
    data = parse_yaml(text, str(path)) if fmt == "yaml" else parse_json(text, str(path))
    if not isinstance(data, dict):
        raise ConfigFileError(f"{str(path)!r} must hold a mapping at the top level, got "
                              f"{type(data).__name__}")
    return data


def load_file(path: str | os.PathLike, build: Any) -> Any:
    """``build(read_structured(path))``, with errors pointing at the file (and line, key)."""
    data = read_structured(path)
    try:
        return build(data)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigFileError):
            raise
        raise located_error(err, data, str(Path(path))) from None
