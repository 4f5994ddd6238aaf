"""Bad input, one table: every public function given something wrong must raise a
TypeError/ValueError (or FileNotFoundError, or a lowbit class subclassing them) that names the
argument, field, file or layer and the value. To extend: add a row to CASES (or FILE_CASES
for config/plan files) with the call, the exception and a regex its message must match."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fault_helpers import deploy_model
from torch import nn

import lowbit
from lowbit import LayerRule, Plan, QuantConfig, QuantSpec
from lowbit.checkpoint import CheckpointMismatchError, strip_metadata
from lowbit.guard import LayerError

W8A8 = QuantConfig.preset("w8a8")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def quantized(model: nn.Module | None = None, config: QuantConfig = W8A8) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lowbit.quantize(model if model is not None else mlp(), config)


def meta_model() -> nn.Module:
    with torch.device("meta"):
        return mlp()


def calibrated() -> nn.Module:
    qm = quantized()
    lowbit.calibrate(qm, [torch.randn(4, 6)], progress=False)
    return qm


Case = tuple[Callable[[], Any], type[BaseException], str]

CASES: dict[str, Case] = {
    # quantize / prepare_qat
    "quantize-inplace-str": (lambda: lowbit.quantize(mlp(), W8A8, inplace="no"), TypeError,
                             r"`inplace` must be a bool \(True or False\), got str 'no'"),
    "quantize-inplace-int": (lambda: lowbit.quantize(mlp(), W8A8, inplace=1), TypeError,
                             r"`inplace` must be a bool.*got int 1"),
    "quantize-config-type": (lambda: lowbit.quantize(mlp(), "w8a8"), TypeError,
                             r"`config` must be a QuantConfig or a Plan, got str"),
    "quantize-model-type": (lambda: lowbit.quantize("model", W8A8), TypeError,
                            r"`model` must be a torch.nn.Module, got str"),
    "quantize-meta-device": (lambda: lowbit.quantize(meta_model(), W8A8), ValueError,
                             r"on the meta device.*'0.weight'.*to_empty"),
    "quantize-axis-out-of-range": (
        lambda: lowbit.quantize(mlp(), QuantConfig(rules=[LayerRule(types=["Linear"], weight=(
            QuantSpec(granularity="per_channel", axis=5)))])),
        ValueError, r"layer '0': weight `axis` 5 is out of range for its 2-d weight \(8, 6\); "
                    r"allowed -2..1"),
    "quantize-plan-from-another-model": (
        lambda: lowbit.quantize(mlp(), lowbit.plan(cnn(), W8A8)), ValueError,
        r"the plan (names layer|says layer) '\d'.*another model"),
    "prepare-qat-freeze-bn": (lambda: lowbit.prepare_qat(mlp(), W8A8, freeze_bn=True),
                              TypeError, r"`freeze_bn` must be an int"),
    # calibrate
    "calibrate-wrong-width": (lambda: lowbit.calibrate(quantized(), [torch.randn(4, 5)],
                                                       progress=False),
                              LayerError, r"calibration batch 1: layer '0'.*Tensor\(4, 5\) "
                                          r"float32 cpu"),
    "calibrate-int-dtype": (lambda: lowbit.calibrate(quantized(), [torch.ones(4, 6,
                                                                              dtype=torch.int64)],
                                                     progress=False),
                            LayerError, r"layer '0'.*int64"),
    "calibrate-nan": (lambda: lowbit.calibrate(quantized(), [torch.full((4, 6), float("nan"))],
                                               progress=False),
                      ValueError, r"the input of layer '0' holds NaN or Inf values"),
    "calibrate-nonfinite-option": (lambda: lowbit.calibrate(quantized(), [torch.ones(4, 6)],
                                                            nonfinite="ignore", progress=False),
                                   ValueError, r"`nonfinite` must be 'raise' or 'skip', got "
                                               r"'ignore'"),
    "calibrate-progress-type": (lambda: lowbit.calibrate(quantized(), [torch.ones(4, 6)],
                                                         progress="yes"),
                                TypeError, r"`progress` must be a bool, got str 'yes'"),
    "calibrate-max-batches-bool": (lambda: lowbit.calibrate(quantized(), [torch.ones(4, 6)],
                                                            max_batches=True, progress=False),
                                   ValueError, r"`max_batches` must be a positive int"),
    "calibrate-float-model": (lambda: lowbit.calibrate(mlp(), [torch.ones(4, 6)]),
                              ValueError, r"no lowbit quantizers"),
    # convert
    "convert-uncalibrated": (lambda: lowbit.convert(quantized()), ValueError,
                             r"layer '0' has no range yet.*lowbit.calibrate"),
    # export_onnx
    "export-float-model": (lambda: lowbit.export_onnx(mlp(), "m.onnx", (torch.ones(1, 6),)),
                           ValueError, r"`model` has no quantized deploy layers"),
    "export-fake-quant-model": (lambda: lowbit.export_onnx(calibrated(), "m.onnx",
                                                           (torch.ones(1, 6),)),
                                ValueError, r"lowbit.convert"),
    "export-opset-str": (lambda: lowbit.export_onnx(deploy_model(width=6), "m.onnx",
                                                    (torch.ones(1, 6),), opset="19"),
                         TypeError, r"`opset` must be an int or None, got str '19'"),
    "export-opset-range": (lambda: lowbit.export_onnx(deploy_model(width=6), "m.onnx",
                                                      (torch.ones(1, 6),), opset=7),
                           ValueError, r"`opset` must be in 13\.\.\d+.*got 7"),
    "export-threads-negative": (lambda: lowbit.export_onnx(deploy_model(width=6), "m.onnx",
                                                           (torch.ones(1, 6),), threads=-1),
                                ValueError, r"`threads` must be >= 1.*got -1"),
    "export-threads-bool": (lambda: lowbit.export_onnx(deploy_model(width=6), "m.onnx",
                                                       (torch.ones(1, 6),), threads=True),
                            TypeError, r"`threads` must be an int or None, got bool"),
    "export-dynamic-shapes-str": (lambda: lowbit.export_onnx(
        deploy_model(width=6), "m.onnx", (torch.ones(1, 6),), dynamic_shapes="batch"),
        TypeError, r"`dynamic_shapes` must be a tuple.*got str 'batch'"),
    "export-input-names-str": (lambda: lowbit.export_onnx(
        deploy_model(width=6), "m.onnx", (torch.ones(1, 6),), input_names="x"),
        TypeError, r"`input_names` must be a list of str or None.*write \['x'\]"),
    "export-wrong-width": (lambda: lowbit.export_onnx(deploy_model(width=6), "m.onnx",
                                                      (torch.ones(1, 5),)),
                           LayerError, r"layer '0' \(DeployLinear\) rejected its input "
                                       r"\(Tensor\(1, 5\)"),
    "export-missing-folder": (lambda: lowbit.export_onnx(deploy_model(width=6), "nope/m.onnx",
                                                         (torch.ones(1, 6),)),
                              ValueError, r"folder 'nope' does not exist"),
    "load-export-missing": (lambda: lowbit.load_export("nope.onnx"), FileNotFoundError,
                            r"'nope.onnx' does not exist"),
    "load-export-path-type": (lambda: lowbit.load_export(3), TypeError,
                              r"`path` must be a str or os.PathLike, got int"),
    # configs
    "spec-bits-bool": (lambda: QuantSpec(bits=True), TypeError,
                       r"QuantSpec.`bits` must be int, got bool True"),
    "spec-bits-range": (lambda: QuantSpec(bits=9), ValueError, r"`bits` must be an integer in "
                                                               r"1..8, got 9"),
    "config-from-file-type": (lambda: QuantConfig.from_file(3), TypeError,
                              r"`path` must be a str or os.PathLike, got int"),
    "config-from-missing-file": (lambda: QuantConfig.from_file("nope.yaml"), FileNotFoundError,
                                 r"'nope.yaml' does not exist"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_gives_a_clear_error(case: str, tmp_path: Path, monkeypatch) -> None:
    call, exc, match = CASES[case]
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=match) as info:
            call()
    assert isinstance(info.value, (TypeError, ValueError, FileNotFoundError))
    assert [p.name for p in tmp_path.iterdir()] == [], "a failed call left files behind"


# ------------------------------------------------------------------ config and plan files

FILE_CASES: dict[str, tuple[str, str, str]] = {
    "yaml-syntax": ("c.yaml", "version: 1\nrules: [\n  - types\n", r"c.yaml:3:3: invalid YAML"),
    "yaml-duplicate-key": ("c.yaml", "version: 1\nrules:\n  - types: [Linear]\n"
                                     "    types: [Conv2d]\n",
                           r"c.yaml:4: duplicate key 'types' \(first at line 3\)"),
    "yaml-unknown-key": ("c.yaml", "version: 1\nrules:\n  - types: [Linear]\n"
                                   "    weight: {bits: 4, bitz: 3}\n",
                         r"c.yaml:4: key 'bitz': unknown QuantSpec field\(s\) \['bitz'\]"),
    "yaml-wrong-type": ("c.yaml", "rules:\n  - weight:\n      bits: '4'\n",
                        r"c.yaml:3: QuantSpec.`bits` must be int, got str '4'"),
    "yaml-not-mapping": ("c.yaml", "- 1\n", r"must hold a mapping at the top level"),
    "yaml-top-level-key": ("c.yaml", "version: 1\nrulez: []\n",
                           r"c.yaml:2: key 'rulez': unknown QuantConfig field"),
    "yaml-version": ("c.yaml", "version: true\nrules: []\n", r"version True is not supported"),
    "yaml-binary": ("c.yaml", b"\xff\xfe\x00rules", r"c.yaml: not a UTF-8 text file"),
    "json-syntax": ("c.json", '{"version": 1,\n "rules": [,]}',
                    r"c.json:2:12: invalid JSON: Expecting value"),
    "json-duplicate-key": ("c.json", '{"version": 1,\n "version": 1}',
                           r"c.json:2: duplicate key 'version' \(first at line 1\)"),
    "json-unknown-key": ("c.json", '{"rules": [\n {"types": ["Linear"],\n  "wieght": {}}]}',
                         r"c.json:3: key 'wieght': unknown LayerRule field"),
}


PLAN_MATCH = {
    "yaml-unknown-key": r"c.yaml:2: key 'rules': unknown Plan field\(s\) \['rules'\]",
    "yaml-wrong-type": r"c.yaml:1: key 'rules': unknown Plan field",
    "yaml-top-level-key": r"c.yaml:2: key 'rulez': unknown Plan field",
    "json-unknown-key": r"c.json:1: key 'rules': unknown Plan field",
}


@pytest.mark.parametrize("case", list(FILE_CASES), ids=list(FILE_CASES))
@pytest.mark.parametrize("reader", [QuantConfig.from_file, Plan.from_file],
                         ids=["config", "plan"])
def test_bad_files_name_the_file_line_and_key(case, reader, tmp_path) -> None:
    name, text, match = FILE_CASES[case]
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    if reader == Plan.from_file and case in PLAN_MATCH:
        match = PLAN_MATCH[case]  # a plan file has no `rules`: that key is the error
    with pytest.raises((ValueError, TypeError), match=match):
        reader(path)


def test_plan_file_unknown_field_names_line(tmp_path) -> None:
    path = tmp_path / "plan.yaml"
    lowbit.plan(mlp(), W8A8).to_file(path)
    text = path.read_text().replace("type: Linear", "type: Linear\n    bitz: 3", 1)
    path.write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "bitz" in t)
    with pytest.raises(ValueError, match=rf"plan.yaml:{line}: key 'bitz': plan entry '0' has "
                                         r"unknown field"):
        Plan.from_file(path)


# ----------------------------------------------------------------- silent nonsense: warned


def test_a_rule_whose_names_match_no_layer_warns() -> None:
    cfg = QuantConfig(rules=[LayerRule(names=["fc*", "0"], weight=QuantSpec())])
    with pytest.warns(UserWarning, match=r"rule 0 of the config: name pattern\(s\) \['fc\*'\] "
                                         r"match no layer"):
        lowbit.plan(mlp(), cfg)


def test_a_plan_missing_layers_of_the_model_warns() -> None:
    small = lowbit.plan(nn.Sequential(nn.Linear(6, 8)), W8A8)
    with pytest.warns(UserWarning, match=r"the plan does not list 1 quantizable layer\(s\).*"
                                         r"\['2'\]"):
        lowbit.quantize(mlp(), small)


def test_calibration_can_skip_non_finite_batches() -> None:
    qm = quantized()
    bad = torch.randn(4, 6)
    bad[0, 0] = float("inf")
    with pytest.warns(UserWarning, match=r"skipped calibration batch 2: the input of layer '0' "
                                         r"holds NaN or Inf values \(0 NaN, 1 Inf of 24\)"):
        count = lowbit.calibrate(qm, [torch.randn(4, 6), bad, torch.randn(4, 6)],
                                 nonfinite="skip", progress=False)
    assert count == 2
    with pytest.raises(ValueError, match=r"all 1 were skipped"), \
            pytest.warns(UserWarning, match=r"skipped calibration batch 1"):
        lowbit.calibrate(quantized(), [bad], nonfinite="skip", progress=False)


# --------------------------------------------------- quantize(inplace=True) leaves no trace


def _fingerprint(model: nn.Module) -> tuple[Any, ...]:
    return (repr(model), [(k, v.clone()) for k, v in model.state_dict().items()],
            [type(m) for m in model.modules()], sorted(vars(model)))


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return (a[0] == b[0] and a[2] == b[2] and a[3] == b[3] and len(a[1]) == len(b[1])
            and all(ka == kb and torch.equal(va, vb) for (ka, va), (kb, vb) in zip(a[1], b[1])))


def test_inplace_with_a_bad_plan_leaves_the_model_as_it_was() -> None:
    model = cnn()
    the_plan = lowbit.plan(model, W8A8)
    bad = Plan(layers=[*the_plan.layers[:1], lowbit.LayerPlan(name="missing", type="Linear",
                                                              weight=QuantSpec())],
               fusions=the_plan.fusions)
    before = _fingerprint(model)
    with pytest.raises(ValueError, match=r"the plan names layer 'missing'"):
        lowbit.quantize(model, bad, inplace=True)
    assert _same(before, _fingerprint(model)), "BN folded or layers swapped before the error"


def test_inplace_failing_late_is_rolled_back(monkeypatch) -> None:
    """A failure after BN folding and layer swaps (here: in the last layer's wrapper) puts
    the caller's model back exactly as it was."""
    q = sys.modules["lowbit.quantize"]  # the module (lowbit.quantize is the function)

    model = cnn()
    x = torch.randn(2, 3, 6, 6)
    y = model(x)
    before = _fingerprint(model)
    real = q.share_input_quantizers

    def boom(m: nn.Module, graph: object) -> None:
        real(m, graph)
        raise ValueError("injected failure after the swaps")

    monkeypatch.setattr(q, "share_input_quantizers", boom)
    with pytest.raises(ValueError, match="injected"):
        lowbit.quantize(model, W8A8, inplace=True)
    assert _same(before, _fingerprint(model))
    assert torch.equal(model(x), y)
    assert isinstance(model[1], nn.BatchNorm2d) and type(model[0]) is nn.Conv2d


# ------------------------------------------------------------------------ checkpoints


def deep() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 4))


def qat(preset: str, model: nn.Module | None = None) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.prepare_qat(model or deep(), QuantConfig.preset(preset))
    qm(torch.randn(4, 6))
    return qm


@pytest.mark.parametrize(("saved", "loaded", "match"), [
    ("w4a4-lsq", "w8a8-qat", r"layer '2' \(weight_quant\) was saved with method='lsq', this "
                             r"model has method='ste'"),
    ("w2a2-lsq", "w4a8-lsq", r"layer '2' \(weight_quant\) was saved with bits=2, this model "
                             r"has bits=4"),
], ids=["w4a4-lsq-into-w8a8-qat", "w2a2-lsq-into-w4a8-lsq"])
def test_a_checkpoint_refuses_another_quantization(saved, loaded, match, tmp_path) -> None:
    torch.save(qat(saved).state_dict(), tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    target = qat(loaded)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(CheckpointMismatchError, match=match):
            target.load_state_dict(state, strict=strict)
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused load changed tensors"
    target.load_state_dict(strip_metadata(state), strict=False)  # on purpose: allowed


def test_a_per_channel_checkpoint_into_a_per_tensor_model() -> None:
    def cfg(granularity: str) -> QuantConfig:
        return QuantConfig(rules=[LayerRule(types=["Linear"], weight=QuantSpec(
            bits=8, granularity=granularity, method="lsq"))])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = lowbit.prepare_qat(deep(), cfg("per_channel"))
        dst = lowbit.prepare_qat(deep(), cfg("per_tensor"))
    src(torch.randn(4, 6))
    with pytest.raises(CheckpointMismatchError, match=r"layer '0' \(weight_quant\) was saved "
                                                      r"with granularity='per_channel', this "
                                                      r"model has granularity='per_tensor'"):
        dst.load_state_dict(src.state_dict())


def test_deploy_checkpoints_are_checked_too() -> None:
    def deploy(preset: str) -> nn.Module:
        qm = quantized(deep(), QuantConfig.preset(preset))
        lowbit.calibrate(qm, [torch.randn(4, 6)], progress=False)
        return lowbit.convert(qm)

    state = deploy("w8a8").state_dict()
    with pytest.raises(CheckpointMismatchError, match=r"layer '0' \(weight\) was saved with "
                                                      r"bits=8, this model has bits=4"):
        deploy("w4a8").load_state_dict(state)
    deploy("w8a8").load_state_dict(state)


def test_metadata_survives_safetensors_and_ddp_prefixes(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    qm = qat("w4a4-lsq")
    save_file(qm.state_dict(), tmp_path / "m.safetensors")
    state = load_file(tmp_path / "m.safetensors")
    assert "lowbit_checkpoint" in state
    qat("w4a4-lsq").load_state_dict(state)
    wrapped = nn.Sequential()
    wrapped.add_module("module", qat("w4a4-lsq"))  # how DDP names its model
    prefixed = wrapped.state_dict()
    assert "module.lowbit_checkpoint" in prefixed
    wrapped.load_state_dict(prefixed)
    other = nn.Sequential()
    other.add_module("module", qat("w8a8-qat"))
    with pytest.raises(CheckpointMismatchError, match=r"layer 'module.2'"):
        other.load_state_dict(prefixed)
    torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(prefixed, "module.")
    qat("w4a4-lsq").load_state_dict(prefixed)


def test_checkpoints_without_metadata_still_load() -> None:
    old = {k: v for k, v in qat("w4a4-lsq").state_dict().items() if k != "lowbit_checkpoint"}
    result = qat("w4a4-lsq").load_state_dict(old, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_a_corrupted_metadata_entry_is_named() -> None:
    state = qat("w4a4-lsq").state_dict()
    state["lowbit_checkpoint"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    with pytest.raises(CheckpointMismatchError, match=r"'lowbit_checkpoint' is not lowbit "
                                                      r"metadata"):
        qat("w4a4-lsq").load_state_dict(state)


def _with_saved_by(state: dict, version: str | None) -> dict:
    """``state`` with its metadata's lowbit version replaced (None: removed, as before 0.9.0)."""
    data = json.loads(bytes(state["lowbit_checkpoint"].numpy()).decode())
    data.pop("lowbit", None)
    if version is not None:
        data["lowbit"] = version
    return {**state, "lowbit_checkpoint": torch.frombuffer(
        bytearray(json.dumps(data).encode()), dtype=torch.uint8)}


def test_a_mismatch_names_the_lowbit_version_that_saved_the_checkpoint() -> None:
    """Where quantizers sit can change between versions (0.9.0 drops a reader's quantizer on an
    output already quantized): a mismatch says which lowbit saved the checkpoint."""
    state = qat("w4a4-lsq").state_dict()
    assert json.loads(bytes(state["lowbit_checkpoint"].numpy()).decode())["lowbit"] == \
        lowbit.__version__
    with pytest.raises(CheckpointMismatchError) as same:
        qat("w8a8-qat").load_state_dict(state)
    assert "saved by" not in str(same.value)
    for version, who in (("0.8.0", "lowbit 0.8.0"), (None, "a lowbit older than 0.9.0")):
        with pytest.raises(CheckpointMismatchError,
                           match=rf"saved by {who}, this is lowbit {lowbit.__version__}"):
            qat("w8a8-qat").load_state_dict(_with_saved_by(state, version))
