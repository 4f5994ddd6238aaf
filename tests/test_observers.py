"""Range observers against slow, obviously-correct numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import QuantSpec
from lowbit.registry import OBSERVERS

NAMES = ["minmax", "ema", "percentile", "kl", "mse"]
HIST_NAMES = ["percentile", "kl", "mse"]
FAST = settings(max_examples=25, deadline=None)


def make(name: str, **spec: object):
    return OBSERVERS.get(name)(QuantSpec(observer=name, **spec))


def feed(obs, *batches: np.ndarray):
    """Feed (R, N) numpy batches as float32 tensors; return the observer."""
    for b in batches:
        obs.update(torch.tensor(np.atleast_2d(b), dtype=torch.float32))
    return obs


def as_f32(*batches: np.ndarray) -> np.ndarray:
    """The values the observer saw, as float64, all batches concatenated along the row."""
    return np.concatenate([np.atleast_2d(b).astype(np.float32) for b in batches], axis=1).astype(
        np.float64
    )


def ranges(obs) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = obs.range()
    return lo.numpy().astype(np.float64), hi.numpy().astype(np.float64)


def levels(x: np.ndarray, bits: int, symmetric: bool) -> int:
    """Steps over [0, t]: half the grid for signed data or a symmetric grid, else all of it."""
    return 2 ** (bits - 1) - 1 if symmetric or (x < 0).any() else 2**bits - 1


# --- slow references -------------------------------------------------------------------------


def ref_kl(hist: np.ndarray, nlevels: int) -> np.ndarray:
    """KL(P||Q) per candidate i in bins//2..bins (inf where bin i-1 is empty), plain loops."""
    bins = len(hist)
    out = np.full(bins + 1, np.inf)
    for i in range(bins // 2, bins + 1):
        if hist[i - 1] == 0:
            continue
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        q = np.zeros(i)
        width = max(i // nlevels, 1)
        for g in range(nlevels):
            a, b = g * width, (i if g == nlevels - 1 else (g + 1) * width)
            if a >= i:
                break
            nonzero = hist[a:b] > 0
            if nonzero.any():
                q[a:b][nonzero] = hist[a:b].sum() / nonzero.sum()
        p, q = p / p.sum(), q / q.sum()
        out[i] = sum(p[k] * math.log(p[k] / q[k]) for k in range(i) if p[k] > 0)
    return out


def raw_sq_error(x: np.ndarray, t: float, nlevels: int) -> float:
    """Squared fake-quant error of the raw data: ``nlevels`` steps over [0, t], sign kept."""
    step = t / nlevels
    fq = np.clip(np.round(np.abs(x) / step), 0, nlevels) * step
    return float(np.sum((np.abs(x) - fq) ** 2))


# --- minmax and ema --------------------------------------------------------------------------


def test_minmax_tracks_extremes_per_row():
    a, b = np.array([[1.0, -2.0], [3.0, 4.0]]), np.array([[0.5, 5.0], [-1.0, 2.0]])
    lo, hi = ranges(feed(make("minmax"), a, b))
    np.testing.assert_array_equal(lo, [-2.0, -1.0])
    np.testing.assert_array_equal(hi, [5.0, 4.0])


@FAST
@given(
    rate=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    seed=st.integers(0, 2**16),
    n_batches=st.integers(1, 5),
)
def test_ema_formula(rate: float, seed: int, n_batches: int):
    rng = np.random.default_rng(seed)
    batches = [rng.normal(size=(3, 20)) * rng.uniform(0.1, 10) for _ in range(n_batches)]
    obs = feed(make("ema", moving_rate=rate), *batches)
    lo_ref, hi_ref = as_f32(batches[0]).min(1), as_f32(batches[0]).max(1)
    for b in batches[1:]:
        lo_ref = rate * lo_ref + (1 - rate) * as_f32(b).min(1)
        hi_ref = rate * hi_ref + (1 - rate) * as_f32(b).max(1)
    lo, hi = ranges(obs)
    np.testing.assert_allclose(lo, lo_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hi, hi_ref, rtol=1e-5, atol=1e-6)


# --- the |x| histogram ----------------------------------------------------------------------


@pytest.mark.parametrize("name", HIST_NAMES)
def test_histogram_rebins_exactly_when_range_doubles(name: str):
    # absmax goes 1 -> 4 -> 3: new bins are whole groups of 4 old bins, so counts are exact.
    # The old top value 1.0 sat in the closed top edge of the old last bin and stays below the
    # new edge at 1.0, so the reference sees it a hair lower.
    rng = np.random.default_rng(0)
    a = np.append(rng.uniform(-1, 1, 999), 1.0)
    b = np.append(rng.uniform(-4, 4, 999), -4.0)
    c = rng.uniform(-3, 3, 1000)
    obs = feed(make(name, bins=256), a, b, c)
    assert float(obs.hist_max[0]) == 4.0
    absx = np.abs(as_f32(a, b, c))
    absx[0, 999] = np.nextafter(1.0, 0.0)
    ref, _ = np.histogram(absx, bins=256, range=(0, 4.0))
    np.testing.assert_allclose(obs.hist[0].numpy(), ref, atol=1e-9)


@FAST
@given(
    seed=st.integers(0, 2**16),
    growth=st.floats(1.01, 50.0),
    bins=st.sampled_from([16, 100, 1024]),
    upsample=st.sampled_from([1, 7, 64]),
)
def test_histogram_rebinning_preserves_counts(seed: int, growth: float, bins: int, upsample: int):
    # Arbitrary growth: old bins straddle new edges, so each cumulative count may be off by at
    # most the straddling old bin's count, never more; the total is exact.
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(1, 500)), rng.normal(size=(1, 700)) * growth
    obs = feed(make("percentile", bins=bins, upsample_bins=upsample), a)
    old_peak = float(obs.hist.max())
    feed(obs, b)
    hist_max = float(obs.hist_max[0])
    true_max = np.abs(as_f32(a, b)).max()
    assert true_max * (1 - 1e-12) <= hist_max <= true_max + np.abs(as_f32(a)).max() / upsample
    ref, _ = np.histogram(np.abs(as_f32(a, b)), bins=bins, range=(0, hist_max))
    ours = obs.hist[0].numpy()
    assert ours.sum() == pytest.approx(1200, abs=1e-9)
    assert np.abs(np.cumsum(ours) - np.cumsum(ref)).max() <= old_peak + 1e-9


# --- percentile ------------------------------------------------------------------------------


@FAST
@given(
    seed=st.integers(0, 2**16),
    percent=st.sampled_from([0.9, 0.99, 0.999, 0.99999, 1.0]),
    shift=st.sampled_from([0.0, 3.0]),
)
def test_percentile_threshold_is_first_bin_reaching_the_cdf(seed: int, percent: float, shift: float):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=(1, 3000)) + shift
    obs = feed(make("percentile", hist_percent=percent, bins=512), x)
    t = float(obs.threshold()[0])
    absx, width = np.abs(as_f32(x)), np.abs(as_f32(x)).max() / 512
    assert t == pytest.approx(width * round(t / width))  # an upper bin edge
    assert np.mean(absx <= t) >= percent - 1e-12
    assert np.mean(absx < t - width) < percent
    lo, hi = ranges(obs)
    assert lo[0] == pytest.approx(max(as_f32(x).min(), -t), rel=1e-6)
    assert hi[0] == pytest.approx(min(as_f32(x).max(), t), rel=1e-6)


def test_percentile_keeps_the_minimum_of_non_negative_data():
    x = np.random.default_rng(1).uniform(2.0, 5.0, size=(1, 2000))
    lo, hi = ranges(feed(make("percentile", hist_percent=0.9), x))
    assert lo[0] == pytest.approx(as_f32(x).min())
    assert 4.6 < hi[0] < 4.8  # 90th percentile of U(2, 5) is 4.7


# --- kl --------------------------------------------------------------------------------------

KL_CASES = [
    pytest.param("normal", 8, True, 1024, id="normal-int8-1024bins"),
    pytest.param("relu", 8, False, 1024, id="relu-uint8-1024bins"),
    pytest.param("laplace", 4, True, 256, id="laplace-int4-256bins"),
    pytest.param("relu", 4, False, 64, id="relu-uint4-64bins"),
    pytest.param("normal", 3, False, 16, id="normal-affine3-16bins"),
]


def sample(kind: str, rng: np.random.Generator, n: int = 4000) -> np.ndarray:
    x = {"normal": rng.normal(size=n), "laplace": rng.laplace(size=n),
         "relu": np.maximum(rng.normal(size=n), 0.0), "uniform": rng.uniform(0, 2, size=n)}[kind]
    return x[None, :]


@pytest.mark.parametrize("kind, bits, symmetric, bins", KL_CASES)
def test_kl_matches_loop_reference(kind: str, bits: int, symmetric: bool, bins: int):
    rng = np.random.default_rng(bins + bits)
    a, b = sample(kind, rng), 2.5 * sample(kind, rng)  # the second batch grows the range
    obs = feed(make("kl", bits=bits, symmetric=symmetric, bins=bins), a, b)
    hist = obs.hist[0].numpy()
    kl = ref_kl(hist, levels(as_f32(a, b), bits, symmetric))
    t = float(obs.threshold()[0])
    i = round(t / (float(obs.hist_max[0]) / bins))
    assert kl[i] <= kl.min() + 1e-12
    if kind != "relu":
        assert t == pytest.approx(-ranges(obs)[0][0], rel=1e-6)


def test_kl_skips_candidates_ending_on_an_empty_bin():
    # Two clusters with a gap: every candidate inside the gap is skipped.
    x = np.concatenate([np.full(50, 0.1), np.full(5, 1.0)])[None, :]
    obs = feed(make("kl", bins=64), x)
    assert float(obs.threshold()[0]) == pytest.approx(1.0)


# --- mse -------------------------------------------------------------------------------------

MSE_CASES = [
    pytest.param("normal", 8, True, 1024, id="normal-int8"),
    pytest.param("relu", 8, False, 1024, id="relu-uint8"),
    pytest.param("laplace", 4, True, 256, id="laplace-int4"),
    pytest.param("relu", 4, False, 256, id="relu-uint4"),
    pytest.param("uniform", 2, False, 64, id="uniform-uint2"),
    pytest.param("laplace", 2, False, 64, id="laplace-affine2"),
]


@pytest.mark.parametrize("kind, bits, symmetric, bins", MSE_CASES)
def test_mse_near_brute_force_on_raw_data(kind: str, bits: int, symmetric: bool, bins: int):
    rng = np.random.default_rng(bits * bins)
    x = sample(kind, rng)
    obs = feed(make("mse", bits=bits, symmetric=symmetric, bins=bins), x)
    xs = as_f32(x)[0]
    nlev, width = levels(xs, bits, symmetric), np.abs(xs).max() / bins
    errors = [raw_sq_error(xs, k * width, nlev) for k in range(bins // 8, bins + 1)]
    t = float(obs.threshold()[0])
    assert t == pytest.approx(width * round(t / width))  # a candidate edge
    assert raw_sq_error(xs, t, nlev) <= 1.03 * min(errors)


# --- shared behaviour ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_rows_are_independent(name: str):
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(3, 400)) * np.array([[1.0], [5.0], [0.1]]) * s for s in (1, 2)]
    batches[0][2] = np.abs(batches[0][2])  # one non-negative row
    lo, hi = ranges(feed(make(name, bins=128), *batches))
    for r in range(3):
        lo_r, hi_r = ranges(feed(make(name, bins=128), *[b[r:r + 1] for b in batches]))
        np.testing.assert_allclose([lo[r], hi[r]], [lo_r[0], hi_r[0]], rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name: str):
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2, 300)), 3 * rng.normal(size=(2, 300))
    obs = feed(make(name, bins=128), a, b)
    fresh = make(name, bins=128)
    fresh.load_state_dict(obs.state_dict())
    assert fresh.has_data()
    for got, want in zip(fresh.range(), obs.range()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    c = 5 * rng.normal(size=(2, 300))  # both keep observing identically
    for got, want in zip(feed(fresh, c).range(), feed(obs, c).range()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_reset_forgets_everything(name: str):
    rng = np.random.default_rng(5)
    obs = feed(make(name, bins=128), 100 * rng.normal(size=(4, 50)))
    obs.reset()
    assert not obs.has_data()
    x = rng.normal(size=(2, 200))
    for got, want in zip(feed(obs, x).range(), feed(make(name, bins=128), x).range()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_all_zero_input_gives_zero_range_then_grows(name: str):
    obs = feed(make(name), np.zeros((2, 64)))
    lo, hi = ranges(obs)
    np.testing.assert_array_equal(np.concatenate([lo, hi]), 0.0)
    x = np.random.default_rng(6).uniform(0, 2, size=(2, 1000))
    lo, hi = ranges(feed(obs, x))
    assert (lo >= 0).all() and (hi > 0.1).all()  # ema: 0.1 of the new max
    if name in HIST_NAMES:
        assert float(obs.hist.sum()) == pytest.approx(2 * 1064)


@pytest.mark.parametrize("name", NAMES)
def test_constant_row(name: str):
    lo, hi = ranges(feed(make(name), np.full((1, 100), 3.0)))
    assert lo[0] == pytest.approx(hi[0], abs=3.0 / 1024) and hi[0] == pytest.approx(3.0, abs=0.01)


# 10,000 N(0, 1) values plus five outliers at 25-30 sigma. Percentile (with a percent that puts
# the outliers in the tail) and 4-bit MSE clip far below them; at 8 bits MSE keeps them (their
# clipping error outweighs the bulk's rounding error). PaddleSlim's KL tries only thresholds in the
# top half of the histogram (start = bins // 2) and skips empty bins, so it can clip at most to
# the smallest outlier above half the absmax, here 25.
HEAVY_TAIL = [
    pytest.param("minmax", {}, 30.0, 30.0, id="minmax-keeps-outliers"),
    pytest.param("percentile", {"hist_percent": 0.999}, 3.0, 4.0, id="percentile-0.999"),
    pytest.param("mse", {"bits": 4}, 3.0, 8.0, id="mse-int4"),
    pytest.param("kl", {}, 25.0, 25.1, id="kl-int8-top-half-only"),
]


@pytest.mark.parametrize("name, spec, low, high", HEAVY_TAIL)
def test_heavy_tail_clipping(name: str, spec: dict, low: float, high: float):
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(size=10_000), [30.0, -25.0, 28.0, 30.0, 27.0]])
    lo, hi = ranges(feed(make(name, **spec), x[None, :]))
    assert low <= hi[0] <= high
    assert lo[0] == pytest.approx(-min(hi[0], 25.0))
