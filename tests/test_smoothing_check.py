"""SmoothQuant is kept only where it pays off for the whole model: ``lowbit.calibrate`` scores
trial copies with and without it on held-out calibration batches (``smoothing_check``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from models import LastHidden
from torch import nn

import lowbit
from lowbit import QuantConfig
from lowbit.fidelity import compared, float_function, sample_cosines
from lowbit.nn import QuantLinear

transformers = pytest.importorskip("transformers")


def bert(outlier: bool) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128,
                                     max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    if outlier:  # one activation outlier channel, as trained transformers have
        with torch.no_grad():
            model.encoder.layer[0].intermediate.dense.bias[3] = 6.0
    return model


def batch(n: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 120, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask}


CALIB = [batch(4, length, seed) for seed, length in enumerate((5, 11, 17, 8))]
HELD_OUT = [batch(4, 12, seed) for seed in range(50, 54)]


def smoothed(qm: nn.Module) -> list[QuantLinear]:
    return [m for m in qm.modules() if isinstance(m, QuantLinear)
            and m.input_smoothing is not None]


def held_out_cosine(qm: nn.Module, model: nn.Module) -> float:
    cos = []
    with torch.no_grad():
        for b in HELD_OUT:
            ref = compared(model(**b).last_hidden_state, b["attention_mask"])
            cos.append(sample_cosines(compared(qm(**b).last_hidden_state, b["attention_mask"]),
                                      ref))
    return float(torch.cat(cos).mean())


def calibrated(model: nn.Module, **kwargs) -> tuple[nn.Module, list[warnings.WarningMessage]]:
    qm = lowbit.quantize(copy.deepcopy(model), QuantConfig.preset("w8a8-transformer"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowbit.calibrate(qm, CALIB, progress=False, **kwargs)
    return qm, [w for w in caught if issubclass(w.category, lowbit.SmoothingWarning)]


def test_smoothing_without_outliers_is_left_off_and_said_so():
    model = bert(outlier=False)
    qm, said = calibrated(model)
    forced, forced_said = calibrated(model, smoothing_check=False)
    assert len(said) == 1 and not forced_said
    message = str(said[0].message)
    assert "SmoothQuant (α 0.8, 13 layers) left off" in message
    assert "calibrated on 2 batch(es) and scored on 2 others" in message
    assert "smoothing_check=False" in message
    assert smoothed(qm) == [] and len(smoothed(forced)) == 13
    assert all(m.smoothing_declined for m in qm.modules() if isinstance(m, QuantLinear))
    # what the check promised holds on batches neither run saw
    assert held_out_cosine(qm, model) > held_out_cosine(forced, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "never calibrated, not smoothed" warning
        lowbit.convert(qm)


def test_smoothing_is_kept_where_an_outlier_channel_needs_it():
    model = bert(outlier=True)
    qm, said = calibrated(model)
    again, _ = calibrated(bert(outlier=True))  # the check is deterministic
    assert not said
    assert len(smoothed(qm)) == 13 and len(smoothed(again)) == 13
    assert not any(m.smoothing_declined for m in qm.modules() if isinstance(m, QuantLinear))
    for a, b in zip(smoothed(qm), smoothed(again)):
        assert torch.equal(a.input_smoothing, b.input_smoothing)


def test_the_check_leaves_the_model_as_calibrate_would_without_it_when_kept():
    """Trials run on copies: a kept smoothing gives exactly the smoothing_check=False model."""
    model = bert(outlier=True)
    qm, _ = calibrated(model)
    forced, _ = calibrated(model, smoothing_check=False)
    assert qm.state_dict().keys() == forced.state_dict().keys()
    for key, value in qm.state_dict().items():
        assert torch.equal(value, forced.state_dict()[key]), key


def test_a_forward_without_a_tensor_output_keeps_smoothing():
    model = bert(outlier=False)
    qm = lowbit.quantize(copy.deepcopy(model), QuantConfig.preset("w8a8-transformer"))
    def forward_returning_nothing(m: nn.Module, b: dict[str, torch.Tensor]) -> None:
        m(**b)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowbit.calibrate(qm, CALIB, forward=forward_returning_nothing, progress=False)
    assert not [w for w in caught if issubclass(w.category, lowbit.SmoothingWarning)]
    assert len(smoothed(qm)) == 13


def test_smoothing_check_must_be_a_bool():
    qm = lowbit.quantize(bert(outlier=False), QuantConfig.preset("w8a8-transformer"))
    with pytest.raises(TypeError, match=r"`smoothing_check` must be a bool, got str 'yes'"):
        lowbit.calibrate(qm, CALIB, smoothing_check="yes")


def test_compared_ignores_padding_positions_and_caps_elements():
    y = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    noisy = y.clone()
    noisy[0, 3:] += 100.0  # garbage where nothing reads
    assert torch.allclose(sample_cosines(compared(noisy, mask), compared(y, mask)),
                          torch.ones(2, dtype=torch.float64))
    assert sample_cosines(compared(noisy), compared(y))[0] < 0.5
    big = torch.randn(1, 70_000)
    assert compared(big).shape == (1, 1 << 16)
    assert torch.equal(compared(big), compared(big.clone()))  # the same positions every call


def test_float_function_switches_every_quantizer_off_and_back():
    model = bert(outlier=True)
    qm, _ = calibrated(model)
    b = HELD_OUT[0]
    with torch.no_grad():
        before = qm(**b).last_hidden_state
        with float_function(qm):
            assert torch.allclose(qm(**b).last_hidden_state, model(**b).last_hidden_state,
                                  atol=1e-5)
        assert torch.equal(qm(**b).last_hidden_state, before)


def test_a_wrapper_taking_the_mask_by_position_decides_like_the_model_itself():
    """The mask is found where the wrapper passes it on, so padding is left out of the score
    (and out of GPTQ's statistics) for tuple batches as for dict batches."""
    from lowbit.fidelity import AttentionMasks

    model = bert(outlier=True)
    wrapped = LastHidden(copy.deepcopy(model))  # the mask goes in by position
    with AttentionMasks(wrapped) as masks, torch.no_grad():
        wrapped(CALIB[0]["input_ids"], CALIB[0]["attention_mask"])
        assert masks.mask is not None and torch.equal(masks.mask, CALIB[0]["attention_mask"])
        wrapped(CALIB[1]["input_ids"], CALIB[1]["attention_mask"])
        assert torch.equal(masks.mask, CALIB[1]["attention_mask"])  # each forward its own
    qm, said = calibrated(model)
    qw = lowbit.quantize(wrapped, QuantConfig.preset("w8a8-transformer"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowbit.calibrate(qw, [(b["input_ids"], b["attention_mask"]) for b in CALIB],
                         progress=False)
    assert not said and not [w for w in caught if issubclass(w.category, lowbit.SmoothingWarning)]
    assert len(smoothed(qw)) == len(smoothed(qm)) == 13
    for a, b in zip(smoothed(qw), smoothed(qm)):
        assert torch.equal(a.input_smoothing, b.input_smoothing)
