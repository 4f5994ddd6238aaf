"""What ``lowbit.analyze`` returns: one row per quantized layer, as a text table, JSON or HTML."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# (key, header, format): the columns of the text table, the JSON rows and the HTML table.
COLUMNS: list[tuple[str, str, str]] = [
    ("order", "#", "d"),
    ("name", "layer", "s"),
    ("type", "type", "s"),
    ("weight", "weight", "s"),
    ("input", "input", "s"),
    ("sqnr_isolated", "SQNR alone dB", ".1f"),
    ("sqnr_cumulative", "SQNR cumul. dB", ".1f"),
    ("weight_sqnr", "W SQNR dB", ".1f"),
    ("input_sqnr", "A SQNR dB", ".1f"),
    ("clipped", "clipped %", "pct"),
    ("size_bits", "size kbit", "kbit"),
]
SORT_KEYS = [key for key, _, _ in COLUMNS]


@dataclass
class LayerAnalysis:
    """One quantized layer. SQNRs are of its output (``sqnr_isolated``: only this layer
    quantized, its input float; ``sqnr_cumulative``: every layer quantized, as deployed),
    of its weight and of its quantized input(s); ``clipped`` is the share of input values
    saturated by the input quantizer (more than half a step outside its range). ``None`` where a number does not apply."""

    name: str
    type: str
    order: int | None  # position in execution order (None: never ran)
    weight: str  # "int8 per_channel", "float", "-" (no weight)
    input: str
    sqnr_isolated: float | None = None
    sqnr_cumulative: float | None = None
    weight_sqnr: float | None = None
    input_sqnr: float | None = None
    clipped: float | None = None
    size_bits: int = 0
    float_bits: int = 0
    calls: int = 0
    # plot data
    weight_channel_min: list[float] | None = None
    weight_channel_max: list[float] | None = None
    weight_clip_lo: list[float] | None = None  # the grid's range per channel (per-tensor: one)
    weight_clip_hi: list[float] | None = None
    input_clip: tuple[float, float] | None = None
    input_min: float | None = None
    input_max: float | None = None
    hist_counts: list[int] = field(default_factory=list)
    hist_edges: list[float] = field(default_factory=list)

    def cell(self, key: str, fmt: str) -> str:
        value = getattr(self, key)
        if value is None:
            return "-"
        if fmt == "pct":
            return f"{100 * value:.3f}"
        if fmt == "kbit":
            return f"{value / 1000:.1f}"
        if isinstance(value, float) and math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return format(value, fmt)


@dataclass
class AnalysisReport:
    """Per-layer figures in model (execution) order, and the model output's SQNR."""

    layers: list[LayerAnalysis]
    output_sqnr: float | None
    batches: int
    seconds: float

    def layer(self, name: str) -> LayerAnalysis:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no analysed layer named {name!r}; layers: {[r.name for r in self.layers]}")

    def ranked(self, key: str = "sqnr_isolated") -> list[LayerAnalysis]:
        """Layers by ascending ``key`` (worst SQNR first); layers without it come last."""
        if key not in SORT_KEYS:
            raise ValueError(f"`key` must be one of {SORT_KEYS}, got {key!r}")
        present = [r for r in self.layers if getattr(r, key) is not None]
        missing = [r for r in self.layers if getattr(r, key) is None]
        return sorted(present, key=lambda r: getattr(r, key)) + missing

    def table(self, sort: str | None = None) -> str:
        """The table as aligned text (model order, or ascending by column ``sort``)."""
        rows = self.layers if sort is None else self.ranked(sort)
        cells = [[h for _, h, _ in COLUMNS]]
        cells += [[r.cell(k, f) for k, _, f in COLUMNS] for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
        text = ["  ".join(c.ljust(w) if i in (1, 2, 3, 4) else c.rjust(w)
                          for i, (c, w) in enumerate(zip(line, widths))) for line in cells]
        text.insert(1, "  ".join("-" * w for w in widths))
        q_bits = sum(r.size_bits for r in self.layers)
        f_bits = sum(r.float_bits for r in self.layers)
        out = _fmt_db(self.output_sqnr)
        text.append(f"model output SQNR {out} dB; quantized layers {q_bits / 8e3:.1f} kB "
                    f"({q_bits / max(f_bits, 1):.3f}x float); {self.batches} batch(es), "
                    f"{self.seconds:.1f} s")
        return "\n".join(text)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "lowbit.analysis", "version": 1, "output_sqnr": _json_num(
            self.output_sqnr), "batches": self.batches, "seconds": self.seconds,
            "columns": {k: h for k, h, _ in COLUMNS},
            "layers": [{k: _json_num(v) for k, v in asdict(r).items()} for r in self.layers]}

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write ``to_dict()`` as JSON (infinite SQNRs as the string ``"inf"``)."""
        return write_text(path, json.dumps(self.to_dict(), indent=1))

    def to_html(self, path: str | os.PathLike[str], *, title: str = "lowbit analysis") -> Path:
        """A self-contained HTML page: SQNR chart, per-layer ranges and histograms, sortable
        table (needs matplotlib: ``pip install lowbit[analysis]``)."""
        from lowbit.analysis.html import render

        return write_text(path, render(self, title=title))

    def __str__(self) -> str:
        return self.table()


def _fmt_db(v: float | None) -> str:
    return "-" if v is None else ("inf" if math.isinf(v) else f"{v:.2f}")


def _json_num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, tuple):
        return [_json_num(x) for x in v]
    return v


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write through a temp file in the same folder and a rename (no half-written file)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}")
    target = Path(path)
    if not target.parent.is_dir():
        raise ValueError(f"`path` {str(target)!r}: folder {str(target.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the report from others
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
