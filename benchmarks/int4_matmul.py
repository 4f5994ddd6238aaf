"""Which ONNX form of 4-bit per-group Linear weights runs faster in ONNX Runtime: INT4
``DequantizeLinear`` → ``MatMul`` or ``com.microsoft.MatMulNBits``, and how big is the file?

    python benchmarks/int4_matmul.py            # ~5 min on 2 cores; --help for options

Model: six BERT-small FFN blocks in a row (Linear 384→1536, GELU, Linear 1536→384; 7.1 M
weights), random init. Input: one float batch (32, 128, 384); every file is exported with dynamic
batch and sequence axes (example input (2, 16, 384)).

Variants, each an ONNX file run on ONNX Runtime's CPU provider with ``--threads`` intra-op threads:

- ``fp32``                  the float model (dynamo exporter);
- ``w8 per-channel``        8-bit weights per channel, weight-only: int8 ``DequantizeLinear`` →
                            ``MatMul`` (ORT 1.32 fuses it into an 8-bit ``MatMulNBits``);
- ``w4 gG dequantize``      4-bit symmetric weights in groups of G (32, 64, 128), stored as INT4
                            ``[K, N]`` blocked ``DequantizeLinear`` → ``MatMul``
                            (``int4_format="dequantize"``), run with ORT's default session, which
                            fuses it into ``MatMulNBits`` at ``accuracy_level`` 4 (int8
                            activations);
- ``w4 g64 dequantize acc0`` the same file with ``session.qdq_matmulnbits_accuracy_level=0``
                            (the fused kernel in float);
- ``w4 gG matmulnbits``     ``MatMulNBits`` in the file (``int4_format="matmulnbits"``), float
                            activations.

For each: file size (and ratio to FP32); ms per batch as the median over ``--repeats``
interleaved repeats (every repeat visits all variants round-robin, rotating the start; one repeat
= median of ``--runs`` timed runs after ``--warmup``), the ratio to FP32 as the median of the
per-repeat ratios; the largest difference from the torch deploy model and the SQNR against the
float model; the ops ONNX Runtime runs (``SessionOptions.optimized_model_filepath``). Repeats
during which other processes kept more than a quarter of a core busy are left out and re-run
(as in ``harness.py``). Prints a table and writes ``benchmarks/results/int4_matmul.json``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from harness import (
    CLEAN_LOAD,
    add_timing_args,
    cpu_info,
    interleaved_repeats,
    quiet_call,
    time_runs,
    wait_idle,
)
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.demo import sqnr_db
from lowbit.export.onnx import quiet_exporter, strip_metadata

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "int4_matmul.json"
DIMS = (384, 1536)
LAYERS = 6
DYNAMIC = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    d, h = DIMS
    blocks = [nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)) for _ in range(LAYERS)]
    return nn.Sequential(*blocks).eval()


def export_fp32(model: nn.Module, path: Path, example: torch.Tensor) -> None:
    with quiet_exporter():
        program = torch.onnx.export(model, (example,), dynamo=True, verbose=False,
                                    dynamic_shapes=DYNAMIC)
        if program is None:
            raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNXProgram")
        program.save(str(path))
    onnx.save(strip_metadata(onnx.load(str(path))), str(path))


def lowbit_variants(model: nn.Module, example: torch.Tensor, out: Path) -> dict[str, dict]:
    specs = {"w8 per-channel": QuantSpec(bits=8, granularity="per_channel")}
    for g in (32, 64, 128):
        specs[f"w4 g{g}"] = QuantSpec(bits=4, granularity="per_group", group_size=g)
    variants = {}
    for label, spec in specs.items():
        rules = [LayerRule(types=["Linear"], weight=spec)]
        dm = lowbit.convert(lowbit.quantize(model, QuantConfig(rules=rules)))
        formats = ["dequantize", "matmulnbits"] if spec.bits == 4 else ["auto"]
        for fmt in formats:
            name = label if fmt == "auto" else f"{label} {fmt}"
            path = out / f"ffn_{name.replace(' ', '_')}.onnx"
            start = time.perf_counter()
            report, caught = quiet_call(lowbit.export_onnx, dm, path, (example,),
                                        dynamic_shapes=DYNAMIC, int4_format=fmt)
            variants[name] = {
                "path": path, "deploy_model": dm, "config": None,
                "weights": f"{spec.bits}-bit {spec.granularity}"
                           + (f"({spec.group_size})" if spec.group_size else ""),
                "int4_format": report.int4_storage if report.int4_weights else None,
                "export_s": round(time.perf_counter() - start, 1), "export_warnings": caught,
                "parity": {"output_max_abs": report.parity.output_max_abs,
                           "output_max_lsb": report.parity.output_max_lsb,
                           "weights_compared": report.parity.weights_compared,
                           "weights_differing": report.parity.weights_differing},
            }
            if name == "w4 g64 dequantize":
                variants[f"{name} acc0"] = dict(variants[name], config={ACCURACY_KEY: "0"})
    return variants


def session(path: Path, threads: int, config: dict | None = None,
            optimized: Path | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def executed_ops(path: Path, threads: int, config: dict | None) -> dict:
    """The ops ONNX Runtime runs after its graph optimizations, and MatMulNBits' accuracy."""
    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        session(path, threads, config, optimized=opt)
        graph = onnx.load(str(opt)).graph
    names = [n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
             for n in graph.node]
    levels = sorted({next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
                     for n in graph.node if n.op_type == "MatMulNBits"})
    return {"counts": dict(sorted(collections.Counter(names).items())),
            "matmulnbits_accuracy_levels": levels}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_timing_args(ap, repeats=5, max_repeats=12, budget=240, runs=3, warmup=1)
    ap.add_argument("--batch", type=int, nargs=2, default=(32, 128), metavar=("B", "S"),
                    help="input batch and sequence length (default 32 128)")
    ap.add_argument("--wait-idle", type=float, default=60,
                    help="wait up to this many seconds for other processes to go quiet before "
                         "timing (default 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be >= 5")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    model = build_model(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    example = torch.randn(2, 16, DIMS[0], generator=gen)
    x = torch.randn(*args.batch, DIMS[0], generator=gen)
    with torch.no_grad():
        ref_float = model(x).numpy()

    tmp = tempfile.TemporaryDirectory(prefix="lowbit-int4-")
    work = Path(tmp.name)
    fp32 = work / "ffn_fp32.onnx"
    export_fp32(model, fp32, example)
    variants: dict[str, dict] = {"fp32": {"path": fp32, "deploy_model": None, "config": None,
                                          "weights": "float32", "int4_format": None}}
    variants.update(lowbit_variants(model, example, work))
    names = list(variants)
    print(f"[{time.perf_counter() - t0:5.1f}s] exported {len(names)} files", flush=True)

    fp32_bytes = fp32.stat().st_size
    feed = {session(fp32, args.threads).get_inputs()[0].name: x.numpy()}
    for v in variants.values():
        v["bytes"] = v["path"].stat().st_size
        v["size_ratio"] = v["bytes"] / fp32_bytes
        v["ops"] = executed_ops(v["path"], args.threads, v["config"])
        got = session(v["path"], args.threads, v["config"]).run(None, feed)[0]
        dm = v.pop("deploy_model")
        acc = {"sqnr_vs_float_db": sqnr_db(ref_float, got)}
        if dm is not None:
            with torch.no_grad():
                deploy = dm(x).numpy()
            acc["max_abs_vs_deploy"] = float(np.abs(got - deploy).max())
            acc["max_abs_deploy_output"] = float(np.abs(deploy).max())
        v["accuracy"] = acc

    waited, load = wait_idle(args.wait_idle)
    print(f"[{time.perf_counter() - t0:5.1f}s] timing {len(names)} variants x >= "
          f"{args.repeats} repeats ...", flush=True)
    sessions = {n: session(variants[n]["path"], args.threads, variants[n]["config"])
                for n in names}
    per_repeat: dict[str, list[float]] = {n: [] for n in names}

    def run(n: str) -> None:
        per_repeat[n].append(time_runs(sessions[n], feed, args.runs, args.warmup))

    quiet_rounds, others = interleaved_repeats(names, run, repeats=args.repeats,
                                        max_repeats=args.max_repeats, budget=args.budget)
    used = quiet_rounds
    contended = len(used) < 5
    if contended:
        used = list(range(len(others)))
        print(f"  WARNING: fewer than 5 of {len(others)} repeats ran on a quiet machine; "
              "the figures below are contended", flush=True)
    for n in names:
        ms = [per_repeat[n][i] for i in used]
        ratios = [per_repeat[n][i] / per_repeat["fp32"][i] for i in used]
        variants[n]["latency"] = {"ms": statistics.median(ms), "min_ms": min(ms),
                                  "max_ms": max(ms), "ratio_to_fp32": statistics.median(ratios),
                                  "ratio_repeats": ratios, "all_repeats_ms": per_repeat[n]}

    result = {
        "question": "Which ONNX form of 4-bit per-group Linear weights runs faster in ONNX "
                    "Runtime (INT4 DequantizeLinear -> MatMul or com.microsoft.MatMulNBits), "
                    "and how big is the file?",
        "command": "python benchmarks/int4_matmul.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": cpu_info(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "lowbit": lowbit.__version__},
        "setup": {"model": f"{LAYERS} x (Linear {DIMS[0]}->{DIMS[1]}, GELU, Linear "
                           f"{DIMS[1]}->{DIMS[0]}), random init",
                  "params": sum(p.numel() for p in model.parameters()),
                  "input": list(x.shape), "export_example": list(example.shape),
                  "dynamic_axes": "batch, sequence", "threads": args.threads,
                  "repeats": args.repeats, "runs": args.runs, "warmup": args.warmup,
                  "seed": args.seed,
                  "latency": "median over repeats of (median of `runs` timed runs); repeats "
                             "interleaved round-robin over variants; ratio = median of "
                             "per-repeat variant/fp32 ms"},
        "load": {"waited_for_idle_s": round(waited, 1), "others_busy_cores_before": load,
                 "others_busy_cores_per_repeat": others, "used_repeats": used,
                 "contended": contended,
                 "note": "cores kept busy by other processes during each repeat; only repeats "
                         f"under {CLEAN_LOAD} enter the figures (all, and contended=true, if "
                         "fewer than 5)"},
        "variants": {n: {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in variants[n].items() if k != "path"}
                     | {"file": variants[n]["path"].name} for n in names},
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print()
    print(format_table(result))
    known = [others[i] for i in used if others[i] is not None]
    busy = f"{statistics.mean(known):.2f} (max {max(known):.2f})" if known else "unknown"
    print(f"\nmachine: {result['machine']['model_name']}; ORT {ort.__version__}, "
          f"{args.threads} intra-op threads; other processes kept {busy} cores busy in the "
          f"{len(used)} repeats used (of {len(others)}); wrote {args.out} in "
          f"{result['elapsed_s']:.0f} s")
    tmp.cleanup()
    return result


def format_table(result: dict) -> str:
    lines = ["| variant | file KiB | size vs fp32 | ms / batch | x fp32 time | ORT runs | "
             "max abs vs deploy | SQNR vs float dB |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for name, v in result["variants"].items():
        counts = v["ops"]["counts"]
        heavy = {k.split(".")[-1]: c for k, c in counts.items()
                 if k.split(".")[-1] in ("MatMulNBits", "MatMul", "FusedMatMul", "Gemm",
                                         "DequantizeLinear")}
        ran = ", ".join(f"{c} {k}" for k, c in heavy.items())
        levels = v["ops"]["matmulnbits_accuracy_levels"]
        if levels:
            ran += f" (acc {'/'.join(map(str, levels))})"
        err = v["accuracy"].get("max_abs_vs_deploy")
        sq = v["accuracy"]["sqnr_vs_float_db"]
        lines.append(
            f"| {name} | {v['bytes'] / 1024:.0f} | {v['size_ratio']:.3f} | "
            f"{v['latency']['ms']:.0f} | {v['latency']['ratio_to_fp32']:.2f} | {ran} | "
            f"{'-' if err is None else f'{err:.1e}'} | "
            f"{'inf' if sq == float('inf') else f'{sq:.1f}'} |")
    lines.append("x fp32 time: median of per-repeat variant/fp32 ms (< 1 is faster). max abs vs "
                 "deploy: ORT output vs the torch deploy model on the timed input. acc: "
                 "MatMulNBits accuracy_level ORT runs (0 float, 4 int8 activations).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
