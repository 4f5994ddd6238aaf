"""QuantSpec / LayerRule / QuantConfig: validation messages, rule resolution, round trips."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.quantizers.uniform import UniformQuantizer
from lowbit.registry import LAYERS, QUANTIZERS

W8 = QuantSpec(bits=8, granularity="per_channel")
A8 = QuantSpec(bits=8, symmetric=False)
DYN = QuantSpec(bits=8, symmetric=False, dynamic=True)

# ------------------------------------------------------------------------------ QuantSpec


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 3.5}, r"QuantSpec.`bits` must be int, got float 3.5"),
        ({"bits": True}, r"QuantSpec.`bits` must be int, got bool True"),
        ({"bits": "8"}, r"QuantSpec.`bits` must be int, got str '8'"),
        ({"symmetric": 1}, r"QuantSpec.`symmetric` must be bool, got int 1"),
        ({"narrow_range": "no"}, r"QuantSpec.`narrow_range` must be bool"),
        ({"dynamic": None}, r"QuantSpec.`dynamic` must be bool, got NoneType"),
        ({"signed": 0}, r"QuantSpec.`signed` must be bool, got int 0"),
        ({"granularity": 0}, r"QuantSpec.`granularity` must be str, got int"),
        ({"observer": None}, r"QuantSpec.`observer` must be str, got NoneType"),
        ({"method": 1}, r"QuantSpec.`method` must be str"),
        ({"axis": 1.0}, r"QuantSpec.`axis` must be int, got float"),
        ({"granularity": "per_group", "group_size": "4"},
         r"QuantSpec.`group_size` must be int, got str"),
        ({"bins": 2048.0}, r"QuantSpec.`bins` must be int, got float"),
        ({"upsample_bins": True}, r"QuantSpec.`upsample_bins` must be int, got bool"),
        ({"hist_percent": "0.9"}, r"QuantSpec.`hist_percent` must be float or int, got str"),
        ({"moving_rate": None}, r"QuantSpec.`moving_rate` must be float or int"),
    ],
    ids=["bits-float", "bits-bool", "bits-str", "symmetric-int", "narrow-str", "dynamic-none",
         "signed-int", "granularity-int", "observer-none", "method-int", "axis-float",
         "group_size-str", "bins-float", "upsample_bins-bool", "hist_percent-str",
         "moving_rate-none"],
)
def test_quant_spec_type_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        QuantSpec(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 9}, r"QuantSpec.`bits` must be an integer in 1..8, got 9"),
        ({"bits": 0}, r"QuantSpec.`bits` must be an integer in 1..8, got 0"),
        ({"granularity": "per_row"},
         r"`granularity` must be one of \['per_tensor', 'per_channel', 'per_group'\], "
         r"got 'per_row'"),
        ({"observer": "maxmin"},
         r"`QuantSpec.observer` must be one of \['ema', 'kl', 'minmax', 'mse', 'percentile'\], "
         r"got 'maxmin'"),
        ({"method": "gptq"}, r"`QuantSpec.method` must be one of \[.*'ste'.*\], got 'gptq'"),
        ({"granularity": "per_group"},
         r"`group_size` must be a positive int with granularity='per_group', got None"),
        ({"granularity": "per_group", "group_size": 0},
         r"`group_size` must be a positive int with granularity='per_group', got 0"),
        ({"group_size": 32},
         r"`group_size` is only used with granularity='per_group', got group_size=32 with "
         r"granularity='per_tensor'"),
        ({"granularity": "per_channel", "group_size": 32},
         r"got group_size=32 with granularity='per_channel'"),
        ({"symmetric": False, "narrow_range": True}, r"`narrow_range` needs signed codes"),
        ({"signed": False, "narrow_range": True}, r"`narrow_range` needs signed codes"),
        ({"bins": 8}, r"QuantSpec.`bins` must be >= 16, got 8"),
        ({"upsample_bins": 0}, r"QuantSpec.`upsample_bins` must be >= 1, got 0"),
        ({"hist_percent": 0.0}, r"QuantSpec.`hist_percent` must be in \(0, 1\], got 0.0"),
        ({"hist_percent": 1.5}, r"QuantSpec.`hist_percent` must be in \(0, 1\], got 1.5"),
        ({"moving_rate": 1.0}, r"QuantSpec.`moving_rate` must be in \[0, 1\), got 1.0"),
        ({"moving_rate": -0.1}, r"QuantSpec.`moving_rate` must be in \[0, 1\), got -0.1"),
    ],
    ids=["bits-9", "bits-0", "granularity", "observer", "method", "per_group-no-size",
         "per_group-size-0", "size-per_tensor", "size-per_channel", "narrow-affine",
         "narrow-unsigned", "bins", "upsample_bins", "hist_percent-0", "hist_percent-1.5",
         "moving_rate-1", "moving_rate-negative"],
)
def test_quant_spec_value_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 4},
        {"symmetric": True},
        {"signed": True},
        {"granularity": "per_channel"},
    ],
    ids=["4-bit", "symmetric", "signed", "per_channel"],
)
def test_dynamic_spec_must_be_uint8_affine_per_tensor(kwargs: dict) -> None:
    settings = {"bits": 8, "symmetric": False, "dynamic": True, **kwargs}
    with pytest.raises(ValueError, match=r"`dynamic=True` must be 8-bit, unsigned, affine and "
                                         r"per_tensor \(ONNX DynamicQuantizeLinear\)"):
        QuantSpec(**settings)


def test_bits_outside_the_methods_set_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    class TwoBitOnly(UniformQuantizer):
        supported_bits = (2,)

    monkeypatch.setitem(QUANTIZERS._items, "two_bit", TwoBitOnly)
    assert QuantSpec(bits=2, method="two_bit").method == "two_bit"
    with pytest.raises(ValueError, match=r"`bits` must be one of \[2\] for method 'two_bit', "
                                         r"got 4"):
        QuantSpec(bits=4, method="two_bit")


@pytest.mark.parametrize(
    ("kwargs", "signed"),
    [({}, True), ({"symmetric": False}, False), ({"symmetric": False, "signed": True}, True),
     ({"signed": False}, False)],
    ids=["symmetric-default", "affine-default", "affine-signed", "symmetric-unsigned"],
)
def test_signed_defaults_to_symmetric(kwargs: dict, signed: bool) -> None:
    assert QuantSpec(**kwargs).is_signed is signed


def test_quant_spec_is_frozen_and_replace_validates() -> None:
    spec = QuantSpec()
    with pytest.raises(AttributeError):
        spec.bits = 4  # type: ignore[misc]
    assert spec.replace(bits=4).bits == 4
    with pytest.raises(ValueError, match=r"`bits` must be an integer in 1..8, got 12"):
        spec.replace(bits=12)


def test_quant_spec_to_dict_keeps_only_changed_fields() -> None:
    assert QuantSpec().to_dict() == {"bits": 8}
    spec = QuantSpec(bits=4, symmetric=False, observer="percentile", hist_percent=0.999)
    assert spec.to_dict() == {"bits": 4, "symmetric": False, "observer": "percentile",
                              "hist_percent": 0.999}
    assert QuantSpec.from_dict(spec.to_dict()) == spec


def test_quant_spec_from_dict_errors() -> None:
    with pytest.raises(TypeError, match=r"a QuantSpec must be a mapping, got list"):
        QuantSpec.from_dict([8])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown QuantSpec field\(s\) \['bit'\]; allowed: "):
        QuantSpec.from_dict({"bit": 8})


# ------------------------------------------------------------------------------ LayerRule


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"types": "Linear"},
         r"LayerRule.`types` must be a list of strings, got the string 'Linear'; "
         r"write \['Linear'\]"),
        ({"names": "fc*"}, r"LayerRule.`names` must be a list of strings, got the string 'fc\*'"),
        ({"types": {"Linear"}}, r"LayerRule.`types` must be a list of strings, got set"),
        ({"names": 3}, r"LayerRule.`names` must be a list of strings, got int"),
        ({"types": [nn.Linear]}, r"LayerRule.`types` must be str, got type"),
        ({"names": ["fc", 1]}, r"LayerRule.`names` must be str, got int 1"),
        ({"weight": {"bits": 8}}, r"LayerRule.`weight` must be a QuantSpec or None, got dict"),
        ({"input": 8}, r"LayerRule.`input` must be a QuantSpec or None, got int"),
        ({"output": "uint8"}, r"LayerRule.`output` must be a QuantSpec or None, got str"),
    ],
    ids=["types-string", "names-string", "types-set", "names-int", "types-class",
         "names-item-int", "weight-dict", "input-int", "output-str"],
)
def test_layer_rule_type_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        LayerRule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"types": ["Conv3d"]},
         rf"`LayerRule.types` must be one of {re.escape(str(LAYERS.names()))}, got 'Conv3d'"),
        ({"types": ["linear"]}, r"`LayerRule.types` must be one of .*got 'linear'"),
        ({"names": ["re:features.(\\d+"]},
         r"LayerRule.`names` has an invalid regex 're:features.\(\\\\d\+'"),
        ({"weight": DYN}, r"LayerRule.`weight` cannot be dynamic"),
        ({"output": DYN}, r"LayerRule.`output` cannot be dynamic"),
    ],
    ids=["unknown-type", "lowercase-type", "bad-regex", "weight-dynamic", "output-dynamic"],
)
def test_layer_rule_value_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LayerRule(**kwargs)


def test_layer_rule_takes_lists_and_stores_tuples() -> None:
    rule = LayerRule(types=["Linear"], names=["fc*"], input=DYN)
    assert rule.types == ("Linear",) and rule.names == ("fc*",)


def test_layer_rule_from_dict_errors() -> None:
    with pytest.raises(TypeError, match=r"a LayerRule must be a mapping, got str"):
        LayerRule.from_dict("Linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown LayerRule field\(s\) \['type'\]"):
        LayerRule.from_dict({"type": ["Linear"]})


@pytest.mark.parametrize(
    ("rule", "name", "type_name", "expected"),
    [
        (LayerRule(), "anything", "Conv2d", True),
        (LayerRule(types=["Linear"]), "fc", "Linear", True),
        (LayerRule(types=["Linear"]), "fc", "Conv2d", False),
        (LayerRule(names=["features.*"]), "features.0", "Conv2d", True),
        (LayerRule(names=["features.*"]), "classifier.0", "Conv2d", False),
        (LayerRule(names=["features.?"]), "features.10", "Conv2d", False),
        (LayerRule(names=["re:layer\\d\\.conv"]), "layer1.conv", "Conv2d", True),
        (LayerRule(names=["re:layer\\d"]), "layer1.conv", "Conv2d", False),  # whole name
        (LayerRule(names=["fc", "head"]), "head", "Linear", True),
        (LayerRule(types=["Conv2d"], names=["fc"]), "fc", "Linear", False),
    ],
    ids=["empty-matches-all", "type", "other-type", "glob", "glob-miss", "glob-one-char",
         "regex", "regex-is-fullmatch", "any-of-names", "type-and-name"],
)
def test_rule_matching(rule: LayerRule, name: str, type_name: str, expected: bool) -> None:
    assert rule.matches(name, type_name) is expected


# ------------------------------------------------------------------------------ QuantConfig


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rules": LayerRule()}, r"QuantConfig.`rules` must be a list of LayerRule; wrap it"),
        ({"rules": "w8a8"}, r"QuantConfig.`rules` must be a list of LayerRule, got str"),
        ({"rules": None}, r"QuantConfig.`rules` must be a list of LayerRule, got NoneType"),
        ({"rules": [{"types": ["Linear"]}]},
         r"QuantConfig.`rules` must hold LayerRule objects, got dict"),
        ({"fuse_bn": "yes"}, r"QuantConfig.`fuse_bn` must be bool, got str 'yes'"),
    ],
    ids=["bare-rule", "string", "none", "dict-rule", "fuse_bn-str"],
)
def test_quant_config_type_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        QuantConfig(**kwargs)


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ValueError, match=r"unknown preset 'int8'; presets: \[.*'w4a8', "
                                         r"'w4a8-lsq'.*'w8', 'w8-transformer', 'w8a8', 'w8a8-qat', 'w8a8-transformer'\]"):
        QuantConfig.preset("int8")
    with pytest.raises(TypeError, match=r"preset name must be a str, got int"):
        QuantConfig.preset(8)  # type: ignore[arg-type]


def test_quant_config_from_dict_errors() -> None:
    with pytest.raises(TypeError, match=r"a QuantConfig must be a mapping, got list"):
        QuantConfig.from_dict([])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"QuantConfig file version 2 is not supported; "
                                         r"expected 1"):
        QuantConfig.from_dict({"version": 2, "rules": []})
    with pytest.raises(ValueError, match=r"unknown QuantConfig field\(s\) \['rule'\]"):
        QuantConfig.from_dict({"rule": []})


def test_later_rules_win() -> None:
    first = LayerRule(types=["Linear", "Conv2d"], weight=W8)
    second = LayerRule(names=["head"], weight=QuantSpec(bits=4))
    third = LayerRule(names=["head"], types=["Conv2d"])  # float, but only for convs
    cfg = QuantConfig(rules=[first, second, third])
    assert cfg.resolve("body", "Linear") is first
    assert cfg.resolve("head", "Linear") is second
    assert cfg.resolve("head", "Conv2d") is third
    assert cfg.resolve("body", "Conv1d") is None


def test_rule_without_specs_keeps_the_layer_float() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    cfg = QuantConfig(rules=[LayerRule(types=["Linear"], weight=W8), LayerRule(names=["2"])])
    the_plan = lowbit.plan(model, cfg)
    assert not the_plan["0"].is_float
    assert the_plan["2"].is_float
    with pytest.warns(UserWarning, match=r"left 1 layer\(s\) in float: 2: kept in float by "
                                         r"the config"):
        qm = lowbit.quantize(model, cfg)
    assert type(qm[2]) is nn.Linear and type(qm[0]) is not nn.Linear


# ------------------------------------------------------------------------------ round trips


def _hand_built() -> QuantConfig:
    return QuantConfig(
        fuse_bn=False,
        rules=[
            LayerRule(types=["Conv2d", "Linear"], weight=W8,
                      input=QuantSpec(bits=8, symmetric=False, observer="percentile",
                                      hist_percent=0.9999, bins=2048)),
            LayerRule(names=["features.*", "re:layer\\d+\\.conv[12]"],
                      weight=QuantSpec(bits=4, granularity="per_group", group_size=32,
                                       narrow_range=True),
                      output=QuantSpec(bits=8, signed=False, observer="ema", moving_rate=0.5,
                                       axis=1, granularity="per_channel")),
            LayerRule(types=["Linear"], names=["head"], input=DYN),
            LayerRule(types=["add"], input=QuantSpec(bits=8, symmetric=False, observer="kl",
                                                    upsample_bins=32)),
            LayerRule(names=["classifier"]),
        ],
    )


CONFIGS = {**{f"preset-{name}": QuantConfig.preset(name) for name in QuantConfig.presets()},
           "hand-built": _hand_built()}


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_to_dict_from_dict_round_trip(cfg: QuantConfig) -> None:
    data = cfg.to_dict()
    assert data["version"] == 1
    assert QuantConfig.from_dict(data) == cfg
    assert json.loads(json.dumps(data)) == data  # plain data only


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_file_round_trip(cfg: QuantConfig, suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"config{suffix}"
    cfg.to_file(path)
    assert QuantConfig.from_file(path) == cfg
    assert QuantConfig.from_file(str(path)).to_dict() == cfg.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_every_preset_builds_and_quantizes() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(128, 2))
    for name in QuantConfig.presets():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = lowbit.quantize(model, QuantConfig.preset(name))
        linear_only = name.startswith("w4-g") or name.endswith("-transformer")
        assert (type(qm[0]) is nn.Conv2d) == linear_only, name
        assert type(qm[2]) is not nn.Linear, name
        assert qm(torch.randn(2, 3, 6, 6)).shape == (2, 2)


@pytest.mark.parametrize("name", ["config.txt", "config", "config.yaml.bak"],
                         ids=["txt", "no-suffix", "bak"])
def test_bad_suffix_is_rejected(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    with pytest.raises(ValueError, match=r"`path` must end in .yaml, .yml or .json"):
        QuantConfig.preset("w8a8").to_file(path)
    assert not path.exists()
    path.write_text("{}")
    with pytest.raises(ValueError, match=r"`path` must end in .yaml, .yml or .json"):
        QuantConfig.from_file(path)


def test_writing_into_a_missing_folder_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "config.yaml"
    with pytest.raises(ValueError, match=r"cannot write .*config.yaml.*: folder .*missing.* "
                                         r"does not exist"):
        QuantConfig.preset("w8a8").to_file(path)
    assert list(tmp_path.iterdir()) == []


def test_file_must_hold_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("- types: [Linear]\n")
    with pytest.raises(ValueError, match=r"must hold a mapping at the top level"):
        QuantConfig.from_file(path)


def test_yaml_file_is_editable_text(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    QuantConfig.preset("w8a8").to_file(path)
    text = path.read_text().replace("bits: 8, granularity: per_channel",
                                    "bits: 4, granularity: per_channel")
    assert text != path.read_text()
    path.write_text(text)
    rule = QuantConfig.from_file(path).rules[0]
    assert rule.weight is not None and rule.weight.bits == 4


# ---------------------------------------------------------------- QAT fields and rules


@pytest.mark.parametrize("spec, match", [
    (dict(xnor=True), r"`xnor` is only used by method\(s\) \['binary'\]"),
    (dict(alpha_init=6.0), r"`alpha_init` is only used by method\(s\) \['pact'\]"),
    (dict(bits=1), r"`bits` must be one of \[2, .*\] for method 'ste'"),
    (dict(bits=3, method="slb"), r"`bits` must be one of \[1, 2, 4\] for method 'slb'"),
    (dict(bits=2, method="binary"), r"`bits` must be one of \[1\] for method 'binary'"),
    (dict(method="pact", alpha_init=0.0), r"`alpha_init` must be > 0"),
    (dict(quant_delay=-3), r"`quant_delay` must be >= 0"),
], ids=["xnor-ste", "alpha-ste", "ste-1bit", "slb-3bit", "binary-2bit", "alpha-zero",
        "delay-negative"])
def test_method_options_are_checked_against_the_method(spec, match) -> None:
    with pytest.raises(ValueError, match=match):
        QuantSpec(**spec)


def test_method_options_type_errors() -> None:
    with pytest.raises(TypeError, match=r"QuantSpec.`xnor` must be bool"):
        QuantSpec(bits=1, method="binary", xnor=1)
    with pytest.raises(TypeError, match=r"QuantSpec.`alpha_init` must be float or int"):
        QuantSpec(method="pact", alpha_init="6")


@pytest.mark.parametrize("target, method, match", [
    ("input", "slb", "'slb' quantizes weights only"),
])
def test_rules_check_which_tensors_a_method_quantizes(target, method, match) -> None:
    with pytest.raises(ValueError, match=match):
        LayerRule(**{target: QuantSpec(bits=2, method=method)})


def test_positions_select_the_first_and_last_weighted_layers() -> None:
    import torch.nn as tnn

    import lowbit

    model = tnn.Sequential(tnn.Conv2d(1, 2, 3), tnn.ReLU(), tnn.Conv2d(2, 2, 3), tnn.Flatten(),
                           tnn.Linear(2, 2))
    eight = QuantSpec(bits=8, granularity="per_channel")
    cfg = QuantConfig(rules=[LayerRule(types=["Conv2d", "Linear"], weight=QuantSpec(bits=4)),
                             LayerRule(positions=["first", "last"], weight=eight)])
    bits = {layer.name: layer.weight.bits for layer in lowbit.plan(model, cfg).layers}
    assert bits == {"0": 8, "2": 4, "4": 8}
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"`positions` must hold values of \['first', 'last', 'between', 'before_pool', 'feeds_float', 'gate'\]"):
        LayerRule(positions=["middle"])
    with pytest.raises(TypeError, match="LayerRule.`positions` must be a list"):
        LayerRule(positions="first")


@pytest.mark.parametrize("name", ["w8a8-qat", "w4a8-lsq", "w2a2-pact", "w2-dorefa", "w1a1-bnn",
                                  "w1a8-xnor", "w2a8-slb", "w1-slb"])
def test_qat_presets_keep_first_and_last_layers_at_eight_bits(name) -> None:
    cfg = QuantConfig.preset(name)
    if cfg.rules[0].weight.bits < 8 or (cfg.rules[0].input and cfg.rules[0].input.bits < 8):
        edge = cfg.rules[-1]
        assert edge.positions == ("first", "last") and edge.weight.bits == 8
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
