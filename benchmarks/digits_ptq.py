"""How good is lowbit's post-training quantization on the digits CNN, per observer, against
torch.ao and ONNX Runtime's own quantizer?

For each training seed, the script trains ``DigitsCNN`` on scikit-learn's digits (20 epochs),
then quantizes the same trained model three ways and measures accuracy on the 360 test images
and the SQNR of the logits against the FP32 torch logits:

* lowbit, each observer (minmax, ema, percentile, kl, mse) at W8A8 and W4A8: per-channel
  symmetric weights, asymmetric uint8 inputs, calibrated on the first 512 training images in
  batches of 64, converted, exported to integer ONNX (dynamic batch) and run in ONNX Runtime;
  also the export report's parity (share of identical activation codes, largest code gap);
* torch.ao eager static PTQ: ``x86`` qconfig (int8 per-channel weights, run with torch's
  quantized kernels) and a fake-quant W4A8 (4-bit per-channel weights, 8-bit activations);
* ``onnxruntime.quantization.quantize_static`` on the FP32 ONNX file: QDQ, per-channel QInt8
  weights, QUInt8 activations, MinMax / Entropy / Percentile calibration, plus MinMax with
  ``reduce_range=True`` (7-bit weights, ORT's workaround for CPUs without VNNI).

Run from the repository root::

    python benchmarks/digits_ptq.py                  # 3 seeds if they fit in the time budget
    python benchmarks/digits_ptq.py --seeds 0 --budget-s 600

It prints a table (mean and min..max across seeds) and writes
``benchmarks/results/digits_ptq.json``. Seeds are run in order; a seed is skipped when the
time the previous ones took says it would overrun ``--budget-s`` (the JSON says so).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.demo import (
    OBSERVERS,
    Digits,
    accuracy,
    export_float,
    load_digits,
    ort_logits,
    sqnr_db,
    train_digits,
)

SEEDS = (0, 1, 2)
EPOCHS = 20
CALIB_SIZE = 512
CALIB_BATCH = 64
RESULTS = Path(__file__).resolve().parent / "results" / "digits_ptq.json"
DYNAMIC_BATCH = ({0: torch.export.Dim("batch")},)
# DigitsCNN is an nn.Sequential: (conv, bn, relu) x 2, maxpool, (conv, bn, relu), pool, flatten, fc
CONV_BN_RELU = [["0", "1", "2"], ["3", "4", "5"], ["7", "8", "9"]]

Row = dict[str, object]

NOTES = {  # what the reference rows are, so that their figures are read right
    "torch.ao W8A8 x86 (int)": "get_default_qconfig('x86'): HistogramObserver activations with "
    "reduce_range=True (7-bit, quint8 0..127), per-channel symmetric int8 weights; run with "
    "torch's quantized x86 kernels; logits are dequantized from an 8-bit output",
    "torch.ao W4A8 (fake-quant)": "fake quant in eval mode: per-channel symmetric weights on "
    "-8..7 (scale amax/7.5), HistogramObserver activations on 0..255",
    "ORT QDQ": "quantize_static on the FP32 export after quant_pre_process; QDQ, per_channel, "
    "QUInt8 activations, QInt8 weights; run with ORT's CPU integer kernels (u8s8), which "
    "saturate on AVX2 CPUs without VNNI",
    "ORT QDQ Entropy": "quantize_static cannot set the entropy calibrator's bins; its defaults "
    "(num_bins=128 = num_quantized_bins=128) leave one candidate threshold, the full range, so "
    "the scales equal MinMax's",
    "ORT QDQ MinMax reduce_range": "7-bit weights, ORT's documented workaround for u8s8 "
    "saturation on CPUs without VNNI",
    "lowbit": "8-bit weights stored as uint8 on CPUs without VNNI (export_onnx weight_dtype="
    "'auto'; exact u8u8 kernels); 4-bit weights stay int8",
}


# --------------------------------------------------------------------------------------------
# plumbing


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters and quantizers: warnings, log records and stdout/stderr chatter."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "onnxruntime", "root", "")]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def score(name: str, logits: torch.Tensor | np.ndarray, data: Digits, ref: torch.Tensor,
          **extra: object) -> Row:
    return {"variant": name, "accuracy": accuracy(logits, data.y_test),
            "sqnr_db": sqnr_db(ref, logits), **extra}


def calib_batches(data: Digits) -> list[torch.Tensor]:
    return list(data.x_train[:CALIB_SIZE].split(CALIB_BATCH))


# --------------------------------------------------------------------------------------------
# lowbit


def lowbit_config(weight_bits: int, observer: str) -> QuantConfig:
    return QuantConfig(rules=[LayerRule(
        types=["Conv2d", "Linear"],
        weight=QuantSpec(bits=weight_bits, symmetric=True, granularity="per_channel"),
        input=QuantSpec(bits=8, symmetric=False, observer=observer))])


def lowbit_row(model: nn.Module, data: Digits, ref: torch.Tensor, weight_bits: int,
               observer: str, workdir: Path) -> Row:
    qm = lowbit.quantize(model, lowbit_config(weight_bits, observer))
    lowbit.calibrate(qm, calib_batches(data), progress=False)
    dm = lowbit.convert(qm)
    path = workdir / f"lowbit_w{weight_bits}a8_{observer}.onnx"
    with quiet():
        report = lowbit.export_onnx(dm, path, (data.x_test[:CALIB_BATCH],),
                                    dynamic_shapes=DYNAMIC_BATCH, verify_inputs=[(data.x_test,)])
    logits = ort_logits(path, data.x_test.numpy())
    p = report.parity
    return score(f"lowbit W{weight_bits}A8 {observer}", logits, data, ref,
                 codes_identical=p.codes_identical, codes_max_diff=p.codes_max_diff,
                 output_max_lsb=p.output_max_lsb, weight_storage=report.weight_storage)


def lowbit_rows(model: nn.Module, data: Digits, ref: torch.Tensor, workdir: Path) -> list[Row]:
    return [lowbit_row(model, data, ref, bits, obs, workdir)
            for bits in (8, 4) for obs in OBSERVERS]


# --------------------------------------------------------------------------------------------
# torch.ao eager static PTQ


def ao_prepared_copy(model: nn.Module) -> nn.Sequential:
    """QuantStub → model with conv-bn-relu fused (BN folded, eval mode) → DeQuantStub."""
    from torch.ao.quantization import DeQuantStub, QuantStub, fuse_modules

    fused = fuse_modules(copy.deepcopy(model).eval(), CONV_BN_RELU)
    return nn.Sequential(QuantStub(), fused, DeQuantStub()).eval()


@torch.no_grad()
def torch_ao_w8a8(model: nn.Module, data: Digits, ref: torch.Tensor) -> Row:
    """The ``x86`` default qconfig, converted and run with torch's int8 kernels."""
    from torch.ao import quantization as tq

    torch.backends.quantized.engine = "x86"
    m = ao_prepared_copy(model)
    m.qconfig = tq.get_default_qconfig("x86")
    with quiet():
        tq.prepare(m, inplace=True)
        for x in calib_batches(data):
            m(x)
        tq.convert(m, inplace=True)
    return score("torch.ao W8A8 x86 (int)", m(data.x_test), data, ref)


def w4a8_qconfig():  # noqa: ANN201
    from torch.ao import quantization as tq

    activation = tq.FakeQuantize.with_args(
        observer=tq.HistogramObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
        qscheme=torch.per_tensor_affine)
    weight = tq.FakeQuantize.with_args(
        observer=tq.PerChannelMinMaxObserver, quant_min=-8, quant_max=7, dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric, ch_axis=0)
    return tq.QConfig(activation=activation, weight=weight)


@torch.no_grad()
def torch_ao_w4a8_fakequant(model: nn.Module, data: Digits, ref: torch.Tensor) -> Row:
    """4-bit per-channel weights, 8-bit histogram-calibrated activations, as fake quant.

    The QAT modules are only a vehicle for weight fake-quant: observers run with fake quant
    off over the calibration batches, then the ranges are frozen and fake quant is switched on
    (eval mode throughout; BN is already folded).
    """

    m = ao_prepared_copy(model)
    m.qconfig = w4a8_qconfig()
    ao_fake_quant_calibrate(m, calib_batches(data))
    return score("torch.ao W4A8 (fake-quant)", m(data.x_test), data, ref)


def ao_fake_quant_calibrate(m: nn.Module, batches: list[torch.Tensor]) -> None:
    """torch.ao's QAT modules (``m.qconfig`` set) as post-training fake quant: observers run
    with fake quant off over ``batches``, then ranges freeze and fake quant turns on (eval)."""
    from torch.ao import quantization as tq

    with quiet():
        tq.prepare_qat(m.train(), inplace=True)
    m.eval()
    m.apply(tq.disable_fake_quant)
    m.apply(tq.enable_observer)
    for x in batches:
        m(x)
    m.apply(tq.disable_observer)
    m.apply(tq.enable_fake_quant)


# --------------------------------------------------------------------------------------------
# ONNX Runtime quantize_static


def ort_reader(data: Digits, input_name: str):  # noqa: ANN201
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """The same 512 calibration images, in equal batches of 64."""

        def __init__(self) -> None:
            self.batches = iter([{input_name: x.numpy()} for x in calib_batches(data)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    return Reader()


ORT_VARIANTS = (  # (row name, calibration method, reduce_range)
    ("ORT QDQ MinMax", "MinMax", False),
    ("ORT QDQ Entropy", "Entropy", False),
    ("ORT QDQ Percentile", "Percentile", False),
    ("ORT QDQ MinMax reduce_range", "MinMax", True),
)


def ort_rows(model: nn.Module, data: Digits, ref: torch.Tensor, workdir: Path) -> list[Row]:
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    fp32 = workdir / "fp32.onnx"
    pre = workdir / "fp32_pre.onnx"
    with quiet():
        export_float(model, fp32, data.x_test[:CALIB_BATCH])
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    rows = [score("FP32 ONNX (ORT)", ort_logits(fp32, data.x_test.numpy()), data, ref)]
    input_name = onnx.load(str(pre)).graph.input[0].name
    for name, method, reduce_range in ORT_VARIANTS:
        out = workdir / f"ort_{method}_{int(reduce_range)}.onnx"
        with quiet():
            quantize_static(str(pre), str(out), ort_reader(data, input_name),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, method))
        rows.append(score(name, ort_logits(out, data.x_test.numpy()), data, ref))
    return rows


# --------------------------------------------------------------------------------------------
# one seed, all seeds, summary


def run_seed(seed: int, data: Digits, say: Callable[[str], None]) -> list[Row]:
    start = time.perf_counter()
    with torch_threads(1):  # a 25k-parameter CNN trains several times faster on one thread
        model = train_digits(data, epochs=EPOCHS, seed=seed)
    with torch.no_grad():
        ref = model(data.x_test)
    say(f"seed {seed}: trained in {time.perf_counter() - start:.1f} s, "
        f"FP32 accuracy {100 * accuracy(ref, data.y_test):.2f}%")
    rows = [{"variant": "FP32 torch", "accuracy": accuracy(ref, data.y_test),
             "sqnr_db": None}]  # the reference itself
    with tempfile.TemporaryDirectory(prefix="digits-ptq-") as tmp:
        workdir = Path(tmp)
        steps = [("lowbit", lambda: lowbit_rows(model, data, ref, workdir)),
                 ("torch.ao", lambda: [torch_ao_w8a8(model, data, ref),
                                       torch_ao_w4a8_fakequant(model, data, ref)]),
                 ("onnxruntime", lambda: ort_rows(model, data, ref, workdir))]
        for label, step in steps:
            t = time.perf_counter()
            rows += step()
            say(f"  {label:<12} {time.perf_counter() - t:5.1f} s")
    for row in rows:
        row["seed"] = seed
    return rows


def summarize(per_seed: list[list[Row]]) -> list[Row]:
    """Mean, min and max across seeds of each metric, per variant (in first-seed order)."""
    out = []
    for i, first in enumerate(per_seed[0]):
        runs = [rows[i] for rows in per_seed]
        row: Row = {"variant": first["variant"], "seeds": [r["seed"] for r in runs]}
        for key in ("accuracy", "sqnr_db", "codes_identical", "codes_max_diff", "output_max_lsb"):
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                row[key] = {"mean": float(np.mean(values)), "min": float(min(values)),
                            "max": float(max(values))}
        if "weight_storage" in first:
            row["weight_storage"] = first["weight_storage"]
        out.append(row)
    return out


def _stat(row: Row, key: str, scale: float = 1.0, fmt: str = ".2f") -> str:
    s = row.get(key)
    if s is None:
        return "-"
    mean = f"{scale * s['mean']:{fmt}}"
    if s["min"] == s["max"]:
        return mean
    return f"{mean} ({scale * s['min']:{fmt}}..{scale * s['max']:{fmt}})"


def format_table(summary: list[Row]) -> str:
    head = f"{'variant':<30} {'accuracy %':<22} {'SQNR dB':<20} {'codes identical %':<24} max diff"
    lines = [head, "-" * len(head)]
    for r in summary:
        gap = r.get("codes_max_diff")
        lines.append(f"{r['variant']:<30} {_stat(r, 'accuracy', 100):<22} "
                     f"{_stat(r, 'sqnr_db', 1, '.1f'):<20} "
                     f"{_stat(r, 'codes_identical', 100):<24} "
                     f"{'-' if gap is None else int(gap['max'])}")
    return "\n".join(lines)


def machine() -> dict[str, object]:
    import onnxruntime

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    return {"cpu": model, "cores": os.cpu_count(), "avx2": "avx2" in flags,
            "vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "lowbit": lowbit.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="skip further seeds when the next one would overrun this")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    data = load_digits()
    per_seed: list[list[Row]] = []
    skipped: list[int] = []
    for seed in args.seeds:
        elapsed = time.perf_counter() - start
        if per_seed and elapsed + elapsed / len(per_seed) > args.budget_s:
            skipped.append(seed)
            continue
        per_seed.append(run_seed(seed, data, say))
    total = time.perf_counter() - start

    summary = summarize(per_seed)
    seeds_run = [rows[0]["seed"] for rows in per_seed]
    note = (f"{len(seeds_run)} seed(s) run; seeds {skipped} skipped to stay within "
            f"{args.budget_s:.0f} s" if skipped else f"all {len(seeds_run)} seeds run")
    result = {
        "question": __doc__.split("\n\n")[0].replace("\n", " "),
        "command": " ".join(["python benchmarks/digits_ptq.py", *(argv or sys.argv[1:])]),
        "seeds_run": seeds_run, "seeds_skipped": skipped, "note": note,
        "wall_s": round(total, 1), "machine": machine(),
        "setup": {"epochs": EPOCHS, "test_images": len(data.y_test),
                  "calibration": f"first {CALIB_SIZE} training images, batches of {CALIB_BATCH}",
                  "sqnr_reference": "FP32 torch logits on the test set",
                  "summary_stats": "mean, min, max over seeds (SQNR: mean of the dB values)"},
        "notes": NOTES,
        "summary": summary,
        "per_seed": per_seed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")

    print(f"digits CNN PTQ, {len(data.y_test)} test images; mean (min..max) over seeds "
          f"{seeds_run}; SQNR of logits vs FP32 torch")
    print(format_table(summary))
    print(f"\n{note}; {total:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
