"""``lowbit.compat.nni``: NNI's quantizers, the documented examples end to end to ONNX Runtime."""

from __future__ import annotations

import json
import warnings
from unittest import mock

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.compat.nni import BNNQuantizer, DoReFaQuantizer, NaiveQuantizer, QAT_Quantizer
from lowbit.demo import load_digits
from lowbit.nn import QuantLayer


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def batches(digits, steps: int, size: int = 32):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(digits.x_train), (size,), generator=g)
        yield digits.x_train[idx], digits.y_train[idx]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data, loss=F.nll_loss) -> None:
    model.train()
    for x, y in data:
        optimizer.zero_grad()
        loss(model(x), y).backward()
        optimizer.step()


class Mnist(nn.Module):
    """The documented ``Mnist`` (NNI's QAT example), shrunk to 8x8 digits: ReLU6 activation modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)
        self.relu1, self.relu2, self.relu3 = nn.ReLU6(), nn.ReLU6(), nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = F.max_pool2d(self.relu2(self.conv2(x)), 2, 2)
        x = x.reshape(-1, 16 * 2 * 2)  # the documented view(); digits batches are channels-last
        x = self.relu3(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


class VGGDigits(nn.Module):
    """The documented ``VGG_Cifar10`` in miniature: Hardtanh activations, BN after every binary layer
    (after the max-pool where there is one), a float last layer."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.Hardtanh(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(16),
            nn.Hardtanh(inplace=True),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.Hardtanh(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(32),
            nn.Hardtanh(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 2 * 2, 64, bias=False), nn.BatchNorm1d(64), nn.Hardtanh(inplace=True),
            nn.Linear(64, 64, bias=False), nn.BatchNorm1d(64), nn.Hardtanh(inplace=True),
            nn.Linear(64, num_classes), nn.BatchNorm1d(num_classes, affine=False),
            nn.LogSoftmax(dim=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).reshape(-1, 32 * 2 * 2))


QAT_SEED_CONFIG = [{
    "quant_types": ["weight"],
    "quant_bits": {"weight": 8},
    "op_types": ["Conv2d", "Linear"],
}, {
    "quant_types": ["output"],
    "quant_bits": 8,
    "quant_start_step": 7000,
    "op_types": ["ReLU6"],
}]
BNN_SEED_CONFIG = [{
    "quant_bits": 1,
    "quant_types": ["weight"],
    "op_types": ["Conv2d", "Linear"],
    "op_names": ["features.0", "features.3", "features.7", "features.10", "classifier.0",
                 "classifier.3"],
}, {
    "quant_bits": 1,
    "quant_types": ["output"],
    "op_types": ["Hardtanh"],
    "op_names": ["features.6", "features.9", "features.13", "classifier.2", "classifier.5"],
}]
DOREFA_SEED_CONFIG = [{"quant_types": ["weight"], "quant_bits": 8, "op_types": "default"}]


def ort_outputs(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def check_parity(quantizer, x: torch.Tensor) -> None:
    """ONNX Runtime runs the exported file like lowbit's deploy model (and the report says so)."""
    parity = quantizer.export_report.parity
    assert parity.output_max_lsb <= 1.5, parity
    if parity.codes_identical is not None:
        assert parity.codes_identical >= 0.995 and parity.codes_max_diff <= 1, parity
    expected = lowbit.convert(quantizer.bound_model)(x).detach().numpy()
    got = ort_outputs(quantizer.export_report.onnx_path, x)
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max() + 1e-3


# ------------------------------------------------------------------ the documented examples


def test_qat_quantizer_seed_example_trains_and_exports_to_onnx(digits, tmp_path, quiet):
    model = Mnist()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    quantizer = QAT_Quantizer(model, QAT_SEED_CONFIG, optimizer)
    assert quantizer.compress() is model, "NNI quantizes in place"
    assert isinstance(model.conv1, QuantLayer) and isinstance(model.relu1, QuantLayer)
    weight = model.conv1.weight_quant.spec
    assert (weight.method, weight.bits, weight.symmetric, weight.is_signed, weight.granularity) \
        == ("ste", 8, False, False, "per_tensor"), "NNI's default: per_tensor_affine uint"
    output = model.relu1.output_quant.spec
    assert (output.observer, output.moving_rate) == ("ema", 0.99)
    assert output.quant_delay == 6999, "NNI quantizes from step 7000, counted from 1"
    assert model.conv1.input_quant is None and model.conv1.output_quant is None

    train(model, optimizer, batches(digits, 8))
    assert int(model.lowbit_step) == 8, "optimizer.step was patched to step the schedule"
    params = quantizer.export_model(tmp_path / "mnist.pt", tmp_path / "mnist.calib.json",
                                    tmp_path / "mnist.onnx", input_shape=(16, 1, 8, 8))
    check_parity(quantizer, digits.x_test[:16])
    saved = json.loads((tmp_path / "mnist.calib.json").read_text())
    assert saved == params
    assert saved["layers"]["relu1"]["output"]["bits"] == 8
    assert saved["layers"]["conv1"]["weight"]["signed"] is False
    fresh = Mnist()
    QAT_Quantizer(fresh, QAT_SEED_CONFIG).compress().load_state_dict(
        torch.load(tmp_path / "mnist.pt", weights_only=True))
    x = digits.x_test[:8]
    assert torch.equal(fresh.train()(x), model.train()(x)), "the state dict resumes training"


def test_quant_start_step_keeps_outputs_float_for_the_first_steps(quiet):
    config = [{"quant_types": ["output"], "quant_bits": 4, "quant_start_step": 3,
               "op_types": ["ReLU6"]}]
    model = QAT_Quantizer(Mnist(), config).compress()
    x = torch.rand(4, 8, 6, 6) * 8
    outputs = [model.relu1(x) for _ in range(3)]
    assert torch.equal(outputs[0], F.relu6(x)) and torch.equal(outputs[1], F.relu6(x))
    assert outputs[2].unique().numel() <= 16, "4-bit outputs from step 3 (counted from 1)"


def test_qat_quant_scheme_dtype_and_input_quantization(digits, tmp_path, quiet):
    config = [{"quant_types": ["weight", "input"], "quant_bits": {"weight": 4, "input": 8},
               "op_types": ["default"], "quant_scheme": {"weight": "per_channel_symmetric"},
               "quant_dtype": {"weight": "int"}}]
    model = Mnist()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    quantizer = QAT_Quantizer(model, config, optimizer, dummy_input=torch.rand(1, 1, 8, 8))
    weight, inp = model.fc1.weight_quant.spec, model.fc1.input_quant.spec
    assert (weight.bits, weight.granularity, weight.is_signed, weight.symmetric) == \
        (4, "per_channel", True, True)
    assert (inp.bits, inp.symmetric, inp.is_signed, inp.observer) == (8, False, False, "ema")
    train(model, optimizer, batches(digits, 6))
    quantizer.export_model(tmp_path / "m.pt", onnx_path=tmp_path / "m.onnx",
                           input_shape=[16, 1, 8, 8])
    check_parity(quantizer, digits.x_test[:16])
    assert quantizer.export_report.parity.tensors_compared >= 4


def test_dorefa_seed_example(digits, tmp_path, quiet):
    with pytest.raises(ValueError, match=r"config_list\[0\] weight with quant_bits=8: .*1\.\.7"):
        DoReFaQuantizer(Mnist(), DOREFA_SEED_CONFIG)
    config = [dict(DOREFA_SEED_CONFIG[0], quant_bits=4)]  # the same with 4 bits
    model = Mnist()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    quantizer = DoReFaQuantizer(model, config, optimizer)
    assert all(isinstance(getattr(model, n), QuantLayer) for n in ("conv1", "conv2", "fc1", "fc2"))
    assert model.fc2.weight_quant.spec.method == "dorefa"
    train(model, optimizer, batches(digits, 6))
    params = quantizer.export_model(tmp_path / "d.pt", onnx_path=tmp_path / "d.onnx",
                                    input_shape=(16, 1, 8, 8))
    check_parity(quantizer, digits.x_test[:16])
    assert params["layers"]["conv2"]["weight"]["bits"] == 4
    codes = lowbit.convert(model).conv2.weight.codes
    assert codes.unique().numel() <= 16


def test_bnn_seed_example_clips_latent_weights_and_exports(digits, tmp_path, quiet):
    model = VGGDigits(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    quantizer = BNNQuantizer(model, BNN_SEED_CONFIG, optimizer)
    model = quantizer.compress()
    binary = [model.features[i] for i in (0, 3, 7, 10)] + [model.classifier[i] for i in (0, 3)]
    assert all(layer.weight_quant.spec.method == "binary" for layer in binary)
    assert not isinstance(model.classifier[6], QuantLayer), "the last layer stays float"
    assert not isinstance(model.features[2], QuantLayer), "features.2 is not in op_names"
    with torch.no_grad():
        model.features[3].weight[0, 0, 0, 0] = 3.0
    for epoch in range(2):
        quantizer.update_epoch(epoch)
        train(model, optimizer, batches(digits, 4))
    assert int(model.lowbit_epoch) == 1
    assert all(float(layer.weight.abs().max()) <= 1.0 for layer in binary), \
        "latent weights clipped to [-1, 1] after every step"
    model.eval()
    out = model.features[6](torch.randn(2, 16, 4, 4))
    assert set(out.unique().tolist()) <= {-1.0, 1.0}

    params = quantizer.export_model(tmp_path / "bnn.pt", tmp_path / "bnn.json",
                                    tmp_path / "bnn.onnx", input_shape=(16, 1, 8, 8))
    check_parity(quantizer, digits.x_test[:16])
    assert params["layers"]["features.0"]["weight"]["bits"] == 1
    assert params["layers"]["features.6"]["output"]["bits"] == 1
    assert "classifier.6" in params["float_layers"]


def test_bnn_without_optimizer_steps_by_hand_and_dummy_input_folds_bn(quiet):
    model = VGGDigits()
    quantizer = BNNQuantizer(model, BNN_SEED_CONFIG, dummy_input=torch.rand(2, 1, 8, 8))
    assert isinstance(model.features[0].bn, nn.BatchNorm2d), "dummy_input: Conv→BN folded"
    with torch.no_grad():
        model.features[0].weight.fill_(2.0)
    quantizer.step_with_optimizer()
    assert float(model.features[0].weight.max()) == 1.0
    unfolded = BNNQuantizer(VGGDigits(), BNN_SEED_CONFIG).compress()
    assert unfolded.features[0].bn is None and isinstance(unfolded.features[1], nn.BatchNorm2d)


def test_naive_quantizer_seed_example(digits, tmp_path, quiet):
    model = Mnist().eval()
    x = digits.x_test[:16]
    expected = model(x)
    compressed = NaiveQuantizer(model).compress()
    assert compressed is model and isinstance(model.fc1, QuantLayer)
    spec = model.fc1.weight_quant.spec
    assert (spec.bits, spec.symmetric, spec.granularity) == (8, True, "per_tensor")
    assert model.fc1.input_quant is None
    assert torch.allclose(model(x), expected, atol=0.05)
    quantizer = NaiveQuantizer(Mnist(), [{"quant_types": ["weight"], "quant_bits": {"weight": 8},
                                          "op_types": ["Linear"]}])
    assert not isinstance(quantizer.bound_model.conv1, QuantLayer)
    quantizer.export_model(tmp_path / "n.pt", onnx_path=tmp_path / "n.onnx",
                           input_shape=(16, 1, 8, 8))
    check_parity(quantizer, x)


def test_exclude_and_later_entries_win(quiet):
    config = [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["default"]},
              {"op_names": ["fc2"], "exclude": True},
              {"quant_types": ["weight"], "quant_bits": 4, "op_names": ["conv1"]}]
    model = QAT_Quantizer(Mnist(), config).compress()
    assert type(model.fc2) is nn.Linear
    assert model.conv1.weight_quant.spec.bits == 4 and model.conv2.weight_quant.spec.bits == 8


# ------------------------------------------------------------------ errors


ENTRY = {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d"]}


@pytest.mark.parametrize("cls, change, error, match", [
    (QAT_Quantizer, {"quant_types": ["bias"]}, ValueError, r"\['quant_types'\].*'weight', 'input'"),
    (QAT_Quantizer, {"quant_types": "weight"}, TypeError, r"\['quant_types'\] must be a list"),
    (QAT_Quantizer, {"quant_types": []}, ValueError, "non-empty"),
    (BNNQuantizer, {"quant_types": ["input"], "quant_bits": 1}, ValueError, r"\['weight', 'output'\]"),
    (DoReFaQuantizer, {"quant_types": ["output"]}, ValueError, r"\['weight'\]"),
    (QAT_Quantizer, {"quant_bits": 1}, ValueError, r"quant_bits=1: .*bits"),
    (QAT_Quantizer, {"quant_bits": 16}, ValueError, r"quant_bits=16: .*1\.\.8"),
    (QAT_Quantizer, {"quant_bits": 8.0}, TypeError, r"\['quant_bits'\] must be an int"),
    (QAT_Quantizer, {"quant_bits": True}, TypeError, r"\['quant_bits'\]"),
    (QAT_Quantizer, {"quant_bits": {"output": 8}}, ValueError, r"must give the bits of \['weight'\]"),
    (QAT_Quantizer, {"quant_bits": {"weight": 8, "output": 8}}, ValueError, "not in quant_types"),
    (QAT_Quantizer, {"quant_bits": {"weight": "8"}}, TypeError, "values must be int"),
    (BNNQuantizer, {"quant_bits": 8}, ValueError, r"quant_bits=8: .*one of \[1\]"),
    (DoReFaQuantizer, {"quant_bits": 8}, ValueError, r"1\.\.7"),
    (NaiveQuantizer, {"quant_bits": 4}, ValueError, "8 bits only"),
    (QAT_Quantizer, {"op_types": ["BatchNorm2d"]}, ValueError, r"'BatchNorm2d', a type lowbit"),
    (QAT_Quantizer, {"op_types": [3]}, TypeError, r"\['op_types'\] must be a list of str"),
    (QAT_Quantizer, {"op_names": "conv1"}, TypeError, r"\['op_names'\] must be a list of str"),
    (QAT_Quantizer, {"op_types": None}, TypeError, r"\['op_types'\]"),
    (QAT_Quantizer, {"op_names": ["conv1"], "op_types": ["ReLU6", "Conv2d"], "exclude": 1},
     TypeError, r"\['exclude'\] must be a bool"),
    (QAT_Quantizer, {"quant_start_step": -1}, ValueError, r"\['quant_start_step'\] must be >= 0"),
    (QAT_Quantizer, {"quant_start_step": 1.5}, TypeError, r"\['quant_start_step'\] must be an int"),
    (DoReFaQuantizer, {"quant_start_step": 10}, ValueError, r"unknown key\(s\) \['quant_start_step'\]"),
    (QAT_Quantizer, {"quant_delay": 10}, ValueError, r"unknown key\(s\) \['quant_delay'\]"),
    (QAT_Quantizer, {"quant_scheme": "per_row"}, ValueError, r"\['quant_scheme'\] must be one of"),
    (QAT_Quantizer, {"quant_dtype": {"output": "int"}}, ValueError, r"\['quant_dtype'\]"),
])
def test_config_errors(cls, change, error, match):
    with pytest.raises(error, match=match):
        cls(Mnist(), [{**ENTRY, **change}])


def test_op_names_of_modules_lowbit_cannot_quantize():
    model = VGGDigits()
    with pytest.raises(ValueError, match=r"'features.4', a MaxPool2d"):
        BNNQuantizer(model, [{"quant_types": ["output"], "quant_bits": 1,
                              "op_names": ["features.4"]}])


@pytest.mark.parametrize("entry, match", [
    ({"quant_types": ["weight"], "quant_bits": 8}, "either op_types or op_names must be specified"),
    ({"op_types": ["Conv2d"]}, r"either \(quant_types and quant_bits\) or exclude"),
    ({"op_types": ["Conv2d"], "quant_types": ["weight"]}, r"\(quant_types and quant_bits\)"),
    ({"op_types": ["Conv2d"], "exclude": False}, r"\(quant_types and quant_bits\)"),
])
def test_required_keys(entry, match):
    with pytest.raises(ValueError, match=match):
        QAT_Quantizer(Mnist(), [entry])


@pytest.mark.parametrize("config_list", [ENTRY, (ENTRY,), [ENTRY, "conv1"]])
def test_config_list_must_be_a_list_of_dicts(config_list):
    with pytest.raises(TypeError, match="`config_list` must be a list of dicts"):
        QAT_Quantizer(Mnist(), config_list)


def test_argument_types():
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module, got dict"):
        QAT_Quantizer({}, [ENTRY])
    with pytest.raises(TypeError, match="`optimizer` must be a torch.optim.Optimizer"):
        QAT_Quantizer(Mnist(), [ENTRY], optimizer="sgd")
    with pytest.raises(TypeError, match="`dummy_input` must be a Tensor"):
        QAT_Quantizer(Mnist(), [ENTRY], dummy_input=3)


def test_types_and_names_missing_from_the_model_warn_as_in_nni(quiet):
    config = [{**ENTRY, "op_types": ["Conv2d", "Conv1d"]},
              {**ENTRY, "op_names": ["conv9"]}]
    with pytest.warns(UserWarning, match=r"op_types \['Conv1d'\] not found in model"):
        QAT_Quantizer(Mnist(), config)
    with pytest.warns(UserWarning, match=r"op_names \['conv9'\] not found in model"):
        QAT_Quantizer(Mnist(), config)


def test_nothing_to_quantize_is_lowbits_error(quiet):
    with pytest.raises(ValueError, match="nothing to quantize"):
        QAT_Quantizer(Mnist(), [{**ENTRY, "op_types": ["Conv1d"]}])


def test_export_model_and_update_epoch_errors(tmp_path, quiet):
    quantizer = NaiveQuantizer(Mnist())
    with pytest.raises(ValueError, match="`model_path` must be specified"):
        quantizer.export_model(None)
    with pytest.raises(ValueError, match="`input_shape` must be specified to export onnx model"):
        quantizer.export_model(tmp_path / "m.pt", onnx_path=tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"`input_shape` must be a list or tuple of positive"):
        quantizer.export_model(tmp_path / "m.pt", onnx_path=tmp_path / "m.onnx",
                               input_shape=(0, 1))
    with pytest.raises(TypeError, match="`calibration_path` must be a str or os.PathLike"):
        quantizer.export_model(tmp_path / "m.pt", calibration_path=3)
    with pytest.raises(ValueError, match="`epoch` must be >= 0, got -1"):
        quantizer.update_epoch(-1)
    with pytest.raises(TypeError, match="`epoch` must be an int, got float"):
        quantizer.update_epoch(1.0)


def test_export_without_onnx_writes_state_dict_and_params(tmp_path, quiet):
    quantizer = NaiveQuantizer(Mnist())
    params = quantizer.export_model(tmp_path / "m.pt", calibration_path=tmp_path / "c.json")
    assert quantizer.export_report is None and not list(tmp_path.glob("*.onnx"))
    assert json.loads((tmp_path / "c.json").read_text()) == params
    assert params["layers"]["fc1"]["weight"]["bits"] == 8
    assert "conv1.weight" in torch.load(tmp_path / "m.pt", weights_only=True)


# ------------------------------------------------------------------ the thin-wrapper walk


@pytest.fixture
def native():
    """``lowbit``'s verbs and ``schedules.for_model`` wrapped in mocks that record each call."""
    targets = [(lowbit, n) for n in ("prepare_qat", "quantize", "convert", "export_onnx")]
    targets.append((lowbit.schedules, "for_model"))
    patches = [mock.patch.object(obj, n, wraps=getattr(obj, n)) for obj, n in targets]
    yield {n: p.start() for (_, n), p in zip(targets, patches)}
    for p in patches:
        p.stop()


@pytest.mark.parametrize("cls, config, verb", [
    (QAT_Quantizer, QAT_SEED_CONFIG, "prepare_qat"),
    (DoReFaQuantizer, [{"quant_types": ["weight"], "quant_bits": 2, "op_types": ["default"]}],
     "prepare_qat"),
    (BNNQuantizer, [{"quant_types": ["weight", "output"], "quant_bits": 1,
                     "op_types": ["Conv2d", "ReLU6"]}], "prepare_qat"),
    (NaiveQuantizer, None, "quantize"),
])
def test_every_quantizer_reaches_the_native_api(cls, config, verb, native, quiet):
    model = Mnist()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    args = (model,) if config is None else (model, config)
    quantizer = cls(*args, optimizer=optimizer)
    assert native[verb].call_count == 1 and native[verb].call_args.kwargs["inplace"] is True
    assert native["for_model"].call_count == 1
    assert isinstance(quantizer.schedule, lowbit.schedules.Schedule)
    assert isinstance(quantizer.config, lowbit.QuantConfig)
    assert quantizer.compress() is model
    with mock.patch.object(quantizer.schedule, "step_batch",
                           wraps=quantizer.schedule.step_batch) as step_batch:
        train(model, optimizer, [(torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,)))])
        quantizer.step_with_optimizer()
        assert step_batch.call_count == 2, "the patched optimizer.step, then by hand"
    quantizer.update_epoch(2)
    assert int(model.lowbit_epoch) == 2


def test_export_model_reaches_the_native_api(native, tmp_path, quiet):
    quantizer = NaiveQuantizer(Mnist())
    quantizer.export_model(tmp_path / "m.pt", onnx_path=tmp_path / "m.onnx",
                           input_shape=(2, 1, 8, 8))
    assert native["convert"].call_count == 1 and native["export_onnx"].call_count == 1
    assert native["convert"].call_args.args[0] is quantizer.bound_model
    assert isinstance(quantizer.export_report, lowbit.ExportReport)


def test_warnings_are_not_swallowed():
    """Float layers are named by lowbit's own warning (the BNN example's last layer)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        BNNQuantizer(VGGDigits(), BNN_SEED_CONFIG)
    assert any("classifier.6" in str(w.message) for w in caught)
