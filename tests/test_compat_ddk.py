"""The vendor DDK's PyTorch plug-in quantization (``lowbit.compat.ddk``): the documented flow end to
end (template → edit → optimize_model → calibrate or train → generate_final_model → ONNX Runtime),
every error, and the walk down to lowbit's native API."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lowbit
import lowbit.config
from lowbit.compat import ddk
from lowbit.demo import load_digits
from lowbit.nn import QuantLayer

INPUT_SHAPE = "x:1,1,8,8"
CONV = "<class 'torch.nn.modules.conv.Conv2d'>"
LINEAR = "<class 'torch.nn.modules.linear.Linear'>"
KEYS = ["conv1/Conv2D", "layer1.conv1/Conv2D", "layer1.conv2/Conv2D", "layer2.conv1/Conv2D",
        "layer2.conv2/Conv2D", "fc/MatMul"]
FLOAT_KEY = "layer2.conv2/Conv2D"


class Block(nn.Module):
    """A ResNet basic block: conv-BN-ReLU, conv-BN, plus the identity, ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class TinyResNet(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.layer1 = Block(c)
        self.layer2 = Block(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.pool(y), 1))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not spin against a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def baseline(digits, tmp_path_factory) -> Path:
    """The documented prerequisite: a full-precision baseline .pth."""
    torch.manual_seed(0)
    model = TinyResNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for step in range(120):
        idx = torch.randint(0, len(digits.x_train), (64,), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("baseline") / "baseline.pth"
    torch.save(model.state_dict(), path)
    return path


def float_model(baseline: Path) -> TinyResNet:
    model = TinyResNet()
    model.load_state_dict(torch.load(baseline, weights_only=True))
    return model


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def edit(path: Path, strategies: dict[str, str]) -> None:
    """The documented edit step: change quant_strategy of some layers (with the documented comment)."""
    data = json.loads(path.read_text())
    for key, strategy in strategies.items():
        data["layer_strategy"][key]["quant_strategy"] = strategy
        if strategy == "float":
            data["layer_strategy"][key]["//"] = "可以逐层配置量化，不量化的层保持浮点"
    path.write_text(json.dumps(data, indent=4, ensure_ascii=False), encoding="utf-8")


def int8_but_one() -> dict[str, str]:
    return {key: "float" if key == FLOAT_KEY else "Quant_INT8-8" for key in KEYS}


def ort_logits(onnx_path: Path, x: torch.Tensor) -> torch.Tensor:
    """Run the exported file in ONNX Runtime, one sample at a time (its shape is input_shape)."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"]
    out = [sess.run(None, {"x": x[i:i + 1].numpy()})[0] for i in range(len(x))]
    return torch.from_numpy(np.concatenate(out))


def check_agreement(report: lowbit.ExportReport, quant_model: nn.Module, x: torch.Tensor) -> None:
    assert report.onnx_path.name == "quant_model.onnx" and report.params_path.is_file()
    assert report.weights_path.is_file()
    assert report.parity.output_max_lsb is not None and report.parity.output_max_lsb <= 1.5
    got = ort_logits(report.onnx_path, x)
    with torch.no_grad():
        expected = quant_model.eval()(x)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-3 * scale, (got - expected).abs().max() / scale
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.98


@pytest.fixture
def config(tmp_path, baseline) -> Path:
    path = tmp_path / "config_gen.json"
    ddk.generate_config_file(float_model(baseline), INPUT_SHAPE, dst_path=str(path))
    return path


# ------------------------------------------------------------------------ the template


def test_generate_config_file_writes_the_documented_template(config):
    data = json.loads(config.read_text())
    assert list(data) == [f"quant_strategy_for op '{CONV}'", f"quant_strategy_for op '{LINEAR}'",
                          "input_shape", "layer_strategy"]
    assert data[f"quant_strategy_for op '{CONV}'"][0] == "Quant_INT8-8"
    assert data["input_shape"] == INPUT_SHAPE
    assert list(data["layer_strategy"]) == KEYS
    for key, entry in data["layer_strategy"].items():
        assert entry == {"op_type": LINEAR if key == "fc/MatMul" else CONV,
                         "quant_strategy": "float"}
    assert [p.name for p in config.parent.iterdir()] == ["config_gen.json"], "no temp file left"


def test_input_shape_takes_several_inputs_and_spaces():
    assert ddk.parse_input_shape(" a:1,3 ; b: 2,5") == [("a", (1, 3)), ("b", (2, 5))]


@pytest.mark.parametrize("strategy, bits", [("Quant_INT8-8", (8, 8)), ("Quant_INT4-8", (4, 8)),
                                            ("Quant_INT2-8", (2, 8)), ("Quant_INT1-8", (1, 8)),
                                            ("Quant_INT4-4", (4, 4))])
def test_each_strategy_is_a_layer_rule_with_its_bits(strategy, bits):
    cfg = ddk.config_from_strategies({"a.b": strategy, "c": "float"})
    (rule,) = cfg.rules
    assert rule.matches("a.b", "Conv2d") and not rule.matches("a_b", "Conv2d")
    assert (rule.weight.bits, rule.input.bits) == bits
    assert rule.weight.method == ("binary" if bits[0] == 1 else "ste")
    assert rule.input.symmetric is False and rule.output is None


# ------------------------------------------------------------------- the documented flows


def test_calibration_flow_to_onnx_runtime(tmp_path, config, baseline, digits):
    """No-training quantization: set_calibrate_state, forward the calibration set, save,
    generate_final_model; one layer left float."""
    edit(config, int8_but_one())
    model = float_model(baseline)
    with pytest.warns(UserWarning, match="layer2.conv2: kept in float"):
        quant_model = ddk.optimize_model(model, str(config))
    calibrate_mode = True
    ddk.set_calibrate_state(quant_model, calibrate_mode)
    assert not quant_model.training
    with torch.no_grad():
        for i in range(4):
            quant_model(digits.x_train[64 * i:64 * (i + 1)])
    torch.save(quant_model.state_dict(), tmp_path / "quant.pth")  # ranges not frozen yet
    out = tmp_path / "out"
    out.mkdir()
    with pytest.warns(UserWarning, match="in float"):
        report = ddk.generate_final_model(
            float_model(baseline),  # the rebuilt float model
            str(config),
            pth_file=str(tmp_path / "quant.pth"),
            output_dir=str(out),
        )
    assert report.float_layers == {"layer2.conv2": "kept in float by the config"}
    params = json.loads(report.params_path.read_text())
    assert sorted(params["layers"]) == ["conv1", "fc", "layer1.conv1", "layer1.conv2",
                                        "layer2.conv1"]
    ddk.set_calibrate_state(quant_model, False)  # freeze the ranges to compare
    x = digits.x_test[:120]
    check_agreement(report, quant_model, x)
    with torch.no_grad():
        float_acc = accuracy(float_model(baseline).eval()(x), digits.y_test[:120])
    assert accuracy(ort_logits(report.onnx_path, x), digits.y_test[:120]) >= float_acc - 0.05


def test_training_flow_to_onnx_runtime(tmp_path, config, baseline, digits, quiet):
    """Retraining quantization with get_quant_loss, every strategy on some layer."""
    strategies = {"conv1/Conv2D": "Quant_INT8-8", "layer1.conv1/Conv2D": "Quant_INT4-8",
                  "layer1.conv2/Conv2D": "Quant_INT2-8", "layer2.conv1/Conv2D": "Quant_INT1-8",
                  FLOAT_KEY: "float", "fc/MatMul": "Quant_INT4-4"}
    edit(config, strategies)
    quant_model = ddk.optimize_model(float_model(baseline), config)
    assert quant_model.training
    optimizer = torch.optim.SGD(quant_model.parameters(), lr=0.01, momentum=0.9)  # quant_model's
    quant_weight = 0.05
    for step in range(8):
        x, y = digits.x_train[32 * step:32 * (step + 1)], digits.y_train[32 * step:32 * (step + 1)]
        loss = nn.functional.cross_entropy(quant_model(x), y)
        total_loss = loss + quant_weight * ddk.get_quant_loss(quant_model)
        optimizer.zero_grad()
        total_loss.backward()
        optimizer.step()
    torch.save(quant_model.state_dict(), tmp_path / "quant.pth")
    report = ddk.generate_final_model(float_model(baseline), config, tmp_path / "quant.pth",
                                      tmp_path)
    params = json.loads(report.params_path.read_text())["layers"]
    bits = {name: (e["weight"]["bits"], e["input"]["bits"]) for name, e in params.items()}
    assert bits == {"conv1": (8, 8), "layer1.conv1": (4, 8), "layer1.conv2": (2, 8),
                    "layer2.conv1": (1, 8), "fc": (4, 4)}
    check_agreement(report, quant_model, digits.x_test[:60])


def test_generate_final_model_defaults_to_the_current_folder(tmp_path, config, baseline, digits,
                                                             quiet, monkeypatch):
    edit(config, int8_but_one())
    quant_model = ddk.optimize_model(float_model(baseline), config)
    ddk.set_calibrate_state(quant_model, True)
    quant_model(digits.x_train[:64])
    ddk.set_calibrate_state(quant_model, False)
    torch.save(quant_model.state_dict(), tmp_path / "quant.pth")
    monkeypatch.chdir(tmp_path)
    report = ddk.generate_final_model(float_model(baseline), config, "quant.pth")
    assert report.onnx_path.resolve() == (tmp_path / "quant_model.onnx").resolve()


# ---------------------------------------------------------------------------- errors


def test_model_errors(tmp_path, baseline):
    model = float_model(baseline)
    with pytest.raises(TypeError, match=r"`model` must not be wrapped by DataParallel.*"
                                        r"model\.module"):
        ddk.generate_config_file(nn.DataParallel(model), INPUT_SHAPE, tmp_path / "c.json")
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module, got str"):
        ddk.generate_config_file("model", INPUT_SHAPE, tmp_path / "c.json")
    with pytest.raises(ValueError, match="`model` has no quantizable layer; supported op types"):
        ddk.generate_config_file(nn.Sequential(nn.ReLU()), "x:1,4", tmp_path / "c.json")


@pytest.mark.parametrize("shape", ["1,1,8,8", "x:1,1,a,8", "x:1,0,8,8", "x:", ":1,2",
                                   "x:1,1,8,8;x:1,2"])
def test_input_shape_format_errors(tmp_path, baseline, shape):
    with pytest.raises(ValueError, match=r"`input_shape` (must be 'name:d1,d2|names an input)"):
        ddk.generate_config_file(float_model(baseline), shape, tmp_path / "c.json")


def test_input_shape_type_and_run_errors(tmp_path, baseline):
    model = float_model(baseline).train()
    with pytest.raises(TypeError, match="`input_shape` must be a str like 'x:1,3,224,224'"):
        ddk.generate_config_file(model, (1, 1, 8, 8), tmp_path / "c.json")
    with pytest.raises(ValueError, match="`input_shape` 'x:1,3,8,8': the model does not run"):
        ddk.generate_config_file(model, "x:1,3,8,8", tmp_path / "c.json")
    assert all(m.training for m in model.modules()), "training flags restored"
    assert not (tmp_path / "c.json").exists()


def test_dst_path_errors(tmp_path, baseline):
    with pytest.raises(ValueError, match="folder .*missing.* does not exist"):
        ddk.generate_config_file(float_model(baseline), INPUT_SHAPE,
                                 tmp_path / "missing" / "c.json")
    with pytest.raises(TypeError, match="`dst_path` must be a str or os.PathLike, got int"):
        ddk.generate_config_file(float_model(baseline), INPUT_SHAPE, 3)


def test_unsupported_strategy_names_the_layer_the_op_type_and_the_choices(config, baseline):
    edit(config, {"fc/MatMul": "Quant_INT3-8"})
    allowed = r"\['float', 'Quant_INT8-8', 'Quant_INT4-8', 'Quant_INT2-8', 'Quant_INT1-8', " \
              r"'Quant_INT4-4'\]"
    with pytest.raises(ValueError, match=rf"layer 'fc/MatMul': quant_strategy 'Quant_INT3-8' is "
                                         rf"not supported for op_type \"{LINEAR}\"; allowed: "
                                         rf"{allowed}"):
        ddk.optimize_model(float_model(baseline), config)
    edit(config, {"fc/MatMul": 8})
    with pytest.raises(TypeError, match="layer 'fc/MatMul': `quant_strategy` must be a str"):
        ddk.optimize_model(float_model(baseline), config)


def test_layer_strategy_errors(config, baseline):
    data = json.loads(config.read_text())

    def expect(error, match, change):
        edited = json.loads(json.dumps(data))
        change(edited)
        config.write_text(json.dumps(edited))
        with pytest.raises(error, match=match):
            ddk.optimize_model(float_model(baseline), config)

    layers = "layer_strategy"
    expect(ValueError, r"`layer_strategy` lists 'extra/Conv2D', which is not a quantizable "
           r"layer of the model \(layers must not be added\)",
           lambda d: d[layers].update({"extra/Conv2D": {"op_type": CONV,
                                                        "quant_strategy": "Quant_INT8-8"}}))
    expect(ValueError, r"layer 'conv1/Conv2D': `op_type` .*Linear.* is not the model's op type",
           lambda d: d[layers]["conv1/Conv2D"].update(op_type=LINEAR))
    expect(ValueError, r"layer 'conv1/Conv2D': unknown field\(s\) \['bits'\]",
           lambda d: d[layers]["conv1/Conv2D"].update(bits=8))
    expect(ValueError, "layer 'conv1/Conv2D': entry must be an object",
           lambda d: d[layers].update({"conv1/Conv2D": "Quant_INT8-8"}))
    expect(ValueError, "has no 'input_shape'; regenerate it", lambda d: d.pop("input_shape"))
    expect(ValueError, "has no 'layer_strategy'", lambda d: d.pop(layers))
    expect(ValueError, "`layer_strategy` in .* must map layer names", lambda d: d.update(
        layer_strategy=[]))
    expect(ValueError, "`input_shape` must be 'name:d1,d2", lambda d: d.update(input_shape="x"))
    expect(ValueError, r"every layer of `config_path` .* is 'float'; set the quant_strategy",
           lambda d: None)


def test_config_file_errors(tmp_path, baseline):
    bad = tmp_path / "bad.json"
    # The documented own edited example has a full-width comma after "Quant_INT8-8".
    bad.write_text('{"input_shape": "x:1,1,8,8", "layer_strategy": {"conv1/Conv2D": '
                   '{"op_type": "x", "quant_strategy": "Quant_INT8-8"，}}}', encoding="utf-8")
    with pytest.raises(ValueError, match="`config_path` .*bad.json' is not valid JSON: .* line 1"):
        ddk.optimize_model(float_model(baseline), bad)
    bad.write_text("[]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        ddk.optimize_model(float_model(baseline), bad)
    with pytest.raises(ValueError, match="`config_path` .*nope.json' does not exist"):
        ddk.optimize_model(float_model(baseline), tmp_path / "nope.json")
    with pytest.raises(TypeError, match="`config_path` must be a str or os.PathLike, got NoneType"):
        ddk.optimize_model(float_model(baseline), None)
    with pytest.raises(TypeError, match="`model` must not be wrapped by DataParallel"):
        ddk.optimize_model(nn.DataParallel(float_model(baseline)), bad)


def test_calibration_and_quant_loss_errors(config, baseline, quiet):
    model = float_model(baseline)
    with pytest.raises(ValueError, match="`model` has no lowbit quantizers"):
        ddk.set_calibrate_state(model, True)
    with pytest.raises(ValueError, match="`model` has no lowbit quantizers"):
        ddk.get_quant_loss(model)
    edit(config, int8_but_one())
    quant_model = ddk.optimize_model(model, config)
    with pytest.raises(TypeError, match="`calibration_mode` must be a bool .* got int 1"):
        ddk.set_calibrate_state(quant_model, 1)


def test_generate_final_model_errors(tmp_path, config, baseline, digits, quiet):
    edit(config, int8_but_one())
    quant_model = ddk.optimize_model(float_model(baseline), config)
    pth = tmp_path / "quant.pth"
    torch.save(quant_model.state_dict(), pth)  # neither calibrated nor trained

    def final(**changes):
        args = dict(model=float_model(baseline), config_file=config, pth_file=pth,
                    output_dir=tmp_path)
        return ddk.generate_final_model(**{**args, **changes})

    with pytest.raises(ValueError, match="`output_dir` .*missing' does not exist"):
        final(output_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="`pth_file` .*nope.pth' does not exist"):
        final(pth_file=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="has no range yet; run lowbit.calibrate"):
        final()
    with pytest.raises(ValueError, match="`model` is already quantized; pass the float model"):
        final(model=quant_model)
    other = tmp_path / "other.json"
    ddk.generate_config_file(float_model(baseline), INPUT_SHAPE, other)
    edit(other, {key: "Quant_INT8-8" for key in KEYS})
    with pytest.raises(ValueError, match="`pth_file` .*quant.pth' does not match the model "
                                         "quantized with `config_file` .*other.json'"):
        final(config_file=other)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="must hold a state dict .* got list"):
        final(pth_file=tmp_path / "list.pth")
    torch.save(quant_model, tmp_path / "whole.pth")  # a pickled module, not a state dict
    with pytest.raises(ValueError, match=r"could not be read with torch.load\(weights_only=True\)"):
        final(pth_file=tmp_path / "whole.pth")
    assert not (tmp_path / "quant_model.onnx").exists()


# -------------------------------------------------------------------- the thin wrapper


def test_every_function_reaches_lowbits_native_api(tmp_path, baseline, digits, quiet):
    spies = {name: mock.patch.object(lowbit, name, wraps=getattr(lowbit, name))
             for name in ("plan", "prepare_qat", "quant_loss", "set_calibrating", "convert",
                          "export_onnx")}
    write = mock.patch.object(lowbit.config, "atomic_write_text",
                              wraps=lowbit.config.atomic_write_text)
    load = mock.patch.object(torch, "load", wraps=torch.load)
    with write as write_spy, load as load_spy, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mocks = {name: patcher.start() for name, patcher in spies.items()}
        try:
            path = tmp_path / "c.json"
            ddk.generate_config_file(float_model(baseline), INPUT_SHAPE, path)
            assert write_spy.call_count == 1 and mocks["plan"].called
            edit(path, int8_but_one())

            quant_model = ddk.optimize_model(float_model(baseline), path)
            (args, _), = mocks["prepare_qat"].call_args_list
            assert isinstance(args[1], lowbit.QuantConfig)
            assert {n for n, m in quant_model.named_modules() if isinstance(m, QuantLayer)} == \
                {"conv1", "layer1.conv1", "layer1.conv2", "layer2.conv1", "fc"}

            loss = ddk.get_quant_loss(quant_model)
            mocks["quant_loss"].assert_called_once_with(quant_model)
            assert isinstance(loss, torch.Tensor) and loss.dim() == 0

            ddk.set_calibrate_state(quant_model, True)
            mocks["set_calibrating"].assert_called_once_with(quant_model, True)
            quant_model(digits.x_train[:32])
            ddk.set_calibrate_state(quant_model, False)
            torch.save(quant_model.state_dict(), tmp_path / "quant.pth")

            report = ddk.generate_final_model(float_model(baseline), path, tmp_path / "quant.pth",
                                              tmp_path)
            assert any(c.kwargs.get("weights_only") is True for c in load_spy.call_args_list)
            assert mocks["convert"].call_count == 1 and mocks["export_onnx"].call_count == 1
            assert mocks["prepare_qat"].call_count == 2, "the final model is rebuilt natively"
            assert isinstance(report, lowbit.ExportReport)
            assert mocks["export_onnx"].call_args.kwargs["input_names"] == ["x"]
        finally:
            for patcher in spies.values():
                patcher.stop()
