"""The analysis page's charts stay readable on real model sizes: short axis labels, outlier
channels cut off and named instead of flattening the others, per-type axis labels."""

from __future__ import annotations

import base64
import io

import pytest

from lowbit.analysis.html import OUTLIER_SPREAD, _weight_axes, chart_labels, sqnr_chart
from lowbit.analysis.report import AnalysisReport, LayerAnalysis

pytest.importorskip("matplotlib")


def test_chart_labels_number_the_layers_and_drop_the_shared_prefix() -> None:
    names = ["model.embeddings.word_embeddings", "model.encoder.layer.0.attention.self.query",
             "model.encoder.layer.0.output.dense"]
    assert chart_labels(names) == ["0 embeddings.word_embeddings",
                                   "1 encoder.layer.0.attention.self.query",
                                   "2 encoder.layer.0.output.dense"]
    # a name is never emptied: the shared prefix stops before each name's last part
    assert chart_labels(["fc", "fc"]) == ["0 fc", "1 fc"]
    assert chart_labels(["a.b", "a.c"]) == ["0 b", "1 c"]


def test_long_labels_are_shortened_in_the_middle() -> None:
    long = "block." + "x" * 80 + ".proj"
    (label,) = chart_labels([long])
    assert label.startswith("0 block.xx") and label.endswith("x.proj") and "…" in label
    assert len(label) <= len("0 ") + 44


def _axes():  # noqa: ANN202 - a matplotlib Axes
    from matplotlib.figure import Figure

    return Figure().add_subplot()


def _row(widths: list[float], type_: str = "Linear") -> LayerAnalysis:
    return LayerAnalysis(name="model.fc", type=type_, order=0, weight="int8 per_channel",
                         input="-", weight_channel_min=[-w for w in widths],
                         weight_channel_max=list(widths),
                         weight_clip_lo=[-w for w in widths], weight_clip_hi=list(widths))


def test_an_outlier_channel_is_cut_off_and_named_not_squashing_the_rest() -> None:
    widths = [0.5 + 0.01 * (i % 7) for i in range(384)]
    widths[99] = 68.0  # one smoothed outlier channel, as on MiniLM's FFN down-projection
    ax = _axes()
    _weight_axes(ax, _row(widths))
    low, high = ax.get_ylim()
    assert high < 1.0 and low > -1.0  # the 383 others fill the axis
    assert "1 channel(s) cut off, widest #99 ±68" in ax.get_title()
    assert ax.get_xlabel() == "output channel"


def test_even_channels_keep_the_full_range() -> None:
    widths = [1.0 + 0.1 * (i % 5) for i in range(64)]
    widths[3] = OUTLIER_SPREAD * 1.4 * 0.9  # wide, but not past the cut-off
    ax = _axes()
    _weight_axes(ax, _row(widths, type_="Embedding"))
    assert ax.get_ylim()[1] >= max(widths)
    assert "cut off" not in ax.get_title()
    assert ax.get_xlabel() == "row"


def test_sqnr_chart_grows_with_its_labels() -> None:
    from PIL import Image

    def height(name_len: int) -> int:
        rows = [LayerAnalysis(name="n" * name_len + str(i), type="Linear", order=i,
                              weight="int8", input="uint8", sqnr_isolated=30.0)
                for i in range(10)]
        uri = sqnr_chart(AnalysisReport(layers=rows, output_sqnr=20.0, batches=1,
                                        seconds=0.1))
        png = base64.b64decode(uri.split(",", 1)[1])
        return Image.open(io.BytesIO(png)).size[1]

    assert height(40) > height(4)
