"""PaddleSlim front end: the documented QAT / PTQ / dynamic examples in PyTorch, end to end to ONNX
that ONNX Runtime runs like the torch deploy model; every error; the walk to the native API."""

from __future__ import annotations

import copy
import types
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.compat.paddleslim import (
    PTQ,
    QAT,
    AbsmaxQuantizer,
    HistQuantizer,
    InputSpec,
    KLQuantizer,
    PerChannelAbsmaxQuantizer,
    quant_post_dynamic,
)
from lowbit.demo import load_digits
from lowbit.deploy import DeployConv, DynamicLinear
from lowbit.numerics import IntRange
from lowbit.quantizers.pact import PACTQuantizer

SHAPE = [None, 1, 8, 8]


def mobilenet_like() -> nn.Sequential:
    """Depthwise-separable convs with BN + ReLU (~1k parameters), like mobilenet_v1."""

    def separable(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         *separable(8, 16, 2), *separable(16, 16, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny depthwise convs train ~20x faster on one thread than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits: (x_train, y_train, x_test, y_test)."""
    data = load_digits()
    return data.x_train, data.y_train, data.x_test[:200], data.y_test[:200]


@pytest.fixture(scope="module")
def fp32_model(digits):
    """The MobileNet-like net trained briefly in float (the documented pretrained model)."""
    torch.manual_seed(0)
    model = mobilenet_like()
    train(model, digits, steps=150, lr=0.02)
    return model.eval()


def train(model: nn.Module, digits, steps: int = 6, lr: float = 0.005) -> None:
    x, y = digits[0], digits[1]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        idx = torch.arange(step * 64, step * 64 + 64) % len(x)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()


def accuracy(logits: np.ndarray | torch.Tensor, y: torch.Tensor) -> float:
    return float((torch.as_tensor(logits).argmax(1) == y).float().mean())


def ort(path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as rt

    session = rt.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def check_ort_agrees(report, deploy: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The shipped file on a batch size other than the example's (dynamic axis) vs torch."""
    parity = report.parity
    assert parity.output_max_lsb <= 1.5, parity
    assert parity.codes_identical >= 0.99 and parity.codes_max_diff <= 1, parity  # ±127 grid
    got = ort(report.onnx_path, x)
    with torch.no_grad():
        expected = deploy(x).numpy()
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.98
    return got


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------- QAT examples


def test_qat_doc_example_with_pact_trains_and_exports(tmp_path, digits, fp32_model):
    net = copy.deepcopy(fp32_model)
    quant_config = {
        "activation_preprocess_type": "PACT",
        "quantizable_layer_type": ["Conv2D", "Linear"],
    }
    quanter = QAT(config=quant_config)
    assert quanter.quantize(net) is net, "quantize works in place"
    assert isinstance(net[0], lowbit.nn.QuantConv2d) and isinstance(net[-1], lowbit.nn.QuantLinear)
    assert isinstance(net[0].input_quant, PACTQuantizer)
    assert isinstance(net[1], nn.BatchNorm2d), "fuse_conv_bn=False: BN trains as a float layer"
    assert net[0].input_quant.grid.qmin == -127, "Paddle's symmetric signed grid"
    train(net, digits)
    report = quanter.save_quantized_model(
        net, str(tmp_path / "quant_model"),
        input_spec=[InputSpec(shape=SHAPE, dtype="float32")])
    for name in ("quant_model.onnx", "quant_model.quant_params.json",
                 "quant_model.weights.safetensors"):
        assert (tmp_path / name).is_file()
    x, y = digits[2], digits[3]
    got = check_ort_agrees(report, lowbit.convert(net), x)
    with torch.no_grad():
        float_acc = accuracy(fp32_model(x), y)
    assert accuracy(got, y) >= float_acc - 0.1


class FirstBatchAbsMax(nn.Module):
    """A user's weight quantizer: int8 abs max fixed at the first batch, straight through.
    ``qparams`` makes it exportable."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.zeros(()))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.scale:
            self.scale.fill_(float(w.detach().abs().max()) / 127)
        q = torch.clamp(torch.round(w / self.scale), -127, 127) * self.scale
        return w + (q - w).detach()

    def qparams(self) -> lowbit.QParams:
        return lowbit.QParams(self.scale.clone(), torch.zeros((), dtype=torch.int32),
                              IntRange(8, signed=True, narrow=True), None)


class ClipWeights(nn.Module):
    """A user's weight preprocess: clip at three standard deviations."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        bound = 3 * w.detach().std()
        return torch.clamp(w, -bound, bound)


class Clip6(nn.Module):
    """A user's activation preprocess: a clip (dropped at export, as PaddleSlim does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, -6.0, 6.0)


def test_user_classes_train_convert_and_export(tmp_path, digits, fp32_model):
    net = copy.deepcopy(fp32_model)
    quanter = QAT(weight_preprocess=ClipWeights, weight_quantize=FirstBatchAbsMax,
                  act_preprocess=Clip6)
    quanter.quantize(net)
    w_q, x_q = net[3].weight_quant, net[3].input_quant
    assert isinstance(w_q, lowbit.Quantizer) and isinstance(w_q.user, FirstBatchAbsMax)
    assert isinstance(w_q.pre, ClipWeights) and isinstance(x_q.pre, Clip6)
    assert x_q.spec.observer == "ema", "the default config still applies around the classes"
    train(net, digits)
    x = digits[2]
    with torch.no_grad():
        trained = net.eval()(x)  # also the last forward: input_spec=None takes its shapes
    deploy = lowbit.convert(net)
    with torch.no_grad():
        assert torch.allclose(deploy(x), trained, atol=1e-4 * trained.abs().max())
    with pytest.warns(UserWarning, match="act_preprocess is not part of the saved model"):
        report = quanter.save_quantized_model(net, tmp_path / "user")
    check_ort_agrees(report, deploy, x[:7])


class NoQParams(nn.Module):
    """A user quantizer without ``qparams``: trains, cannot convert."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (torch.round(x * 16) / 16 - x).detach()


class BadQParams(NoQParams):
    def qparams(self):
        return 0.1


def test_a_user_quantizer_without_qparams_trains_but_cannot_save(tmp_path, digits):
    net = mobilenet_like()
    quanter = QAT(act_quantize=NoQParams)
    quanter.quantize(net)
    train(net, digits, steps=2)
    with pytest.raises(NotImplementedError, match="act_quantize class NoQParams defines no "
                                                  "qparams"):
        quanter.save_quantized_model(net, tmp_path / "m", input_spec=[SHAPE])
    with pytest.raises(NotImplementedError, match="can train but lowbit cannot convert"):
        lowbit.convert(net)


def test_a_user_qparams_of_the_wrong_type_is_named(digits):
    net = mobilenet_like()
    QAT(weight_quantize=BadQParams).quantize(net)
    with pytest.raises(TypeError, match=r"BadQParams.qparams\(\) must return a lowbit.QParams"):
        train(net, digits, steps=1)  # the layer reads the weight scale for its integer bias


def test_weight_pact_with_bn_folding_trains_its_clip_and_converts(digits, fp32_model):
    net = copy.deepcopy(fp32_model)
    quanter = QAT(config={"weight_preprocess_type": "PACT", "fuse_conv_bn": True})
    quanter.quantize(net)
    w_q = net[3].weight_quant
    assert type(w_q) is PACTQuantizer and w_q.role == "weight", "lowbit's own method 'pact'"
    assert quanter.quant_config.rules[0].weight.method == "pact"
    assert isinstance(net[3].bn, nn.BatchNorm2d), "fuse_conv_bn folds BN while training"
    alpha = w_q.alpha.item()
    train(net, digits, steps=3)
    assert w_q.alpha.item() != alpha, "PACT learns the weight clip"
    x = digits[2]
    with torch.no_grad():
        expected = net.eval()(x)
        assert torch.allclose(lowbit.convert(net)(x), expected, atol=1e-4 * expected.abs().max())


def test_qat_config_maps_onto_lowbit_specs():
    default = QAT().quant_config.rules[0]
    assert set(default.types) == {"Conv2d", "Linear"}
    assert default.weight == lowbit.QuantSpec(bits=8, symmetric=True, signed=True,
                                              narrow_range=True, granularity="per_channel")
    assert default.input.observer == "ema" and default.input.moving_rate == 0.9
    assert QAT().quant_config.fuse_bn is False
    rule = QAT(config={"weight_quantize_type": "abs_max", "activation_quantize_type": "abs_max",
                       "weight_bits": 4, "activation_bits": 6,
                       "quantizable_layer_type": ["Conv2D"]}).quant_config.rules[0]
    assert rule.types == ("Conv2d",)
    assert (rule.weight.bits, rule.weight.granularity) == (4, "per_tensor")
    assert (rule.input.bits, rule.input.observer) == (6, "minmax")
    assert QAT(config={"moving_rate": 0.5}).quant_config.rules[0].input.moving_rate == 0.5


def test_qat_quantizable_layer_type_leaves_other_layers_in_float():
    net = mobilenet_like()
    with pytest.warns(UserWarning, match="left 1 layer"):
        QAT(config={"quantizable_layer_type": ["Conv2D"]}).quantize(net)
    assert type(net[-1]) is nn.Linear


# ----------------------------------------------------------------------------- PTQ examples


def calibrate(quant_model: nn.Module, digits, batches: int = 4) -> None:
    with torch.no_grad():
        for i in range(batches):
            quant_model(digits[0][i * 64:(i + 1) * 64])


def test_ptq_doc_example_calibrates_and_exports(tmp_path, digits, fp32_model):
    ptq = PTQ()
    quant_model = ptq.quantize(fp32_model)
    assert quant_model is not fp32_model and not quant_model.training
    assert isinstance(ptq.activation_quantizer, KLQuantizer)
    assert quant_model[0].input_quant.spec.observer == "kl"
    assert quant_model[0].weight_quant.spec.granularity == "per_channel"
    assert quant_model[0].input_quant.observing, "the returned model calibrates as it runs"
    calibrate(quant_model, digits)
    report = ptq.save_quantized_model(
        quant_model, str(tmp_path / "quant_model"),
        input_spec=[InputSpec(shape=SHAPE, dtype="float32")])
    assert not quant_model[0].input_quant.observing, "save froze the ranges"
    x, y = digits[2], digits[3]
    got = check_ort_agrees(report, lowbit.convert(quant_model), x)
    with torch.no_grad():
        assert accuracy(got, y) >= accuracy(fp32_model(x), y) - 0.05


def test_ptq_doc_example_with_hist_config_and_fuse_list(tmp_path, digits, fp32_model):
    ptq_config = {"activation_quantizer": "HistQuantizer", "upsample_bins": 127,
                  "hist_percent": 0.999}
    ptq = PTQ(**ptq_config)
    assert ptq.activation_quantizer == HistQuantizer(upsample_bins=127, hist_percent=0.999)
    fuse_list: list[list[str]] = []
    for name, layer in fp32_model.named_modules():
        if isinstance(layer, nn.Conv2d):
            fuse_list.append([name])
        if isinstance(layer, nn.BatchNorm2d):
            fuse_list[-1].append(name)
    quant_model = ptq.quantize(fp32_model, fuse=True, fuse_list=fuse_list)
    assert isinstance(quant_model[1], nn.Identity), "BN folded into the conv"
    assert isinstance(fp32_model[1], nn.BatchNorm2d), "the float model is left as it was"
    spec = quant_model[3].input_quant.spec
    assert (spec.observer, spec.upsample_bins, spec.hist_percent) == ("percentile", 127, 0.999)
    calibrate(quant_model, digits)
    report = ptq.save_quantized_model(quant_model, tmp_path / "fused",
                                      input_spec=[InputSpec(SHAPE)])
    x, y = digits[2], digits[3]
    got = check_ort_agrees(report, lowbit.convert(quant_model), x)
    with torch.no_grad():
        assert accuracy(got, y) >= accuracy(fp32_model(x), y) - 0.05


def test_ptq_without_fuse_keeps_bn_in_float(fp32_model):
    quant_model = PTQ("AbsmaxQuantizer", "AbsmaxQuantizer", quant_bits=4).quantize(fp32_model)
    assert isinstance(quant_model[1], nn.BatchNorm2d)
    w, x = quant_model[0].weight_quant.spec, quant_model[0].input_quant.spec
    assert (w.bits, w.granularity, x.bits, x.observer) == (4, "per_tensor", 4, "minmax")


@pytest.mark.parametrize("quantizer, spec", [
    (KLQuantizer(quant_bits=6, bins=512, upsample_bins=32),
     dict(bits=6, observer="kl", bins=512, upsample_bins=32)),
    (HistQuantizer(hist_percent=0.99), dict(bits=8, observer="percentile", hist_percent=0.99)),
    (AbsmaxQuantizer(), dict(bits=8, observer="minmax", granularity="per_tensor")),
    (PerChannelAbsmaxQuantizer(7), dict(bits=7, granularity="per_channel")),
], ids=["kl", "hist", "absmax", "per_channel"])
def test_ptq_quantizers_map_onto_observers(quantizer, spec):
    got = quantizer.spec()
    assert got.symmetric and got.is_signed and got.narrow_range
    assert {k: getattr(got, k) for k in spec} == spec


def test_ptq_accepts_instances_and_the_seeds_spelling():
    ptq = PTQ(activation_quantizer=AbsmaxQuantizer(6), weight_quantizer=AbsmaxQuantizer())
    assert ptq.quant_config.rules[0].input.bits == 6
    assert isinstance(PTQ(cactivation_quantizer="HistQuantizer").activation_quantizer,
                      HistQuantizer)


# ------------------------------------------------------------------------------ dynamic


def test_quant_post_dynamic_quantizes_weights_and_linear_inputs(tmp_path, digits, fp32_model):
    deploy = quiet(quant_post_dynamic, fp32_model, str(tmp_path / "out"),
                   save_params_filename="params.safetensors", input_spec=[SHAPE])
    assert isinstance(deploy[0], DeployConv) and isinstance(deploy[-1], DynamicLinear)
    assert type(deploy[3]) is nn.Conv2d, "depthwise_conv2d is not in the default op types"
    for name in ("model.onnx", "model.quant_params.json", "params.safetensors"):
        assert (tmp_path / "out" / name).is_file()
    x = digits[2]
    got = ort(tmp_path / "out" / "model.onnx", x)
    with torch.no_grad():
        expected = deploy(x).numpy()
        assert (got.argmax(1) == fp32_model(x).numpy().argmax(1)).mean() >= 0.95
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()
    everything = quiet(quant_post_dynamic, fp32_model, quantizable_op_type=["depthwise_conv2d"])
    assert isinstance(everything[3], DeployConv) and type(everything[0]) is nn.Conv2d


# ------------------------------------------------------------------------------- errors

QAT_CONFIG_ERRORS = [
    ([1], TypeError, "`config` must be dict"),
    ({"weight_bit": 8}, ValueError, r"unknown QAT config key\(s\) \['weight_bit'\]"),
    ({"weight_preprocess_type": "LSQ"}, ValueError, "`weight_preprocess_type` must be one of"),
    ({"activation_preprocess_type": "pact"}, ValueError, "`activation_preprocess_type` must"),
    ({"weight_quantize_type": "range_abs_max"}, ValueError, "`weight_quantize_type` must be"),
    ({"activation_quantize_type": "range_abs_max"}, NotImplementedError, "range_abs_max"),
    ({"activation_quantize_type": "max"}, ValueError, "`activation_quantize_type` must be"),
    ({"weight_bits": 8.0}, TypeError, "`weight_bits` must be int, got float"),
    ({"weight_bits": 16}, ValueError, "`weight_bits` must be in 2..8"),
    ({"activation_bits": True}, TypeError, "`activation_bits` must be int, got bool"),
    ({"activation_bits": 1}, ValueError, "`activation_bits` must be in 2..8"),
    ({"dtype": torch.int8}, TypeError, "`dtype` must be str"),
    ({"dtype": "uint8"}, ValueError, "`dtype` must be 'int8', got 'uint8'"),
    ({"window_size": 100.0}, TypeError, "`window_size` must be int"),
    ({"window_size": 100}, ValueError, "`window_size` only applies to"),
    ({"moving_rate": 1}, TypeError, "`moving_rate` must be float, got int"),
    ({"moving_rate": 1.0}, ValueError, r"`moving_rate` must be in \[0, 1\)"),
    ({"moving_rate": 0.5, "activation_quantize_type": "abs_max"}, ValueError,
     "`moving_rate` only applies to"),
    ({"fuse_conv_bn": 1}, TypeError, "`fuse_conv_bn` must be bool"),
    ({"quantizable_layer_type": "Conv2D"}, TypeError, "`quantizable_layer_type` must be a list"),
    ({"quantizable_layer_type": []}, ValueError, "must name at least one layer type"),
    ({"quantizable_layer_type": ["Conv2DTranspose"]}, ValueError,
     "must hold names of .* got 'Conv2DTranspose'"),
]


@pytest.mark.parametrize("config, error, match", QAT_CONFIG_ERRORS,
                         ids=[str(c)[:40] for c, _, _ in QAT_CONFIG_ERRORS])
def test_qat_config_errors(config, error, match):
    with pytest.raises(error, match=match):
        QAT(config=config)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weight_quantize=NoQParams()), TypeError, "`weight_quantize` must be a torch.nn.Module "
                                                   "subclass"),
    (dict(act_preprocess=lambda x: x), TypeError, "`act_preprocess` must be a torch.nn.Module"),
    (dict(weight_preprocess=int), TypeError, "`weight_preprocess` must be a torch.nn.Module"),
    (dict(config={"weight_preprocess_type": "PACT"}, weight_quantize=NoQParams),
     NotImplementedError, "weight_preprocess_type='PACT' with a user weight_quantize"),
    (dict(config={"activation_preprocess_type": "PACT"}, act_quantize=NoQParams),
     NotImplementedError, "activation_preprocess_type='PACT' with a user act_quantize"),
], ids=["instance", "function", "not-a-module", "weight-pact-and-user", "act-pact-and-user"])
def test_qat_user_class_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        QAT(**kwargs)


class NeedsBits(nn.Module):
    def __init__(self, bits: int) -> None:
        super().__init__()


def test_a_user_class_that_needs_arguments_fails_before_the_model_changes():
    net = mobilenet_like()
    with pytest.raises(TypeError, match=r"class NeedsBits must be constructible with no"):
        QAT(act_preprocess=NeedsBits).quantize(net)
    assert type(net[0]) is nn.Conv2d


def test_qat_quantize_errors():
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        QAT().quantize("mobilenet_v1")


def test_save_errors(tmp_path, digits):
    quanter = QAT()
    with pytest.raises(TypeError, match="`model` must be Module"):
        quanter.save_quantized_model("net", tmp_path / "m")
    with pytest.raises(ValueError, match="has no lowbit quantizers"):
        quanter.save_quantized_model(mobilenet_like(), tmp_path / "m")
    net = quanter.quantize(mobilenet_like())
    with pytest.raises(ValueError, match=r"layers \['0', .*\] have no activation range yet"):
        quanter.save_quantized_model(net, tmp_path / "m", input_spec=[SHAPE])
    with torch.no_grad():
        net(digits[2][:4])  # a training forward sets the moving-average ranges
    for spec, error, match in [
        (InputSpec(SHAPE), TypeError, "`input_spec` must be a list .* wrap one input"),
        ("x", TypeError, "`input_spec` must be a list"),
        (SHAPE, TypeError, r"the flat shape \[None, 1, 8, 8\]; write \[\[None, 1, 8, 8\]\]"),
        ([{"shape": SHAPE}], TypeError, r"`input_spec\[0\]` must be an InputSpec"),
    ]:
        with pytest.raises(error, match=match):
            quanter.save_quantized_model(net, tmp_path / "m", input_spec=spec)
    with pytest.raises(TypeError, match="`path` must be str or PathLike"):
        quanter.save_quantized_model(net, 3, input_spec=[SHAPE])
    fresh = PTQ().quantize(mobilenet_like().eval())
    with pytest.raises(ValueError, match="has not run since quantize"):
        PTQ().save_quantized_model(fresh, tmp_path / "m")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(shape="NCHW"), TypeError, "InputSpec `shape` must be a list"),
    (dict(shape=[0, 3]), ValueError, "InputSpec `shape` must hold positive ints"),
    (dict(shape=[1.5]), ValueError, "InputSpec `shape` must hold positive ints"),
    (dict(shape=[1], dtype="float8"), ValueError, "InputSpec `dtype` must be one of"),
    (dict(shape=[1], name=3), TypeError, "`InputSpec.name` must be str"),
], ids=["str-shape", "zero", "float-dim", "dtype", "name"])
def test_input_spec_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        InputSpec(**kwargs)


def test_input_spec_reads_paddle_spellings():
    spec = InputSpec(shape=[-1, 3, 8, 8], dtype="paddle.float32", name="image")
    assert spec.shape == (None, 3, 8, 8) and spec.torch_dtype is torch.float32


@pytest.mark.parametrize("args, kwargs, error, match", [
    (("KL",), {}, ValueError, "`activation_quantizer` must be one of .*got 'KL'"),
    ((PerChannelAbsmaxQuantizer(),), {}, ValueError,
     "`activation_quantizer` must be one of .*got PerChannelAbsmaxQuantizer"),
    ((KLQuantizer,), {}, TypeError, "`activation_quantizer` must be a quantizer name or instance"),
    ((), dict(weight_quantizer="KLQuantizer"), ValueError, "`weight_quantizer` must be one of"),
    ((), dict(hist_percent=0.9), TypeError, r"keyword argument\(s\) \['hist_percent'\]"),
    ((), dict(bins=512, weight_quantizer=AbsmaxQuantizer(), activation_quantizer=KLQuantizer()),
     TypeError, r"\['bins'\]"),
    (("HistQuantizer",), dict(cactivation_quantizer="KLQuantizer"), TypeError, "not both"),
    ((), dict(quant_bits="8"), TypeError, "`KLQuantizer.quant_bits` must be int"),
    ((), dict(quant_bits=16), ValueError, "`KLQuantizer.quant_bits` must be in 2..8"),
    ((), dict(bins=8), ValueError, "`bins` must be >= 16"),
    (("HistQuantizer",), dict(hist_percent=1.5), ValueError, r"`hist_percent` must be in \(0, 1\]"),
], ids=["name", "weight-only-class", "class-not-instance", "act-for-weights", "unused-kwarg",
        "kwargs-with-instances", "both-spellings", "bits-type", "bits-value", "bins",
        "hist_percent"])
def test_ptq_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        PTQ(*args, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(fuse=1), TypeError, "`fuse` must be bool"),
    (dict(fuse=True), TypeError, "`fuse_list` must be a list of .* when fuse=True, got None"),
    (dict(fuse_list=[["0", "1"]]), ValueError, "`fuse_list` is only used with fuse=True"),
    (dict(fuse=True, fuse_list="0,1"), TypeError, "`fuse_list` must be a list"),
    (dict(fuse=True, fuse_list=["0"]), TypeError, r"`fuse_list\[0\]` must be a list of module"),
    (dict(fuse=True, fuse_list=[["0"]]), ValueError, r"`fuse_list\[0\]` must name a conv"),
    (dict(fuse=True, fuse_list=[["0", "bn"]]), ValueError, "names a module the model lacks"),
    (dict(fuse=True, fuse_list=[["0", "2"]]), ValueError, "followed by a BatchNorm"),
], ids=["fuse-type", "no-list", "list-without-fuse", "list-type", "item-type", "item-length",
        "missing-name", "not-a-bn"])
def test_ptq_quantize_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        quiet(PTQ().quantize, mobilenet_like().eval(), **kwargs)


@pytest.mark.parametrize("args, kwargs, error, match", [
    (("./mobilenet",), {}, TypeError, "lowbit takes the model object, not a model dir"),
    ((None, "out"), dict(model_filename="__model__"), ValueError, "`model_filename` names a file"),
    ((None, "out"), dict(params_filename="__params__"), ValueError, "`params_filename` names"),
    ((None,), dict(weight_bits=16), NotImplementedError, "weight_bits=16 is not supported"),
    ((None,), dict(weight_bits=4), ValueError, "`weight_bits` must be 8"),
    ((None,), dict(weight_bits="8"), TypeError, "`weight_bits` must be int"),
    ((None,), dict(generate_test_model=True), NotImplementedError, "generate_test_model=True"),
    ((None,), dict(generate_test_model="yes"), TypeError, "`generate_test_model` must be bool"),
    ((None,), dict(quantizable_op_type="conv2d"), TypeError, "`quantizable_op_type` must be a "
                                                             "list"),
    ((None,), dict(quantizable_op_type=["conv3d"]), ValueError, r"got \['conv3d'\]"),
    ((None,), dict(quantizable_op_type=["matmul"]), None, None),
    ((None, "out"), {}, ValueError, "`input_spec` is required to save"),
], ids=["model-dir", "model_filename", "params_filename", "16-bit", "4-bit", "bits-type",
        "test-model", "test-model-type", "op-type-str", "op-type-name", "no-matching-layer",
        "save-without-spec"])
def test_quant_post_dynamic_errors(tmp_path, args, kwargs, error, match):
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    args = tuple(model if a is None else str(tmp_path / a) if a == "out" else a for a in args)
    error, match = (ValueError, "no layer of the model is one of") if error is None \
        else (error, match)
    with pytest.raises(error, match=match):
        quant_post_dynamic(*args, **kwargs)


# ------------------------------------------------------------------ the walk to lowbit


def test_every_front_end_function_reaches_the_native_api(tmp_path, digits):
    names = ("prepare_qat", "quantize", "plan", "set_calibrating", "convert")
    patches = {n: mock.patch.object(lowbit, n, wraps=getattr(lowbit, n)) for n in names}
    spies = {n: p.start() for n, p in patches.items()}
    export = mock.patch.object(lowbit, "export_onnx", return_value="report").start()
    try:
        x = digits[2][:5]
        quanter = QAT()
        net = quanter.quantize(mobilenet_like())
        spies["prepare_qat"].assert_called_once()
        assert spies["prepare_qat"].call_args.kwargs["inplace"] is True
        assert spies["prepare_qat"].call_args.args[1] is quanter.quant_config
        net(x)
        assert quanter.save_quantized_model(net, tmp_path / "q") == "report"
        deploy, path, inputs = export.call_args.args
        assert isinstance(deploy[0], DeployConv) and path == tmp_path / "q.onnx"
        assert inputs[0].shape[1:] == x.shape[1:], "input_spec=None: the last forward's shapes"
        (dims,) = export.call_args.kwargs["dynamic_shapes"]
        assert list(dims) == [0], "with a dynamic batch"

        ptq = PTQ()
        model = mobilenet_like().eval()
        quant_model = ptq.quantize(model, fuse=True, fuse_list=[["0", "1"]])
        spies["plan"].assert_called_once()
        assert spies["quantize"].call_args.args[1].fusions == (("0", "1"),)
        spies["set_calibrating"].assert_called_once_with(quant_model, True)
        quant_model(x)
        paddle_like = types.SimpleNamespace(shape=[-1, 1, 8, 8], dtype="float32", name="image")
        ptq.save_quantized_model(quant_model, str(tmp_path / "p"), input_spec=[paddle_like])
        spies["set_calibrating"].assert_called_with(quant_model, False)
        assert export.call_args.kwargs["input_names"] == ["image"]
        (dims,) = export.call_args.kwargs["dynamic_shapes"]
        assert list(dims) == [0] and isinstance(dims[0], type(torch.export.Dim("d")))
        assert spies["convert"].call_count == 2

        quiet(quant_post_dynamic, model, tmp_path / "d", input_spec=[x])
        rules = spies["quantize"].call_args.args[1].rules
        assert any(r.input is not None and r.input.dynamic for r in rules)
        assert spies["convert"].call_count == 3 and export.call_count == 3
    finally:
        mock.patch.stopall()
    assert isinstance(net[0].input_quant, lowbit.Quantizer)


def test_user_classes_are_registered_lowbit_quantizers():
    quanter = QAT(weight_quantize=FirstBatchAbsMax)
    method = quanter.quant_config.rules[0].weight.method
    assert method in lowbit.QUANTIZERS and method.startswith("paddleslim:weight:")
    assert issubclass(lowbit.QUANTIZERS.get(method), lowbit.Quantizer)
    assert QAT(weight_quantize=FirstBatchAbsMax).quant_config.rules[0].weight.method == method
