"""Does accuracy come back without training? Cross-layer equalization (CLE), bias correction,
AdaRound and scale tuning on the digits CNN at W4A8 and on a MobileNetV2-style net at
per-tensor W8A8.

For each training seed (20 epochs on scikit-learn's digits), every variant is quantized from
the same trained model, calibrated on the first 512 training images (batches of 64),
converted, exported to integer ONNX and run in ONNX Runtime on the 360 test images; the table
gives ONNX Runtime accuracy and the SQNR of its logits against the FP32 torch logits.

* digits CNN (``lowbit.demo.DigitsCNN``), W4A8: 4-bit per-channel symmetric weights, uint8
  min-max inputs; round to nearest, ``equalize`` (CLE + high-bias absorption), bias correction
  (empirical; analytical after CLE), bias correction then ``tune_scales`` (defaults: 300
  steps on the calibration batches, the last fifth held out), AdaRound (500 iterations a
  layer, batch 256), and torch.ao's fake-quant W4A8 (per-channel weights on -8..7, histogram
  activations);
* ``MobileNetish`` (conv stem, three inverted-residual-style blocks of 1x1 expand → 3x3
  depthwise → 1x1 project without skip connections, ReLU as DFQ used, a 1x1 head), W8A8 with
  per-channel weights (the reference) and per-tensor weights: round to nearest, CLE, CLE +
  bias correction (then ``tune_scales``), and torch.ao eager fake-quant per-tensor W8A8
  (min-max weights, histogram activations).

Run from the repository root::

    python benchmarks/recovery.py                  # 3 seeds, one after the other
    python benchmarks/recovery.py --seeds 0 --threads 1 --out /tmp/r0.json   # one seed each,
    python benchmarks/recovery.py --merge /tmp/r0.json /tmp/r1.json ...      # then combined

Prints a table (mean and min..max across seeds) and writes ``benchmarks/results/recovery.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits_ptq import (  # noqa: E402
    ao_fake_quant_calibrate,
    calib_batches,
    format_table,
    machine,
    quiet,
    score,
    summarize,
    torch_ao_w4a8_fakequant,
)

import lowbit  # noqa: E402
from lowbit import LayerRule, QuantConfig, QuantSpec  # noqa: E402
from lowbit.demo import (  # noqa: E402
    Digits,
    DigitsCNN,
    export_float,
    load_digits,
    ort_logits,
    train_digits,
)
from lowbit.fuse import find_chains  # noqa: E402

SEEDS = (0, 1, 2)
EPOCHS = 20
RESULTS = Path(__file__).resolve().parent / "results" / "recovery.json"
DYNAMIC_BATCH = ({0: torch.export.Dim("batch")},)

Row = dict[str, object]


class MobileNetish(nn.Sequential):
    """Depthwise-separable blocks as in MobileNetV2 (no skip connections), ~20k parameters."""

    def __init__(self) -> None:
        def block(cin: int, hidden: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
                    nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                    nn.BatchNorm2d(hidden), nn.ReLU(),
                    nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]

        super().__init__(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            *block(16, 64, 24, 1), *block(24, 96, 32, 2), *block(32, 128, 48, 1),
            nn.Conv2d(48, 96, 1, bias=False), nn.BatchNorm2d(96), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10))


def train(factory: Callable[[], nn.Module], data: Digits, seed: int) -> nn.Module:
    """Adam, batch 64, cosine schedule: ``lowbit.demo.train_digits`` on ``factory``'s net."""
    return train_digits(data, epochs=EPOCHS, seed=seed, model=factory)


def config(bits: int, granularity: str, algorithm: str = "rtn") -> QuantConfig:
    return QuantConfig(rules=[LayerRule(
        types=["Conv2d", "Linear"],
        weight=QuantSpec(bits=bits, symmetric=True, granularity=granularity, algorithm=algorithm),
        input=QuantSpec(bits=8, symmetric=False))])


def lowbit_row(name: str, model: nn.Module, cfg: QuantConfig, data: Digits, ref: torch.Tensor,
               workdir: Path, *, cle: bool = False, bias_correction: str | None = None,
               tune: bool = False) -> Row:
    start = time.perf_counter()
    with quiet():
        m = lowbit.equalize(model) if cle else model
        qm = lowbit.quantize(m, cfg)
        lowbit.calibrate(qm, calib_batches(data), progress=False,
                         bias_correction=bias_correction)
        if tune:
            lowbit.tune_scales(qm, model, calib_batches(data), progress=False)
        seconds = time.perf_counter() - start
        dm = lowbit.convert(qm)
        path = workdir / "model.onnx"
        report = lowbit.export_onnx(dm, path, (data.x_test[:64],), dynamic_shapes=DYNAMIC_BATCH,
                                    verify_inputs=[(data.x_test,)])
    logits = ort_logits(path, data.x_test.numpy())
    return score(name, logits, data, ref, codes_identical=report.parity.codes_identical,
                 codes_max_diff=report.parity.codes_max_diff,
                 output_max_lsb=report.parity.output_max_lsb, calibrate_s=round(seconds, 1))


@torch.no_grad()
def torch_ao_per_tensor_w8a8(model: nn.Module, data: Digits, ref: torch.Tensor) -> Row:
    """torch.ao eager fake quant: per-tensor symmetric int8 weights (min-max), histogram
    uint8 activations; BN folded by ``fuse_modules``; calibrated like lowbit."""
    from torch.ao import quantization as tq

    m = copy.deepcopy(model).eval()
    m = tq.fuse_modules(m, [list(c) for c in find_chains(m)])
    m = nn.Sequential(tq.QuantStub(), m, tq.DeQuantStub()).eval()
    m.qconfig = tq.QConfig(
        activation=tq.FakeQuantize.with_args(observer=tq.HistogramObserver, quant_min=0,
                                             quant_max=255, dtype=torch.quint8,
                                             qscheme=torch.per_tensor_affine),
        weight=tq.FakeQuantize.with_args(observer=tq.MinMaxObserver, quant_min=-128,
                                         quant_max=127, dtype=torch.qint8,
                                         qscheme=torch.per_tensor_symmetric))
    ao_fake_quant_calibrate(m, calib_batches(data))
    return score("torch.ao W8A8 per-tensor (fake-quant)", m(data.x_test), data, ref)


def fp32_row(model: nn.Module, data: Digits, ref: torch.Tensor, workdir: Path) -> Row:
    path = workdir / "fp32.onnx"
    with quiet():
        export_float(model, path, data.x_test[:64])
    return score("FP32 (ORT)", ort_logits(path, data.x_test.numpy()), data, ref)


def run_seed(seed: int, data: Digits, say: Callable[[str], None]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cnn = train(DigitsCNN, data, seed)
        with torch.no_grad():
            ref = cnn(data.x_test)
        w4 = config(4, "per_channel")
        rows = [fp32_row(cnn, data, ref, work),
                lowbit_row("W4A8 nearest", cnn, w4, data, ref, work),
                lowbit_row("W4A8 CLE", cnn, w4, data, ref, work, cle=True),
                lowbit_row("W4A8 bias corr. (empirical)", cnn, w4, data, ref, work,
                           bias_correction="empirical"),
                lowbit_row("W4A8 CLE + bias corr. (analytical)", cnn, w4, data, ref, work,
                           cle=True, bias_correction="analytical"),
                lowbit_row("W4A8 bias corr. + tuned scales", cnn, w4, data, ref, work,
                           bias_correction="empirical", tune=True),
                lowbit_row("W4A8 AdaRound", cnn, config(4, "per_channel", "adaround"), data,
                           ref, work),
                lowbit_row("W4A8 CLE + AdaRound", cnn, config(4, "per_channel", "adaround"),
                           data, ref, work, cle=True),
                torch_ao_w4a8_fakequant(cnn, data, ref)]
        out["digits_cnn_w4a8"] = [{**r, "seed": seed} for r in rows]
        say(f"seed {seed}: digits CNN done")

        net = train(MobileNetish, data, seed)
        with torch.no_grad():
            ref = net(data.x_test)
        pt, pc = config(8, "per_tensor"), config(8, "per_channel")
        rows = [fp32_row(net, data, ref, work),
                lowbit_row("W8A8 per-channel", net, pc, data, ref, work),
                lowbit_row("W8A8 per-tensor", net, pt, data, ref, work),
                lowbit_row("W8A8 per-tensor CLE", net, pt, data, ref, work, cle=True),
                lowbit_row("W8A8 per-tensor CLE + bias corr. (empirical)", net, pt, data, ref,
                           work, cle=True, bias_correction="empirical"),
                lowbit_row("W8A8 per-tensor CLE + bias corr. (analytical)", net, pt, data, ref,
                           work, cle=True, bias_correction="analytical"),
                lowbit_row("W8A8 per-tensor CLE + bias corr. + tuned scales", net, pt, data,
                           ref, work, cle=True, bias_correction="empirical", tune=True),
                torch_ao_per_tensor_w8a8(net, data, ref)]
        out["mobilenetish_w8a8"] = [{**r, "seed": seed} for r in rows]
        say(f"seed {seed}: MobileNet-style net done")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="combine the per-seed results of earlier runs instead of running")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    data = load_digits()
    if args.merge:
        runs = [json.loads(p.read_text()) for p in args.merge]
        args.seeds = [seed for r in runs for seed in r["seeds"]]
        per_seed = [{net: r[net]["per_seed"][i] for net in ("digits_cnn_w4a8",
                                                             "mobilenetish_w8a8")}
                    for r in runs for i in range(len(r["seeds"]))]
    else:
        per_seed = [run_seed(seed, data, say) for seed in args.seeds]
    result: dict[str, object] = {
        "question": __doc__.split("\n\n")[0].replace("\n", " "),
        "command": " ".join(["python benchmarks/recovery.py", *(argv or sys.argv[1:])]),
        "seeds": args.seeds, "wall_s": round(time.perf_counter() - start, 1),
        "machine": machine(),
        "setup": {"epochs": EPOCHS, "test_images": len(data.y_test),
                  "calibration": "first 512 training images, batches of 64",
                  "sqnr_reference": "FP32 torch logits on the test set",
                  "adaround": "defaults: 500 iterations a layer, batch 256, beta 20→2, "
                              "reg 0.01, warm-up 20%"},
    }
    for net in per_seed[0]:
        summary = summarize([s[net] for s in per_seed])
        fp32 = summary[0]["accuracy"]["mean"]  # type: ignore[index]
        for row in summary:
            acc = row.get("accuracy")
            if isinstance(acc, dict):
                row["vs_fp32_points"] = round(100 * (acc["mean"] - fp32), 2)
        result[net] = {"summary": summary, "per_seed": [s[net] for s in per_seed]}
        print(f"\n{net}: ONNX Runtime, {len(data.y_test)} test images; mean (min..max) over "
              f"seeds {args.seeds}; SQNR of logits vs FP32 torch")
        print(format_table(summary))
        print("accuracy vs FP32 (points): " + ", ".join(
            f"{r['variant']}: {r['vs_fp32_points']:+.2f}" for r in summary))
    m = result["machine"]
    print(f"\nCPU: {m['cpu']} ({m['cores']} cores, VNNI: {m['vnni']})")  # type: ignore[index]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
