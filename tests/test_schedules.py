"""lowbit.schedules: SLB temperature (Golden Stick), binary weight clipping, BN re-estimation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantConfig
from lowbit.schedules import Temperature, for_model, recalibrate_bn


def slb_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def golden_stick_temperature(epoch: int, epochs: int = 100, t_start_val: float = 1.0,
                             t_start_time: float = 0.2, t_end_time: float = 0.6,
                             t_factor: float = 1.2) -> float:
    """The formula of Golden Stick's temperature callback, written out independently."""
    start, end = int(epochs * t_start_time), int(epochs * t_end_time)
    t = t_start_val
    if epoch > start:
        t = t_start_val * t_factor ** (min(epoch, end) - start)
    return t


@pytest.mark.parametrize("epoch", [1, 20, 21, 59, 60, 100])
def test_temperature_matches_golden_stick_for_100_epochs(epoch):
    schedule = Temperature(epoch_size=100)
    assert schedule.at(epoch) == pytest.approx(golden_stick_temperature(epoch), rel=1e-12)
    assert schedule.hard(epoch) == (epoch >= 60)


def test_temperature_values_at_the_edges():
    schedule = Temperature(epoch_size=100)
    assert schedule.at(20) == 1.0 and schedule.at(21) == pytest.approx(1.2)
    assert schedule.at(60) == pytest.approx(1.2**40) == pytest.approx(1469.77, rel=1e-4)
    assert schedule.at(100) == schedule.at(60)


def test_schedule_sets_slb_temperature_per_epoch_and_counts_has_trained_epoch():
    qm = lowbit.prepare_qat(slb_net(), QuantConfig.preset("w2-slb"))
    sched = for_model(qm, epochs=10, has_trained_epoch=3, t_factor=2.0)
    slb = qm[3].weight_quant  # the first and last layers are 8-bit by the preset's rule
    assert slb.spec.method == "slb"
    assert sched.epoch == 4  # 1-based, after 3 trained epochs
    expected = golden_stick_temperature(4, epochs=10, t_factor=2.0)
    assert float(slb.temperature) == pytest.approx(expected)
    for _ in range(3):
        sched.step_epoch()
    assert sched.epoch == 7 and int(qm.lowbit_epoch) == 3
    assert float(slb.temperature) == pytest.approx(golden_stick_temperature(7, 10, t_factor=2.0))
    assert bool(slb.hard) == (7 >= 6)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(epoch_size=0), ValueError, "epoch_size"),
    (dict(epoch_size=10.0), TypeError, "epoch_size"),
    (dict(epoch_size=10, has_trained_epoch=-1), ValueError, "has_trained_epoch"),
    (dict(epoch_size=10, has_trained_epoch="1"), TypeError, "has_trained_epoch"),
    (dict(epoch_size=10, has_trained_epoch=10), ValueError, "greater than"),
    (dict(epoch_size=10, t_start_val=0.0), ValueError, "t_start_val"),
    (dict(epoch_size=10, t_factor=-1.0), ValueError, "t_factor"),
    (dict(epoch_size=10, t_factor="1.2"), TypeError, "t_factor"),
    (dict(epoch_size=10, t_start_time=-0.1), ValueError, "t_start_time"),
    (dict(epoch_size=10, t_end_time=1.5), ValueError, "t_end_time"),
    (dict(epoch_size=10, t_start_time=0.7, t_end_time=0.5), ValueError, "t_end_time"),
    (dict(epoch_size=10, t_start_val=True), TypeError, "t_start_val"),
])
def test_temperature_validation_follows_golden_stick(kwargs, error, match):
    with pytest.raises(error, match=match):
        Temperature(**kwargs)


def test_for_model_rejects_unknown_options_and_float_models():
    qm = lowbit.prepare_qat(slb_net(), QuantConfig.preset("w2-slb"))
    with pytest.raises(TypeError, match="unknown option"):
        for_model(qm, epochs=5, temperature=3)
    with pytest.raises(ValueError, match="prepare_qat"):
        for_model(slb_net(), epochs=5)
    with pytest.raises(TypeError, match="bn_calibration"):
        for_model(qm, epochs=5, bn_calibration=torch.zeros(3))
    with pytest.raises(ValueError, match="bn_calibration_batches"):
        for_model(qm, epochs=5, bn_calibration=[], bn_calibration_batches=0)


def test_step_batch_clips_binary_latent_weights():
    qm = lowbit.prepare_qat(slb_net(), QuantConfig.preset("w1a1-bnn"))
    sched = for_model(qm, epochs=2)
    binary = [m for m in qm.modules() if getattr(m, "weight_quant", None) is not None
              and m.weight_quant.spec.method == "binary"]
    assert binary
    with torch.no_grad():
        for layer in binary:
            layer.weight.mul_(10)
    sched.step_batch()
    assert all(layer.weight.abs().max() <= 1.0 for layer in binary)
    assert sched.step == 1
    no_clip = for_model(qm, epochs=2, clip_binary_weights=False)
    with torch.no_grad():
        binary[0].weight.mul_(10)
    no_clip.step_batch()
    assert binary[0].weight.abs().max() > 1.0


def test_bn_recalibration_uses_discrete_weights_and_restores_modes():
    qm = lowbit.prepare_qat(slb_net(), QuantConfig.preset("w2-slb"))
    reference = copy.deepcopy(qm)
    batches = [torch.randn(8, 1, 8, 8) for _ in range(4)]
    layer = qm[3]
    assert layer.weight_quant.spec.method == "slb" and layer.bn is not None
    momentum = layer.bn.momentum
    assert recalibrate_bn(qm, batches) == 4
    assert qm.training and layer.bn.training and layer.bn.momentum == momentum

    # The running mean is the average over the batches of the conv output with argmax weights
    # (the first, 8-bit ste layer normalises its float conv output by the batch meanwhile).
    first = reference[0]
    assert first.weight_quant.folds_bn
    codes, qp = layer.weight_quant.quantize_weight(layer.weight)
    means = []
    with torch.no_grad():
        for x in batches:
            y0 = first._conv_forward(x, first.weight, first.bias)
            h = torch.relu(nn.functional.batch_norm(y0, None, None, first.bn.weight,
                                                    first.bn.bias, training=True))
            y = layer._conv_forward(h, codes * qp.scale, layer.bias)
            means.append(y.mean(dim=(0, 2, 3)))
    assert torch.allclose(layer.bn.running_mean, torch.stack(means).mean(0), atol=1e-5)


def test_bn_recalibration_with_no_batches_leaves_the_model_unchanged():
    qm = lowbit.prepare_qat(slb_net(), QuantConfig.preset("w2-slb"))
    qm(torch.randn(8, 1, 8, 8))
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    with pytest.raises(ValueError, match="empty"):
        recalibrate_bn(qm, [])
    after = qm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_schedule_runs_bn_calibration_after_the_start_epoch():
    qm = lowbit.prepare_qat(slb_net(), QuantConfig.preset("w2-slb"))
    batches = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    sched = for_model(qm, epochs=5, bn_calibration=batches)  # start = int(5 * 0.2) = 1
    layer = next(m for m in qm.modules() if getattr(m, "bn", None) is not None)
    tracked = int(layer.bn.num_batches_tracked)
    sched.step_epoch()  # epoch 1: not past the start
    assert int(layer.bn.num_batches_tracked) == tracked
    sched.step_epoch()  # epoch 2 > 1: re-estimated over 2 batches
    assert int(layer.bn.num_batches_tracked) == 2


def _float_reference_with_bn_stats(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """The float model whose BatchNorms average these batches' statistics (momentum=None)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    ref.train()
    with torch.no_grad():
        for x in batches:
            ref(x)
    return ref.eval()


@pytest.mark.parametrize("freeze_bn", [None, 2])
def test_bn_recalibration_of_folded_scaled_grids_keeps_the_model_faithful(freeze_bn):
    """ste layers fold BN into the weight they quantize: re-estimation measures the float
    layer's statistics and the weight range follows the new fold, frozen BN or not."""
    torch.manual_seed(0)
    model = slb_net()
    batches = [torch.randn(16, 1, 8, 8) * 3 + 1 for _ in range(4)]
    qm = lowbit.prepare_qat(copy.deepcopy(model), QuantConfig.preset("w8a8-qat"),
                            freeze_bn=freeze_bn)
    opt = torch.optim.SGD(qm.parameters(), lr=1e-3)
    for x in batches:  # a few steps: ranges go stale, BN (maybe) freezes
        opt.zero_grad()
        qm(x).square().mean().backward()
        opt.step()
    assert recalibrate_bn(qm, batches) == 4

    reference = _float_reference_with_bn_stats(
        _float_twin(qm, model), batches)
    for layer, bn in ((qm[0], reference[1]), (qm[3], reference[4])):  # inputs are 8-bit
        assert torch.allclose(layer.bn.running_mean, bn.running_mean, atol=0.02)
        assert torch.allclose(layer.bn.running_var, bn.running_var, rtol=0.02)
    qm.eval()
    x = torch.randn(32, 1, 8, 8) * 3 + 1
    with torch.no_grad():
        want, got = reference(x), qm(x)
        converted = lowbit.convert(qm)(x)
    assert (got - want).norm() / want.norm() < 0.05
    assert torch.allclose(converted, got, atol=1e-5)


def _float_twin(qm: nn.Module, model: nn.Module) -> nn.Module:
    """``model`` with the trained float parameters of ``qm`` (convs, BN affine, linear)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for i in (0, 3):
            twin[i].weight.copy_(qm[i].weight)
            twin[i].bias.copy_(qm[i].bias)
            twin[i + 1].weight.copy_(qm[i].bn.weight)
            twin[i + 1].bias.copy_(qm[i].bn.bias)
        twin[7].weight.copy_(qm[7].weight)
        twin[7].bias.copy_(qm[7].bias)
    return twin
