"""The analysis as one self-contained HTML page: plots as embedded PNGs, an inline sortable table.

No network, no external script or style: the page opens from a file anywhere. matplotlib
(Agg backend) is imported here only, so ``import lowbit`` does not need it.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import TYPE_CHECKING, Any

from lowbit.analysis.report import COLUMNS, AnalysisReport, LayerAnalysis

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the HTML report needs matplotlib: pip install 'lowbit[analysis]'") \
            from None
    return matplotlib


def _png(fig: Figure) -> str:
    """Render with the Agg canvas (Figure objects, not pyplot: no global backend is set)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(v: float | None) -> float:
    return float("nan") if v is None or not math.isfinite(v) else v


LABEL_CHARS = 44  # longer layer names are shortened in the middle on the chart's axis
OUTLIER_QUANTILE = 0.99  # channels wider than OUTLIER_SPREAD x this quantile of the channels'
OUTLIER_SPREAD = 4.0  # widths are drawn cut off at the axis (their true range in the title)


def chart_labels(names: list[str]) -> list[str]:
    """Axis labels: the table's ``#``, then the name without the dotted prefix every name
    shares (``model.``), middle-shortened past ``LABEL_CHARS``."""
    prefix = ""
    if len(names) > 1:
        common = names[0].split(".")
        for name in names[1:]:
            parts = name.split(".")
            k = 0
            while k < min(len(common), len(parts) - 1) and common[k] == parts[k]:
                k += 1
            common = common[:k]
        prefix = ".".join(common) + "." if common else ""
    labels = []
    for i, name in enumerate(names):
        short = name[len(prefix):]
        if len(short) > LABEL_CHARS:
            half = (LABEL_CHARS - 1) // 2
            short = short[:half] + "…" + short[-(LABEL_CHARS - 1 - half):]
        labels.append(f"{i} {short}")
    return labels


def sqnr_chart(report: AnalysisReport) -> str:
    """Per-layer SQNR (alone, cumulative, weight, input) in model order, as a PNG data URI.
    The figure grows with the labels' length, so the plot keeps its height under them."""
    from matplotlib.figure import Figure

    rows = report.layers
    n = len(rows)
    labels = chart_labels([r.name for r in rows])
    longest = max((len(label) for label in labels), default=0)
    fig = Figure(figsize=(max(8.0, 0.22 * n + 2.5), 3.6 + 0.065 * longest), layout="constrained")
    ax = fig.add_subplot()
    x = list(range(n))
    series = [("sqnr_isolated", "output, this layer alone quantized", "o-", "C0"),
              ("sqnr_cumulative", "output, all layers up to it quantized", "s-", "C3"),
              ("weight_sqnr", "weight", "^", "C2"),
              ("input_sqnr", "input (activation)", "v", "C1")]
    for key, label, style, color in series:
        ax.plot(x, [_finite(getattr(r, key)) for r in rows], style, label=label, color=color,
                markersize=4, linewidth=1.2)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylabel("SQNR (dB, higher is better)")
    ax.set_title(f"Per-layer SQNR in model order (model output: "
                 f"{_finite(report.output_sqnr):.1f} dB)")
    ax.grid(True, alpha=0.3)
    fig.legend(fontsize=8, loc="outside upper right", ncols=4)
    return _png(fig)


def _weight_axes(ax: Any, row: LayerAnalysis) -> None:
    """Each output channel's min..max (blue bars) over the grid's range (a light red band
    behind them, so the bars stay visible on wide layers). Where a few channels are far wider
    than the rest (an outlier channel after smoothing), the axis stops at the others' range,
    so they do not flatten every other channel to a line; the title names the widest."""
    from matplotlib.ticker import MaxNLocator

    lo, hi = row.weight_channel_min or [], row.weight_channel_max or []
    n = len(lo)
    ch = list(range(n))
    edges = [c - 0.5 for c in range(n + 1)]
    if row.weight_clip_lo is not None and row.weight_clip_hi is not None:
        ax.stairs(row.weight_clip_hi, edges, baseline=row.weight_clip_lo, fill=True, color="C3",
                  alpha=0.25, linewidth=0, label="grid range", zorder=1)
    ax.vlines(ch, lo, hi, color="C0", linewidth=min(6.0, max(0.8, 300 / max(n, 1))),
              label="channel min..max", zorder=2)
    note = ""
    spans = sorted((max(abs(a), abs(b)), c) for c, (a, b) in enumerate(zip(lo, hi)))
    if spans:
        typical = spans[min(n - 1, int(OUTLIER_QUANTILE * n))][0]
        beyond = [(v, c) for v, c in spans if v > OUTLIER_SPREAD * typical]
        if beyond and typical > 0:
            limit = 1.3 * max(v for v, _ in spans if v <= OUTLIER_SPREAD * typical)
            ax.set_ylim(-limit, limit)
            up = [c for c in ch if hi[c] > limit]
            down = [c for c in ch if lo[c] < -limit]
            ax.plot(up, [limit] * len(up), "k^", markersize=4, zorder=3,
                    label="beyond the axis")
            ax.plot(down, [-limit] * len(down), "kv", markersize=4, zorder=3)
            widest, at = beyond[-1]
            note = (f"; {len(beyond)} channel(s) cut off, widest #{at} ±{widest:.3g}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.5, max(n, 1) - 0.5)
    ax.set_title(f"weight per output channel ({row.weight}){note}", fontsize=9)
    ax.set_xlabel("row" if row.type == "Embedding" else "output channel", fontsize=8)
    ax.legend(fontsize=7, loc="upper right")


def layer_figure(row: LayerAnalysis) -> str | None:
    """Per-channel weight ranges (with the grid's range) and the input histogram (with the
    clip range marked) of one layer, side by side; None when it has neither."""
    from matplotlib.figure import Figure

    has_w = row.weight_channel_min is not None
    has_x = bool(row.hist_counts)
    if not (has_w or has_x):
        return None
    fig = Figure(figsize=(11, 2.8), layout="constrained")
    axes = fig.subplots(1, 2)
    ax = axes[0]
    if has_w:
        _weight_axes(ax, row)
    else:
        ax.text(0.5, 0.5, "no weight", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax = axes[1]
    if has_x:
        edges = row.hist_edges
        widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
        ax.bar(edges[:-1], row.hist_counts, width=widths, align="edge", color="C0")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.7)  # single counts stay visible
        if row.input_clip is not None:
            for v in row.input_clip:
                ax.axvline(v, color="C3", linestyle="--", linewidth=1.0)
            ax.axvspan(row.input_clip[0], row.input_clip[1], color="C3", alpha=0.06)
        clipped = "-" if row.clipped is None else f"{100 * row.clipped:.3f}%"
        ax.set_title(f"input values ({row.input}); dashed: clip range; clipped {clipped}",
                     fontsize=9)
        ax.set_xlabel("value (sampled)", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
    else:
        ax.text(0.5, 0.5, "input not quantized", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
    fig.suptitle(row.name, fontsize=10)
    return _png(fig)


SCRIPT = """
function sortTable(col, numeric) {
  const table = document.getElementById("layers");
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const th = table.tHead.rows[0].cells[col];
  const asc = th.dataset.dir !== "asc";
  for (const c of table.tHead.rows[0].cells) { c.dataset.dir = ""; }
  th.dataset.dir = asc ? "asc" : "desc";
  const key = (r) => {
    const t = r.cells[col].dataset.v ?? r.cells[col].textContent;
    if (!numeric) return t;
    const v = parseFloat(t);
    return isNaN(v) ? (t === "inf" ? Infinity : (asc ? Infinity : -Infinity)) : v;
  };
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    const c = numeric ? x - y : String(x).localeCompare(String(y));
    return asc ? c : -c;
  });
  for (const r of rows) body.appendChild(r);
}
"""

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; white-space: nowrap; }
th { background: #f0f0f0; cursor: pointer; user-select: none; white-space: nowrap; }
th[data-dir="asc"]::after { content: " \\25B2"; } th[data-dir="desc"]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.low { background: #fde0dc; }
img { max-width: 100%; }
.layer { margin: 0.4em 0 1.2em 0; }
"""

LOW_SQNR_DB = 20.0  # cells below it are shaded: an 8-bit grid gives about 40 dB on normal data


def render(report: AnalysisReport, *, title: str = "lowbit analysis") -> str:
    """The page: summary, SQNR chart, sortable table, one figure per layer."""
    _pyplot()
    esc = html.escape
    head = "".join(f'<th onclick="sortTable({i}, {str(fmt != "s").lower()})">{esc(h)}</th>'
                   for i, (_, h, fmt) in enumerate(COLUMNS))
    body = []
    for r in report.layers:
        cells = []
        for key, _, fmt in COLUMNS:
            text = r.cell(key, fmt)
            value = getattr(r, key)
            cls = "num" if fmt != "s" else ""
            if key.endswith("sqnr") or key.startswith("sqnr"):
                if isinstance(value, float) and value < LOW_SQNR_DB:
                    cls += " low"
            if key == "name":
                text = f'<a href="#layer-{esc(r.name)}">{esc(text)}</a>'
            else:
                text = esc(text)
            cells.append(f'<td class="{cls.strip()}">{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    figures = []
    for r in report.layers:
        uri = layer_figure(r)
        if uri is not None:
            figures.append(f'<div class="layer" id="layer-{esc(r.name)}">'
                           f'<img alt="{esc(r.name)}" src="{uri}"></div>')
        else:
            figures.append(f'<div class="layer" id="layer-{esc(r.name)}"><b>{esc(r.name)}</b>: '
                           "no weight and no quantized input</div>")
    q_bits = sum(r.size_bits for r in report.layers)
    f_bits = sum(r.float_bits for r in report.layers)
    out_sqnr = report.output_sqnr
    out = "-" if out_sqnr is None else ("inf" if math.isinf(out_sqnr) else f"{out_sqnr:.2f}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{STYLE}</style><script>{SCRIPT}</script></head>
<body>
<h1>{esc(title)}</h1>
<p>{len(report.layers)} quantized layers; model output SQNR <b>{out} dB</b>; quantized layers
{q_bits / 8e3:.1f} kB ({q_bits / max(f_bits, 1):.3f}x float); {report.batches} batch(es),
analysed in {report.seconds:.1f} s.
<i>SQNR alone</i>: the layer's output with only that layer quantized (its input float);
<i>cumul.</i>: with every layer quantized. Cells under {LOW_SQNR_DB:.0f} dB are shaded.
Click a header to sort.</p>
<h2>SQNR per layer</h2>
<img alt="SQNR per layer" src="{sqnr_chart(report)}">
<h2>Layers</h2>
<table id="layers"><thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
<h2>Ranges and histograms</h2>
<p>Left: each output channel's weight range (blue bars) inside the grid's range (red band);
channels far wider than the rest are what cross-layer equalization evens out (channels more than
{OUTLIER_SPREAD:.0f}x wider than the rest run off the axis, marked ▲/▼, the widest named above).
Right: the layer's input values (a sample; log scale) with the input quantizer's clip range
dashed.</p>
{chr(10).join(figures)}
</body></html>
"""
