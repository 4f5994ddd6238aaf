"""Range estimators: ``update(rows)``, ``range() -> (lo, hi)``, ``reset()``.

Every observer sees a tensor already viewed as ``(rows, values)`` (one row per scale the
quantizer will hold: 1 row per tensor, C rows per channel) and returns ``lo``/``hi`` of shape
``(rows,)``. State lives in buffers so ``state_dict`` round-trips; buffers whose shape depends on
the data are resized on load.

Observers: ``minmax`` and ``ema`` (moving average) track min/max; ``percentile``, ``kl`` and
``mse`` keep a histogram of ``|x|`` per row and clip it (docs/algorithms.md §7).

Under ``torch.distributed`` (``lowbit.distributed``) each update reduces the batch statistics
of every rank first, so all ranks hold the same range: min / max take the extremes of all ranks'
batches, and histograms fold each rank's batch in rank order, exactly as one process reading
those batches one after another would. Weight observers (``shared=False``) stay local: weights
are the same on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit import distributed
from lowbit.config import QuantSpec
from lowbit.registry import OBSERVERS


class Observer(nn.Module):
    """Base class: keeps the spec; subclasses fill ``update`` / ``range``."""

    count: torch.Tensor

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        # Reduce statistics over the ranks of a process group (activations: each rank sees
        # other data); weight observers are built with shared=False (``build``).
        self.shared = True
        self.lag: Any = None  # a distributed.LaggedRanges queue, where lag_ranges set one
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self._has_data: bool | None = False  # `count > 0` on the host; None: read it

    def group(self) -> Any:
        """The process group this update reduces over, or None (one process, or local)."""
        return distributed.active_group() if self.shared else None

    def batch_range(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row min and max of this batch, over every rank's batch when reduced."""
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        group = self.group()
        return (lo, hi) if group is None else distributed.reduce_range(lo, hi, group)

    can_lag = False  # whether fold_range can apply a queued range (distributed.lag_ranges)

    def update(self, rows: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def fold_range(self, lo: torch.Tensor, hi: torch.Tensor, batches: int = 1) -> None:
        """Fold in an already reduced batch range (observers with ``can_lag``)."""
        raise NotImplementedError(f"{type(self).__name__} keeps more than a range")

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:
        self.count.zero_()
        self._has_data = False

    def has_data(self) -> bool:
        if self._has_data is None:  # after a load: one read, then no device sync per step
            self._has_data = int(self.count) > 0
        return self._has_data

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self._has_data = None  # re-read the loaded count
        # Buffers sized by the data (per-channel ranges, histograms) take the saved shape.
        for name, buf in list(self._buffers.items()):
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key]).to(buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args)


def build(spec: QuantSpec, *, shared: bool) -> Observer:
    """The spec's observer; ``shared=False`` for weights (never reduced across ranks)."""
    observer = OBSERVERS.get(spec.observer, field="QuantSpec.observer")(spec)
    observer.shared = shared
    return observer


@OBSERVERS.register("minmax")
class MinMaxObserver(Observer):
    """Running min / max over everything seen."""

    lo: torch.Tensor
    hi: torch.Tensor

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        self.register_buffer("lo", torch.zeros(0))
        self.register_buffer("hi", torch.zeros(0))

    can_lag = True  # a training quantizer may queue its batch range (distributed.lag_ranges)

    def update(self, rows: torch.Tensor) -> None:
        group = self.group()
        self.fold_range(*self.batch_range(rows),
                        batches=1 if group is None else distributed.world_size(group))

    def fold_range(self, lo: torch.Tensor, hi: torch.Tensor, batches: int = 1) -> None:
        """Fold in the range of ``batches`` batches (one per rank when reduced)."""
        if self.has_data():
            lo, hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        self.lo, self.hi = lo, hi
        self.count += batches
        self._has_data = True

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo, self.hi

    def reset(self) -> None:
        super().reset()
        self.lo, self.hi = self.lo.new_zeros(0), self.hi.new_zeros(0)


@OBSERVERS.register("ema")
class EMAObserver(Observer):
    """Moving average of each batch's per-row min and max (QAT activations, docs/algorithms.md §1).

    The first batch sets the range; later ones blend in as ``v = rate * v + (1 - rate) * batch``
    with ``rate = spec.moving_rate``.
    """

    lo: torch.Tensor
    hi: torch.Tensor

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        self.register_buffer("lo", torch.zeros(0))
        self.register_buffer("hi", torch.zeros(0))

    can_lag = True  # a training quantizer may queue its batch range (distributed.lag_ranges)

    def update(self, rows: torch.Tensor) -> None:
        self.fold_range(*self.batch_range(rows))

    def fold_range(self, lo: torch.Tensor, hi: torch.Tensor, batches: int = 1) -> None:
        """Blend in one step's range (the extremes of ``batches`` ranks' batches)."""
        if self.has_data():
            rate = self.spec.moving_rate
            lo, hi = rate * self.lo + (1 - rate) * lo, rate * self.hi + (1 - rate) * hi
        self.lo, self.hi = lo, hi
        self.count += 1
        self._has_data = True

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo, self.hi

    def reset(self) -> None:
        super().reset()
        self.lo, self.hi = self.lo.new_zeros(0), self.hi.new_zeros(0)


def rebin(hist: torch.Tensor, old_max: torch.Tensor, new_max: torch.Tensor,
          upsample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move histograms over ``[0, old_max]`` onto a range that also covers ``new_max``.

    As PaddleSlim does: each old bin is cut into ``upsample`` equal sub-bins sharing its count,
    and each new bin is ``d`` whole sub-bins with the integer ``d = ceil(new_max * upsample /
    old_max)``, so the new range (``old_max * d / upsample``, a little above ``new_max``) ends on
    a sub-bin edge and counts move without loss. Since ``d >= upsample`` an old bin lands in at
    most two new bins; rows that do not grow keep their histogram, and rows that were all zeros
    (``old_max == 0``, every count in bin 0) take ``new_max`` as it is.
    """
    bins = hist.shape[1]
    d, target = _rebin_steps(old_max, new_max, upsample)
    start = torch.arange(bins, dtype=torch.float64, device=hist.device) * upsample  # sub-bin units
    first = torch.floor(start / d[:, None]).clamp_(max=bins - 1)
    # Share of each old bin that falls before the next new-bin edge; the rest goes one bin up.
    share = (((first + 1) * d[:, None] - start) / upsample).clamp_(0, 1)
    out = torch.zeros_like(hist).scatter_add_(1, first.long(), hist * share)
    second = (first + 1).clamp_(max=bins - 1).long()
    return out.scatter_add_(1, second, hist * (1 - share)), target


def _rebin_steps(old_max: torch.Tensor, new_max: torch.Tensor,
                 upsample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rebin``'s sub-bins per new bin ``d`` and its new range, per row."""
    grow = (new_max > old_max) & (old_max > 0)
    d = torch.where(grow, torch.ceil(new_max * upsample / old_max.clamp_min(1e-300)), upsample)
    return d, torch.where(grow, old_max * d / upsample, torch.maximum(old_max, new_max))


def histogram(absx: torch.Tensor, hist_max: torch.Tensor, bins: int) -> torch.Tensor:
    """Per-row counts of ``absx`` (R, N) in ``bins`` equal bins over ``[0, hist_max]`` (as
    ``np.histogram``: the top edge belongs to the last bin; a zero range puts all in bin 0)."""
    per_unit = torch.where(hist_max > 0, bins / hist_max.clamp_min(1e-300), 0.0)
    index = (absx * per_unit[:, None]).floor_().clamp_(0, bins - 1).long()
    counts = torch.zeros(absx.shape[0], bins, dtype=torch.float64, device=absx.device)
    return counts.scatter_add_(1, index, torch.ones_like(absx))


class HistogramObserver(MinMaxObserver):
    """Exact per-row min/max plus a float64 histogram of ``|x|`` per row (``spec.bins`` bins).

    Subclasses pick a clipping threshold ``t`` per row from the histogram; the range is then
    ``lo = max(row_min, -t)``, ``hi = min(row_max, t)``: non-negative data keeps its minimum and
    signed data is clipped symmetrically (a histogram of ``|x|`` cannot tell the two signs apart).
    """

    can_lag = False  # a queued min/max would leave the histogram behind

    hist_max: torch.Tensor
    hist: torch.Tensor

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        self.register_buffer("hist_max", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("hist", torch.zeros(0, spec.bins, dtype=torch.float64))

    def update(self, rows: torch.Tensor) -> None:
        absx = rows.detach().abs().to(torch.float64)
        lo, hi, new_max = rows.amin(dim=1), rows.amax(dim=1), absx.amax(dim=1)
        group, mine = self.group(), 0
        maxima = [new_max]
        if group is not None:  # every rank's batch, folded in rank order
            rows_n = lo.numel()
            stats = distributed.gather(torch.cat([lo.double(), hi.double(), new_max]), group)
            lo = torch.stack([s[:rows_n] for s in stats]).amin(dim=0).to(lo.dtype)
            hi = torch.stack([s[rows_n:2 * rows_n] for s in stats]).amax(dim=0).to(hi.dtype)
            maxima = [s[2 * rows_n:] for s in stats]
            mine = torch.distributed.get_rank(group)
        # The range each batch is binned on, as the batches before it leave it.
        upsample, has_data, hist_max, binned_on = self.spec.upsample_bins, self.has_data(), \
            self.hist_max, []
        for m in maxima:
            hist_max = _rebin_steps(hist_max, m, upsample)[1] if has_data else m
            has_data = True
            binned_on.append(hist_max)
        counts = histogram(absx, binned_on[mine], self.spec.bins)
        every = [counts] if group is None else distributed.gather(counts, group)
        fresh = not self.has_data()
        for m, h in zip(maxima, every):
            if fresh:
                self.hist, self.hist_max, fresh = h.new_zeros(h.shape), m, False
            else:
                self.hist, self.hist_max = rebin(self.hist, self.hist_max, m, upsample)
            self.hist += h
        self.fold_range(lo, hi, batches=len(maxima))

    def reset(self) -> None:
        super().reset()
        self.hist_max = self.hist_max.new_zeros(0)
        self.hist = self.hist.new_zeros(0, self.spec.bins)

    def levels(self) -> torch.Tensor:
        """Quantization steps over ``[0, t]`` per row: ``2**(bits-1) - 1`` when the grid is
        symmetric or the row holds negative values, ``2**bits - 1`` for non-negative data on an
        affine grid (at least 1)."""
        half = (self.lo < 0) | self.spec.symmetric
        steps = torch.where(half, 2 ** (self.spec.bits - 1) - 1, 2**self.spec.bits - 1)
        return steps.clamp_min(1)

    def threshold(self) -> torch.Tensor:  # pragma: no cover - abstract
        """Clipping threshold per row, float64 of shape (R,)."""
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.threshold().to(self.lo.dtype)
        hi = torch.minimum(self.hi, t)
        return torch.minimum(torch.maximum(self.lo, -t), hi), hi


@OBSERVERS.register("percentile")
class PercentileObserver(HistogramObserver):
    """PaddleSlim ``HistQuantizer``: ``t`` is the upper edge of the first bin where the CDF of
    ``|x|`` reaches ``spec.hist_percent``."""

    def threshold(self) -> torch.Tensor:
        cdf = self.hist.cumsum(dim=1) / self.hist.sum(dim=1, keepdim=True).clamp_min(1e-300)
        # A 1e-12 slack keeps float round-off in the cumsum from skipping past hist_percent=1.
        first = (cdf < self.spec.hist_percent - 1e-12).sum(dim=1).clamp_(max=self.spec.bins - 1)
        return (first + 1) * self.hist_max / self.spec.bins


# Candidates scored at once: bounds the (candidates, bins) float64 temporaries to ~16 MB.
_CHUNK_CELLS = 2**21


def _chunks(first: int, last: int, bins: int) -> list[torch.Tensor]:
    """Candidate bin counts ``first..last`` in chunks of at most ``_CHUNK_CELLS / bins``."""
    step = max(1, _CHUNK_CELLS // bins)
    return [torch.arange(a, min(a + step, last + 1)) for a in range(first, last + 1, step)]


def kl_divergences(hist: torch.Tensor, keep: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(P || Q) for each candidate ``i`` in ``keep`` on one histogram (TensorRT's recipe).

    P is ``hist[:i]`` with the tail ``hist[i:]`` added to its last bin; Q merges ``hist[:i]``
    into ``levels`` groups of ``i // levels`` bins (the last group takes the remainder) and
    spreads each group's count evenly over its non-empty bins. Candidates whose bin ``i - 1`` is
    empty get ``inf``. Q > 0 wherever P > 0 by construction; a floor guards round-off.
    """
    bins, keep = hist.numel(), keep.to(hist.device)
    i, j = keep[:, None], torch.arange(bins, device=hist.device)[None, :]
    inside = j < i
    kept = torch.where(inside, hist, 0.0)
    total = hist.sum()
    p = kept + (j == i - 1) * (total - kept.sum(dim=1, keepdim=True))
    group = (j // (i // levels).clamp_min(1)).clamp_(max=levels - 1).expand(len(keep), bins)
    sums = kept.new_zeros(len(keep), levels).scatter_add_(1, group, kept)
    nonzero = inside & (hist > 0)
    counts = kept.new_zeros(len(keep), levels).scatter_add_(1, group, nonzero.double())
    q = torch.where(nonzero, (sums / counts.clamp_min(1)).gather(1, group), 0.0)
    p, q = p / total, q / q.sum(dim=1, keepdim=True).clamp_min(1e-300)
    terms = torch.where(p > 0, p * torch.log(p / q.clamp_min(1e-300)), 0.0)
    kl = terms.sum(dim=1)
    return torch.where(hist[keep - 1] > 0, kl, torch.inf)


@OBSERVERS.register("kl")
class KLObserver(HistogramObserver):
    """TensorRT / PaddleSlim ``KLQuantizer`` entropy calibration on the ``|x|`` histogram.

    Candidates keep ``i`` bins, ``bins // 2 <= i <= bins``; the one with the smallest KL(P||Q)
    wins (the first on ties) and ``t = i * bin_width``, the upper edge of the kept bins, which is
    the range P describes (PaddleSlim uses ``(i + 0.5) * bin_width``). ``levels()`` gives the
    number of groups. A row with no usable candidate (all zeros) falls back to its absmax.
    """

    def threshold(self) -> torch.Tensor:
        bins = self.spec.bins
        absmax = torch.maximum(self.lo.abs(), self.hi.abs()).to(torch.float64)
        out = absmax.clone()
        chunks = _chunks(bins // 2, bins, bins)
        keep = torch.cat(chunks)
        for r, (hist, levels) in enumerate(zip(self.hist, self.levels().tolist())):
            kl = torch.cat([kl_divergences(hist, c, levels) for c in chunks])
            if torch.isfinite(kl).any():
                out[r] = int(keep[int(kl.argmin())]) * self.hist_max[r] / bins
        return out


def squared_errors(
    hist: torch.Tensor, edges: torch.Tensor, width: float, levels: int
) -> torch.Tensor:
    """Fake-quant squared error of the histogram (its bin centres, weighted by counts) for each
    threshold ``edges * width``: ``levels`` steps over ``[0, t]``, values above ``t`` clip."""
    bins = hist.numel()
    centres = (torch.arange(bins, dtype=torch.float64, device=hist.device) + 0.5) * width
    step = (edges.to(hist.device, torch.float64) * width / levels)[:, None]
    fq = torch.round(centres / step).clamp_(0, levels) * step
    return ((centres - fq) ** 2 * hist).sum(dim=1)


@OBSERVERS.register("mse")
class MSEObserver(HistogramObserver):
    """Clipping threshold minimising the expected fake-quant MSE over the ``|x|`` histogram.

    Candidates are the bin edges ``k * bin_width`` for ``bins // 8 <= k <= bins`` (the first
    minimum wins); the grid has ``levels()`` steps over ``[0, t]``. The error of each bin is
    taken at its centre, accurate while a quantization step spans a few bins (default 1024 bins).
    """

    def threshold(self) -> torch.Tensor:
        bins = self.spec.bins
        chunks = _chunks(bins // 8, bins, bins)
        edges = torch.cat(chunks)
        out = torch.zeros_like(self.hist_max)
        for r, (hist, levels) in enumerate(zip(self.hist, self.levels().tolist())):
            width = float(self.hist_max[r]) / bins
            if width > 0:
                err = torch.cat([squared_errors(hist, c, width, levels) for c in chunks])
                out[r] = int(edges[int(err.argmin())]) * width
        return out
