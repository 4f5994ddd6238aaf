"""prepare_qat: BatchNorm folding while training, quant delay, BN freezing, exact resumes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec


def conv_bn_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


def trained_bn(model: nn.Module, channels: int = 1) -> nn.Module:
    """Give the BatchNorms non-trivial statistics and affine parameters."""
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.randn(16, channels, 8, 8) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


FLOAT_WEIGHTS = QuantConfig(rules=[LayerRule(types=["Conv2d", "Linear"],
                                             output=QuantSpec(bits=8, symmetric=False,
                                                              observer="ema"))])


def test_prepare_qat_keeps_bn_inside_the_layer_and_trains():
    qm = lowbit.prepare_qat(trained_bn(conv_bn_net()), QuantConfig.preset("w8a8-qat"))
    assert qm.training
    assert isinstance(qm[0].bn, nn.BatchNorm2d) and isinstance(qm[1], nn.Identity)
    assert isinstance(qm[0].activation, nn.ReLU)
    assert {"lowbit_epoch", "lowbit_step"} <= set(qm.state_dict())


def test_quantize_still_folds_bn_for_inference():
    qm = lowbit.quantize(trained_bn(conv_bn_net()).eval(), QuantConfig.preset("w8a8"))
    assert qm[0].bn is None


@pytest.mark.parametrize("bias", [True, False])
def test_folded_layer_equals_conv_then_bn_in_eval(bias):
    """With float weights the training-time fold is exact: conv→BN in eval to 1e-5."""
    model = trained_bn(nn.Sequential(nn.Conv2d(3, 6, 3, bias=bias), nn.BatchNorm2d(6)), 3).eval()
    qm = lowbit.prepare_qat(model, QuantConfig(rules=[LayerRule(
        types=["Conv2d"], output=QuantSpec(bits=8, symmetric=False, observer="ema"))]))
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        expected = model(x)
        layer = qm[0]
        layer.output_quant = None  # compare the float fold itself
        qm.eval()
        assert torch.allclose(qm(x), expected, atol=1e-5)
        # and the inference fold lowbit.convert builds from it
        weight, b, k = layer.folded_weight_and_bias()
        assert k is None
        folded = nn.functional.conv2d(x, weight, b)
        assert torch.allclose(folded, expected, atol=1e-5)


def test_training_forward_uses_batch_statistics_and_updates_running_ones():
    model = trained_bn(conv_bn_net())
    qm = lowbit.prepare_qat(model, FLOAT_WEIGHTS)
    reference = copy.deepcopy(model).train()
    x = torch.randn(16, 1, 8, 8)
    before = qm[0].bn.running_mean.clone()
    qm(x)
    reference[0].bn = None
    with torch.no_grad():
        ref_bn = copy.deepcopy(model[1]).train()
        ref_bn.running_mean.copy_(before)
        ref_bn(model[0](x))
    assert not torch.equal(qm[0].bn.running_mean, before)
    assert torch.allclose(qm[0].bn.running_mean, ref_bn.running_mean, atol=1e-6)


def test_folded_weight_quantizer_sees_the_folded_weight():
    model = trained_bn(conv_bn_net())
    qm = lowbit.prepare_qat(model, QuantConfig.preset("w8a8-qat"))
    layer = qm[0]
    k = layer.bn.weight / torch.sqrt(layer.bn.running_var + layer.bn.eps)
    qm(torch.randn(8, 1, 8, 8))
    amax = (layer.weight * k.reshape(-1, 1, 1, 1)).detach().abs().amax(dim=(1, 2, 3))
    assert torch.allclose(layer.weight_quant.scale, amax / 127, rtol=1e-5)


def test_freeze_bn_switches_to_running_statistics_after_n_steps():
    qm = lowbit.prepare_qat(trained_bn(conv_bn_net()), QuantConfig.preset("w8a8-qat"),
                            freeze_bn=2)
    layer = qm[0]
    for step in range(4):
        before = layer.bn.running_mean.clone()
        qm(torch.randn(8, 1, 8, 8))
        frozen = step >= 2
        assert torch.equal(layer.bn.running_mean, before) == frozen, step
    assert layer.bn_frozen() and int(layer.bn_steps) == 4


@pytest.mark.parametrize("freeze_bn, error", [(-1, ValueError), (1.5, TypeError),
                                              (True, TypeError)])
def test_freeze_bn_is_validated(freeze_bn, error):
    with pytest.raises(error, match="freeze_bn"):
        lowbit.prepare_qat(conv_bn_net(), QuantConfig.preset("w8a8-qat"), freeze_bn=freeze_bn)


def test_quant_delay_keeps_float_for_the_first_steps():
    spec = QuantSpec(bits=4, symmetric=False, observer="ema", quant_delay=3)
    qm = lowbit.prepare_qat(nn.Sequential(nn.Linear(4, 4)), QuantConfig(rules=[LayerRule(
        types=["Linear"], input=spec)]))
    q = qm[0].input_quant
    x = torch.randn(32, 4)
    outputs = [q(x) for _ in range(4)]
    assert all(torch.equal(o, x) for o in outputs[:3]), "float during the delay"
    assert not torch.equal(outputs[3], x), "fake quant from step 4"
    assert bool(q.initialized), "ranges were tracked during the delay"
    assert int(q.train_steps) == 4 and "quant_delay=3" in repr(q)


def test_quant_delay_is_validated():
    with pytest.raises(ValueError, match="quant_delay"):
        QuantSpec(quant_delay=-1)
    with pytest.raises(TypeError, match="quant_delay"):
        QuantSpec(quant_delay=1.0)


def _train(qm: nn.Module, opt: torch.optim.Optimizer, sched, batches) -> None:
    ce = nn.CrossEntropyLoss()
    for x, y in batches:
        loss = ce(qm(x), y) + 1e-4 * lowbit.quant_loss(qm)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step_batch()


def _batches(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("preset", ["w8a8-qat", "w4a8-lsq", "w2a2-pact", "w2-dorefa",
                                    "w1a1-bnn", "w1a8-xnor", "w2a8-slb"])
def test_resume_from_state_dict_gives_the_same_next_steps_bit_for_bit(preset, tmp_path, quiet):
    cfg = QuantConfig.preset(preset)
    model = trained_bn(conv_bn_net())

    def fresh():
        qm = lowbit.prepare_qat(model, cfg, freeze_bn=4)
        opt = torch.optim.SGD(qm.parameters(), lr=0.05, momentum=0.9)
        return qm, opt, lowbit.schedules.for_model(qm, epochs=4)

    qm, opt, sched = fresh()
    _train(qm, opt, sched, _batches(1, 3))
    sched.step_epoch()
    torch.save({"model": qm.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(qm, opt, sched, _batches(2, 3))

    resumed, opt2, _ = fresh()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2 = lowbit.schedules.for_model(resumed, epochs=4)
    assert sched2.epoch == 2 and sched2.step == 3
    _train(resumed, opt2, sched2, _batches(2, 3))

    original, restored = qm.state_dict(), resumed.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    x = torch.randn(4, 1, 8, 8)
    qm.eval(), resumed.eval()
    assert torch.equal(qm(x), resumed(x))


@pytest.mark.parametrize("preset", ["w8a8-qat", "w4a8-lsq", "w1a8-xnor", "w2-slb"])
def test_a_loaded_checkpoint_evaluates_and_converts_like_the_trained_model(preset, tmp_path,
                                                                           quiet):
    model = trained_bn(conv_bn_net())
    qm = lowbit.prepare_qat(model, QuantConfig.preset(preset))
    opt = torch.optim.SGD(qm.parameters(), lr=0.05, momentum=0.9)
    _train(qm, opt, lowbit.schedules.for_model(qm, epochs=2), _batches(3, 5))
    torch.save(qm.state_dict(), tmp_path / "qat.pt")
    loaded = lowbit.prepare_qat(model, QuantConfig.preset(preset))
    loaded.load_state_dict(torch.load(tmp_path / "qat.pt", weights_only=True))
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        expected = qm.eval()(x)
        assert torch.equal(loaded.eval()(x), expected)
        assert torch.equal(lowbit.convert(loaded)(x), lowbit.convert(qm)(x))
