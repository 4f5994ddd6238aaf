"""How fast does lowbit's int8 ONNX run in ONNX Runtime, against the FP32 ONNX and against
ONNX Runtime's own ``quantize_static`` file, and how big is it?

    python benchmarks/ort_latency.py            # ~2-3 min on 2 cores; --help for options

Model: a ResNet-8-style CNN for 3x32x32 inputs (stem conv3x3-BN-ReLU 32, then three basic
residual blocks at 32, 64 (stride 2) and 128 (stride 2) channels, 1x1 conv-BN projection
shortcuts where the shape changes, global average pool, Linear(128, 10)); random init with its
BatchNorm statistics run through random data in train mode, so BN folding is not a no-op.
Calibration: 8 batches of 32 standard-normal inputs. Evaluation input: one further batch of 64
(its first row is the batch-1 input).

Variants, each an ONNX file run on ONNX Runtime's CPU provider with ``--threads`` intra-op threads:

- ``fp32``               ``lowbit.demo.export_float`` (the float model, dynamo exporter);
- ``lowbit w8a8 uint8``  ``preset("w8a8")`` + residual-add inputs quantized, 8-bit weight codes
                         stored as uint8 (u8u8 kernels: exact on every CPU);
- ``lowbit w8a8 int8``   the same, stored as int8 (u8s8 kernels: fastest where they are exact,
                         i.e. with VNNI; they saturate on AVX2-only CPUs);
- ``lowbit w7a8 int8``   7-bit weights (int8 storage): lowbit's counterpart of ORT's
                         ``reduce_range``, u8s8 kernels that cannot saturate;
- ``ort u8s8``           ``quantize_static`` QDQ, per-channel, QUInt8 activations, QInt8 weights;
- ``ort u8s8 rr``        the same with ``reduce_range=True`` (7-bit weights: no saturation);
- ``ort u8u8``           QUInt8 weights;
- ``ort s8s8``           QInt8 activations and weights (quantize_static's own dtype default),
                         per-channel.

For each: file size (and ratio to FP32); latency at batch 1 and 64 as the median over
``--repeats`` interleaved repeats (every repeat visits all variants round-robin, rotating the
start; one repeat = median of ``--runs`` timed runs at batch 64, ``--runs-b1`` at batch 1, after
warm-up), and the speedup over FP32 as the median of the per-repeat ratios; output error of
ONNX Runtime against the ONNX reference evaluator (``onnx.reference.ReferenceEvaluator``) run on
the same file and input, so kernel saturation shows up as an error column, and SQNR against the
float torch model; the ops ONNX Runtime actually runs (from
``SessionOptions.optimized_model_filepath``). Prints a table and writes
``benchmarks/results/ort_latency.json``.

Timings are only as good as the machine is quiet: before timing, the script waits (up to
``--wait-idle`` seconds) until other processes use less than a quarter of a core, and it records
how many cores other processes kept busy during each repeat. Repeats during which other
processes kept more than a quarter of a core busy are left out of the figures and re-run after
a wait for quiet (up to ``--max-repeats`` repeats and ``--budget`` seconds); if fewer than 5 quiet repeats remain, all repeats
are used and the JSON says ``"contended": true``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.demo import export_float, sqnr_db
from lowbit.export.encoding import cpu_has_vnni, resolve_weight_dtype

HERE = Path(__file__).resolve().parent
CLEAN_LOAD = 0.25  # cores busy elsewhere above which a timing repeat does not count
DEFAULT_OUT = HERE / "results" / "ort_latency.json"


# --------------------------------------------------------------------------------------- model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU, conv3x3-BN, + shortcut (identity or 1x1 conv-BN), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + self.shortcut(x))


class ResNet8(nn.Module):
    """7 conv3x3 + 1 linear on the main path (ResNet-8 counting), widths 32/64/128."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU())
        self.layer1 = BasicBlock(32, 32, 1)
        self.layer2 = BasicBlock(32, 64, 2)
        self.layer3 = BasicBlock(64, 128, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_model(seed: int) -> nn.Module:
    """Random init; BN running statistics from 16 random batches in train mode; eval mode."""
    torch.manual_seed(seed)
    model = ResNet8()
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    with torch.no_grad():
        for _ in range(16):
            model(torch.randn(64, 3, 32, 32, generator=gen))
    return model.eval()


# ------------------------------------------------------------------------------------ variants


def quiet_call(fn, *args, **kwargs):  # noqa: ANN001, ANN201
    """Run ``fn`` with the exporters' chatter (stdout, warnings, torch logs) kept out."""
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, [str(w.message).splitlines()[0] for w in caught
                    if "torchvision" not in str(w.message)]


ADD_RULE = LayerRule(types=["add"], input=QuantSpec(bits=8, symmetric=False))


def lowbit_config(weight_bits: int) -> QuantConfig:
    """``preset("w8a8")`` (weights at ``weight_bits``) + uint8 inputs for the residual adds."""
    rules = [replace(r, weight=replace(r.weight, bits=weight_bits)) if r.weight else r
             for r in QuantConfig.preset("w8a8").rules]
    return QuantConfig(rules=[*rules, ADD_RULE])


def lowbit_files(model: nn.Module, calib: list[torch.Tensor], x: torch.Tensor,
                 out: Path) -> dict[str, dict]:
    files = {}
    for bits, dtypes in ((8, ("uint8", "int8")), (7, ("int8",))):
        files.update(_lowbit_files(model, calib, x, out, bits, dtypes))
    return files


def _lowbit_files(model: nn.Module, calib: list[torch.Tensor], x: torch.Tensor, out: Path,
                  bits: int, dtypes: tuple[str, ...]) -> dict[str, dict]:
    start = time.perf_counter()
    qm = lowbit.quantize(model, lowbit_config(bits), example_inputs=(x,))
    lowbit.calibrate(qm, calib, progress=False)
    dm = lowbit.convert(qm)
    prep_s = time.perf_counter() - start
    files = {}
    for dtype in dtypes:
        path = out / f"resnet8_lowbit_w{bits}a8_{dtype}.onnx"
        start = time.perf_counter()
        report, caught = quiet_call(lowbit.export_onnx, dm, path, (x,),
                                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    weight_dtype=dtype)
        p = report.parity
        files[f"lowbit w{bits}a8 {dtype}"] = {
            "path": path, "source": "lowbit", "weights": f"{dtype} ({bits}-bit codes)",
            "activations": "uint8",
            "quantize_calibrate_s": round(prep_s, 1),
            "export_s": round(time.perf_counter() - start, 1),
            "export_warnings": caught,
            "parity": {  # lowbit's own check: ORT vs the torch deploy model on x (batch 64)
                "codes_identical": p.codes_identical, "codes_total": p.codes_total,
                "codes_max_diff": p.codes_max_diff, "output_max_abs": p.output_max_abs,
                "output_max_lsb": p.output_max_lsb, "lsb_unit": p.lsb_unit,
                "worst_layers": p.worst_layers, "unmatched": p.unmatched,
            },
            "deploy_model": dm,
        }
    return files


def ort_files(fp32: Path, calib: list[torch.Tensor], out: Path) -> dict[str, dict]:
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

    pre = out / "resnet8_fp32_preprocessed.onnx"
    quant_pre_process(str(fp32), str(pre))  # shape inference + BN folding, as ORT recommends
    name = onnx.load(str(pre)).graph.input[0].name
    u8, s8 = QuantType.QUInt8, QuantType.QInt8
    specs = {
        "ort u8s8": dict(activation_type=u8, weight_type=s8, reduce_range=False),
        "ort u8s8 rr": dict(activation_type=u8, weight_type=s8, reduce_range=True),
        "ort u8u8": dict(activation_type=u8, weight_type=u8, reduce_range=False),
        "ort s8s8": dict(activation_type=s8, weight_type=s8, reduce_range=False),
    }
    files = {}
    for variant, kw in specs.items():
        path = out / f"resnet8_{variant.replace(' ', '_')}.onnx"
        start = time.perf_counter()
        try:
            _, caught = quiet_call(quantize_static, str(pre), str(path), Reader(name, calib),
                                   quant_format=QuantFormat.QDQ, per_channel=True, **kw)
        except Exception as err:  # e.g. a dtype pair this ORT version refuses
            files[variant] = {"error": f"{type(err).__name__}: {err}"}
            continue
        files[variant] = {
            "path": path, "source": "onnxruntime.quantization.quantize_static (QDQ, per-channel,"
                                    " MinMax)",
            "weights": "int8" if kw["weight_type"] == s8 else "uint8",
            "activations": "int8" if kw["activation_type"] == s8 else "uint8",
            "reduce_range": kw["reduce_range"],
            "quantize_s": round(time.perf_counter() - start, 1), "quantize_warnings": caught,
        }
    return files


# ------------------------------------------------------------------------------- measurements


def session(path: Path, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
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


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default 2)")
    ap.add_argument("--repeats", type=int, default=7,
                    help="interleaved repeats on a quiet machine to collect (default 7, >= 5)")
    ap.add_argument("--max-repeats", type=int, default=20,
                    help="give up collecting quiet repeats after this many (default 20)")
    ap.add_argument("--budget", type=float, default=180,
                    help="...or after this many seconds of timing and waiting (default 180)")
    ap.add_argument("--runs", type=int, default=20,
                    help="timed runs per repeat at batch 64 (default 20)")
    ap.add_argument("--runs-b1", type=int, default=100,
                    help="timed runs per repeat at batch 1 (default 100: ~1 ms each)")
    ap.add_argument("--wait-idle", type=float, default=90,
                    help="wait up to this many seconds for other processes to go quiet before "
                         "timing (default 90)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs before each repeat")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep the ONNX files in this folder (default: a temp folder)")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be >= 5")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    model = build_model(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 2)
    calib = [torch.randn(32, 3, 32, 32, generator=gen) for _ in range(8)]
    x64 = torch.randn(64, 3, 32, 32, generator=gen)
    inputs = {1: x64[:1].contiguous(), 64: x64}
    with torch.no_grad():
        ref_float = {b: model(x).numpy() for b, x in inputs.items()}

    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="lowbit-ort-latency-")
        work = Path(tmp.name)
    else:
        work = args.keep
        work.mkdir(parents=True, exist_ok=True)

    fp32 = work / "resnet8_fp32.onnx"
    quiet_call(export_float, model, fp32, x64)
    print(f"[{time.perf_counter() - t0:5.1f}s] fp32 exported; quantizing with lowbit ...",
          flush=True)
    variants: dict[str, dict] = {"fp32": {"path": fp32, "source": "lowbit.demo.export_float",
                                          "weights": "float32", "activations": "float32"}}
    variants.update(lowbit_files(model, calib, x64, work))
    print(f"[{time.perf_counter() - t0:5.1f}s] lowbit exported; ORT quantize_static ...",
          flush=True)
    variants.update(ort_files(fp32, calib, work))
    failed = {k: v["error"] for k, v in variants.items() if "error" in v}
    for k in failed:
        print(f"  {k}: skipped ({failed[k]})")
        del variants[k]
    names = list(variants)

    # Sizes, executed ops, accuracy.
    fp32_bytes = fp32.stat().st_size
    from onnx.reference import ReferenceEvaluator

    for name, v in variants.items():
        v["bytes"] = v["path"].stat().st_size
        v["size_ratio"] = v["bytes"] / fp32_bytes
        v["ops"] = executed_ops(v["path"], args.threads)
        sess = session(v["path"], args.threads)
        iname = sess.get_inputs()[0].name
        got = run_once(sess, {iname: x64.numpy()})
        acc: dict = {"sqnr_vs_float_db": sqnr_db(ref_float[64], got),
                     "top1_agree_float": float((got.argmax(1) == ref_float[64].argmax(1)).mean())}
        if name == "fp32":
            acc["max_abs_vs_reference"] = float(np.abs(got - ref_float[64]).max())
            acc["reference"] = "torch float model"
        else:
            ev = ReferenceEvaluator(str(v["path"]))
            ref = ev.run(None, {ev.input_names[0]: x64.numpy()})[0]
            lsb = float(np.abs(ref).max()) / 127
            acc["reference"] = "onnx.reference.ReferenceEvaluator on the same file"
            acc["max_abs_vs_reference"] = float(np.abs(got - ref).max())
            acc["max_lsb_vs_reference"] = acc["max_abs_vs_reference"] / lsb
            acc["lsb"] = "max|reference output| / 127"
            acc["reference_sqnr_vs_float_db"] = sqnr_db(ref_float[64], ref)
            dm = v.pop("deploy_model", None)
            if dm is not None:
                with torch.no_grad():
                    torch_out = dm(x64).numpy()
                acc["reference_vs_torch_deploy_max_abs"] = float(np.abs(ref - torch_out).max())
        v["accuracy"] = acc
    waited, load = wait_idle(args.wait_idle)
    idle_note = ("unknown" if load is None else f"{load:.2f} cores busy elsewhere after "
                 f"waiting {waited:.0f} s")
    print(f"[{time.perf_counter() - t0:5.1f}s] timing {len(names)} variants x batch 1/64 x "
          f">= {args.repeats} repeats ({idle_note}) ...", flush=True)

    # Latency: interleaved round-robin, rotating the start variant each repeat.
    sessions = {n: session(variants[n]["path"], args.threads) for n in names}
    feeds = {n: {b: {sessions[n].get_inputs()[0].name: x.numpy()} for b, x in inputs.items()}
             for n in names}
    per_repeat: dict[str, dict[int, list[float]]] = {n: {1: [], 64: []} for n in names}

    def run(n: str) -> None:
        for batch in (1, 64):
            runs = args.runs_b1 if batch == 1 else args.runs
            per_repeat[n][batch].append(time_runs(sessions[n], feeds[n][batch], runs,
                                                  args.warmup))

    quiet_rounds, others = interleaved_repeats(names, run, repeats=args.repeats,
                                        max_repeats=args.max_repeats, budget=args.budget)
    used = quiet_rounds
    contended = len(used) < 5
    if contended:  # too few quiet repeats: use them all and say so
        used = list(range(len(others)))
        print(f"  WARNING: fewer than 5 of {len(others)} repeats ran on a quiet machine; "
              "the figures below are contended", flush=True)
    for n in names:
        lat = {}
        for batch in (1, 64):
            ms = [per_repeat[n][batch][i] for i in used]
            ratios = [per_repeat["fp32"][batch][i] / per_repeat[n][batch][i] for i in used]
            lat[f"b{batch}"] = {"ms": statistics.median(ms), "min_ms": min(ms),
                                "max_ms": max(ms), "speedup_vs_fp32": statistics.median(ratios),
                                "speedup_repeats": ratios,
                                "all_repeats_ms": per_repeat[n][batch]}
        variants[n]["latency"] = lat

    result = {
        "question": "How fast does lowbit's int8 ONNX run in ONNX Runtime vs the FP32 ONNX and "
                    "vs ORT's own quantize_static file, and how big is it?",
        "command": "python benchmarks/ort_latency.py " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": cpu_info(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "lowbit": lowbit.__version__},
        "setup": {"model": "ResNet8 (stem 32; basic blocks 32, 64/s2, 128/s2; 1x1 projection "
                           "shortcuts; GAP; Linear(128, 10)); random init, BN stats from 16 "
                           "random batches", "params": sum(p.numel() for p in model.parameters()),
                  "calibration": "8 batches of 32 x N(0,1), 3x32x32",
                  "eval_input": "1 batch of 64 x N(0,1) (batch 1 = its first row)",
                  "lowbit_config": "preset w8a8 + LayerRule(types=['add'], input=uint8 asym)",
                  "threads": args.threads, "repeats": args.repeats, "runs_b64": args.runs,
                  "runs_b1": args.runs_b1, "warmup": args.warmup, "seed": args.seed,
                  "latency": "median over repeats of (median of `runs` timed runs); repeats "
                             "interleaved round-robin over variants; speedup = median of "
                             "per-repeat fp32/variant ratios"},
        "load": {"waited_for_idle_s": round(waited, 1), "others_busy_cores_before": load,
                 "others_busy_cores_per_repeat": others, "used_repeats": used,
                 "contended": contended,
                 "note": "cores kept busy by other processes (from /proc/stat minus this "
                         f"process) during each repeat; only repeats under {CLEAN_LOAD} enter "
                         "the figures (all of them, and contended=true, if fewer than 5)"},
        "skipped": failed,
        "variants": {n: {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in variants[n].items() if k != "path"}
                     | {"file": variants[n]["path"].name} for n in names},
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print()
    print(format_table(result))
    print(f"\nmachine: {result['machine']['model_name']}; "
          + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in result["machine"]["flags"].items())
          + f"\nORT {ort.__version__}, {args.threads} intra-op threads; other processes kept "
          f"{_fmt_load([others[i] for i in used])} cores busy in the {len(used)} repeats used "
          f"(of {len(others)}); "
          f"wrote {args.out} in {result['elapsed_s']:.0f} s")
    if tmp is not None:
        tmp.cleanup()
    return result


def _fmt_load(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{statistics.mean(known):.2f} (max {max(known):.2f})" if known else "unknown"


def format_table(result: dict) -> str:
    head = (f"{'variant':<19} {'KiB':>7} {'size':>6} {'b1 ms':>7} {'b1 x':>6} {'b64 ms':>7} "
            f"{'b64 x':>6} {'max|ORT-ref|':>12} {'LSB':>6} {'SQNR dB':>7} {'codes =':>8} "
            f"{'maxΔ':>5}")
    lines = [head, "-" * len(head)]
    for name, v in result["variants"].items():
        lat, acc = v["latency"], v["accuracy"]
        par = v.get("parity")
        codes = f"{100 * par['codes_identical']:.2f}%" if par else "-"
        lsb = acc.get("max_lsb_vs_reference")
        sq = acc["sqnr_vs_float_db"]
        lines.append(
            f"{name:<19} {v['bytes'] / 1024:>7.1f} {v['size_ratio']:>5.2f}x "
            f"{lat['b1']['ms']:>7.3f} {lat['b1']['speedup_vs_fp32']:>5.2f}x "
            f"{lat['b64']['ms']:>7.2f} {lat['b64']['speedup_vs_fp32']:>5.2f}x "
            f"{acc['max_abs_vs_reference']:>12.2e} {'-' if lsb is None else f'{lsb:.2f}':>6} "
            f"{'inf' if sq == float('inf') else f'{sq:.1f}':>7} "
            f"{codes:>8} "
            f"{'-' if not par else par['codes_max_diff']:>5}")
    lines.append("size, x: ratio to fp32 (speedup = fp32 ms / variant ms, same run). "
                 "max|ORT-ref|: vs the ONNX reference evaluator on the same file (fp32: vs "
                 "torch); LSB = max|ref|/127. SQNR: ORT output vs the float torch model. "
                 "codes =, maxΔ: lowbit's export parity (ORT vs torch deploy model).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
