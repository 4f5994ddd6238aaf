"""Does the shipped ``w8a8`` preset run fast in ONNX Runtime? Against the FP32 ONNX and ONNX
Runtime's own ``quantize_static`` files, on four convnets, at batch 1 and 64.

    python benchmarks/ort_latency.py                 # all nets, ~5-8 min on a quiet 2-core machine
    python benchmarks/ort_latency.py --nets resnet8  # one net; --help for options

Nets (``benchmarks/convnets.py``): a ResNet-8-style net, a MobileNetV2-style net (inverted
residuals, depthwise convs, ReLU6), an Inception-style net (branches joined by ``torch.cat``),
a U-Net whose pooling and upsampling are ``F.max_pool2d`` / ``F.interpolate`` calls and a
random-init Hugging Face ``ResNetModel`` (if ``transformers`` is installed). Calibration: 8
batches of 32 standard-normal inputs; evaluation
input: one further batch of 64 (its first row is the batch-1 input).

Variants per net, each an ONNX file run on ONNX Runtime's CPU provider:

- ``fp32``        ``lowbit.demo.export_float`` (the float model, dynamo exporter);
- ``lowbit w8a8`` ``QuantConfig.preset("w8a8")`` exactly as shipped (no extra rules; one example
                  input passed to ``quantize``, as its warning asks for models torch.fx cannot
                  trace), exported with ``lowbit.export_onnx``'s defaults — what a user gets;
- ``ort u8s8``    ``quantize_static`` QDQ, per-channel, uint8 activations, int8 weights;
- ``ort u8s8 rr`` the same with ``reduce_range=True`` (7-bit weights, exact without VNNI);
- ``ort u8u8``    uint8 weights.

For each: file size (ratio to FP32); latency at batch 1 and 64 as the median over quiet
interleaved repeats (``harness.interleaved_repeats``) and the speedup over FP32 as the median of
per-repeat ratios; SQNR of ONNX Runtime's output against the float torch model; the compute ops
ONNX Runtime still runs in float after its graph optimizations. Prints one table per net with the
CPU's flags and writes ``benchmarks/results/ort_latency.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from convnets import available, build
from harness import (
    CLEAN_LOAD,
    _fmt_load,
    add_timing_args,
    cpu_info,
    executed_ops,
    interleaved_repeats,
    machine_line,
    ort_quantize_static,
    quiet_call,
    run_once,
    session,
    time_runs,
    wait_idle,
)

import lowbit
from lowbit import QuantConfig
from lowbit.demo import export_float, sqnr_db

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "ort_latency.json"


def lowbit_file(model: torch.nn.Module, calib: list[torch.Tensor], x: torch.Tensor,
                path: Path) -> dict:
    """The shipped preset, quantized, calibrated, converted and exported with defaults."""
    start = time.perf_counter()
    # example_inputs: how the HF model (which torch.fx cannot trace) is traced; no extra rules.
    qm, warned = quiet_call(lowbit.quantize, model, QuantConfig.preset("w8a8"),
                            example_inputs=(x[:1],))
    lowbit.calibrate(qm, calib, progress=False)
    dm = lowbit.convert(qm)
    prep_s = time.perf_counter() - start
    start = time.perf_counter()
    report, caught = quiet_call(lowbit.export_onnx, dm, path, (x,),
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    p = report.parity
    return {"path": path, "source": 'lowbit QuantConfig.preset("w8a8"), export defaults',
            "weights": report.weight_storage, "activations": "uint8",
            "quantize_calibrate_s": round(prep_s, 1),
            "export_s": round(time.perf_counter() - start, 1),
            "warnings": warned + caught,
            "plan": {"quantized": len(qm.lowbit_plan.quantized),
                     "adds_quantized": sum(1 for x in qm.lowbit_plan.quantized
                                           if x.type == "add"),
                     "outputs_quantized": sum(1 for x in qm.lowbit_plan.quantized
                                              if x.output is not None),
                     "bn_folded": len(qm.lowbit_plan.fusions)},
            "parity": {"codes_identical": p.codes_identical, "codes_max_diff": p.codes_max_diff,
                       "output_max_lsb": p.output_max_lsb}}


def measure_net(name: str, args: argparse.Namespace, work: Path) -> dict:
    t0 = time.perf_counter()
    model, shape = build(name, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 2)
    calib = [torch.randn(32, *shape, generator=gen) for _ in range(8)]
    x64 = torch.randn(64, *shape, generator=gen)
    inputs = {1: x64[:1].contiguous(), 64: x64}
    with torch.no_grad():
        ref_float = model(x64).numpy()
    fp32 = work / f"{name}_fp32.onnx"
    quiet_call(export_float, model, fp32, x64)
    variants: dict[str, dict] = {"fp32": {"path": fp32, "source": "lowbit.demo.export_float",
                                          "weights": "float32", "activations": "float32"}}
    variants["lowbit w8a8"] = lowbit_file(model, calib, x64, work / f"{name}_lowbit_w8a8.onnx")
    variants.update(ort_quantize_static(fp32, calib, work))
    failed = {k: v.pop("error") for k, v in list(variants.items()) if "error" in v}
    for k in failed:
        print(f"  {name}/{k}: skipped ({failed[k]})")
        del variants[k]
    names = list(variants)
    fp32_bytes = fp32.stat().st_size
    for v in variants.values():
        v["bytes"] = v["path"].stat().st_size
        v["size_ratio"] = v["bytes"] / fp32_bytes
        v["ops"] = executed_ops(v["path"], args.threads)
        sess = session(v["path"], args.threads)
        got = run_once(sess, {sess.get_inputs()[0].name: x64.numpy()})
        v["accuracy"] = {"sqnr_vs_float_db": sqnr_db(ref_float, got),
                         "top1_agree_float": float((got.argmax(1) == ref_float.argmax(1)).mean())}
    waited, load = wait_idle(args.wait_idle)
    print(f"[{time.perf_counter() - t0:5.1f}s] {name}: timing {len(names)} variants x batch "
          f"1/64 (others busy: {'?' if load is None else f'{load:.2f}'} cores) ...", flush=True)
    sessions = {n: session(variants[n]["path"], args.threads) for n in names}
    feeds = {n: {b: {sessions[n].get_inputs()[0].name: x.numpy()} for b, x in inputs.items()}
             for n in names}
    per_repeat: dict[str, dict[int, list[float]]] = {n: {1: [], 64: []} for n in names}

    def run(n: str) -> None:
        for batch in (1, 64):
            runs = args.runs_b1 if batch == 1 else args.runs
            per_repeat[n][batch].append(time_runs(sessions[n], feeds[n][batch], runs,
                                                  args.warmup))

    used, others = interleaved_repeats(names, run, repeats=args.repeats,
                                       max_repeats=args.max_repeats, budget=args.budget)
    contended = len(used) < 5
    if contended:
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
                                "speedup_repeats": ratios}
        variants[n]["latency"] = lat
    return {"net": name, "input_shape": list(shape),
            "params": sum(p.numel() for p in model.parameters()),
            "skipped": failed,
            "load": {"others_busy_cores_per_repeat": others, "used_repeats": used,
                     "contended": contended},
            "variants": {n: {k: v for k, v in variants[n].items() if k != "path"}
                         | {"file": variants[n]["path"].name} for n in names},
            "elapsed_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", default=None, choices=available(),
                    help="nets to measure (default: all that can be built here)")
    add_timing_args(ap, repeats=7, max_repeats=15, budget=120, runs=10, warmup=3)
    ap.add_argument("--runs-b1", type=int, default=50, help="timed runs per repeat at batch 1")
    ap.add_argument("--wait-idle", type=float, default=60,
                    help="wait up to this many seconds for quiet before timing each net")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be >= 5")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    nets = []
    with tempfile.TemporaryDirectory(prefix="lowbit-ort-latency-") as tmp:
        for name in args.nets or available():
            nets.append(measure_net(name, args, Path(tmp)))
            print(format_table(nets[-1]), flush=True)
    result = {
        "question": "Does the shipped w8a8 preset run fast in ONNX Runtime, against FP32 and "
                    "ORT's own quantize_static files?",
        "command": "python benchmarks/ort_latency.py " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": cpu_info(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "lowbit": lowbit.__version__},
        "setup": {"threads": args.threads, "repeats": args.repeats, "runs_b64": args.runs,
                  "runs_b1": args.runs_b1, "warmup": args.warmup, "seed": args.seed,
                  "calibration": "8 batches of 32 x N(0,1)", "eval_input": "64 x N(0,1)",
                  "clean_load": CLEAN_LOAD},
        "nets": nets,
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\n{machine_line(result['machine'])}\nORT {ort.__version__}, {args.threads} "
          f"intra-op threads; wrote {args.out} in {result['elapsed_s']:.0f} s")
    return result


def format_table(net: dict) -> str:
    head = (f"{net['net']:<12} {'KiB':>7} {'size':>6} {'b1 ms':>7} {'b1 x':>6} {'b64 ms':>8} "
            f"{'b64 x':>6} {'SQNR dB':>7} {'float ops':>9} {'codes =':>8}")
    lines = [head, "-" * len(head)]
    for name, v in net["variants"].items():
        lat, acc = v["latency"], v["accuracy"]
        par = v.get("parity")
        codes = f"{100 * par['codes_identical']:.2f}%" if par and par["codes_identical"] else "-"
        sq = acc["sqnr_vs_float_db"]
        lines.append(
            f"{name:<12} {v['bytes'] / 1024:>7.1f} {v['size_ratio']:>5.2f}x "
            f"{lat['b1']['ms']:>7.3f} {lat['b1']['speedup_vs_fp32']:>5.2f}x "
            f"{lat['b64']['ms']:>8.2f} {lat['b64']['speedup_vs_fp32']:>5.2f}x "
            f"{'inf' if sq == float('inf') else f'{sq:.1f}':>7} "
            f"{len(v['ops']['float_compute_ops']):>9} {codes:>8}")
    load = net["load"]
    lines.append(f"x: speedup over fp32 (same run); float ops: Conv/Gemm/MatMul/Add ORT runs in "
                 f"float; others busy {_fmt_load([load['others_busy_cores_per_repeat'][i] for i in load['used_repeats']])} cores"
                 + (" (CONTENDED)" if load["contended"] else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
