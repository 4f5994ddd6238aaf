"""A quantizer shared by several readers handles each tensor once per model call
(``lowbit.quantizers.scope``): its EMA range and its ``quant_delay`` step count do not depend on
how many layers read the tensor, and a tensor changed in place is quantized again."""

from __future__ import annotations

import torch
from models import TwoHeads
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.quantizers import make_quantizer, scope


def _qat(delay: int) -> nn.Module:
    torch.manual_seed(0)
    spec = QuantSpec(bits=8, symmetric=False, observer="ema", quant_delay=delay)
    config = QuantConfig(rules=[LayerRule(types=["Linear"], weight=QuantSpec(bits=8),
                                          input=spec)])
    return lowbit.prepare_qat(TwoHeads(), config)


def test_a_shared_quantizer_counts_and_averages_each_tensor_once_per_step():
    qm = _qat(delay=3)
    shared = qm.a.input_quant
    assert shared is qm.b.input_quant and shared is not qm.body.input_quant
    opt = torch.optim.SGD(qm.parameters(), lr=1e-2)
    torch.manual_seed(1)
    for _ in range(5):
        loss = qm(torch.randn(16, 6)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Five model steps for the quantizer one layer reads and for the one two layers read.
    assert int(qm.body.input_quant.train_steps) == 5 and int(shared.train_steps) == 5


def test_the_shared_range_is_the_one_a_single_reader_would_keep():
    torch.manual_seed(2)
    batches = [torch.randn(16, 6) for _ in range(4)]
    qm = _qat(delay=0)
    lone = make_quantizer(qm.a.input_quant.spec, role="input", channel_axis=-1).train()
    seen: list[torch.Tensor] = []
    qm.a.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    for x in batches:
        qm(x)
        lone(seen[-1])  # the tensor both heads read, seen once
    ours, ref = qm.a.input_quant.observer, lone.observer
    assert torch.allclose(ours.lo, ref.lo) and torch.allclose(ours.hi, ref.hi)


def test_outside_a_model_call_every_call_counts_and_a_changed_tensor_is_quantized_again():
    spec = QuantSpec(bits=8, symmetric=False, observer="ema", quant_delay=5)
    q = make_quantizer(spec, role="input", channel_axis=-1).train()
    x = torch.randn(4, 6)
    q(x)
    q(x)
    assert int(q.train_steps) == 2  # used on its own: no model call, no memo

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = make_quantizer(QuantSpec(bits=8, symmetric=False), role="input",
                                    channel_axis=-1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            first = self.q(x)
            x.mul_(4)  # same object, new version: not the tensor quantized before
            return first, self.q(x)

    model = InPlace().eval()
    model.q.set_qparams(torch.tensor(0.05), torch.tensor(128))
    scope.attach(model)
    first, second = model(torch.randn(4, 6))
    assert not torch.equal(first, second)


def test_readers_that_smooth_their_shared_input_still_observe_it_once_per_call():
    """SmoothQuant gives q, k and v one factor for their shared input; each multiplies by it,
    and the shared quantizer must still see one tensor a call."""
    torch.manual_seed(3)
    batches = [torch.randn(16, 6) for _ in range(4)]
    spec = QuantSpec(bits=8, symmetric=False, observer="ema", smoothing=0.5)
    config = QuantConfig(rules=[LayerRule(types=["Linear"], weight=QuantSpec(bits=8),
                                          input=spec)])
    qm = lowbit.quantize(TwoHeads(), config)
    lowbit.calibrate(qm, batches, progress=False, smoothing_check=False)
    shared = qm.a.input_quant
    assert shared is qm.b.input_quant
    assert qm.a.input_smoothing is not None and torch.equal(qm.a.input_smoothing,
                                                            qm.b.input_smoothing)
    seen: list[torch.Tensor] = []
    shared.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    lowbit.set_calibrating(qm, True)
    with torch.no_grad():
        for x in batches:
            qm(x)
    lowbit.set_calibrating(qm, False)
    assert len(seen) == 2 * len(batches)  # both readers call it ...
    assert all(seen[i] is seen[i + 1] for i in range(0, len(seen), 2))  # ... on one tensor
    lone = make_quantizer(spec, role="input", channel_axis=-1)
    lone.observing = True
    for x in seen[::2]:
        lone(x)
    assert torch.allclose(shared.observer.lo, lone.observer.lo)
    assert torch.allclose(shared.observer.hi, lone.observer.hi)
