"""The ``lowbit`` command: ``demo``, ``plan``, ``quantize``, ``analyze``, ``report``.

Built on the same public functions as the Python API. A model is named as
``pkg.module:factory`` or ``path/to/file.py:factory`` (a callable returning an ``nn.Module``);
weights load with ``torch.load(weights_only=True)`` or safetensors; calibration data comes from
``.npy`` / ``.npz`` files or a ``module:factory`` returning an iterable of batches.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EPILOG = "Run `lowbit COMMAND --help` for the options of each command."


def load_object(ref: str, what: str) -> Any:
    """``module.path:name`` or ``file.py:name`` → the object."""
    if ":" not in ref:
        raise ValueError(f"{what} must look like 'pkg.module:name' or 'file.py:name', got {ref!r}")
    target, _, name = ref.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"{what}: file {target!r} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(path.stem, module)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ValueError(f"{what}: cannot import {target!r}: {err}") from None
    if not hasattr(module, name):
        raise ValueError(f"{what}: {target!r} has no attribute {name!r}")
    return getattr(module, name)


def build_model(ref: str, weights: str | None) -> Any:
    import torch

    model = load_object(ref, "--model")()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"--model factory must return a torch.nn.Module, got {type(model).__name__}")
    if weights:
        try:
            model.load_state_dict(load_weights(weights))
        except RuntimeError as err:
            raise ValueError(f"--weights {weights!r} do not fit the model: {err}") from None
    return model.eval()


def load_weights(path: str) -> dict[str, Any]:
    import torch

    if not Path(path).is_file():
        raise ValueError(f"--weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"--weights {path!r} must hold a state dict, got {type(state).__name__}")
    return state


def load_batches(ref: str, batch_size: int) -> list[Any]:
    """Calibration batches from ``.npy``/``.npz`` (first array, split into batches) or a factory."""
    import numpy as np
    import torch

    if batch_size < 1:
        raise ValueError(f"--batch-size must be a positive int, got {batch_size}")
    if ref.endswith((".npy", ".npz")):
        if not Path(ref).is_file():
            raise ValueError(f"--data file {ref!r} does not exist")
        arr = np.load(ref)
        if ref.endswith(".npz"):
            arr = arr[arr.files[0]]
        tensor = torch.from_numpy(np.asarray(arr, dtype=np.float32))
        return list(tensor.split(batch_size))
    return list(load_object(ref, "--data")())


def cmd_demo(args: argparse.Namespace) -> int:
    from lowbit.demo import format_table, run_demo

    rows = run_demo(args.out, epochs=args.epochs, weight_bits=args.weight_bits)
    print(format_table(rows))
    print(f"artifacts in {Path(args.out).resolve()}")
    return 0


def _config(args: argparse.Namespace) -> Any:
    from lowbit import QuantConfig

    if args.config:
        return QuantConfig.from_file(args.config)
    return QuantConfig.preset(args.preset)


def cmd_plan(args: argparse.Namespace) -> int:
    import lowbit

    model = build_model(args.model, args.weights)
    the_plan = lowbit.plan(model, _config(args))
    the_plan.to_file(args.out)
    print(the_plan.summary())
    print(f"wrote {args.out}: edit it, then `lowbit quantize --plan {args.out} ...`")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    import lowbit

    model = build_model(args.model, args.weights)
    config = lowbit.Plan.from_file(args.plan) if args.plan else _config(args)
    batches = load_batches(args.data, args.batch_size)
    if not batches:
        raise ValueError(f"--data {args.data!r} holds no batches")
    qm = lowbit.quantize(model, config)
    lowbit.calibrate(qm, batches, max_batches=args.max_batches)
    dm = lowbit.convert(qm)
    example = batches[0] if isinstance(batches[0], (tuple, list)) else (batches[0],)
    shapes = None
    if args.dynamic_batch:
        shapes = tuple({0: torch.export.Dim("batch")} for _ in example)
    report = lowbit.export_onnx(dm, args.out, example, dynamic_shapes=shapes,
                                weight_dtype=args.weight_dtype)
    print(report)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    import lowbit

    model = build_model(args.model, args.weights)
    config = lowbit.Plan.from_file(args.plan) if args.plan else _config(args)
    batches = load_batches(args.data, args.batch_size)
    if not batches:
        raise ValueError(f"--data {args.data!r} holds no batches")
    qm = lowbit.quantize(model, config)
    lowbit.calibrate(qm, batches, max_batches=args.max_batches)
    report = lowbit.analyze(qm, batches, max_batches=args.max_batches)
    print(report.table(sort=args.sort))
    for path, write in ((args.html, report.to_html), (args.json, report.to_json)):
        if path:
            print(f"wrote {write(path)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    path = Path(args.params)
    data = json.loads(path.read_text())
    if data.get("format") != "lowbit.quant_params":
        raise ValueError(f"{args.params!r} is not a lowbit quant_params.json file")
    print(f"{'layer':<32} {'type':<10} {'weight':<18} {'input':<18} {'output':<18}")
    for name, entry in data["layers"].items():
        cells = []
        for key in ("weight", "input", "output"):
            q = entry.get(key)
            if q is None:
                cells.append("float")
            elif q.get("dynamic"):
                cells.append("uint8 dynamic")
            else:
                kind = "int" if q["signed"] else "uint"
                cells.append(f"{kind}{q['bits']} {q['granularity']}")
        print(f"{name:<32} {entry['type']:<10} " + " ".join(f"{c:<18}" for c in cells))
    for name, why in data.get("float_layers", {}).items():
        print(f"{name:<32} float      ({why})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lowbit.config import QuantConfig

    parser = argparse.ArgumentParser(
        prog="lowbit", description="Quantize PyTorch models and export integer ONNX.",
        epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train a CNN on digits, quantize with every observer, "
                          "export, run in ONNX Runtime, print a table")
    demo.add_argument("--out", default="lowbit-demo", help="artifact folder (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs (default: %(default)s)")
    demo.add_argument("--weight-bits", type=int, default=8, choices=[2, 4, 8],
                      help="weight bits (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True,
                       help="model factory, 'pkg.module:factory' or 'file.py:factory'")
        p.add_argument("--weights", help="state dict: .pt/.pth (torch.load, weights_only) or "
                       ".safetensors")
        p.add_argument("--preset", default="w8a8", choices=QuantConfig.presets(),
                       help="config preset (default: %(default)s)")
        p.add_argument("--config", help="QuantConfig file (.yaml/.json); overrides --preset")

    plan = sub.add_parser("plan", help="write the editable per-layer plan of a model")
    model_args(plan)
    plan.add_argument("--out", default="plan.yaml", help="plan file, .yaml or .json "
                      "(default: %(default)s)")
    plan.set_defaults(func=cmd_plan)

    quant = sub.add_parser("quantize", help="post-training quantization, then ONNX export")
    model_args(quant)
    quant.add_argument("--plan", help="edited plan file from `lowbit plan`; overrides --preset "
                       "and --config")
    quant.add_argument("--data", required=True, help="calibration data: .npy/.npz (first array "
                       "holds the inputs) or 'module:factory' returning an iterable of batches")
    quant.add_argument("--batch-size", type=int, default=32,
                       help="batch size for .npy/.npz data (default: %(default)s)")
    quant.add_argument("--max-batches", type=int, default=None,
                       help="use at most this many calibration batches")
    quant.add_argument("--out", default="model.int8.onnx", help="ONNX file (default: %(default)s)")
    quant.add_argument("--weight-dtype", default="auto", choices=["auto", "int8", "uint8"],
                       help="storage of 8-bit weights (default: %(default)s, see docs)")
    quant.add_argument("--dynamic-batch", action="store_true",
                       help="export with a dynamic batch dimension")
    quant.set_defaults(func=cmd_quantize)

    analyze = sub.add_parser("analyze", help="quantize and calibrate as `quantize` does, then "
                             "per-layer SQNR, ranges and clipping (table, HTML, JSON)")
    model_args(analyze)
    analyze.add_argument("--plan", help="edited plan file; overrides --preset and --config")
    analyze.add_argument("--data", required=True, help="calibration data, also analysed: "
                         ".npy/.npz or 'module:factory' (as for `quantize`)")
    analyze.add_argument("--batch-size", type=int, default=32,
                         help="batch size for .npy/.npz data (default: %(default)s)")
    analyze.add_argument("--max-batches", type=int, default=None,
                         help="calibrate on and analyse at most this many batches")
    analyze.add_argument("--html", help="write the report page here (needs matplotlib)")
    analyze.add_argument("--json", help="write the table as JSON here")
    analyze.add_argument("--sort", choices=["sqnr_isolated", "sqnr_cumulative", "weight_sqnr",
                                            "input_sqnr", "clipped", "size_bits"],
                         help="order the table by this column, ascending (default: model order)")
    analyze.set_defaults(func=cmd_analyze)

    report = sub.add_parser("report", help="summarise a .quant_params.json file")
    report.add_argument("params", help="path to <model>.quant_params.json")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (TypeError, ValueError, NotImplementedError, OSError) as err:
        print(f"lowbit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
