"""Every PTQ / QAT path on every available device, and no host sync inside a training step.

A host sync is an ``aten._local_scalar_dense`` call (``int(t)``, ``bool(t)``, ``t.item()``): on
a GPU it waits for every queued kernel. A dispatch mode counts them on any device, so the check
runs on the CPU too.
"""

from __future__ import annotations

import collections
import traceback
import warnings

import pytest
import torch
from models import conv_net
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lowbit
from lowbit import QuantConfig

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
QAT_PRESETS = ["w8a8-qat", "w4a8-lsq", "w2a2-pact", "w1a8-slb", "w1a1-bnn", "w2-dorefa",
               "w1a8-xnor"]


class HostSyncs(TorchDispatchMode):
    """Counts device-to-host scalar reads, by the lowbit line that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is torch.ops.aten._local_scalar_dense.default:
            ours = [f for f in traceback.extract_stack() if "/lowbit/" in f.filename]
            self.where[f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "torch"] += 1
        return func(*args, **(kwargs or {}))


def qat_steps(preset: str, device: str, freeze_bn: int | None = 2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.prepare_qat(conv_net(), QuantConfig.preset(preset), freeze_bn=freeze_bn,
                                example_inputs=(torch.randn(2, 1, 8, 8),)).to(device)
    sched = lowbit.schedules.for_model(qm, epochs=2)
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    x = torch.randn(8, 1, 8, 8, device=device)
    y = torch.randint(0, 10, (8,), device=device)

    def step() -> None:
        loss = nn.functional.cross_entropy(qm(x), y) + 1e-4 * lowbit.quant_loss(qm)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step_batch()

    return qm, step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", QAT_PRESETS)
def test_training_steps_never_wait_for_the_device(preset, device):
    qm, step = qat_steps(preset, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step()  # the first step initialises ranges / steps and checks for constant codes
        with HostSyncs() as syncs:
            for _ in range(3):  # freeze_bn=2: BN freezes in between
                step()
    assert not syncs.where, dict(syncs.where)


def test_a_loaded_checkpoint_reads_its_counters_once():
    """The host mirrors of step counters and flags follow a load_state_dict."""
    qm, step = qat_steps("w4a8-lsq", "cpu", freeze_bn=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            step()
        fresh, _ = qat_steps("w4a8-lsq", "cpu", freeze_bn=3)
        fresh.load_state_dict(qm.state_dict())
    layer = fresh[0]
    assert layer.bn_frozen(), "3 steps were taken before the checkpoint: BN is frozen"
    assert all(q.is_ready() for q in fresh.modules() if isinstance(q, lowbit.Quantizer))


@pytest.mark.parametrize("device", DEVICES)
def test_ptq_calibrate_convert_stay_on_the_device(device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(conv_net().eval(), QuantConfig.preset("w8a8"),
                             example_inputs=(torch.randn(2, 1, 8, 8),)).to(device)
    batches = [torch.randn(8, 1, 8, 8, device=device) for _ in range(3)]
    lowbit.calibrate(qm, batches, progress=False)
    dm = lowbit.convert(qm)
    for name, t in list(qm.state_dict().items()) + list(dm.state_dict().items()):
        if isinstance(t, torch.Tensor):
            assert t.device.type == device, name
    out = dm(batches[0])
    assert out.device.type == device
    torch.testing.assert_close(out, qm(batches[0]), atol=1e-4, rtol=1e-4)
