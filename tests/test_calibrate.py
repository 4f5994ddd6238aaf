"""``lowbit.calibrate``, ``lowbit.set_calibrating`` and ``lowbit.convert``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.deploy import DeployConv, DeployLinear
from lowbit.nn import QuantLayer

A8 = QuantSpec(bits=8, symmetric=False, observer="minmax")


def _config(weight: QuantSpec | None = None, types=("Linear", "Conv1d", "Conv2d"),
            output: QuantSpec | None = None) -> QuantConfig:
    weight = weight or QuantSpec(bits=8, granularity="per_channel")
    return QuantConfig(rules=[LayerRule(types=list(types), weight=weight, input=A8,
                                        output=output)])


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _quantized(model: nn.Module | None = None, config: QuantConfig | None = None) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lowbit.quantize(model if model is not None else mlp(), config or _config())


def _batches(n: int = 3, shape=(4, 6)) -> list[torch.Tensor]:
    return [torch.randn(*shape) for _ in range(n)]


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


# ------------------------------------------------------------------------------ argument checks


def test_empty_batches() -> None:
    with pytest.raises(ValueError, match=r"`batches` is empty: calibration needs at least one "
                                         r"batch"):
        lowbit.calibrate(_quantized(), [], progress=False)


def test_empty_generator() -> None:
    with pytest.raises(ValueError, match=r"`batches` is empty"):
        lowbit.calibrate(_quantized(), (b for b in []), progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_batch_names_the_layer(bad: float) -> None:
    x = torch.randn(4, 6)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"the input of layer '0' holds NaN or Inf values"):
        lowbit.calibrate(_quantized(), [x], progress=False)


@pytest.mark.parametrize("model", [mlp(), torch.nn.Identity()], ids=["float-mlp", "identity"])
def test_calibrating_a_float_model(model: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"`model` has no lowbit quantizers; call "
                                         r"lowbit.quantize\(model, config\) first"):
        lowbit.calibrate(model, _batches(), progress=False)


def test_calibrating_a_non_module() -> None:
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, got function"):
        lowbit.calibrate(mlp, _batches(), progress=False)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("batches", "match"),
    [(torch.randn(4, 6), r"`batches` must be an iterable of batches, got Tensor; wrap a single "
                         r"tensor in a list: \[x\]"),
     (5, r"`batches` must be an iterable of batches, got int$"),
     ("data.npy", r"`batches` must be an iterable of batches, got str")],
    ids=["tensor", "int", "str"],
)
def test_batches_of_the_wrong_type(batches, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        lowbit.calibrate(_quantized(), batches, progress=False)


def test_batch_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"a calibration batch must be a Tensor, tuple/list or "
                                        r"dict, got ndarray; pass `forward="):
        lowbit.calibrate(_quantized(), [torch.randn(4, 6).numpy()], progress=False)


def test_forward_must_be_callable() -> None:
    with pytest.raises(TypeError, match=r"`forward` must be callable, got str"):
        lowbit.calibrate(_quantized(), _batches(), "model(x)", progress=False)  # type: ignore


@pytest.mark.parametrize("max_batches", [0, -1, True, 2.0], ids=["zero", "negative", "bool",
                                                                  "float"])
def test_max_batches_must_be_a_positive_int(max_batches) -> None:
    with pytest.raises(ValueError, match=r"`max_batches` must be a positive int or None, got "):
        lowbit.calibrate(_quantized(), _batches(), max_batches=max_batches, progress=False)


# ------------------------------------------------------------------------------ behaviour


@pytest.mark.parametrize("start", ["eval", "train", "mixed"])
def test_training_flags_are_restored(start: str) -> None:
    qm = _quantized()
    if start == "train":
        qm.train()
    elif start == "mixed":
        qm.train()
        qm[2].eval()
    before = _flags(qm)
    seen = []

    def forward(model: nn.Module, batch: torch.Tensor) -> None:
        seen.append(any(m.training for m in model.modules()))
        model(batch)

    lowbit.calibrate(qm, _batches(), forward, progress=False)
    assert seen == [False, False, False]  # calibration runs in eval mode
    assert _flags(qm) == before


def test_training_flags_and_observing_are_restored_when_forward_raises() -> None:
    qm = _quantized().train()
    qm[2].eval()
    before = _flags(qm)

    def forward(model: nn.Module, batch: torch.Tensor) -> None:
        model(batch)
        raise KeyError("the loader broke")

    with pytest.raises(KeyError, match="the loader broke"):
        lowbit.calibrate(qm, _batches(), forward, progress=False)
    assert _flags(qm) == before
    assert not any(getattr(m, "observing", False) for m in qm.modules())


def test_flags_are_restored_after_a_nan_batch() -> None:
    qm = _quantized().train()
    before = _flags(qm)
    with pytest.raises(ValueError, match=r"holds NaN or Inf"):
        lowbit.calibrate(qm, [torch.randn(4, 6), torch.full((4, 6), float("nan"))],
                         progress=False)
    assert _flags(qm) == before


def test_set_calibrating_records_then_freezes() -> None:
    qm = _quantized().eval()
    x = torch.randn(16, 6) * 3
    quant = qm[0].input_quant
    assert not quant.is_ready()

    lowbit.set_calibrating(qm, True)
    assert quant.observing
    assert torch.equal(qm[0](x), torch.nn.functional.linear(x, qm[0].weight_quant(qm[0].weight),
                                                           qm[0].bias))  # input passes as is
    assert not quant.is_ready()

    lowbit.set_calibrating(qm, False)
    assert not quant.observing and quant.is_ready()
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    assert float(quant.scale) == pytest.approx((hi - lo) / 255)
    frozen = quant.scale.clone()
    qm(x * 10)  # eval mode, not observing: the range stays frozen
    assert torch.equal(quant.scale, frozen)


def test_set_calibrating_reset() -> None:
    qm = _quantized()
    quant = qm[0].input_quant
    lowbit.set_calibrating(qm, True)
    qm(torch.full((2, 6), 4.0))
    lowbit.set_calibrating(qm, False)
    wide = float(quant.scale)

    lowbit.set_calibrating(qm, True, reset=False)  # keeps the 4.0 seen before
    qm(torch.full((2, 6), 1.0))
    lowbit.set_calibrating(qm, False)
    assert float(quant.scale) == wide

    lowbit.set_calibrating(qm, True)  # reset=True forgets it
    qm(torch.full((2, 6), 1.0))
    lowbit.set_calibrating(qm, False)
    assert float(quant.scale) == pytest.approx(wide / 4)


def test_set_calibrating_errors() -> None:
    with pytest.raises(TypeError, match=r"`enabled` must be a bool, got int"):
        lowbit.set_calibrating(_quantized(), 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`model` has no lowbit quantizers"):
        lowbit.set_calibrating(mlp(), True)


def test_max_batches_is_honoured() -> None:
    consumed = []

    def batches():
        for i in range(10):
            consumed.append(i)
            yield torch.randn(4, 6) * (1.0 if i < 3 else 100.0)  # later batches are far wider

    qm = _quantized()
    assert lowbit.calibrate(qm, batches(), max_batches=3, progress=False) == 3
    assert consumed == [0, 1, 2]
    assert float(qm[0].input_quant.scale) < 0.1  # ranges from the first three batches only


def test_count_of_all_batches_and_progress_bar() -> None:
    assert lowbit.calibrate(_quantized(), _batches(5)) == 5  # default progress=True works


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y)


@pytest.mark.parametrize("layout", ["dict", "tuple", "list"])
def test_structured_batches(layout: str) -> None:
    qm = _quantized(TwoInputs().eval())
    x, y = torch.randn(4, 6), torch.randn(4, 5) * 7
    batch = {"dict": {"y": y, "x": x}, "tuple": (x, y), "list": [x, y]}[layout]
    assert lowbit.calibrate(qm, [batch], progress=False) == 1
    # each layer saw its own input: b's range is the wide one
    assert float(qm.b.input_quant.scale) == pytest.approx(
        (float(y.max()) - min(float(y.min()), 0.0)) / 255)
    assert float(qm.a.input_quant.scale) == pytest.approx(
        (float(x.max()) - min(float(x.min()), 0.0)) / 255)


def test_custom_forward_for_labelled_batches() -> None:
    qm = _quantized()
    pairs = [(torch.randn(4, 6), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    assert lowbit.calibrate(qm, pairs, lambda m, b: m(b[0]), progress=False) == 2
    assert qm[0].input_quant.is_ready()


def test_unreached_layer_is_named_in_a_warning() -> None:
    class Branchy(nn.Module):
        """Calls ``unused`` only while ``both`` is set: when quantize traces it, not after."""

        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(6, 3)
            self.unused = nn.Linear(6, 3)
            self.both = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.used(x)
            return y + self.unused(2 * x) if self.both else y  # its own input quantizer

    qm = _quantized(Branchy().eval())
    qm.both = False
    with pytest.warns(UserWarning, match=r"calibration never reached these layers, so their "
                                         r"activation ranges are unset: \['unused'\]"):
        lowbit.calibrate(qm, _batches(), progress=False)


# ------------------------------------------------------------------------------ convert


def test_convert_of_an_uncalibrated_model_names_the_layer() -> None:
    with pytest.raises(ValueError, match=r"the input quantizer of layer '0' has no range yet; "
                                         r"run lowbit.calibrate"):
        lowbit.convert(_quantized())


def test_convert_argument_errors() -> None:
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, got str"):
        lowbit.convert("model.pt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`model` has no lowbit Quant layers; call "
                                         r"lowbit.quantize"):
        lowbit.convert(mlp())


def _conv2d(groups: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3, groups=groups), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                         nn.Conv2d(8, 4, 1)).eval()


MODELS = {
    "linear": (mlp, (4, 6)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.ReLU(),
                                     nn.Conv1d(6, 6, 3, groups=3, padding_mode="reflect",
                                               padding=1)).eval(), (4, 3, 16)),
    "conv2d-grouped-depthwise": (lambda: _conv2d(groups=2), (2, 4, 9, 9)),
    "conv2d-depthwise-first": (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=4),
                                                     nn.Conv2d(4, 2, 1)).eval(), (2, 4, 7, 7)),
}
WEIGHTS = {
    "w8-per_channel": QuantSpec(bits=8, granularity="per_channel"),
    "w8-per_tensor": QuantSpec(bits=8),
    "w4-per_channel": QuantSpec(bits=4, granularity="per_channel"),
    "w4-per_tensor": QuantSpec(bits=4, narrow_range=True),
}


@pytest.mark.parametrize("weight", list(WEIGHTS.values()), ids=list(WEIGHTS))
@pytest.mark.parametrize("model_shape", list(MODELS.values()), ids=list(MODELS))
def test_deploy_model_equals_fake_quant_model(model_shape, weight: QuantSpec) -> None:
    factory, shape = model_shape
    qm = _quantized(factory(), _config(weight, output=A8))
    batches = [torch.randn(*shape) for _ in range(3)]
    lowbit.calibrate(qm, batches, progress=False)
    state = {k: v.clone() for k, v in qm.state_dict().items()}
    types = {n: type(m) for n, m in qm.named_modules()}

    dm = lowbit.convert(qm)

    # the quantized model is untouched
    assert qm.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in qm.state_dict().items())
    assert {n: type(m) for n, m in qm.named_modules()} == types
    # every Quant wrapper has its deploy module
    for name, module in qm.named_modules():
        if isinstance(module, QuantLayer):
            assert isinstance(dm.get_submodule(name), (DeployConv, DeployLinear)), name
    assert not dm.training
    with torch.no_grad():
        for x in batches:
            assert torch.equal(dm(x), qm(x))


# ------------------------------------------------------------------ speed without a cost


def test_a_pass_fake_quantizes_each_weight_once_and_forgets_it_after():
    from lowbit.quantizers.uniform import reusing_weights

    qm = _quantized()
    lowbit.calibrate(qm, [torch.randn(4, 6) for _ in range(2)], progress=False)
    wq = qm[0].weight_quant
    x = torch.randn(3, 6)
    with torch.no_grad(), reusing_weights(qm):
        first = wq(qm[0].weight)
        assert wq(qm[0].weight) is first  # reused
        replaced = nn.Parameter(qm[0].weight.detach() * 2)
        assert wq(replaced) is not first  # another weight is quantized afresh
        y_reused = qm(x)
    assert wq._reused is None and not wq.reuse_weight
    with torch.no_grad():
        assert torch.equal(qm(x), y_reused)


def test_calibration_with_weight_changes_between_passes_is_unchanged_by_reuse(monkeypatch):
    """SmoothQuant and GPTQ change weights between the statistics and the range pass: the
    reused value must not outlive its pass."""
    import contextlib

    calibrate_module = lowbit.calibrate.__globals__
    w4 = QuantSpec(bits=4, granularity="per_group", group_size=4, algorithm="gptq")
    cfg = QuantConfig(rules=[LayerRule(types=["Linear"], weight=w4,
                                       input=QuantSpec(bits=8, symmetric=False, smoothing=0.5))])
    batches = [torch.randn(16, 8) * torch.linspace(0.1, 8, 8) for _ in range(4)]
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()

    def calibrated() -> nn.Module:
        qm = lowbit.quantize(model, cfg)
        lowbit.calibrate(qm, batches, progress=False, smoothing_check=False)
        return qm

    reused = calibrated()
    monkeypatch.setitem(calibrate_module, "reusing_weights", lambda m: contextlib.nullcontext())
    fresh = calibrated()
    assert reused.state_dict().keys() == fresh.state_dict().keys()
    for key, value in reused.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


def test_all_finite_is_exact_where_the_sum_overflows():
    from lowbit.numerics import all_finite

    big = torch.full((4,), 3e38)  # finite values whose sum is inf
    assert all_finite(big)
    assert all_finite(torch.arange(5))  # integers
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(100)
        x[17] = bad
        assert not all_finite(x)
    x = torch.randn(10)
    x[1], x[2] = float("inf"), -float("inf")  # a sum of nan
    assert not all_finite(x)
