"""``lowbit.analyze``: per-layer SQNRs against a slow reference (one model per layer), the HTML
report is complete without a browser, clear errors, the model is left as it was, the CLI."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.analysis.analyze import RoundedWeightsWarning
from lowbit.cli import main
from lowbit.numerics import IntRange, fake_quantize, qparams_from_range


def tiny_net() -> nn.Module:
    """Conv → Tanh → Conv → Tanh → Linear (no ReLU, so no layer absorbs its activation and
    float modules and quant layers have the same outputs)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 8, 3),
                         nn.Tanh(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()


BATCHES = [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(3)]
NAMES = ["0", "2", "5"]


def w4a8(names: list[str] | None = None) -> QuantConfig:
    return QuantConfig(rules=[LayerRule(
        types=["Conv2d", "Linear"], names=names or [],
        weight=QuantSpec(bits=4, symmetric=True, granularity="per_channel"),
        input=QuantSpec(bits=8, symmetric=False, observer="minmax"))])


def calibrated(model: nn.Module, config: QuantConfig) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers left in float are named in a warning
        qm = lowbit.quantize(model, config)
    lowbit.calibrate(qm, BATCHES, progress=False)
    return qm.eval()


def outputs(model: nn.Module, names: list[str]) -> list[dict[str, torch.Tensor]]:
    """Each named submodule's output, per batch."""
    got: list[dict[str, torch.Tensor]] = []
    modules = dict(model.named_modules())
    for x in BATCHES:
        seen: dict[str, torch.Tensor] = {}
        hooks = [modules[n].register_forward_hook(
            lambda m, a, y, n=n, seen=seen: seen.__setitem__(n, y.detach())) for n in names]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        got.append(seen)
    return got


def sqnr(refs: list[torch.Tensor], tests: list[torch.Tensor]) -> float:
    signal = sum(float(r.double().pow(2).sum()) for r in refs)
    noise = sum(float((r.double() - t.double()).pow(2).sum()) for r, t in zip(refs, tests))
    return 10 * math.log10(signal / noise)


@pytest.fixture(scope="module")
def report() -> lowbit.AnalysisReport:
    return lowbit.analyze(calibrated(tiny_net(), w4a8()), BATCHES)


def partly_quantized(model: nn.Module, full: nn.Module, names: list[str]) -> nn.Module:
    """``model`` with only ``names`` quantized, each with the qparams ``full`` calibrated
    (calibration runs with weights quantized, so a model quantized elsewhere would see other
    activations and choose other ranges)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(model, w4a8(names))
    layers = dict(full.named_modules())
    for name, module in qm.named_modules():
        if name in names:
            module.load_state_dict(layers[name].state_dict())
    return qm.eval()


def test_sqnrs_match_a_slow_reference_built_one_model_per_layer(report):
    model = tiny_net()
    full = calibrated(model, w4a8())
    ref = outputs(model, NAMES)
    for i, name in enumerate(NAMES):
        alone = outputs(partly_quantized(model, full, [name]), [name])  # only this layer
        upto = outputs(partly_quantized(model, full, NAMES[:i + 1]), [name])  # all up to it
        row = report.layer(name)
        assert row.sqnr_isolated == pytest.approx(
            sqnr([r[name] for r in ref], [a[name] for a in alone]), abs=1e-6)
        assert row.sqnr_cumulative == pytest.approx(
            sqnr([r[name] for r in ref], [u[name] for u in upto]), abs=1e-6)
        # weight SQNR from the numerics directly: symmetric int4 per output channel
        w = dict(model.named_modules())[name].weight.detach()
        rows = w.reshape(w.shape[0], -1)
        grid = IntRange(4, True)
        scale, zp = qparams_from_range(rows.amin(1), rows.amax(1), grid, symmetric=True)
        wq = fake_quantize(w, scale, zp, grid, 0)
        assert row.weight_sqnr == pytest.approx(sqnr([w], [wq]), abs=1e-6)
    # The first layer's input is the model input: its quantized SQNR and min/max observer's
    # range (nothing clipped) are known without the tool.
    x = torch.cat(BATCHES)
    scale, zp = qparams_from_range(x.min(), x.max(), IntRange(8, False), symmetric=False)
    first = report.layer("0")
    assert first.input_sqnr == pytest.approx(
        sqnr(BATCHES, [fake_quantize(b, scale, zp, IntRange(8, False), None) for b in BATCHES]),
        abs=1e-6)
    assert first.clipped == 0.0
    assert [r.name for r in report.layers] == NAMES  # model order
    # the model output is the last layer's output
    assert report.output_sqnr == pytest.approx(report.layer("5").sqnr_cumulative)
    # errors build up: the last layer alone is better than the whole chain
    assert report.layer("5").sqnr_cumulative < report.layer("5").sqnr_isolated


def test_clipped_share_counts_values_the_input_range_saturates():
    model = tiny_net()
    qm = calibrated(model, w4a8())
    wide = [b * 4 for b in BATCHES]  # 4x wider than the calibrated range
    row = lowbit.analyze(qm, wide).layer("0")
    x = torch.cat(wide)
    q = qm[0].input_quant.qparams()
    lo = float(q.scale * (0 - q.zero_point)) - float(q.scale) / 2
    hi = float(q.scale * (255 - q.zero_point)) + float(q.scale) / 2
    expected = float(((x < lo) | (x > hi)).float().mean())
    assert expected > 0.3
    assert row.clipped == pytest.approx(expected)
    assert row.input_clip == pytest.approx((lo + float(q.scale) / 2, hi - float(q.scale) / 2))


def test_size_in_bits_counts_codes_scales_and_bias(report):
    row = report.layer("0")  # Conv2d(1, 6, 3): 54 int4 codes, 6 scales, 6 biases
    assert row.size_bits == 54 * 4 + 6 * 32 + 6 * 32
    assert row.float_bits == (54 + 6) * 32


def test_report_html_is_complete_without_a_browser(report, tmp_path):
    import matplotlib.image as mpimg

    path = report.to_html(tmp_path / "a.html", title="tiny <net>")
    page = path.read_text()
    assert "tiny &lt;net&gt;" in page
    assert "http://" not in page and "https://" not in page  # nothing from the network
    assert re.search(r"<script[^>]*\bsrc=", page) is None
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 1 + len(report.layers)  # the SQNR chart and one figure per layer
    for uri in uris:
        image = mpimg.imread(io.BytesIO(base64.b64decode(uri)), format="png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    body = page.split('<table id="layers">')[1].split("</table>")[0]
    assert body.count("<tr>") == 1 + len(report.layers)
    for row in report.layers:
        assert f'href="#layer-{row.name}"' in body and f'id="layer-{row.name}"' in page
    assert "function sortTable" in page


def test_table_and_json_hold_every_layer(report, tmp_path):
    text = report.table()
    for row in report.layers:
        assert re.search(rf"^\s*{row.order}\s+{re.escape(row.name)}\s", text, re.M)
    ranked = report.ranked("sqnr_cumulative")
    assert [r.sqnr_cumulative for r in ranked] == sorted(r.sqnr_cumulative for r in ranked)
    assert report.table(sort="sqnr_cumulative").splitlines()[2].split()[1] == ranked[0].name
    data = json.loads(report.to_json(tmp_path / "a.json").read_text())
    assert [r["name"] for r in data["layers"]] == NAMES
    assert data["layers"][0]["sqnr_isolated"] == pytest.approx(report.layers[0].sqnr_isolated)
    with pytest.raises(ValueError, match="`key` must be one of"):
        report.ranked("speed")


def test_never_calibrated_model_is_a_clear_error():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(tiny_net(), w4a8())
    with pytest.raises(ValueError, match="never calibrated.*lowbit.calibrate"):
        lowbit.analyze(qm, BATCHES)
    with pytest.raises(ValueError, match="no lowbit quant layers"):
        lowbit.analyze(tiny_net(), BATCHES)


def test_weights_calibration_rounded_are_named_in_a_warning():
    """Scale tuning (like GPTQ) writes the rounded weight back: the float pass runs it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(tiny_net(), w4a8())
        lowbit.calibrate(qm, BATCHES, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RoundedWeightsWarning)
        lowbit.analyze(qm, BATCHES)  # round to nearest: the float weights are still there
    lowbit.tune_scales(qm, tiny_net(), BATCHES, steps=10, lr=1e-2, held_out=0, progress=False)
    with pytest.warns(RoundedWeightsWarning, match=r"3 layer\(s\) .*: 0, 2, 5; .*'rtn'"):
        lowbit.analyze(qm, BATCHES)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"qm": "model"}, TypeError, "`qm` must be a torch.nn.Module, got str"),
    ({"batches": BATCHES[0]}, TypeError, r"wrap a single tensor in a list"),
    ({"batches": 3}, TypeError, "`batches` must be an iterable of batches, got int"),
    ({"batches": []}, ValueError, "`batches` is empty"),
    ({"forward": 1}, TypeError, "`forward` must be callable, got int"),
    ({"max_batches": 0}, ValueError, "`max_batches` must be a positive int or None, got 0"),
    ({"max_batches": True}, ValueError, "`max_batches` must be a positive int"),
    ({"seed": 1.5}, TypeError, "`seed` must be an int, got float 1.5"),
], ids=["qm", "tensor", "int", "empty", "forward", "max_batches", "bool", "seed"])
def test_argument_errors(kwargs, error, match):
    args = {"qm": calibrated(tiny_net(), w4a8()), "batches": BATCHES} | kwargs
    with pytest.raises(error, match=match):
        lowbit.analyze(args.pop("qm"), args.pop("batches"), **args)


def test_arguments_are_honoured_and_the_model_is_left_as_it_was():
    qm = calibrated(tiny_net(), w4a8())
    qm.train()
    before = {n: [id(q) for q in m.quantizers()] for n, m in qm.named_modules()
              if isinstance(m, lowbit.nn.QuantLayer)}
    with torch.no_grad():
        y0 = qm.eval()(BATCHES[0])
    qm.train()
    one = lowbit.analyze(qm, BATCHES, max_batches=1)
    assert one.batches == 1 and one.layer("0").calls == 1
    assert qm.training  # flags restored
    after = {n: [id(q) for q in m.quantizers()] for n, m in qm.named_modules()
             if isinstance(m, lowbit.nn.QuantLayer)}
    assert after == before
    with torch.no_grad():
        assert torch.equal(qm.eval()(BATCHES[0]), y0)
    seen = []
    two = lowbit.analyze(qm, [(b,) for b in BATCHES],
                         forward=lambda m, b: seen.append(1) or m(b[0]))
    assert len(seen) == 2 * len(BATCHES)  # a float pass and a quantized pass per batch
    assert two.layer("0").sqnr_isolated == pytest.approx(
        lowbit.analyze(qm, BATCHES).layer("0").sqnr_isolated)
    a, b = (lowbit.analyze(qm, BATCHES, seed=s).layer("2").hist_counts for s in (0, 1))
    assert a != b and sum(a) == sum(b)  # the seed picks the histogram's sample


def test_importing_lowbit_does_not_import_matplotlib():
    code = "import sys, lowbit; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_transformer_layers_and_embeddings():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=128,
                                     max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for length in (5, 11, 7):
        ids = torch.randint(1, 120, (4, length), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8-transformer"))
    lowbit.calibrate(qm, batches, progress=False)
    report = lowbit.analyze(qm, batches)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert {r.name for r in report.layers} == set(linears) | {
        "embeddings.word_embeddings", "embeddings.position_embeddings",
        "embeddings.token_type_embeddings"}
    q = report.layer("encoder.layer.0.attention.self.query")
    k = report.layer("encoder.layer.0.attention.self.key")
    assert q.order < report.layer("encoder.layer.1.attention.self.query").order
    assert q.input_sqnr == pytest.approx(k.input_sqnr)  # one shared, smoothed input
    emb = report.layer("embeddings.word_embeddings")
    assert emb.input == "-" and emb.input_sqnr is None and emb.weight_sqnr > 30
    assert all(r.sqnr_cumulative is not None and r.sqnr_cumulative > 10 for r in report.layers)
    assert math.isfinite(report.output_sqnr)


# ------------------------------------------------------------------------------------- CLI

MODEL_SOURCE = '''
from torch import nn


def make():
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 8 * 8, 5))
'''


def test_cli_analyze_prints_the_table_and_writes_html_and_json(tmp_path, capsys):
    source = tmp_path / "lowbit_analysis_cli_model.py"
    source.write_text(MODEL_SOURCE)
    data = tmp_path / "x.npy"
    np.save(data, torch.cat(BATCHES).numpy())
    html, js = tmp_path / "r.html", tmp_path / "r.json"
    code = main(["analyze", "--model", f"{source}:make", "--data", str(data), "--preset", "w4a8",
                 "--batch-size", "8", "--html", str(html), "--json", str(js),
                 "--sort", "sqnr_cumulative"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^\s*\d+\s+0\s+Conv2d\s+int4 per_channel", out, re.M)
    assert re.search(r"^\s*\d+\s+3\s+Linear", out, re.M)
    assert json.loads(js.read_text())["batches"] == 3
    assert html.read_text().count("data:image/png;base64,") == 3
    code = main(["analyze", "--model", f"{source}:make", "--data", str(data),
                 "--max-batches", "1"])
    assert code == 0 and "1 batch(es)" in capsys.readouterr().out
    assert main(["analyze", "--model", f"{source}:make", "--data",
                 str(tmp_path / "missing.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
