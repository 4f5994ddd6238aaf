"""W1A1 on a ReLU network: preset ``w1a1-bnn`` gives post-ReLU inputs {0, 1} codes with a
learned threshold; a binary *output* takes the sign of the BN output in place of the ReLU. Both
train on digits and run in ONNX Runtime with the same codes; the sign of post-ReLU inputs warns."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.demo import accuracy, load_digits, ort_logits, train_digits
from lowbit.quantizers.base import ConstantQuantizerWarning
from lowbit.quantizers.binary import sign_pm1

LAYERS = ["Conv2d", "Linear"]


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    data = load_digits()
    return data, train_digits(data, epochs=4, seed=0)


def sign_of_outputs() -> QuantConfig:
    """BinaryNet's layout: the sign of each layer's BN output, in place of its ReLU."""
    sign = QuantSpec(bits=1, method="binary")
    w8, x8 = QuantSpec(bits=8, granularity="per_channel"), QuantSpec(bits=8, symmetric=False)
    return QuantConfig(rules=[
        LayerRule(types=LAYERS, weight=sign, input=sign, output=sign),
        LayerRule(types=LAYERS, positions=["first"], weight=w8, input=x8, output=sign),
        LayerRule(types=LAYERS, positions=["last"], weight=w8, input=x8)])


def sign_of_inputs() -> QuantConfig:
    """The layout that collapses on ReLU nets: the sign of each binary layer's input."""
    sign = QuantSpec(bits=1, method="binary")
    return QuantConfig(rules=[
        LayerRule(types=LAYERS, weight=sign, input=sign),
        LayerRule(types=LAYERS, positions=["first", "last"],
                  weight=QuantSpec(bits=8, granularity="per_channel"),
                  input=QuantSpec(bits=8, symmetric=False, observer="ema"))])


def qat(model: nn.Module, cfg: QuantConfig, data, epochs: int = 3) -> nn.Module:  # noqa: ANN001
    torch.manual_seed(0)
    qm = lowbit.prepare_qat(model, cfg)
    opt = torch.optim.Adam(qm.parameters(), lr=3e-3)
    sched = lowbit.schedules.for_model(qm, epochs=epochs)
    for _ in range(epochs):
        qm.train()
        for idx in torch.randperm(len(data.x_train)).split(64):
            loss = nn.functional.cross_entropy(qm(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step_batch()
        sched.step_epoch()
    return qm.eval()


def test_preset_gives_binary_layers_0_1_inputs_with_a_learned_threshold() -> None:
    from lowbit.demo import DigitsCNN

    qm = lowbit.prepare_qat(DigitsCNN().eval(), QuantConfig.preset("w1a1-bnn"))
    for layer in (qm[3], qm[7]):
        assert layer.weight_quant.spec.method == "binary" and layer.weight_quant.grid.odd
        x_q = layer.input_quant
        assert x_q.spec.method == "binary" and (x_q.grid.qmin, x_q.grid.qmax) == (0, 1)
        assert "scale" in dict(x_q.named_parameters()), "the threshold is learned"
        assert isinstance(layer.activation, nn.ReLU), "the ReLU stays"
    assert qm[0].weight_quant.spec.bits == 8 and qm[12].input_quant.spec.bits == 8


def test_a_binary_output_takes_the_sign_of_bn_in_place_of_the_fused_relu() -> None:
    from lowbit.demo import DigitsCNN

    qm = lowbit.prepare_qat(DigitsCNN().eval(), sign_of_outputs())
    for conv in (qm[0], qm[3], qm[7]):
        assert conv.output_quant is not None and conv.output_quant.grid.odd
        assert conv.activation is None, "the sign replaces the fused ReLU"
        assert conv.bn is not None, "the sign reads BN(conv(x)), the BN stays inside"
    assert qm[12].output_quant is None, "logits stay float"
    w8a8 = lowbit.prepare_qat(DigitsCNN().eval(), QuantConfig.preset("w8a8-qat"))
    assert isinstance(w8a8[0].activation, nn.ReLU), "other layers keep their fused ReLU"


@pytest.mark.parametrize("layout", ["w1a1-bnn", "sign-of-outputs"])
def test_w1a1_on_a_relu_net_trains_above_chance_and_matches_onnx_runtime(layout, digits,
                                                                          tmp_path) -> None:
    data, fp32 = digits
    cfg = QuantConfig.preset("w1a1-bnn") if layout == "w1a1-bnn" else sign_of_outputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConstantQuantizerWarning)
        qm = qat(fp32, cfg, data)
        with torch.no_grad():
            acc = accuracy(qm(data.x_test), data.y_test)
    assert acc > 0.6, f"{layout}: {acc:.3f} (chance is 0.10)"
    dm = lowbit.convert(qm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lowbit.export_onnx(dm, tmp_path / "m.onnx", (data.x_test[:8],),
                                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    verify_inputs=[(data.x_test,)])
    assert report.parity.codes_identical == 1.0 and report.parity.codes_max_diff == 0
    ort_acc = accuracy(ort_logits(tmp_path / "m.onnx", data.x_test.numpy()), data.y_test)
    assert ort_acc == acc


def test_the_sign_of_post_relu_inputs_warns_and_stays_at_chance(digits) -> None:
    data, fp32 = digits
    with pytest.warns(ConstantQuantizerWarning, match=r"layer '3'.*binary ±1 codes need signed "
                                                      r"inputs.*signed=False.*'w1a1-bnn'"):
        qm = qat(fp32, sign_of_inputs(), data, epochs=1)
    with torch.no_grad():
        assert accuracy(qm(data.x_test), data.y_test) < 0.2


def test_unsigned_binary_is_a_learned_threshold_on_0_1_codes() -> None:
    q = lowbit.quantizers.make_quantizer(QuantSpec(bits=1, method="binary", signed=False),
                                         role="input", channel_axis=1)
    assert q is not None and not q.grid.signed and (q.grid.qmin, q.grid.qmax) == (0, 1)
    x = torch.relu(torch.randn(8, 4, 5, 5)).requires_grad_()
    y = q.train()(x)
    s = q.scale.detach().reshape(())  # a 1-element parameter (FSDP2 shards no 0-dim ones)
    torch.testing.assert_close(s, 2 * x.detach().mean())  # LSQ's init at one level
    assert set(y.detach().unique().tolist()) <= {0.0, float(s)}
    assert torch.equal(y.detach() > 0, x.detach() > s / 2), "threshold s/2"
    y.sum().backward()
    assert q.scale.grad is not None and q.scale.grad != 0, "the threshold learns"
    assert torch.equal(q.eval()(x), y.detach()), "eval equals training's value"
    qp = q.qparams()
    assert qp.zero_point.item() == 0 and qp.scale.item() == s.item()
    fresh = lowbit.quantizers.make_quantizer(q.spec, role="input", channel_axis=1)
    fresh.load_state_dict(q.state_dict())
    assert fresh.is_ready() and torch.equal(fresh.eval()(x), y.detach())
    with pytest.raises(ValueError, match=r"`signed` must be True or None for 'binary' weights"):
        lowbit.quantizers.make_quantizer(q.spec, role="weight", channel_axis=0)


def test_unsigned_binary_calibrates_its_threshold_from_the_mean() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    cfg = QuantConfig(rules=[LayerRule(names=["2"], input=QuantSpec(bits=1, method="binary",
                                                                    signed=False))])
    qm = lowbit.quantize(model, cfg)
    batches = [torch.randn(16, 6) for _ in range(3)]
    lowbit.calibrate(qm, batches, progress=False)
    with torch.no_grad():
        mean = torch.cat([model[1](model[0](b)) for b in batches]).mean()
    torch.testing.assert_close(qm[2].input_quant.scale.detach().reshape(()), 2 * mean)


@pytest.mark.parametrize("bias", [-2.0, -1.5, -0.3, 0.0, 0.5, 0.7, 2.0, 3.5])
def test_a_sign_output_keeps_the_float_bias_signs_with_no_sum_on_zero(bias: float) -> None:
    """Sums of ±1·±1 are integers; with the bias rounded to that grid many land on 0, where the
    accumulation order decides the sign. ``(⌊b⌋ + ½)`` gives the float bias's signs exactly."""
    sign = QuantSpec(bits=1, method="binary")
    layer = nn.Linear(4, 1)
    with torch.no_grad():
        layer.weight.fill_(0.3)
        layer.bias.fill_(bias)
    qm = lowbit.quantize(nn.Sequential(layer), QuantConfig(rules=[
        LayerRule(types=["Linear"], weight=sign, input=sign, output=sign)])).eval()
    x = sign_pm1(torch.randn(64, 4))
    sums = x.sum(dim=1, keepdim=True)  # weight codes are all +1 with scale 1: integers in [-4, 4]
    expected = sign_pm1(sums + bias)
    assert torch.equal(qm(x), expected)
    dm = lowbit.convert(qm)
    assert torch.equal(dm(x), expected)
    codes = dm[0].int_bias.codes
    assert codes.item() % 2 == 1, "odd codes on the half step: no integer sum meets -bias"
    assert (qm[0].effective_bias() + sums).abs().min() >= 0.5
