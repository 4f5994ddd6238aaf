"""Shared parts of the ONNX Runtime benchmarks: quiet timing, CPU facts, ORT's own quantizer.

Timings are only as good as the machine is quiet: ``interleaved_repeats`` runs every variant
round-robin per repeat while a ``LoadMeter`` measures how many cores other processes kept busy;
noisy repeats are left out (and re-run after a wait for quiet) so figures are medians of quiet
repeats. ``cpu_info`` records the CPU flags that decide which integer kernels ONNX Runtime picks
(AVX-512 VNNI or not); print it with every speed figure.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from lowbit.export.encoding import cpu_has_vnni, resolve_weight_dtype

CLEAN_LOAD = 0.25  # cores busy elsewhere above which a timing repeat does not count


def quiet_call(fn, *args, **kwargs):  # noqa: ANN001, ANN201
    """Run ``fn`` with the exporters' chatter (stdout, warnings, torch logs) kept out."""
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, [str(w.message).splitlines()[0] for w in caught
                    if "torchvision" not in str(w.message)]



def session(path: Path, threads: int, optimized: Path | None = None,
            profile_prefix: str | None = None) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads, sequential; ``optimized``: also write
    ORT's optimized graph there; ``profile_prefix``: profile every run into that file."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def executed_ops(path: Path, threads: int) -> dict:
    """The graph ONNX Runtime runs after its optimizations (QDQ fusion, layout transforms)."""
    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        session(path, threads, optimized=opt)
        graph = onnx.load(str(opt)).graph
    names = [n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
             for n in graph.node]
    float_compute = [n for n in names if n.split(".")[-1] in
                     ("Conv", "FusedConv", "Gemm", "MatMul", "Add") and "nchwc" not in n]
    return {"counts": dict(sorted(collections.Counter(names).items())), "sequence": names,
            "float_compute_ops": float_compute}


def run_once(sess: ort.InferenceSession, feed: dict) -> np.ndarray:
    return sess.run(None, feed)[0]


def time_runs(sess: ort.InferenceSession, feed: dict, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _busy_s() -> tuple[float, float]:
    """(CPU seconds all processes spent busy, CPU seconds this process used), cumulative."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


class LoadMeter:
    """How many cores other processes kept busy between ``start`` and ``stop``."""

    def start(self) -> None:
        self.t, (self.busy, self.own) = time.perf_counter(), _busy_s()

    def stop(self) -> float | None:
        try:
            busy, own = _busy_s()
        except OSError:
            return None
        wall = time.perf_counter() - self.t
        return max(0.0, (busy - self.busy) - (own - self.own)) / wall if wall > 0 else None


def wait_idle(max_s: float, threshold: float = 0.25) -> tuple[float, float | None]:
    """Wait (up to ``max_s``) until other processes use < ``threshold`` cores over 1 s."""
    meter, start, load = LoadMeter(), time.perf_counter(), None
    try:
        while True:
            meter.start()
            time.sleep(1.0)
            load = meter.stop()
            if load is None or load < threshold or time.perf_counter() - start >= max_s:
                return time.perf_counter() - start, load
    except OSError:
        return 0.0, None


def interleaved_repeats(names: list[str], run: Callable[[str], None], *, repeats: int,
                        max_repeats: int, budget: float, threshold: float = CLEAN_LOAD,
                        after_round: Callable[[int, float | None], None] | None = None,
                        ) -> tuple[list[int], list[float | None]]:
    """Timing rounds: round r calls ``run(name)`` for every variant, starting r places later,
    while a ``LoadMeter`` measures the other processes. Stops once ``repeats`` rounds ran
    quiet (< ``threshold`` cores elsewhere), or, after at least ``repeats`` rounds, at
    ``max_repeats`` rounds or ``budget`` seconds; after a noisy round it waits (up to 30 s) for
    quiet; ``after_round(r, load)`` reports each round. Returns the quiet rounds' indices and
    the others' load per round."""
    others: list[float | None] = []
    meter, start = LoadMeter(), time.perf_counter()

    def quiet() -> list[int]:
        return [i for i, o in enumerate(others) if o is None or o < threshold]

    while True:
        r = len(others)
        meter.start()
        for name in names[r % len(names):] + names[:r % len(names)]:
            run(name)
        others.append(meter.stop())
        if after_round is not None:
            after_round(r, others[-1])
        if len(quiet()) >= repeats:
            break
        spent = time.perf_counter() - start
        if len(others) >= repeats and (len(others) >= max_repeats or spent > budget):
            break
        if others[-1] is not None and others[-1] >= threshold and spent < budget:
            wait_idle(min(30.0, budget - spent), threshold)  # let the other job finish, if it will
    return quiet(), others


def cpu_info() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                  if line.startswith("Model name")), platform.processor())
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
              "amx_int8")
    return {"model_name": model, "machine": platform.machine(),
            "logical_cpus": len([ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                                 if ln.startswith("processor")]) if flags else None,
            "flags": {f: f in flags for f in wanted},
            "lowbit_cpu_has_vnni": cpu_has_vnni(),
            "lowbit_auto_weight_dtype": list(resolve_weight_dtype("auto"))}


def _fmt_load(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{statistics.mean(known):.2f} (max {max(known):.2f})" if known else "unknown"


ORT_VARIANTS = {  # onnxruntime.quantization.quantize_static settings, QDQ, per-channel
    "ort u8s8": ("QUInt8", "QInt8", False),
    "ort u8s8 rr": ("QUInt8", "QInt8", True),  # 7-bit weights: exact on AVX2 without VNNI
    "ort u8u8": ("QUInt8", "QUInt8", False),
}


def ort_quantize_static(fp32: Path, calib: list[torch.Tensor], out: Path,
                        variants: dict[str, tuple[str, str, bool]] = ORT_VARIANTS,
                        ) -> dict[str, dict]:
    """ONNX Runtime's own int8 files of ``fp32`` (pre-processed as ORT recommends), one per
    variant: ``{name: {"path", "source", "weights", "activations", ...}}`` or ``{"error"}``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name: str, batches: list[torch.Tensor]) -> None:
            self.items = iter([{name: b.numpy()} for b in batches])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    pre = out / f"{fp32.stem}_preprocessed.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    name = onnx.load(str(pre)).graph.input[0].name
    files = {}
    for variant, (act, weight, reduce_range) in variants.items():
        path = out / f"{fp32.stem}_{variant.replace(' ', '_')}.onnx"
        start = time.perf_counter()
        try:
            _, caught = quiet_call(quantize_static, str(pre), str(path), Reader(name, calib),
                                   quant_format=QuantFormat.QDQ, per_channel=True,
                                   activation_type=getattr(QuantType, act),
                                   weight_type=getattr(QuantType, weight),
                                   reduce_range=reduce_range)
        except Exception as err:  # e.g. a dtype pair this ORT version refuses
            files[variant] = {"error": f"{type(err).__name__}: {err}"}
            continue
        files[variant] = {
            "path": path, "source": "onnxruntime.quantization.quantize_static (QDQ, "
                                    "per-channel, MinMax)",
            "weights": "int8" if weight == "QInt8" else "uint8",
            "activations": "int8" if act == "QInt8" else "uint8",
            "reduce_range": reduce_range,
            "quantize_s": round(time.perf_counter() - start, 1), "quantize_warnings": caught,
        }
    return files


def add_timing_args(ap: argparse.ArgumentParser, *, repeats: int, max_repeats: int,
                    budget: float, runs: int, warmup: int) -> None:
    """The options every ORT timing benchmark takes (threads, quiet repeats, runs, warm-up)."""
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    ap.add_argument("--repeats", type=int, default=repeats,
                    help=f"interleaved repeats on a quiet machine to collect (default {repeats}, "
                         ">= 5)")
    ap.add_argument("--max-repeats", type=int, default=max_repeats,
                    help=f"give up collecting quiet repeats after this many (default {max_repeats})")
    ap.add_argument("--budget", type=float, default=budget,
                    help=f"...or after this many seconds of timing (default {budget:g})")
    ap.add_argument("--runs", type=int, default=runs,
                    help=f"timed runs per repeat (default {runs})")
    ap.add_argument("--warmup", type=int, default=warmup,
                    help="untimed runs before each repeat")


def machine_line(machine: dict) -> str:
    return (f"machine: {machine['model_name']}; "
            + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in machine["flags"].items()))
