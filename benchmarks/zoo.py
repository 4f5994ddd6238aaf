"""Conformance sweep: does every Hugging Face architecture family go through lowbit's public flow
and come out as an integer ONNX file that ONNX Runtime runs, agrees with and runs fast?

    python benchmarks/zoo.py                          # all models x fitting presets (~15 min)
    python benchmarks/zoo.py --only bert --only resnet --presets w8a8 --no-speed
    python benchmarks/zoo.py --more --no-speed        # 31 more architectures (zoo_more_models)

Models: ``benchmarks/zoo_models.py`` (small random-init ``transformers`` models; torchvision and
timm rows only where those import). Per model x preset (CNNs: ``w8a8``, ``w8``; transformers
also ``w8a8-transformer`` and ``w4-g128``): ``lowbit.quantize`` → ``lowbit.calibrate`` (4 random
batches of 4) → ``lowbit.convert`` → ``lowbit.export_onnx`` (dynamic batch, else static) → ONNX
Runtime. One row each: the failing stage and the error's first line, or quantized / float /
folded-BN counts, weight layers left float without a plan entry ("silently float"), ONNX
Runtime code agreement, output cosine to the torch float model, file size against the FP32 file,
the integer/float kernels ONNX Runtime runs, and ORT latency against FP32 at batch 1 and 8.
Each row is isolated (an exception or ``--row-timeout`` fails the row, not the sweep). Prints a
markdown table and writes JSON (default ``benchmarks/results/zoo.json``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import ORT_VARIANTS, cpu_info, ort_quantize_static  # noqa: E402
from zoo_models import MODELS, ZooModel, first_line  # noqa: E402
from zoo_more_models import MORE  # noqa: E402
from zoo_report import HEADER, format_row, lowbit_commit, merge  # noqa: E402

import lowbit  # noqa: E402
from lowbit.export.exporters import run_exporter  # noqa: E402
from lowbit.export.onnx import DEFAULT_OPSET, strip_metadata  # noqa: E402
from lowbit.export.verify import feed, session  # noqa: E402
from lowbit.nn import QuantLayer  # noqa: E402

DEFAULT_OUT = HERE / "results" / "zoo.json"
CNN_PRESETS = ("w8a8", "w8")
TRANSFORMER_PRESETS = ("w8a8", "w8a8-transformer", "w8", "w4-g128")
EIGHT_BIT = {"w8a8", "w8a8-transformer", "w8"}
STATIC_INT8 = {"w8a8", "w8a8-transformer"}  # presets whose convs/matmuls run integer kernels
BY_NAME = {m.name: m for m in MODELS + MORE}  # the zoo, then the --more models
TARGETS = {"codes": 0.999, "local_codes": 0.999, "cosine": 0.99, "speed": 1.0}
INT_KERNELS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
               "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "QAttention",
               "DynamicQuantizeLSTM", "QLinearAdd"}
FLOAT_KERNELS = {"Conv", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul",
                 "ConvTranspose"}


# onnxscript's constant folder logs shape-evaluation misses of the exported graph at WARNING.
logging.getLogger("onnxscript").setLevel(logging.ERROR)


class RowTimeout(Exception):
    """A row ran past ``--row-timeout``."""


def presets_for(model: ZooModel) -> tuple[str, ...]:
    return model.presets or (CNN_PRESETS if model.is_cnn else TRANSFORMER_PRESETS)


# ------------------------------------------------------------------------------- diagnosis


def where(err: BaseException) -> dict[str, str]:
    """The deepest frame inside lowbit and the deepest frame overall, along the cause chain."""
    frames: list[traceback.FrameSummary] = []
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        frames += traceback.extract_tb(e.__traceback__)
        e = e.__cause__ or e.__context__
    ours = [f for f in frames if "/lowbit/" in f.filename and "/benchmarks/" not in f.filename]
    fmt = lambda f: f"{f.filename.split('site-packages/')[-1]}:{f.lineno} ({f.name})"  # noqa: E731
    return {"lowbit": fmt(ours[-1]) if ours else "", "deepest": fmt(frames[-1]) if frames else ""}


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a ``raise ... from`` chain (the exporter's own error)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def silently_float(qm: nn.Module, plan: lowbit.Plan) -> list[str]:
    """Modules holding a >= 2-D ``weight`` (a parameter or a parametrization such as weight
    norm) that are neither lowbit layers, nor inside one, nor listed in the plan. A weight
    with fewer than two non-singleton dimensions is a per-channel scale (ConvNeXtV2's GRN
    keeps its gamma as ``(1, 1, 1, C)``), not a weight layer."""
    listed = {layer.name for layer in plan.layers} | set(plan.float_layers)
    wrappers = [n for n, m in qm.named_modules() if isinstance(m, QuantLayer)]
    found = []
    for name, m in qm.named_modules():
        if isinstance(m, QuantLayer) or name in listed:
            continue
        if any(name.startswith(w + ".") for w in wrappers):
            continue
        param = m._parameters.get("weight")
        if param is None and torch.nn.utils.parametrize.is_parametrized(m, "weight"):
            param = m.weight
        if param is not None and sum(d > 1 for d in param.shape) >= 2:
            found.append(f"{name} ({type(m).__name__})")
    return found


def executed_kernels(path: Path, threads: int) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime runs after its optimizations (fused kernels)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    return {"int": sum(o in INT_KERNELS for o in ops),
            "float": sum(o in FLOAT_KERNELS for o in ops)}


# ------------------------------------------------------------------------------------ pieces


def export_float(model: nn.Module, path: Path, example: tuple[torch.Tensor, ...],
                 dynamic_shapes: Any) -> bool:
    """FP32 ONNX (metadata stripped) through the exporter choice lowbit makes for its own files
    (dynamo, then TorchScript where dynamo fails); True if the batch is dynamic."""
    for shapes in (dynamic_shapes, None):
        try:
            run_exporter(model, example, path, exporter="auto", opset=DEFAULT_OPSET,
                         dynamic_shapes=shapes)
            onnx.save(strip_metadata(onnx.load(str(path))), str(path))
            return shapes is not None
        except Exception:
            if shapes is None:
                raise
    return False


def run_ort(path: Path, inputs: tuple[torch.Tensor, ...], threads: int) -> np.ndarray:
    sess = session(path, threads)
    return sess.run(None, feed(sess, inputs))[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def speedups(fp32: Path, quantized: list[Path], inputs: tuple[torch.Tensor, ...],
             threads: int, repeats: int) -> list[float]:
    """FP32 time / each quantized file's time: the median over interleaved repeats of the
    per-repeat ratio (each repeat: mean of enough runs to take ~20 ms, after warm-up)."""
    sessions = [session(p, threads) for p in (fp32, *quantized)]
    feeds = [feed(s, inputs) for s in sessions]
    runs = []
    for s, f in zip(sessions, feeds):
        for _ in range(3):
            s.run(None, f)
        start = time.perf_counter()
        s.run(None, f)
        runs.append(max(3, min(200, int(0.02 / max(time.perf_counter() - start, 1e-6)))))
    n = max(runs)
    ratios: list[list[float]] = [[] for _ in quantized]
    for _ in range(repeats):
        times = []
        for s, f in zip(sessions, feeds):
            start = time.perf_counter()
            for _ in range(n):
                s.run(None, f)
            times.append(time.perf_counter() - start)
        for i, t in enumerate(times[1:]):
            ratios[i].append(times[0] / t)
    return [statistics.median(r) for r in ratios]


class FloatBaseline:
    """Per model, built once and shared by its rows: the float model, its FP32 ONNX file and
    the torch float output on the evaluation batch."""

    def __init__(self, zm: ZooModel, folder: Path, threads: int, fp32_file: bool = True) -> None:
        self.model = zm.build()
        self.example = zm.inputs(2, 100)
        self.evaluate = zm.inputs(2, 101)
        self.calib = [zm.inputs(4, seed) for seed in range(4)]
        with torch.no_grad():
            self.reference = self.model(*self.evaluate).numpy()
        self.output_std = float(self.reference.std())  # ~0 would make the cosine meaningless
        self.path = folder / f"{zm.name}.fp32.onnx"
        self.error = "" if fp32_file else "not exported"
        self.dynamic = False
        self.cosine: float | None = None
        self.rounding_floor: float | None = None  # median over noise draws
        self.rounding_floor_range: tuple[float, float] | None = None
        if not fp32_file:  # no size or speed columns (the tests)
            return
        draws = rounding_floor(self.model, self.evaluate, self.reference)
        self.rounding_floor = float(np.median(draws))
        self.rounding_floor_range = (min(draws), max(draws))
        try:
            self.dynamic = export_float(self.model, self.path, self.example, zm.dynamic_shapes())
            self.cosine = cosine(run_ort(self.path, self.evaluate, threads), self.reference)
        except Exception as err:  # noqa: BLE001 - the rows report it
            self.error = first_line(root_cause(err))
        self._ort_int8: tuple[Path | None, str] | None = None

    def ort_int8(self) -> tuple[Path | None, str]:
        """ONNX Runtime's own int8 file of the FP32 export (``quantize_static``, QDQ, u8s8,
        per-channel, on the same calibration batches), built once: the bar a CNN row's speed
        is held against. ``(None, why)`` where ORT's quantizer fails."""
        if self._ort_int8 is None:
            try:
                made = ort_quantize_static(self.path, [c[0] for c in self.calib], self.path.parent,
                                           {"ort u8s8": ORT_VARIANTS["ort u8s8"]})["ort u8s8"]
                if made.get("path"):
                    session(made["path"], 1)  # ORT's quantizer can write a file ORT refuses
                self._ort_int8 = (made.get("path"), made.get("error", ""))
            except Exception as err:  # noqa: BLE001 - the row reports it
                self._ort_int8 = (None, first_line(err))
        return self._ort_int8


def rounding_floor(model: nn.Module, inputs: tuple[torch.Tensor, ...], reference: np.ndarray,
                   bits: int = 8, seeds: int = 5) -> list[float]:
    """Cosines to the float output once every Conv / Linear weight carries uniform noise of
    +-half a per-channel int``bits`` step, one per noise draw: what round-to-nearest costs *any*
    8-bit quantizer on this model. Random-init nets can sit far below the cosine target here
    (MobileNets: ~0.9), and a row then misses for the model's conditioning, not for lowbit.
    One draw is not enough there: MobileNetV2's ten draws ranged 0.93-0.995."""
    out = []
    for seed in range(seeds):
        noisy = copy.deepcopy(model)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in noisy.modules():
                w = getattr(m, "weight", None)
                if (isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and w is not None
                        and w.dim() > 1):
                    step = w.abs().flatten(1).amax(1).clamp_min(1e-12) / (2 ** (bits - 1) - 1)
                    shape = step.reshape(-1, *[1] * (w.dim() - 1))
                    w.add_(((torch.rand(w.shape, generator=g) - 0.5) * shape).to(w.dtype))
            out.append(cosine(noisy(*inputs).numpy(), reference))
    return out


# ---------------------------------------------------------------------------------------- row


def run_row(zm: ZooModel, preset: str, base: FloatBaseline, folder: Path, *,
            speed: bool = True, threads: int = 1, repeats: int = 5) -> dict[str, Any]:
    """One model x preset through quantize → calibrate → convert → export → ONNX Runtime."""
    row: dict[str, Any] = {"model": zm.name, "family": zm.family, "preset": preset,
                           "export": "", "stage": "", "error": "", "where": {},
                           "float_export": base.error or ("dynamic" if base.dynamic else "static"),
                           "fp32_cosine": base.cosine, "float_output_std": base.output_std,
                           "rounding_floor": base.rounding_floor,
                           "rounding_floor_range": base.rounding_floor_range}
    stage = "quantize"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # example_inputs: how lowbit traces models torch.fx cannot (most HF ones) — what
            # its warning asks a user for; no extra rules.
            qm = lowbit.quantize(base.model, lowbit.QuantConfig.preset(preset),
                                 example_inputs=base.example)
            plan = qm.lowbit_plan
            row["quantized"] = sum(isinstance(m, QuantLayer) for m in qm.modules())
            row["float"] = len(plan.float_layers)
            row["float_layers"] = plan.float_layers
            row["folded_bn"] = len(plan.fusions)
            row["bn_left"] = sum(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                 for m in qm.modules())
            row["silently_float"] = silently_float(qm, plan)
            stage = "calibrate"
            lowbit.calibrate(qm, base.calib, progress=False)
            stage = "convert"
            dm = lowbit.convert(qm)
            stage = "export"
            path = folder / f"{zm.name}.{preset}.onnx"
            try:
                report = lowbit.export_onnx(dm, path, base.example, verify_inputs=[base.evaluate],
                                            dynamic_shapes=zm.dynamic_shapes(), threads=threads)
                row["export"] = "ok"
            except Exception as err:  # noqa: BLE001 - try a static batch before failing
                row["dynamic_error"] = first_line(root_cause(err))
                report = lowbit.export_onnx(dm, path, base.example, verify_inputs=[base.evaluate],
                                            threads=threads)
                row["export"] = "ok (static batch)"
            row["warnings"] = sorted({first_line(w.message)[:300] for w in caught
                                      if "left" not in str(w.message)})
        stage = "ort"
        p = report.parity
        row.update(codes_identical=p.codes_identical, codes_max_diff=p.codes_max_diff,
                   first_identical=p.first_identical, local_identical=p.local_identical,
                   local_max_diff=p.local_max_diff, local_worst=p.local_worst,
                   output_max_lsb=p.output_max_lsb,
                   worst_layers=p.worst_layers,
                   weight_storage=report.weight_storage)
        row["cosine"] = cosine(run_ort(path, base.evaluate, threads), base.reference)
        if not base.error:
            row["size_ratio"] = path.stat().st_size / base.path.stat().st_size
        row["kernels"] = executed_kernels(path, threads)
        if speed and not base.error and base.dynamic and row["export"] == "ok":
            stage = "speed"
            ort_file, why = (base.ort_int8() if zm.is_cnn and preset in STATIC_INT8
                             else (None, ""))
            if why:
                row["ort_int8_error"] = why
            elif ort_file:
                row["ort_int8_cosine"] = cosine(run_ort(ort_file, base.evaluate, threads),
                                                base.reference)
            for b in (1, 8):
                files = [path] + ([ort_file] if ort_file else [])
                ratios = speedups(base.path, files, zm.inputs(b, 7), threads, repeats)
                row[f"speed_b{b}"] = ratios[0]
                if ort_file:
                    row[f"ort_int8_speed_b{b}"] = ratios[1]
    except Exception as err:  # noqa: BLE001 - a failed row, not a failed sweep
        row["stage"], row["error"], row["where"] = stage, first_line(root_cause(err)), where(err)
        if stage in ("quantize", "calibrate", "convert", "export"):
            row["export"] = f"{stage}: {row['error']}"
    row["targets"] = targets(row, zm)
    row["pass"] = all(v is not False for v in row["targets"].values())
    return row


def targets(row: dict[str, Any], zm: ZooModel) -> dict[str, bool | None]:
    """Pass/fail per target; None where a target does not apply or was not measured."""
    codes, cos = row.get("codes_identical"), row.get("cosine")
    local = row.get("local_identical")
    out: dict[str, bool | None] = {
        "exports": row["export"].startswith("ok"),
        "no_silent_float": None if "silently_float" not in row else not row["silently_float"],
        "codes": None if codes is None else codes >= TARGETS["codes"],
        "local_codes": (None if local is None else local >= TARGETS["local_codes"]
                        and row.get("local_max_diff", 0) <= 1),
        "cosine": (None if cos is None or row["preset"] not in EIGHT_BIT
                   else cos >= TARGETS["cosine"]),
        "cnn_speed": None,
    }
    if zm.is_cnn and row["preset"] in STATIC_INT8 and "speed_b1" in row:
        out["cnn_speed"] = min(row["speed_b1"], row["speed_b8"]) >= TARGETS["speed"]
    return out


# ----------------------------------------------------------------------------------- sweep


def sweep(names: list[str], presets: list[str] | None, *, speed: bool, threads: int,
          repeats: int, row_timeout: float, folder: Path, say: Any = print,
          on_row: Any = None) -> list[dict[str, Any]]:
    """Run every fitting preset of every named model; ``on_row(rows)`` after each row."""
    import signal

    def on_alarm(signum: int, frame: Any) -> None:
        raise RowTimeout(f"row ran past {row_timeout:.0f} s")

    rows: list[dict[str, Any]] = []
    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for name in names:
            zm = BY_NAME[name]
            wanted = [p for p in presets_for(zm) if presets is None or p in presets]
            why = zm.available()
            if why or not wanted:
                if why:
                    say(f"{name}: skipped ({why})")
                continue
            try:
                signal.setitimer(signal.ITIMER_REAL, row_timeout)
                base = FloatBaseline(zm, folder, threads)
            except Exception as err:  # noqa: BLE001
                rows += [{"model": name, "family": zm.family, "preset": p, "stage": "build",
                          "export": f"build: {first_line(err)}", "error": first_line(err),
                          "where": where(err), "targets": {"exports": False}, "pass": False}
                         for p in wanted]
                continue
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            for preset in wanted:
                t0 = time.perf_counter()
                try:
                    signal.setitimer(signal.ITIMER_REAL, row_timeout)
                    row = run_row(zm, preset, base, folder, speed=speed, threads=threads,
                                  repeats=repeats)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                row["seconds"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                say(format_row(row))
                if on_row is not None:
                    on_row(rows)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=sorted(BY_NAME), metavar="NAME",
                    help="run only this model (repeatable); names: " + ", ".join(BY_NAME))
    ap.add_argument("--more", action="store_true",
                    help="run the models of benchmarks/zoo_more_models.py instead of the zoo's")
    ap.add_argument("--presets", nargs="+", choices=sorted(set(CNN_PRESETS + TRANSFORMER_PRESETS)),
                    help="run only these presets (where they fit the model)")
    ap.add_argument("--json", type=Path, default=DEFAULT_OUT, help="where to write the results")
    ap.add_argument("--no-speed", action="store_true", help="skip the ORT latency columns")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats (median ratio)")
    ap.add_argument("--row-timeout", type=float, default=300.0, help="seconds per row")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                    help="instead of running: combine the rows of partial runs (e.g. one per "
                         "half of the models, run side by side) into --json, first file first")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)

    cpu = cpu_info()
    print(f"CPU: {cpu['model_name']}; VNNI (lowbit.export.encoding.cpu_has_vnni): "
          f"{cpu['lowbit_cpu_has_vnni']}; 8-bit weights stored as "
          f"{cpu['lowbit_auto_weight_dtype'][0]}; ORT threads {args.threads}")
    names = args.only or [m.name for m in (MORE if args.more else MODELS)]
    start = time.perf_counter()
    import onnxruntime
    import transformers

    result: dict[str, Any] = {
        "command": "python benchmarks/zoo.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lowbit_commit": lowbit_commit(), "cpu": cpu, "threads": args.threads,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "transformers": transformers.__version__},
        "targets": TARGETS, "complete": False,
    }

    def save(rows: list[dict[str, Any]]) -> None:  # after every row: a long sweep leaves a trace
        result.update(seconds=round(time.perf_counter() - start, 1), rows=rows, summary={
            "rows": len(rows), "pass": sum(r["pass"] for r in rows),
            "exports": sum(r["export"].startswith("ok") for r in rows)})
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")

    print(HEADER)
    with tempfile.TemporaryDirectory(prefix="lowbit-zoo-") as tmp:
        rows = sweep(names, args.presets, speed=not args.no_speed, threads=args.threads,
                     repeats=args.repeats, row_timeout=args.row_timeout, folder=Path(tmp),
                     on_row=save)
    result["complete"] = True
    save(rows)
    print(f"\n{result['summary']['pass']}/{len(rows)} rows meet every target; "
          f"{result['summary']['exports']} export; {result['seconds']:.0f} s")
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
