"""lowbit.compat.mindspore: MindSpore's QAT tutorial (LeNet-5), translated to PyTorch, end to end.

Data: scikit-learn's 8x8 digits upsampled (bilinear) to LeNet-5's 32x32 input and scaled to
[-1, 1], the range that export's ``mean=std_dev=127.5`` assume (real = (pixel - 127.5) / 127.5).
"""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.compat import mindspore as ms
from lowbit.compat.mindspore import (
    ActQuant,
    Conv2dBnAct,
    Conv2dQuant,
    DenseBnAct,
    DenseQuant,
    FakeQuantWithMinMaxObserver,
    OptimizeOption,
    QuantDtype,
    QuantizationAwareTraining,
    create_quant_config,
    export,
    load_nonquant_param_into_quant_net,
)
from lowbit.demo import load_digits
from lowbit.deploy import IntWeight, QuantizeDequantize
from lowbit.registry import LAYERS

# ------------------------------------------------------------------ the tutorial's networks


class LeNet5(nn.Module):
    """The tutorial's float LeNet-5 (MindSpore ``nn.Conv2d`` has no bias by default; the dense
    layers start from ``Normal(0.02)``)."""

    def __init__(self, num_class: int = 10, num_channel: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_channel, 6, 5, bias=False)  # pad_mode='valid'
        self.conv2 = nn.Conv2d(6, 16, 5, bias=False)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_class)
        for fc in (self.fc1, self.fc2, self.fc3):
            nn.init.normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)
        self.relu = nn.ReLU()
        self.max_pool2d = nn.MaxPool2d(kernel_size=2, stride=2)
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.max_pool2d(self.relu(self.conv1(x)))
        x = self.max_pool2d(self.relu(self.conv2(x)))
        x = self.flatten(x)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5Fusion(nn.Module):
    """The tutorial's fusion network (``has_bn`` added to test BN folding)."""

    def __init__(self, num_class: int = 10, has_bn: bool = False) -> None:
        super().__init__()
        self.num_class = num_class
        self.conv1 = Conv2dBnAct(1, 6, kernel_size=5, pad_mode="valid", activation="relu",
                                 has_bn=has_bn)
        self.conv2 = Conv2dBnAct(6, 16, kernel_size=5, pad_mode="valid", activation="relu",
                                 has_bn=has_bn)
        self.fc1 = DenseBnAct(16 * 5 * 5, 120, activation="relu")
        self.fc2 = DenseBnAct(120, 84, activation="relu")
        self.fc3 = DenseBnAct(84, self.num_class)
        self.max_pool2d = nn.MaxPool2d(kernel_size=2, stride=2)
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.max_pool2d(self.conv1(x))
        x = self.max_pool2d(self.conv2(x))
        x = self.flatten(x)
        x = self.fc1(x)
        x = self.fc2(x)
        return self.fc3(x)


class LeNet5Manual(nn.Module):
    """The tutorial's manually quantized LeNet-5 at any bit width, plus (the tutorial's note) a
    ``FakeQuantWithMinMaxObserver`` inserted after the last pooling."""

    def __init__(self, num_class: int = 10, channel: int = 1,
                 dtype: QuantDtype = QuantDtype.INT8) -> None:
        super().__init__()
        self.num_class = num_class
        self.qconfig = create_quant_config(quant_dtype=(dtype, dtype), per_channel=(True, False),
                                           symmetric=[True, False])
        self.conv1 = Conv2dQuant(channel, 6, 5, pad_mode="valid", quant_config=self.qconfig,
                                 quant_dtype=dtype)
        self.conv2 = Conv2dQuant(6, 16, 5, pad_mode="valid", quant_config=self.qconfig,
                                 quant_dtype=dtype)
        self.fc1 = DenseQuant(16 * 5 * 5, 120, quant_config=self.qconfig, quant_dtype=dtype)
        self.fc2 = DenseQuant(120, 84, quant_config=self.qconfig, quant_dtype=dtype)
        self.fc3 = DenseQuant(84, self.num_class, quant_config=self.qconfig, quant_dtype=dtype)
        self.relu = ActQuant(nn.ReLU(), quant_config=self.qconfig, quant_dtype=dtype)
        self.max_pool2d = nn.MaxPool2d(kernel_size=2, stride=2)
        self.fake_quant = FakeQuantWithMinMaxObserver(quant_dtype=dtype, ema=True)
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.max_pool2d(self.relu(self.conv1(x)))
        x = self.fake_quant(self.max_pool2d(self.relu(self.conv2(x))))
        x = self.flatten(x)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


# ------------------------------------------------------------------ data and training


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, ...]:
    data = load_digits()

    def to_lenet(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=32, mode="bilinear", align_corners=False) * 2 - 1

    return to_lenet(data.x_train), data.y_train, to_lenet(data.x_test), data.y_test


def train(model: nn.Module, digits: tuple[torch.Tensor, ...], steps: int,
          lr: float = 3e-3) -> nn.Module:
    x, y = digits[0], digits[1]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(model: nn.Module, digits: tuple[torch.Tensor, ...]) -> float:
    with torch.no_grad():
        return (model(digits[2]).argmax(1) == digits[3]).float().mean().item()


def ort_logits(path: str, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.fixture(scope="module")
def pretrained(digits) -> dict[str, torch.Tensor]:
    """The float LeNet-5 "checkpoint" the tutorial fine-tunes from."""
    torch.manual_seed(0)
    model = train(LeNet5(), digits, steps=100)
    assert accuracy(model, digits) > 0.85
    return model.state_dict()


# ------------------------------------------------------------------ the tutorial, end to end


@pytest.fixture(scope="module")
def auto_run(digits, pretrained, tmp_path_factory):
    """Define the fusion network, load the float checkpoint, quantize, fine-tune, export."""
    torch.manual_seed(0)
    network = LeNet5Fusion(10)
    load_nonquant_param_into_quant_net(network, pretrained)
    fused_float = [accuracy(network, digits)]
    # The tutorial's quant_delay=900 scaled to this short run: 10 float steps, then fake quant.
    quantizer = QuantizationAwareTraining(quant_delay=10, bn_fold=False,
                                          per_channel=[True, False], symmetric=[True, False])
    net = quantizer.quantize(network)
    train(net, digits, steps=40, lr=1e-3)
    file_name = str(tmp_path_factory.mktemp("ms") / "lenet_quant")
    inputs = digits[2][:64]
    report = export(net, inputs, file_name=file_name, file_format="ONNX", quant_mode="QUANT",
                    mean=127.5, std_dev=127.5)
    return network, net, report, file_name, inputs, fused_float[0]


def test_loaded_fusion_network_computes_the_float_network(digits, pretrained):
    float_net = LeNet5()
    float_net.load_state_dict(pretrained)
    network = LeNet5Fusion(10)
    load_nonquant_param_into_quant_net(network, pretrained)
    x = digits[2][:16]
    with torch.no_grad():
        torch.testing.assert_close(network.eval()(x), float_net.eval()(x))


def test_quantize_converts_in_place_and_fine_tunes(auto_run, digits):
    network, net, _, _, _, float_acc = auto_run
    assert net is network, "MindSpore converts the network in place"
    assert isinstance(net.conv1.conv, lowbit.nn.QuantConv2d)
    assert isinstance(net.fc3.dense, lowbit.nn.QuantLinear)
    assert accuracy(net.eval(), digits) >= float_acc - 0.03


def test_export_writes_onnx_that_onnx_runtime_runs_like_the_model(auto_run, digits):
    _, net, report, file_name, inputs, _ = auto_run
    assert report.onnx_path.name == "lenet_quant.onnx"
    assert report.parity.output_max_lsb <= 1.5, report.parity
    assert report.parity.codes_identical >= 0.99 and report.parity.codes_max_diff <= 1
    got = ort_logits(file_name + ".onnx", inputs)
    with torch.no_grad():
        expected = net.eval()(inputs).numpy()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95
    assert (got.argmax(1) == digits[3][:64].numpy()).mean() >= 0.85


def test_export_fixes_the_first_layer_input_from_mean_and_std_dev(auto_run):
    _, net, report, _, _, _ = auto_run
    params = json.loads(report.params_path.read_text())["layers"]
    first = params["conv1.conv"]["input"]
    assert first["bits"] == 8 and first["signed"] is False
    assert first["scale"] == pytest.approx(1 / 127.5) and first["zero_point"] == 128


def test_the_tutorial_constructor_maps_to_lowbit_specs():
    quantizer = QuantizationAwareTraining(quant_delay=900, bn_fold=False,
                                          per_channel=[True, False], symmetric=[True, False])
    weight, act = quantizer.quant_config
    assert weight == lowbit.QuantSpec(bits=8, symmetric=True, granularity="per_channel",
                                      quant_delay=900)
    assert act == lowbit.QuantSpec(bits=8, symmetric=False, observer="ema", moving_rate=0.0,
                                   quant_delay=900)
    net = quantizer.quantize(LeNet5Fusion(10, has_bn=True))
    layers = {layer.name: layer for layer in net.lowbit_plan.layers}
    assert set(layers) == {"conv1.conv", "conv2.conv", "fc1.dense", "fc2.dense", "fc3.dense"}
    assert layers["conv1.conv"].weight == weight and layers["conv1.conv"].input == act
    assert layers["fc2.dense"].output is None
    assert layers["fc3.dense"].output == act.replace(moving_rate=0.999), \
        "after_fake: the last cell's output gets an EMA fake quant"
    assert net.lowbit_plan.fusions == (), "bn_fold=False: QuantConfig(fuse_bn=False)"
    assert isinstance(net.conv1.batchnorm, nn.BatchNorm2d) and net.conv1.conv.bn is None
    assert net.fc3.dense.output_quant.qparams().scale.item() == pytest.approx(12 / 255), \
        "activation ranges start at MindSpore's min_init/max_init [-6, 6]"


@pytest.mark.parametrize("one_conv_fold, freeze", [(True, None), (False, 3)])
def test_bn_fold_folds_while_training_and_freezes_after_freeze_bn(digits, one_conv_fold, freeze):
    quantizer = QuantizationAwareTraining(bn_fold=True, freeze_bn=3, one_conv_fold=one_conv_fold,
                                          per_channel=[True, False], symmetric=[True, False])
    net = quantizer.quantize(LeNet5Fusion(10, has_bn=True))
    conv = net.conv1.conv
    assert isinstance(conv.bn, nn.BatchNorm2d) and isinstance(net.conv1.batchnorm, nn.Identity)
    assert conv.freeze_bn == freeze, "freeze_bn is read only with one_conv_fold=False"
    train(net, digits, steps=4)
    assert conv.bn_frozen() is (freeze is not None)


def test_bn_fold_network_exports_with_folded_batchnorm(digits, tmp_path):
    net = QuantizationAwareTraining(bn_fold=True, per_channel=[True, False],
                                    symmetric=[True, False]).quantize(LeNet5Fusion(10, has_bn=True))
    train(net, digits, steps=20)
    x = digits[2][:32]
    report = export(net, x, file_name=str(tmp_path / "bn"))
    assert report.parity.output_max_lsb <= 1.5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in lowbit.convert(net).modules())


# ------------------------------------------------------------------ manual layers


@pytest.mark.parametrize("dtype", [QuantDtype.INT4, QuantDtype.INT7, QuantDtype.INT8],
                         ids=["4bit", "7bit", "8bit"])
def test_manual_network_at_4_7_8_bits_trains_and_exports(digits, pretrained, tmp_path, dtype):
    torch.manual_seed(0)
    net = LeNet5Manual(10, dtype=dtype)
    load_nonquant_param_into_quant_net(net, pretrained)
    train(net, digits, steps=20, lr=1e-3)
    assert accuracy(net, digits) > 0.7
    x = digits[2][:32]
    # Conv2dQuant quantizes weights only: no quantizer reads the network input.
    with pytest.warns(UserWarning, match="not applied"):
        report = export(net, x, file_name=str(tmp_path / "manual"))
    assert report.parity.output_max_lsb <= 1.5, report.parity
    assert report.parity.codes_identical >= 0.99 and report.parity.codes_max_diff <= 1, \
        "codes are read after the Clip of the narrow grid"
    with torch.no_grad():
        expected = lowbit.convert(net)(x).numpy()
    got = ort_logits(str(report.onnx_path), x)  # a 4-bit tie one code apart moves logits
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95
    bits = dtype.num_bits
    dm = lowbit.convert(net)
    for module in dm.modules():
        if isinstance(module, IntWeight):
            codes = module.codes.to(torch.int64)
            assert module.grid.bits == bits
            assert -(2 ** (bits - 1)) <= codes.min() and codes.max() <= 2 ** (bits - 1) - 1
    grids = [m.grid for m in dm.modules() if isinstance(m, QuantizeDequantize)]
    assert len(grids) == 2 and all(g.bits == bits and not g.signed for g in grids)


def test_fake_quant_node_before_any_data_uses_its_initial_range():
    """MindSpore's docstring example: range [-6, 6], 8 bits, round half to even."""
    fake_quant = FakeQuantWithMinMaxObserver().eval()
    x = torch.tensor([[1.0, 2, 1], [-2, 0, -1]])
    expected = torch.tensor([[0.9882355, 1.9764705, 0.9882355], [-1.9764705, 0.0, -0.9882355]])
    torch.testing.assert_close(fake_quant(x), expected)


def test_fake_quant_node_options():
    node = FakeQuantWithMinMaxObserver(per_channel=True, num_channels=3, channel_axis=1,
                                       quant_dtype=QuantDtype.INT4, symmetric=True, ema=True,
                                       ema_decay=0.99, quant_delay=2, min_init=-1, max_init=1)
    q = node.output_quant
    assert q.spec == lowbit.QuantSpec(bits=4, symmetric=True, granularity="per_channel", axis=1,
                                      observer="ema", moving_rate=0.99, quant_delay=2)
    assert q.qparams().scale.shape == (3,)
    assert q.qparams().scale[0].item() == pytest.approx(1 / 7)


def test_act_quant_returns_lowbit_layers():
    relu = ActQuant(nn.ReLU(), ema=True, fake_before=True)
    assert type(relu) is LAYERS.get("ReLU")
    assert relu.input_quant is not None and relu.output_quant.spec.moving_rate == 0.999
    assert ActQuant(nn.ReLU6()).input_quant is None
    sigmoid = ActQuant(nn.Sigmoid(), quant_dtype=QuantDtype.INT4)
    assert isinstance(sigmoid, nn.Sequential) and isinstance(sigmoid[0], nn.Sigmoid)
    x = torch.randn(4, 3)
    sigmoid.train()(x)
    dm = lowbit.convert(sigmoid.eval())
    torch.testing.assert_close(dm(x), sigmoid(x))


def test_dense_quant_activation_and_initializers():
    layer = DenseQuant(4, 3, weight_init="zeros", bias_init=0.5, activation="relu")
    assert isinstance(layer.activation, nn.ReLU)
    assert torch.equal(layer(torch.randn(2, 4)), torch.full((2, 3), 0.5))
    conv = Conv2dQuant(2, 3, 3, pad_mode="pad", padding=(1, 1, 1, 1), has_bias=True,
                       weight_init=torch.ones(3, 2, 3, 3))
    assert conv.padding == (1, 1) and torch.equal(conv.weight, torch.ones(3, 2, 3, 3))
    assert conv(torch.randn(1, 2, 5, 5)).shape == (1, 3, 5, 5)
    assert Conv2dQuant(2, 3, 3)(torch.randn(1, 2, 5, 5)).shape == (1, 3, 5, 5), "pad_mode='same'"
    assert Conv2dQuant(2, 3, 3).weight.std().item() == pytest.approx(0.01, rel=0.5), \
        "weight_init='normal' is MindSpore's N(0, 0.01)"


def test_learned_scale_uses_lsq_and_exports_the_fixed_input_scale(tmp_path):
    quantizer = QuantizationAwareTraining(
        optimize_option=OptimizeOption.LEARNED_SCALE, freeze_bn=0, symmetric=(True, True),
        narrow_range=(True, True))
    assert {s.method for s in quantizer.quant_config} == {"lsq"}
    net = quantizer.quantize(LeNet5Fusion(10))
    assert type(net.conv1.conv.weight_quant) is lowbit.QUANTIZERS.get("lsq")
    net(torch.rand(8, 1, 32, 32) * 2 - 1)  # LSQ steps start from the first batch
    report = export(net, torch.rand(4, 1, 32, 32) * 2 - 1, file_name=str(tmp_path / "lsq"))
    first = json.loads(report.params_path.read_text())["layers"]["conv1.conv"]["input"]
    assert first["scale"] == pytest.approx(1 / 127.5)
    assert report.parity.codes_identical >= 0.99, report.parity


# ------------------------------------------------------------------ load_nonquant_param_into_quant_net


def test_load_maps_batchnorm_moved_into_the_quantized_layer():
    float_net = LeNet5Fusion(10, has_bn=True)
    with torch.no_grad():
        float_net.conv1.batchnorm.running_mean.uniform_(-1, 1)
        float_net.conv1.conv.weight.mul_(3)
    quantizer = QuantizationAwareTraining(per_channel=[True, False], symmetric=[True, False])
    net = quantizer.quantize(LeNet5Fusion(10, has_bn=True))
    load_nonquant_param_into_quant_net(net, float_net.state_dict())
    conv = net.conv1.conv
    assert torch.equal(conv.bn.running_mean, float_net.conv1.batchnorm.running_mean)
    assert torch.equal(conv.weight, float_net.conv1.conv.weight)
    with torch.no_grad():
        net.eval()(torch.randn(2, 1, 32, 32))  # refresh_weight_range: read at the next eval
    folded, _, _ = conv.folded_weight_and_bias()
    amax = folded.detach().abs().flatten(1).amax(1)
    torch.testing.assert_close(conv.weight_quant.qparams().scale, amax / 127), \
        "the weight range follows the loaded weight (W·k)"


def test_load_errors_on_missing_and_mismatched_names(pretrained):
    with pytest.raises(ValueError, match="Can't find match parameter in ckpt, param name = "
                                         "conv1.conv.weight"):
        load_nonquant_param_into_quant_net(LeNet5Fusion(10), {"fc1.weight": torch.zeros(1)})
    partial = {k: v for k, v in pretrained.items() if k != "fc3.bias"}
    with pytest.raises(ValueError, match="fc3.dense.bias"):
        load_nonquant_param_into_quant_net(LeNet5Fusion(10), partial)
    load_nonquant_param_into_quant_net(LeNet5Fusion(10), partial, quant_new_params=["bias"])
    load_nonquant_param_into_quant_net(LeNet5Fusion(10), partial,
                                       quant_new_params=["fc3.dense.bias"])
    wrong = dict(pretrained, **{"fc3.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"'fc3.dense.bias' has shape \(10,\)"):
        load_nonquant_param_into_quant_net(LeNet5Fusion(10), wrong)
    with pytest.warns(UserWarning, match=r"1 checkpoint entries match no parameter.*extra"):
        load_nonquant_param_into_quant_net(LeNet5Fusion(10), dict(pretrained, extra=torch.ones(1)))


def test_load_refuses_a_model_whose_batchnorm_was_folded_by_quantize():
    qm = lowbit.quantize(LeNet5Fusion(10, has_bn=True).eval(),
                         lowbit.QuantConfig.preset("w8a8"))
    with pytest.raises(ValueError, match="BatchNorm 'conv1.batchnorm' folded"):
        load_nonquant_param_into_quant_net(qm, LeNet5Fusion(10, has_bn=True).state_dict())


# ------------------------------------------------------------------ errors


def _fused() -> nn.Module:
    return LeNet5Fusion(10)


QAT = QuantizationAwareTraining
ERRORS = [
    (lambda: QAT(quant_delay=(0, 0, 0)), ValueError, r"`quant_delay` must hold 1 or 2 values"),
    (lambda: QAT(quant_delay=(0, -1)), ValueError, r"`quant_delay\[1\]` must be >= 0, got -1"),
    (lambda: QAT(quant_delay=1.5), TypeError, r"`quant_delay` must be an int, got float"),
    (lambda: QAT(bn_fold="yes"), TypeError, r"`bn_fold` must be a bool"),
    (lambda: QAT(freeze_bn=-1), ValueError, r"`freeze_bn` must be >= 0"),
    (lambda: QAT(freeze_bn=1e7), TypeError, r"`freeze_bn` must be an int"),
    (lambda: QAT(quant_dtype="INT8"), TypeError, r"`quant_dtype` must be a QuantDtype"),
    (lambda: QAT(per_channel=(1, 0)), TypeError, r"`per_channel\[0\]` must be a bool"),
    (lambda: QAT(symmetric=(True, None)), TypeError, r"`symmetric\[1\]` must be a bool"),
    (lambda: QAT(narrow_range="no"), TypeError, r"`narrow_range` must be a bool"),
    (lambda: QAT(one_conv_fold=1), TypeError, r"`one_conv_fold` must be a bool"),
    (lambda: QAT(optimize_option="QAT"), TypeError, r"`optimize_option` must hold OptimizeOption"),
    (lambda: QAT(per_channel=(False, True)), ValueError, r"`per_channel` for activations"),
    (lambda: QAT(per_channel=True), ValueError, r"`per_channel` for activations"),
    (lambda: QAT(optimize_option=OptimizeOption.LEARNED_SCALE, freeze_bn=0,
                 narrow_range=(True, True)), ValueError, r"needs symmetric=\(True, True\)"),
    (lambda: QAT(optimize_option=[OptimizeOption.LEARNED_SCALE], freeze_bn=0,
                 symmetric=(True, True)), ValueError, r"needs narrow_range=\(True, True\)"),
    (lambda: QAT(optimize_option=OptimizeOption.LEARNED_SCALE, symmetric=True,
                 narrow_range=True), ValueError, r"needs freeze_bn=0, got 10000000"),
    (lambda: QAT(optimize_option=OptimizeOption.LEARNED_SCALE, symmetric=True, freeze_bn=0,
                 narrow_range=True, quant_delay=5), ValueError, r"needs quant_delay=\(0, 0\)"),
    (lambda: QAT().quantize("net"), TypeError, r"`network` must be a torch.nn.Module"),
    (lambda: QAT().quantize(LeNet5()), ValueError, r"no Conv2dBnAct or DenseBnAct cell"),
    (lambda: create_quant_config(per_channel=(False, True)), ValueError, r"`per_channel` for"),
    (lambda: create_quant_config(mode="FAST"), ValueError, r"`mode` must be 'DEFAULT'"),
    (lambda: create_quant_config(quant_observer=(nn.Identity, nn.Identity)),
     NotImplementedError, r"`quant_observer` must be FakeQuantWithMinMaxObserver"),
    (lambda: Conv2dQuant(1, 2, 3, pad_mode="full"), ValueError, r"`pad_mode` must be one of"),
    (lambda: Conv2dQuant(1, 2, 3, pad_mode="valid", padding=1), ValueError,
     r"`padding` must be 0 when pad_mode is 'valid'"),
    (lambda: Conv2dQuant(1, 2, 3, pad_mode="pad", padding=(1, 0, 1, 1)), NotImplementedError,
     r"pads top/bottom or left/right unequally"),
    (lambda: Conv2dQuant(1, 2, 3, stride=2), NotImplementedError, r"pad_mode='same' with stride"),
    (lambda: Conv2dQuant(1, 2, 3, weight_init="glorot"), ValueError, r"`weight_init` must be "),
    (lambda: Conv2dQuant(1, 2, 3, weight_init=torch.ones(1)), ValueError,
     r"`weight_init` has shape \(1,\)"),
    (lambda: Conv2dQuant(1, 2, 3, weight_init=None), TypeError, r"`weight_init` must be a str"),
    (lambda: Conv2dQuant(1, 2, 3, quant_config={}), TypeError, r"`quant_config` must be a Quant"),
    (lambda: Conv2dQuant(1, 2, 3, quant_dtype=8), TypeError, r"`quant_dtype` must be a QuantD"),
    (lambda: Conv2dQuant(1, 2, 3, has_bias=1), TypeError, r"`has_bias` must be a bool"),
    (lambda: DenseQuant(2, 3, activation="swish"), ValueError, r"`activation` must be one of"),
    (lambda: DenseQuant(2, 3, activation=3), TypeError, r"`activation` must be a str or"),
    (lambda: ActQuant("relu"), TypeError, r"`activation` must be a torch.nn.Module"),
    (lambda: ActQuant(nn.ReLU(), ema=True, ema_decay=1.0), ValueError,
     r"`ema_decay` must be in \[0, 1\)"),
    (lambda: ActQuant(nn.ReLU(), fake_before="yes"), TypeError, r"`fake_before` must be a bool"),
    (lambda: Conv2dBnAct(1, 2, 3, momentum=1.5), ValueError, r"`momentum` must be in \[0, 1\]"),
    (lambda: Conv2dBnAct(1, 2, 3, eps=0), ValueError, r"`eps` must be > 0"),
    (lambda: DenseBnAct(1, 2, has_bn="no"), TypeError, r"`has_bn` must be a bool"),
    (lambda: DenseBnAct(1, 2, after_fake=None), TypeError, r"`after_fake` must be a bool"),
    (lambda: FakeQuantWithMinMaxObserver(min_init=1, max_init=1), ValueError,
     r"`min_init` must be < `max_init`"),
    (lambda: FakeQuantWithMinMaxObserver(min_init="a"), TypeError, r"`min_init` must be an int"),
    (lambda: FakeQuantWithMinMaxObserver(quant_delay=-1), ValueError, r"`quant_delay` must be"),
    (lambda: FakeQuantWithMinMaxObserver(per_channel=True, num_channels=0), ValueError,
     r"`num_channels` must be >= 1"),
    (lambda: FakeQuantWithMinMaxObserver(mode="FAST"), ValueError, r"`mode` must be 'DEFAULT'"),
    (lambda: load_nonquant_param_into_quant_net("net", {}), TypeError, r"`quant_model` must be"),
    (lambda: load_nonquant_param_into_quant_net(_fused(), [1]), TypeError,
     r"`params_dict` must be a mapping"),
    (lambda: load_nonquant_param_into_quant_net(_fused(), {}, quant_new_params="bias"),
     TypeError, r"`quant_new_params` must be a list or None"),
]


@pytest.mark.parametrize("call, error, match", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.fixture(scope="module")
def small_qat():
    net = QAT(per_channel=[True, False], symmetric=[True, False]).quantize(LeNet5Fusion(10))
    net(torch.randn(8, 1, 32, 32))
    return net.eval()


EXPORT_ERRORS = [
    (dict(file_format="MINDIR"), ValueError, r"'MINDIR' is a MindSpore format"),
    (dict(file_format="AIR"), ValueError, r"'AIR' is a MindSpore format"),
    (dict(file_format="TFLITE"), ValueError, r"Illegal file format 'TFLITE'"),
    (dict(file_format=1), TypeError, r"`file_format` must be a str"),
    (dict(file_name=3), TypeError, r"`file_name` must be a str"),
    (dict(quant_mode=1), TypeError, r"The type of quant_mode should be str"),
    (dict(quant_mode="FAST"), ValueError, r"`quant_mode` must be 'QUANT' or 'NONQUANT'"),
    (dict(quant_mode="NONQUANT"), NotImplementedError, r"exports the integer model only"),
    (dict(mean="127.5"), TypeError, r"`mean` must be an int or a float"),
    (dict(std_dev=0), ValueError, r"`std_dev` must be > 0"),
    (dict(mean=300), ValueError, r"`mean` 300.0 puts the input zero point at 300"),
]


@pytest.mark.parametrize("kwargs, error, match", EXPORT_ERRORS,
                         ids=[e[2][:40] for e in EXPORT_ERRORS])
def test_export_errors(small_qat, tmp_path, kwargs, error, match):
    kwargs = {"file_name": str(tmp_path / "m"), **kwargs}
    with pytest.raises(error, match=match):
        export(small_qat, torch.ones(1, 1, 32, 32), **kwargs)


def test_export_leaves_the_network_as_it_was(small_qat, tmp_path):
    small_qat.train()
    before = {k: v.clone() for k, v in small_qat.state_dict().items()}
    export(small_qat, torch.ones(1, 1, 32, 32), file_name=str(tmp_path / "m"), mean=100,
           std_dev=50)
    after = small_qat.state_dict()
    assert small_qat.training and all(torch.equal(before[k], after[k]) for k in before)
    small_qat.eval()


def test_export_input_errors(small_qat, tmp_path):
    with pytest.raises(ValueError, match="pass at least one example input"):
        export(small_qat, file_name=str(tmp_path / "m"))
    with pytest.raises(TypeError, match=r"`inputs\[0\]` must be a torch.Tensor"):
        export(small_qat, np.ones((1, 1, 32, 32)), file_name=str(tmp_path / "m"))
    with pytest.raises(TypeError, match="`net` must be a torch.nn.Module"):
        export("net", torch.ones(1, 1, 32, 32), file_name=str(tmp_path / "m"))


# ------------------------------------------------------------------ the thin-wrapper walk


def test_every_front_end_name_reaches_lowbit(small_qat, tmp_path):
    with mock.patch.object(lowbit, "prepare_qat", wraps=lowbit.prepare_qat) as prepare:
        net = QAT(bn_fold=True, freeze_bn=7, one_conv_fold=False).quantize(
            LeNet5Fusion(10, has_bn=True))
    config = prepare.call_args.args[1]
    assert prepare.call_args.kwargs == {"inplace": True, "freeze_bn": 7}
    assert isinstance(config, lowbit.QuantConfig) and config.fuse_bn is True
    assert all(rule.weight.method == "ste" for rule in config.rules)
    assert ("conv1.conv", "conv1.batchnorm", "conv1.activation") in net.lowbit_plan.fusions, \
        "lowbit's BN folding recognises Conv2dBnAct"

    quantizer_type = lowbit.QUANTIZERS.get("ste")
    assert type(Conv2dQuant(1, 2, 3)) is lowbit.nn.QuantConv2d
    assert type(DenseQuant(2, 3)) is lowbit.nn.QuantLinear
    assert type(Conv2dQuant(1, 2, 3).weight_quant) is quantizer_type
    assert type(ActQuant(nn.ReLU()).output_quant) is quantizer_type
    node = FakeQuantWithMinMaxObserver()
    assert isinstance(node, lowbit.nn.QuantLayer) and type(node.output_quant) is quantizer_type

    refresh = lowbit.nn.QuantLayer.refresh_weight_range
    with mock.patch.object(lowbit.nn.QuantLayer, "refresh_weight_range", autospec=True,
                           side_effect=refresh) as refreshed:
        load_nonquant_param_into_quant_net(net, LeNet5Fusion(10, has_bn=True).state_dict())
    assert refreshed.call_count == 5, "one weight range per quantized layer"

    ste = lowbit.QUANTIZERS.get("ste")
    with mock.patch.object(lowbit, "convert", wraps=lowbit.convert) as convert, \
            mock.patch.object(lowbit, "export_onnx", wraps=lowbit.export_onnx) as export_onnx, \
            mock.patch.object(ste, "set_qparams", autospec=True,
                              side_effect=ste.set_qparams) as set_qparams:
        report = export(small_qat, torch.ones(1, 1, 32, 32), file_name=str(tmp_path / "walk"))
    assert set_qparams.call_args.args[1:] == (1 / 127.5, 128), "mean/std_dev: set_qparams"
    convert.assert_called_once()
    assert export_onnx.call_args.args[1] == str(tmp_path / "walk.onnx")
    assert isinstance(report, lowbit.ExportReport)
    assert ms.quant_config_default == create_quant_config()
