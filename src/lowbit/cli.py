"""The ``lowbit`` command: ``demo``, ``plan``, ``quantize``, ``analyze``, ``report``.

Built on the same public functions as the Python API. A model is named as
``pkg.module:factory`` or ``path/to/file.py:factory`` (a callable returning an ``nn.Module``),
or is a local Hugging Face model directory (``lowbit.hf``); weights load with
``torch.load(weights_only=True)`` or safetensors; calibration data comes from ``.npy`` / ``.npz``
files, a ``module:factory`` returning an iterable of batches, or a text file (one text a line)
for a model directory.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EPILOG = "Run `lowbit COMMAND --help` for the options of each command."
DEFAULT_PRESET = "w8a8"
DEFAULT_HF_PRESET = "w8a8-transformer"


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
        if spec is None or spec.loader is None:
            raise ValueError(f"{what}: cannot load {target!r} as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(path.stem, module)
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            raise ValueError(f"{what}: running {target!r} failed: {type(err).__name__}: "
                             f"{err}") from err
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ValueError(f"{what}: cannot import {target!r}: {err}") from None
        except Exception as err:
            raise ValueError(f"{what}: importing {target!r} failed: {type(err).__name__}: "
                             f"{err}") from err
    if not hasattr(module, name):
        raise ValueError(f"{what}: {target!r} has no attribute {name!r}")
    return getattr(module, name)


def build_model(ref: str, weights: str | None) -> Any:
    import torch

    factory = load_object(ref, "--model")
    if not callable(factory):
        raise TypeError(f"--model {ref!r} must name a callable that returns a torch.nn.Module, "
                        f"got {type(factory).__name__}")
    try:
        model = factory()
    except Exception as err:
        raise ValueError(f"--model factory {ref!r} failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"--model factory must return a torch.nn.Module, got {type(model).__name__}")
    if weights:
        try:
            model.load_state_dict(load_weights(weights))
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"--weights {weights!r} do not fit the model: "
                             f"{' '.join(str(err).split())}") from None
    return model.eval()


@dataclass
class LoadedModel:
    """What the commands need of a model: the module, and for model directories the
    tokenizer-backed loader and the names the ONNX graph keeps."""

    model: Any
    hf: Any = None  # lowbit.hf.HFModel for a Hugging Face directory
    input_names: list[str] | None = None
    output_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)


def load_model(args: argparse.Namespace) -> LoadedModel:
    """``--model`` as a factory reference or a Hugging Face directory."""
    from lowbit import hf

    if hf.is_model_dir(args.model):
        if args.weights:
            raise ValueError("--weights does not apply to a model directory: its weights load "
                             f"from {args.model!r}")
        loaded = hf.load_model_dir(args.model, max_length=getattr(args, "max_length", 128))
        return LoadedModel(loaded.model, loaded, loaded.input_names, [loaded.output_name],
                           [f"loaded {loaded.architecture} from {args.model} (offline), "
                            f"inputs {', '.join(loaded.input_names)}, output "
                            f"{loaded.output_name}"])
    if Path(args.model).is_dir():
        raise ValueError(f"--model directory {args.model!r} has no config.json (a Hugging Face "
                         "model directory holds config.json, weights and a tokenizer)")
    return LoadedModel(build_model(args.model, args.weights))


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` → ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise ValueError("--input-shape must be comma-separated positive ints like "
                         f"1,3,224,224, got {text!r}")
    return shape


def load_example_inputs(path: str) -> tuple[tuple[Any, ...], list[str] | None]:
    """``.pt`` (a tensor, a tuple/list of tensors or a dict name → tensor, loaded with
    ``weights_only=True``) or ``.npz`` (arrays in file order): ``(inputs, names or None)``."""
    import numpy as np
    import torch

    if not Path(path).is_file():
        raise ValueError(f"--example-inputs file {path!r} does not exist")
    if path.endswith(".npz"):
        with np.load(path) as arrays:
            names = list(arrays.files)
            return tuple(torch.from_numpy(arrays[n]) for n in names), names
    if not path.endswith((".pt", ".pth")):
        raise ValueError(f"--example-inputs must be a .pt/.pth or .npz file, got {path!r}")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, torch.Tensor):
        return (data,), None
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        return tuple(data.values()), [str(k) for k in data]
    if isinstance(data, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in data):
        return tuple(data), None
    raise ValueError(f"--example-inputs {path!r} must hold a tensor, a tuple/list of tensors "
                     f"or a dict of tensors, got {type(data).__name__}")


def example_inputs(args: argparse.Namespace) -> tuple[tuple[Any, ...] | None, list[str] | None]:
    """``--input-shape`` (random float32 inputs) or ``--example-inputs``; ``(None, None)``
    when neither is given."""
    import torch

    shapes = getattr(args, "input_shape", None)
    file = getattr(args, "example_inputs", None)
    if shapes and file:
        raise ValueError("give --input-shape or --example-inputs, not both")
    if shapes:
        generator = torch.Generator().manual_seed(0)
        return tuple(torch.randn(parse_input_shape(s), generator=generator)
                     for s in shapes), None
    if file:
        return load_example_inputs(file)
    return None, None


def load_weights(path: str) -> dict[str, Any]:
    import torch

    if not Path(path).is_file():
        raise ValueError(f"--weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as err:
            raise ValueError(f"--weights {path!r} is not a valid safetensors file: {err}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors: all mean "not a state dict file"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"--weights {path!r} cannot be read as a torch state dict "
                         f"(torch.load weights_only): {type(err).__name__}: {first}") from None
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
        try:
            arr = np.load(ref, allow_pickle=False)
            if ref.endswith(".npz"):
                if not arr.files:
                    raise ValueError("the archive holds no arrays")
                arr = arr[arr.files[0]]
            tensor = torch.from_numpy(np.asarray(arr, dtype=np.float32))
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"--data {ref!r} cannot be read as a NumPy array: {err}") from None
        if tensor.dim() == 0:
            raise ValueError(f"--data {ref!r} holds a scalar; it must hold a batch of inputs "
                             "(first dimension: samples)")
        return list(tensor.split(batch_size))
    return list(load_object(ref, "--data")())


def cmd_demo(args: argparse.Namespace) -> int:
    from lowbit.demo import (
        OBSERVERS,
        format_table,
        load_digits,
        run_demo,
        speed_by_batch,
        speed_note,
    )

    rows = run_demo(args.out, epochs=args.epochs, weight_bits=args.weight_bits)
    print(format_table(rows))
    out = Path(args.out)
    speed = speed_by_batch(out / "digits_fp32.onnx",
                           out / f"digits_w{args.weight_bits}a8_{OBSERVERS[0]}.onnx",
                           load_digits().x_test.numpy())
    print(speed_note(speed))
    print(f"artifacts in {Path(args.out).resolve()}")
    return 0


def _config(args: argparse.Namespace, loaded: LoadedModel | None = None) -> Any:
    from lowbit import QuantConfig

    if args.config:
        return QuantConfig.from_file(args.config)
    if args.preset is None:
        return QuantConfig.preset(DEFAULT_HF_PRESET if loaded is not None and loaded.hf
                                  else DEFAULT_PRESET)
    return QuantConfig.preset(args.preset)


def cmd_plan(args: argparse.Namespace) -> int:
    import lowbit

    loaded = load_model(args)
    example, _ = example_inputs(args)
    the_plan = lowbit.plan(loaded.model, _config(args, loaded), example)
    the_plan.to_file(args.out)
    print(the_plan.summary())
    print(f"wrote {args.out}: edit it, then `lowbit quantize --plan {args.out} ...`")
    return 0


def _calibration_batches(args: argparse.Namespace, loaded: LoadedModel) -> list[Any]:
    if loaded.hf is not None and args.data.endswith(".txt"):
        from lowbit import hf

        return hf.text_batches(loaded.hf, hf.read_texts(args.data), args.batch_size,
                               args.max_length)
    if args.data.endswith(".txt"):
        raise ValueError(f"--data {args.data!r}: text files need --model to be a Hugging Face "
                         "model directory (its tokenizer reads them)")
    return load_batches(args.data, args.batch_size)


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    import lowbit

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive int, got {args.batch_size}")
    if args.max_length < 2:
        raise ValueError(f"--max-length must be an int >= 2, got {args.max_length}")
    if args.tune_scales is not None and args.tune_scales < 1:
        raise ValueError(f"--tune-scales must be a positive number of steps, got "
                         f"{args.tune_scales}")
    loaded = load_model(args)
    for note in loaded.notes:
        print(note)
    given, given_names = example_inputs(args)
    config = lowbit.Plan.from_file(args.plan) if args.plan else _config(args, loaded)
    batches = _calibration_batches(args, loaded)
    if not batches:
        raise ValueError(f"--data {args.data!r} holds no batches")
    first = batches[0] if isinstance(batches[0], (tuple, list)) else (batches[0],)
    qm = lowbit.quantize(loaded.model, config, example_inputs=given)
    lowbit.calibrate(qm, batches, max_batches=args.max_batches)
    if args.tune_scales is not None:
        tuned = lowbit.tune_scales(qm, loaded.model, batches[:args.max_batches],
                                   steps=args.tune_scales)
        print(tuned.summary())
    dm = lowbit.convert(qm)
    input_names = given_names or loaded.input_names
    shapes = None
    if loaded.hf is not None:
        from lowbit import hf

        example = given or hf.export_example(tuple(first))
        shapes = hf.dynamic_shapes(loaded.hf, max(args.max_length, example[0].shape[1]))
    else:
        example = given or tuple(first)
        if args.dynamic_batch:
            shapes = tuple({0: torch.export.Dim("batch")} for _ in example)
    report = lowbit.export_onnx(dm, args.out, example, dynamic_shapes=shapes,
                                input_names=input_names, output_names=loaded.output_names,
                                weight_dtype=args.weight_dtype, exporter=args.exporter)
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
    """Summarise a ``.quant_params.json``; for a ``.onnx`` file also say what ONNX Runtime
    runs (its sidecar found by name, as ``export_onnx`` writes it)."""
    path = Path(args.params)
    if path.suffix != ".onnx":
        _print_params(_read_params(path))
        return 0
    from lowbit.export.deploy import deploy_graph
    from lowbit.export.onnx import side_paths

    if not path.is_file():
        raise FileNotFoundError(f"{args.params!r} does not exist")
    params_path = side_paths(path)[0]
    data = None
    if params_path.is_file():
        data = _read_params(params_path)
        _print_params(data)
    else:
        print(f"no {params_path.name} beside it: quantized layers found by initializer names")
    try:
        graph = deploy_graph(path, params=data, float_layers=(data or {}).get("float_layers"))
    except Exception as err:  # noqa: BLE001 - ORT refusing the file is the user's answer
        raise ValueError(f"ONNX Runtime could not load {args.params!r}: {err}") from None
    print()
    print("deploy graph")
    for line in graph.lines():
        print(f"  {line}")
    if graph.float_layers:
        print("float layers")
        for name, why in graph.float_layers.items():
            print(f"  {name}: {why}")
    return 0


def _read_params(path: Path) -> dict[str, Any]:
    """The quant params, checked against the ``.onnx`` beside them (a mismatched set is
    refused, naming the file that does not belong)."""
    from lowbit.export.files import read_quant_params

    return read_quant_params(path)


def _print_params(data: dict[str, Any]) -> None:
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


class _Parser(argparse.ArgumentParser):
    """Bad usage is one line on stderr (not the usage block) and exit code 2."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from lowbit.config import QuantConfig

    parser = _Parser(
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
                       help="model factory, 'pkg.module:factory' or 'file.py:factory', or a "
                       "local Hugging Face model directory (config.json + weights + "
                       "tokenizer; loaded offline with the class its config names)")
        p.add_argument("--weights", help="state dict: .pt/.pth (torch.load, weights_only) or "
                       ".safetensors (factories only)")
        p.add_argument("--preset", default=None, choices=QuantConfig.presets(), metavar="NAME",
                       help=f"config preset (default: {DEFAULT_PRESET}; "
                       f"{DEFAULT_HF_PRESET} for a model directory), one of: "
                       + ", ".join(QuantConfig.presets()))
        p.add_argument("--config", help="QuantConfig file (.yaml/.json); overrides --preset")
        p.add_argument("--input-shape", action="append", metavar="SHAPE",
                       help="shape of a float32 example input, e.g. 1,3,224,224; repeat it "
                       "for several inputs (random values: used to trace the model and "
                       "export it)")
        p.add_argument("--example-inputs", metavar="FILE",
                       help="example inputs instead of --input-shape: .pt (a tensor, a tuple "
                       "of tensors or a dict name → tensor) or .npz (arrays in order; their "
                       "names become the ONNX input names)")

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
                       "holds the inputs), 'module:factory' returning an iterable of batches, "
                       "or for a model directory a .txt file (one text a line)")
    quant.add_argument("--batch-size", type=int, default=32,
                       help="batch size for .npy/.npz/.txt data (default: %(default)s)")
    quant.add_argument("--max-length", type=int, default=128,
                       help="tokenizer truncation length for .txt data (default: %(default)s)")
    quant.add_argument("--max-batches", type=int, default=None,
                       help="use at most this many calibration batches")
    quant.add_argument("--tune-scales", type=int, default=None, metavar="STEPS",
                       help="after calibration, train the weight scales for this many steps "
                       "on the same data, codes fixed (lowbit.tune_scales; 300 is a start)")
    quant.add_argument("--out", default="model.int8.onnx", help="ONNX file (default: %(default)s)")
    quant.add_argument("--weight-dtype", default="auto", choices=["auto", "int8", "uint8"],
                       help="storage of 8-bit weights (default: %(default)s, see docs)")
    quant.add_argument("--dynamic-batch", action="store_true",
                       help="export with a dynamic batch dimension (model directories always "
                       "get dynamic batch and sequence axes)")
    quant.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "torchscript"],
                       help="torch exporter; auto tries dynamo, then TorchScript "
                       "(default: %(default)s)")
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

    report = sub.add_parser("report", help="summarise an exported model: its quant_params.json "
                            "and, for a .onnx file, the kernels ONNX Runtime runs")
    report.add_argument("params", help="path to <model>.onnx (its <model>.quant_params.json is "
                        "read from beside it) or to <model>.quant_params.json")
    report.set_defaults(func=cmd_report)
    return parser


def _one_line(err: BaseException) -> str:
    """An error as one line: its first line, shortened."""
    text = " ".join(str(err).split("\n", 1)[0].split()) or type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


# Errors about what the user gave (arguments, files, models): exit code 2. Anything else is a
# failure while running (disk full, exporter, ONNX Runtime): exit code 1.
USAGE_ERRORS = (TypeError, ValueError, NotImplementedError, FileNotFoundError, IsADirectoryError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; errors are one line on stderr (a traceback only with ``--debug``).

    Exit codes: 0 success, 2 bad usage or bad input, 1 a failure while running, 130 when
    interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted before or after the command
    parser = build_parser()
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an error")
    args = parser.parse_args(argv)  # bad usage: argparse prints one line and exits with 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"lowbit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        usage = isinstance(err, USAGE_ERRORS)
        hint = ("fix the input and run again" if usage else
                "run again with --debug for the traceback")
        print(f"lowbit {args.command}: error: {type(err).__name__}: {_one_line(err)} "
              f"({hint})", file=sys.stderr)
        return 2 if usage else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
