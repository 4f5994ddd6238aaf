"""Golden Stick's SlbQuantAwareTraining front end: names, defaults, errors, the documented workflow
on digits (temperature per epoch, BN calibration, convert, ONNX Runtime parity)."""

from __future__ import annotations

import warnings
from unittest import mock

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lowbit
import lowbit.schedules
from lowbit.compat.golden_stick import (
    BNCalibrationCallback,
    QuantDtype,
    SlbQuantAwareTraining,
    TemperatureScheduler,
)
from lowbit.demo import load_digits
from lowbit.deploy import IntWeight
from lowbit.nn import QuantLayer
from lowbit.quantizers.slb import SLBQuantizer


def lenet() -> nn.Sequential:
    """LeNet-style: three Conv2d→BN→ReLU blocks (quantized) and a float Linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def golden_stick_t(epoch: int, epochs: int, has_trained: int = 0, t_start_val: float = 1.0,
                   t_start_time: float = 0.2, t_end_time: float = 0.6,
                   t_factor: float = 1.2) -> tuple[float, bool]:
    """Golden Stick's TemperatureScheduler.epoch_begin, written out independently."""
    epoch += has_trained
    t, start, end = t_start_val, int(epochs * t_start_time), int(epochs * t_end_time)
    if epoch > start:
        t *= t_factor ** (min(epoch, end) - start)
    return t, epoch >= end


def slb_quantizers(model: nn.Module) -> list[SLBQuantizer]:
    return [m for m in model.modules() if isinstance(m, SLBQuantizer)]


def apply_quietly(algo: SlbQuantAwareTraining, net: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Linear head stays float: lowbit says so
        return algo.apply(net)


def documented_algo(epochs: int) -> SlbQuantAwareTraining:
    """The documented configuration, through its setters."""
    algo = SlbQuantAwareTraining()
    algo.set_weight_quant_dtype(QuantDtype.INT1)
    algo.set_act_quant_dtype(QuantDtype.INT8)
    algo.set_enable_act_quant(True)
    algo.set_enable_bn_calibration(True)
    algo.set_epoch_size(epochs)
    algo.set_has_trained_epoch(0)
    algo.set_t_start_val(1.0)
    algo.set_t_start_time(0.2)
    algo.set_t_end_time(0.6)
    algo.set_t_factor(1.2)
    return algo


# ------------------------------------------------------------------------- defaults, config


def test_defaults_are_golden_sticks():
    algo = SlbQuantAwareTraining()
    assert (algo.act_quant_dtype, algo.weight_quant_dtype) == (QuantDtype.INT8, QuantDtype.INT1)
    assert algo.enable_act_quant is False and algo.enable_bn_calibration is False
    assert algo.epoch_size is None and algo.has_trained_epoch is None
    assert (algo.t_start_val, algo.t_start_time, algo.t_end_time, algo.t_factor) == \
        (1.0, 0.2, 0.6, 1.2)
    assert [d.num_bits for d in QuantDtype] == [1, 2, 4, 8]
    rule, = algo.quant_config().rules
    assert rule.types == ("Conv2d",) and rule.input is None
    assert (rule.weight.bits, rule.weight.method) == (1, "slb")


def test_config_keys_go_through_the_setters():
    algo = SlbQuantAwareTraining({
        "quant_dtype": (QuantDtype.INT8, QuantDtype.INT4), "enable_act_quant": True,
        "enable_bn_calibration": True, "epoch_size": 50, "has_trained_epoch": 5,
        "t_start_val": 2.0, "t_start_time": 0.1, "t_end_time": 0.9, "t_factor": 3.2})
    assert algo.weight_quant_dtype is QuantDtype.INT4 and algo.act_quant_dtype is QuantDtype.INT8
    assert algo.enable_act_quant and algo.enable_bn_calibration
    assert (algo.epoch_size, algo.has_trained_epoch) == (50, 5)
    assert (algo.t_start_val, algo.t_start_time, algo.t_end_time, algo.t_factor) == \
        (2.0, 0.1, 0.9, 3.2)
    rule, = algo.quant_config().rules
    assert rule.weight.bits == 4
    act = rule.input
    assert (act.bits, act.method, act.observer, act.is_signed) == (8, "ste", "ema", False)
    with mock.patch.object(SlbQuantAwareTraining, "set_t_factor") as setter:
        SlbQuantAwareTraining({"t_factor": 1.5})
    setter.assert_called_once_with(1.5)


@pytest.mark.parametrize("config, error, match", [
    ("x", TypeError, "`config` must be a dict"),
    ({"t_factr": 1.0}, ValueError, r"unknown `config` key\(s\) \['t_factr'\]"),
    ({"quant_dtype": 8}, TypeError, "`quant_dtype` must be a QuantDtype"),
    ({"quant_dtype": [QuantDtype.INT8, "INT1"]}, TypeError, "QuantDtype elements"),
    ({"quant_dtype": [QuantDtype.INT8] * 3}, ValueError, "exactly two"),
    # One QuantDtype is copied to both: INT8 weights / INT1 activations are then rejected.
    ({"quant_dtype": QuantDtype.INT8}, ValueError, "`weight_quant_dtype` must be one of"),
    ({"quant_dtype": QuantDtype.INT1}, ValueError, "`act_quant_dtype` must be one of"),
    ({"enable_act_quant": 1}, TypeError, "`enable_act_quant` must be a bool"),
    ({"enable_bn_calibration": "yes"}, TypeError, "`enable_bn_calibration` must be a bool"),
    ({"epoch_size": 10.0}, TypeError, "`epoch_size` must be an int"),
    ({"epoch_size": True}, TypeError, "`epoch_size` must be an int"),
    ({"has_trained_epoch": "0"}, TypeError, "`has_trained_epoch` must be an int"),
    ({"t_start_val": 1}, TypeError, "`t_start_val` must be a float, got int 1"),
    ({"t_start_time": 0}, TypeError, "`t_start_time` must be a float"),
    ({"t_end_time": True}, TypeError, "`t_end_time` must be a float"),
    ({"t_factor": "1.2"}, TypeError, "`t_factor` must be a float"),
    ({"epoch_size": 0}, ValueError, r"`epoch_size` must be > 0, got 0"),
    ({"has_trained_epoch": -1}, ValueError, r"`has_trained_epoch` must be >= 0, got -1"),
    ({"t_start_val": 0.0}, ValueError, r"`t_start_val` must be > 0.0"),
    ({"t_factor": -1.2}, ValueError, r"`t_factor` must be > 0.0"),
    ({"t_start_time": -0.1}, ValueError, r"`t_start_time` must be in \[0.0, 1.0\]"),
    ({"t_end_time": -0.1}, ValueError, r"`t_end_time` must be in \[0.0, 1.0\]"),
    ({"t_start_time": 1.1}, ValueError, r"`t_start_time` must be in \[0.0, 1.0\]"),
    ({"t_end_time": 1.5}, ValueError, r"`t_end_time` must be in \[0.0, 1.0\], got 1.5"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_config_errors_follow_the_docs(config, error, match):
    with pytest.raises(error, match=match):
        SlbQuantAwareTraining(config)


@pytest.mark.parametrize("setter, value, error, match", [
    ("set_weight_quant_dtype", 1, TypeError, "`weight_quant_dtype` must be a QuantDtype"),
    ("set_weight_quant_dtype", QuantDtype.INT8, ValueError, r"INT1.*INT2.*INT4.*got"),
    ("set_act_quant_dtype", "INT8", TypeError, "`act_quant_dtype` must be a QuantDtype"),
    ("set_act_quant_dtype", QuantDtype.INT4, ValueError, r"`act_quant_dtype`.*INT8.*got"),
    ("set_enable_act_quant", None, TypeError, "`enable_act_quant` must be a bool"),
    ("set_enable_bn_calibration", 0, TypeError, "`enable_bn_calibration` must be a bool"),
    ("set_epoch_size", 2.5, TypeError, "`epoch_size` must be an int"),
    ("set_epoch_size", -3, ValueError, "`epoch_size` must be > 0"),
    ("set_has_trained_epoch", 1.0, TypeError, "`has_trained_epoch` must be an int"),
    ("set_has_trained_epoch", -2, ValueError, "`has_trained_epoch` must be >= 0"),
    ("set_t_start_val", 2, TypeError, "`t_start_val` must be a float"),
    ("set_t_start_val", -1.0, ValueError, "`t_start_val` must be > 0.0"),
    ("set_t_start_time", 1, TypeError, "`t_start_time` must be a float"),
    ("set_t_start_time", 2.0, ValueError, "`t_start_time` must be in"),
    ("set_t_end_time", "0.6", TypeError, "`t_end_time` must be a float"),
    ("set_t_end_time", -0.5, ValueError, "`t_end_time` must be in"),
    ("set_t_factor", False, TypeError, "`t_factor` must be a float"),
    ("set_t_factor", 0.0, ValueError, "`t_factor` must be > 0.0"),
])
def test_setter_errors_follow_the_docs(setter, value, error, match):
    algo = SlbQuantAwareTraining()
    with pytest.raises(error, match=match):
        getattr(algo, setter)(value)


@pytest.mark.parametrize("setter, default, attr", [
    ("set_weight_quant_dtype", QuantDtype.INT1, "weight_quant_dtype"),
    ("set_act_quant_dtype", QuantDtype.INT8, "act_quant_dtype"),
    ("set_enable_act_quant", False, "enable_act_quant"),
    ("set_enable_bn_calibration", False, "enable_bn_calibration"),
    ("set_t_start_val", 1.0, "t_start_val"), ("set_t_start_time", 0.2, "t_start_time"),
    ("set_t_end_time", 0.6, "t_end_time"), ("set_t_factor", 1.2, "t_factor"),
])
def test_setter_defaults_are_the_seeds(setter, default, attr):
    algo = SlbQuantAwareTraining({"enable_act_quant": True, "enable_bn_calibration": True,
                                  "quant_dtype": [QuantDtype.INT8, QuantDtype.INT2],
                                  "t_start_val": 3.0, "t_start_time": 0.5, "t_end_time": 0.9,
                                  "t_factor": 2.0})
    getattr(algo, setter)()
    assert getattr(algo, attr) == default


# ------------------------------------------------------------------------------ apply


@pytest.mark.parametrize("dtype, values", [(QuantDtype.INT1, 2), (QuantDtype.INT2, 4),
                                           (QuantDtype.INT4, 16)])
def test_apply_quantizes_every_conv2d_with_slb_and_leaves_linear_float(dtype, values):
    algo = SlbQuantAwareTraining({"quant_dtype": [QuantDtype.INT8, dtype]})
    with pytest.warns(UserWarning, match="left 1 layer"):
        qm = algo.apply(lenet())
    convs = [m for m in qm.modules() if isinstance(m, QuantLayer)]
    assert len(convs) == 3 and isinstance(qm[-1], nn.Linear) and not isinstance(qm[-1], QuantLayer)
    for layer in convs:
        assert isinstance(layer.weight_quant, SLBQuantizer)
        assert layer.weight_quant.spec.bits == dtype.num_bits and layer.input_quant is None
        assert isinstance(layer.bn, nn.BatchNorm2d), "BN kept in the layer while training"
    assert qm.training
    dm = lowbit.convert(qm.eval())
    for module in dm.modules():
        if isinstance(module, IntWeight):
            assert module.codes.unique().numel() <= values


def test_apply_with_act_quant_puts_8_bit_ema_quantizers_on_conv_inputs():
    algo = SlbQuantAwareTraining({"enable_act_quant": True})
    qm = apply_quietly(algo, lenet())
    for layer in (m for m in qm.modules() if isinstance(m, QuantLayer)):
        spec = layer.input_quant.spec
        assert (spec.bits, spec.method, spec.observer, spec.is_signed) == (8, "ste", "ema", False)
    with pytest.raises(TypeError, match="`network` must be a torch.nn.Module.*Cell.*got str"):
        algo.apply("net")


# -------------------------------------------------------------------------- callbacks


@pytest.fixture
def digits():
    return load_digits()


def batches(data, n: int, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(data.x_train[i * size:(i + 1) * size], data.y_train[i * size:(i + 1) * size])
            for i in range(n)]


@pytest.mark.parametrize("setup, error, match", [
    ({"has_trained_epoch": 0}, RuntimeError, "`epoch_size` is not initialised"),
    ({"epoch_size": 5}, RuntimeError, "`has_trained_epoch` is not initialised"),
    ({"epoch_size": 5, "has_trained_epoch": 5}, ValueError,
     r"`epoch_size` \(5\) must be greater than `has_trained_epoch` \(5\)"),
    ({"epoch_size": 5, "has_trained_epoch": 0, "t_start_time": 0.7, "t_end_time": 0.5},
     ValueError, r"`t_end_time` \(0.5\) must be >= `t_start_time` \(0.7\)"),
])
def test_callbacks_errors_follow_the_docs(setup, error, match):
    algo = SlbQuantAwareTraining(setup)
    qm = apply_quietly(SlbQuantAwareTraining(), lenet())
    with pytest.raises(error, match=match):
        algo.callbacks(qm, [torch.zeros(2, 1, 8, 8)])


def test_callbacks_type_errors_for_model_and_dataset():
    algo = SlbQuantAwareTraining({"epoch_size": 5, "has_trained_epoch": 0})
    qm = apply_quietly(algo, lenet())
    data = [torch.zeros(2, 1, 8, 8)]
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module.*mindspore.train."
                                        r"Model\), got dict"):
        algo.callbacks({}, data)
    for bad in (torch.zeros(2, 1, 8, 8), 3, "data"):
        with pytest.raises(TypeError, match=r"`dataset` must be an iterable of batches.*"
                                            r"mindspore.dataset.Dataset"):
            algo.callbacks(qm, bad)
    with pytest.raises(TypeError, match="`dataset` must be re-iterable.*generator"):
        algo.callbacks(qm, (b for b in data))
    with pytest.raises(TypeError, match="`forward` must be callable"):
        algo.callbacks(qm, data, forward=3)
    with pytest.raises(ValueError, match="no lowbit quant layers; call lowbit.prepare_qat"):
        algo.callbacks(lenet(), data)  # the float network, not apply()'s


def test_callbacks_are_a_temperature_scheduler_and_a_bn_calibration_on_one_native_schedule():
    algo = SlbQuantAwareTraining({"epoch_size": 5, "has_trained_epoch": 0})
    qm = apply_quietly(algo, lenet())
    data = [torch.zeros(2, 1, 8, 8)]
    cbs = algo.callbacks(qm, data)
    assert [type(cb) for cb in cbs] == [TemperatureScheduler]
    algo.set_enable_bn_calibration(True)
    cbs = algo.callbacks(qm, data)
    assert [type(cb) for cb in cbs] == [TemperatureScheduler, BNCalibrationCallback]
    schedule = cbs[0].schedule
    assert cbs[1].schedule is schedule and isinstance(schedule, lowbit.schedules.Schedule)
    assert isinstance(schedule.temperature, lowbit.schedules.Temperature)
    assert schedule.bn_calibration is data and schedule.model is qm
    for bad, error, match in ((0, ValueError, r"counts from 1.*epoch \+ 1"),
                              (1.0, TypeError, "`epoch` must be an int")):
        with pytest.raises(error, match=match):
            cbs[0].on_epoch_begin(bad)
        with pytest.raises(error, match=match):
            cbs[1].on_epoch_end(bad)


def test_temperature_resumes_after_has_trained_epoch():
    """LeNet/MNIST setting of Golden Stick's test (t_factor=3.2), resumed after 4 epochs."""
    algo = SlbQuantAwareTraining({"epoch_size": 10, "has_trained_epoch": 4, "t_factor": 3.2})
    qm = apply_quietly(algo, lenet())
    temperature, = algo.callbacks(qm, [torch.zeros(2, 1, 8, 8)])
    for epoch in range(1, 7):
        temperature.on_epoch_begin(epoch)
        expected, hard = golden_stick_t(epoch, 10, has_trained=4, t_factor=3.2)
        for q in slb_quantizers(qm):
            assert float(q.temperature) == pytest.approx(expected, rel=1e-6)
            assert bool(q.hard) is hard
    assert float(slb_quantizers(qm)[0].temperature) == pytest.approx(3.2**4, rel=1e-6)


def test_bn_calibration_feeds_the_first_column_or_a_custom_forward(digits):
    algo = SlbQuantAwareTraining({"epoch_size": 5, "has_trained_epoch": 0,
                                  "enable_bn_calibration": True})
    qm = apply_quietly(algo, lenet())
    data = batches(digits, 2)
    _, bn_cb = algo.callbacks(qm, data)
    bn = qm[0].bn
    before = bn.running_mean.clone()
    bn_cb.on_epoch_end(1)  # epoch 1 is not past start = int(5 * 0.2) = 1: nothing happens
    assert torch.equal(bn.running_mean, before)
    bn_cb.on_epoch_end(2)
    assert not torch.equal(bn.running_mean, before) and bn.momentum == 0.1 and qm.training
    seen = []
    _, bn_cb = algo.callbacks(qm, data, forward=lambda m, b: seen.append(b) or m(b[0]))
    bn_cb.on_epoch_end(3)
    assert len(seen) == 2 and seen[0] is data[0]
    loader = DataLoader(TensorDataset(digits.x_train[:96], digits.y_train[:96]), batch_size=32)
    _, bn_cb = algo.callbacks(qm, loader)  # a DataLoader of [x, y]: x goes to the network
    bn_cb.on_epoch_end(4)
    assert int(bn.num_batches_tracked) == 3, "statistics re-estimated over the loader's 3 batches"


# ------------------------------------------------------------------------- the workflow


def train_float(data, steps: int = 60) -> nn.Module:
    """The pretrained network Golden Stick's examples start from (a few Adam steps here)."""
    net = lenet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for x, y in batches(data, steps // 4) * 4:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def test_documented_workflow_on_digits_to_onnx_runtime(digits, tmp_path):
    """apply → callbacks driving a training loop → save → convert(ckpt_path) → ONNX Runtime."""
    epochs = 5
    algo = documented_algo(epochs)
    net_qat = apply_quietly(algo, train_float(digits))
    dataset = batches(digits, 4)
    cbs = algo.callbacks(net_qat, dataset)
    opt = torch.optim.Adam(net_qat.parameters(), lr=1e-2)
    recalibrate = mock.patch.object(lowbit.schedules, "recalibrate_bn",
                                    wraps=lowbit.schedules.recalibrate_bn)
    with recalibrate as recal:
        for epoch in range(1, epochs + 1):
            for cb in cbs:
                cb.on_epoch_begin(epoch)
            expected, hard = golden_stick_t(epoch, epochs)  # 1, 1.2, 1.44 (hard), 1.44, 1.44
            for q in slb_quantizers(net_qat):
                assert float(q.temperature) == pytest.approx(expected, rel=1e-6)
                assert bool(q.hard) is hard
            for x, y in dataset:
                opt.zero_grad()
                nn.functional.cross_entropy(net_qat(x), y).backward()
                opt.step()
            calls = recal.call_count
            for cb in cbs:
                cb.on_epoch_end(epoch)
            assert recal.call_count - calls == (1 if epoch > int(epochs * 0.2) else 0)
    assert [float(t) for t in (golden_stick_t(e, epochs)[0] for e in (1, 2, 3))] == \
        pytest.approx([1.0, 1.2, 1.44])

    ckpt = tmp_path / "slb.pt"
    torch.save(net_qat.state_dict(), ckpt)
    fresh = apply_quietly(algo, lenet())  # the untrained structure, as Golden Stick reloads
    with mock.patch.object(lowbit, "convert", wraps=lowbit.convert) as convert:
        dm = algo.convert(fresh, ckpt_path=str(ckpt))
    convert.assert_called_once_with(fresh)
    x_test = digits.x_test[:128]
    with torch.no_grad():
        expected = net_qat.eval()(x_test)
        got = dm(x_test)
    assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max())
    accuracy = (got.argmax(1) == digits.y_test[:128]).float().mean().item()
    assert accuracy > 0.5, accuracy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lowbit.export_onnx(dm, tmp_path / "slb.onnx", (x_test[:16],),
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert report.parity.output_max_lsb <= 1.5, report.parity
    assert report.parity.codes_identical >= 0.995 and report.parity.codes_max_diff <= 1
    sess = ort.InferenceSession(str(report.onnx_path), providers=["CPUExecutionProvider"])
    ort_out = sess.run(None, {sess.get_inputs()[0].name: x_test.numpy()})[0]
    assert np.mean(ort_out.argmax(1) == got.argmax(1).numpy()) >= 0.98
    assert np.abs(ort_out - got.numpy()).max() <= 0.05 * got.abs().max().item()


def test_convert_loads_safetensors_and_reports_bad_checkpoints(tmp_path):
    algo = SlbQuantAwareTraining()
    trained = apply_quietly(algo, lenet())
    for q in slb_quantizers(trained):
        q.init_random_()
    path = tmp_path / "slb.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    target = apply_quietly(algo, lenet())
    dm = algo.convert(target, str(path))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(dm(x), trained.eval()(x), atol=1e-5)
    assert algo.convert(target).training is False  # "" loads nothing

    with pytest.raises(TypeError, match="`net_opt` must be a torch.nn.Module.*Cell.*got str"):
        algo.convert("net")
    with pytest.raises(TypeError, match="`ckpt_path` must be a str, got PosixPath"):
        algo.convert(target, path)
    with pytest.raises(ValueError, match="`ckpt_path` '.*missing.pt' is not a file"):
        algo.convert(target, str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="failed to load `ckpt_path`"):
        algo.convert(target, str(garbage))
    other = tmp_path / "int2.pt"
    two_bit = SlbQuantAwareTraining({"quant_dtype": [QuantDtype.INT8, QuantDtype.INT2]})
    torch.save(apply_quietly(two_bit, lenet()).state_dict(), other)
    with pytest.raises(RuntimeError, match="failed to load.*layer '0' \\(weight_quant\\) was "
                                           "saved with bits=2, this model has bits=1"):
        algo.convert(target, str(other))
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    with pytest.raises(RuntimeError, match="holds a list, not a state dict"):
        algo.convert(target, str(listed))


def test_every_front_end_call_reaches_the_native_api():
    algo = SlbQuantAwareTraining({"epoch_size": 4, "has_trained_epoch": 0,
                                  "enable_bn_calibration": True})
    with mock.patch.object(lowbit, "prepare_qat", wraps=lowbit.prepare_qat) as prepare:
        qm = apply_quietly(algo, lenet())
    prepare.assert_called_once()
    assert prepare.call_args.args[1] == algo.quant_config()
    assert isinstance(prepare.call_args.args[1], lowbit.QuantConfig)
    data = [torch.randn(4, 1, 8, 8)]
    temperature, bn = algo.callbacks(qm, data)
    with mock.patch.object(lowbit.schedules.Schedule, "apply", autospec=True,
                           side_effect=lowbit.schedules.Schedule.apply) as apply:
        temperature.on_epoch_begin(2)
    apply.assert_called_once_with(temperature.schedule)
    with mock.patch.object(lowbit.schedules, "recalibrate_bn",
                           wraps=lowbit.schedules.recalibrate_bn) as recal:
        bn.on_epoch_end(2)
    recal.assert_called_once()
    with mock.patch.object(lowbit, "convert", wraps=lowbit.convert) as convert:
        algo.convert(qm)
    convert.assert_called_once_with(qm)
