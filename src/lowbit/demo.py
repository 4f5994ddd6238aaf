"""The embedded default: a small CNN trained on scikit-learn's digits, quantized after
training with each observer, exported to integer ONNX and run in ONNX Runtime.

``lowbit demo`` prints a table of accuracy, output SQNR, size, latency and parity per observer
and keeps every artifact in ``./lowbit-demo/``. The same pieces (data, model, training) serve
the benchmarks and the end-to-end test.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch
from torch import nn

OBSERVERS = ("minmax", "ema", "percentile", "kl", "mse")


class DemoRow(TypedDict):
    """One row of the demo table (``run_demo`` returns them, ``format_table`` prints them)."""

    variant: str
    accuracy: float
    sqnr_db: float
    kib: float
    ms_b64: float
    codes_identical: float | None
    max_lsb: float | None


@dataclass
class Digits:
    """scikit-learn's 8x8 digits as float tensors, scaled to [0, 1], split 80/20 (seeded)."""

    x_train: torch.Tensor  # (N, 1, 8, 8)
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(seed: int = 0) -> Digits:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, data.target, test_size=0.2, random_state=seed,
                                          stratify=data.target)
    # Plain NCHW strides: numpy's (64, 1, 8, 1) for the size-1 channel reads as channels-last.
    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).clone(memory_format=torch.contiguous_format)

    return Digits(images(xtr), torch.from_numpy(ytr).long(),
                  images(xte), torch.from_numpy(yte).long())


class DigitsCNN(nn.Sequential):
    """Three conv-BN-ReLU blocks and a linear classifier (~25k parameters)."""

    def __init__(self, width: int = 16) -> None:
        w = width
        super().__init__(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, 10),
        )


def train_digits(data: Digits, *, epochs: int = 20, seed: int = 0, lr: float = 3e-3,
                 model: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Train ``DigitsCNN`` (or the net ``model`` builds) with Adam (batch 64, cosine
    schedule); deterministic for a given seed."""
    torch.manual_seed(seed)
    model = (model or DigitsCNN)()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(n, generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor) -> float:
    pred = torch.as_tensor(logits).argmax(dim=1)
    return float((pred == labels).float().mean())


def sqnr_db(reference: torch.Tensor | np.ndarray, test: torch.Tensor | np.ndarray) -> float:
    """Signal-to-quantization-noise ratio, 10·log10(Σref² / Σ(ref − test)²)."""
    ref = torch.as_tensor(reference).double()
    noise = (ref - torch.as_tensor(test).double()).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise)) if noise > 0 else float("inf")


def ort_latency_ms(path: Path, x: np.ndarray, *, repeats: int = 20, threads: int = 2) -> float:
    """Median wall time of one ``run`` on ``x`` (after a warm-up)."""
    from lowbit.export.verify import session

    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    from lowbit.export.verify import session

    sess = session(path, 2)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def export_float(model: nn.Module, path: Path, example: torch.Tensor) -> None:
    """Plain FP32 ONNX export (dynamic batch) for size and latency baselines."""
    from lowbit.export.onnx import quiet_exporter

    with quiet_exporter():
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
        if program is None:
            raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNXProgram")
        program.save(str(path))
    import onnx

    from lowbit.export.onnx import strip_metadata

    onnx.save(strip_metadata(onnx.load(str(path))), str(path))


def run_demo(out_dir: str | Path = "lowbit-demo", *, epochs: int = 20, weight_bits: int = 8,
             observers: tuple[str, ...] = OBSERVERS, calib_size: int = 512,
             progress: bool = True) -> list[DemoRow]:
    """Train, quantize with each observer, export, run in ONNX Runtime; returns table rows."""
    import lowbit
    from lowbit import LayerRule, QuantConfig, QuantSpec

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)
    data = load_digits()
    start = time.perf_counter()
    model = train_digits(data, epochs=epochs)
    say(f"trained DigitsCNN on digits in {time.perf_counter() - start:.1f} s")
    torch.save(model.state_dict(), out / "digits_cnn.pt")

    x_test = data.x_test.numpy()
    batch = x_test[:64]
    with torch.no_grad():
        ref = model(data.x_test)
    fp32_path = out / "digits_fp32.onnx"
    export_float(model, fp32_path, data.x_test[:64])
    rows: list[DemoRow] = [{
        "variant": "fp32", "accuracy": accuracy(ort_logits(fp32_path, x_test), data.y_test),
        "sqnr_db": float("inf"), "kib": fp32_path.stat().st_size / 1024,
        "ms_b64": ort_latency_ms(fp32_path, batch), "codes_identical": None, "max_lsb": None,
    }]
    calib = data.x_train[:calib_size].split(64)
    for observer in observers:
        cfg = QuantConfig(rules=[LayerRule(
            types=["Conv2d", "Linear"],
            weight=QuantSpec(bits=weight_bits, granularity="per_channel"),
            input=QuantSpec(bits=8, symmetric=False, observer=observer))])
        qm = lowbit.quantize(model, cfg)
        lowbit.calibrate(qm, calib, progress=False)
        dm = lowbit.convert(qm)
        path = out / f"digits_w{weight_bits}a8_{observer}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = lowbit.export_onnx(dm, path, (data.x_test[:64],),
                                        dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        verify_inputs=[(data.x_test,)])
        logits = ort_logits(path, x_test)
        rows.append({
            "variant": f"w{weight_bits}a8 {observer}",
            "accuracy": accuracy(logits, data.y_test), "sqnr_db": sqnr_db(ref, logits),
            "kib": path.stat().st_size / 1024, "ms_b64": ort_latency_ms(path, batch),
            "codes_identical": report.parity.codes_identical,
            "max_lsb": report.parity.output_max_lsb,
        })
        say(f"  {observer:<10} done")
    return rows


class SpeedRow(TypedDict):
    """FP32 and int8 latency of the demo's files at one batch size (``speed_by_batch``)."""

    batch: int
    fp32_ms: float
    int8_ms: float


def speed_by_batch(fp32_path: Path, int8_path: Path, pool: np.ndarray, *,
                   batches: tuple[int, ...] = (1, 64, 512, 2048), repeats: int = 7,
                   threads: int = 2) -> list[SpeedRow]:
    """Median latency of both files at each batch size, the two runs interleaved so that a
    busy machine slows both alike. ``pool`` is tiled up to the largest batch."""
    from lowbit.export.verify import session

    sessions = [session(fp32_path, threads), session(int8_path, threads)]
    names = [s.get_inputs()[0].name for s in sessions]
    tiled = np.concatenate([pool] * (max(batches) // len(pool) + 1))
    rows: list[SpeedRow] = []
    for b in batches:
        x = tiled[:b]
        times: list[list[float]] = [[], []]
        for sess, name in zip(sessions, names):
            sess.run(None, {name: x})  # warm-up
        for _ in range(repeats):
            for i, (sess, name) in enumerate(zip(sessions, names)):
                start = time.perf_counter()
                sess.run(None, {name: x})
                times[i].append(time.perf_counter() - start)
        rows.append({"batch": b, "fp32_ms": 1000 * float(np.median(times[0])),
                     "int8_ms": 1000 * float(np.median(times[1]))})
    return rows


def speed_note(rows: list[SpeedRow]) -> str:
    """Why int8 is not faster at batch 1 on the demo net, and where (if anywhere) it is. The
    first line's reason follows the measured ratio (a shared machine can time int8 ahead)."""
    first = rows[0]
    ratio = first["fp32_ms"] / first["int8_ms"]
    verdict = ("outweigh the cheaper integer arithmetic" if ratio < 1 else
               "take about what the cheaper integer arithmetic saves")
    lines = [f"int8 at batch {first['batch']}: {ratio:.2f}x the speed of fp32 - a "
             f"25k-parameter net does ~0.6 M multiply-adds per image, so ONNX Runtime's "
             f"per-node cost and the Quantize/Dequantize/layout nodes int8 adds {verdict}."]
    faster = next((r for r in rows if r["int8_ms"] < r["fp32_ms"]), None)
    sweep = ", ".join(f"b{r['batch']} {r['fp32_ms'] / r['int8_ms']:.2f}x" for r in rows)
    if faster is not None:
        lines.append(f"int8 is faster from batch {faster['batch']} here "
                     f"({faster['fp32_ms']:.2f} ms fp32 vs {faster['int8_ms']:.2f} ms int8; "
                     f"int8 speed vs fp32: {sweep}).")
    else:
        lines.append(f"int8 was not faster at any batch size measured here ({sweep}): "
                     "this net's convolutions are too narrow (1-64 channels on 8x8 images) "
                     "for the integer kernels to pay off; benchmarks/ort_latency.py measures "
                     "nets where they do (docs/benchmarks.md).")
    return "\n".join(lines)


def format_table(rows: list[DemoRow]) -> str:
    head = (f"{'variant':<18} {'accuracy':>8} {'SQNR dB':>8} {'size KiB':>9} {'ms/b64':>7} "
            f"{'codes =':>8} {'max LSB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        codes = "-" if r["codes_identical"] is None else f"{100 * r['codes_identical']:.2f}%"
        lsb = "-" if r["max_lsb"] is None else f"{r['max_lsb']:.2f}"
        lines.append(f"{r['variant']:<18} {100 * r['accuracy']:>7.2f}% {r['sqnr_db']:>8.1f} "
                     f"{r['kib']:>9.1f} {r['ms_b64']:>7.3f} {codes:>8} {lsb:>8}")
    return "\n".join(lines)
