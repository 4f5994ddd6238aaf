"""``lowbit quantize --input-shape`` / ``--example-inputs`` for models with several inputs, and
``--help`` texts that print each thing once."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lowbit.cli import main
from lowbit.config import QuantConfig

SOURCE = '''
import torch
from torch import nn


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(6, 4)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def make():
    torch.manual_seed(0)
    return TwoInputs()


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 8, generator=g), torch.randn(5, 6, generator=g)) for _ in range(3)]
'''
STEM = "lowbit_cli_two_inputs"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("inputs")
    path = root / f"{STEM}.py"
    path.write_text(SOURCE)
    yield path
    sys.modules.pop(STEM, None)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _shapes(path: Path) -> dict[str, list[int | str]]:
    graph = onnx.load(str(path)).graph
    return {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in graph.input}


def test_input_shape_per_input(model_file, capsys, tmp_path, quiet):
    out = tmp_path / "m.onnx"
    code, stdout, err = _run(capsys, "quantize", "--model", f"{model_file}:make",
                             "--data", f"{model_file}:batches", "--input-shape", "3,8",
                             "--input-shape", "3,6", "--out", out)
    assert code == 0, err
    assert _shapes(out) == {"x": [3, 8], "y": [3, 6]}  # not the calibration batches' 5 rows
    assert "ORT parity" in stdout


def test_input_shape_with_dynamic_batch(model_file, capsys, tmp_path, quiet):
    out = tmp_path / "m.onnx"
    code, _, err = _run(capsys, "quantize", "--model", f"{model_file}:make",
                        "--data", f"{model_file}:batches", "--input-shape", "3,8",
                        "--input-shape", "3,6", "--dynamic-batch", "--exporter", "torchscript",
                        "--out", out)
    assert code == 0, err
    shapes = _shapes(out)
    assert shapes["x"][1] == 8 and isinstance(shapes["x"][0], str)


@pytest.mark.parametrize("kind", ["npz", "pt-dict", "pt-tuple"])
def test_example_inputs_file(kind, model_file, capsys, tmp_path, quiet):
    x, y = torch.randn(2, 8), torch.randn(2, 6)
    if kind == "npz":
        path = tmp_path / "ex.npz"
        np.savez(path, first=x.numpy(), second=y.numpy())
        names = ["first", "second"]
    else:
        path = tmp_path / "ex.pt"
        torch.save({"first": x, "second": y} if kind == "pt-dict" else (x, y), path)
        names = ["first", "second"] if kind == "pt-dict" else ["x", "y"]
    out = tmp_path / "m.onnx"
    code, _, err = _run(capsys, "quantize", "--model", f"{model_file}:make",
                        "--data", f"{model_file}:batches", "--example-inputs", path,
                        "--out", out)
    assert code == 0, err
    assert list(_shapes(out)) == names
    assert list(_shapes(out).values()) == [[2, 8], [2, 6]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--input-shape", "3,x"], r"--input-shape must be comma-separated positive ints like "
                                   r"1,3,224,224, got '3,x'"),
        (["--input-shape", "0,8"], r"got '0,8'"),
        (["--input-shape", "3,8", "--example-inputs", "e.pt"],
         r"give --input-shape or --example-inputs, not both"),
        (["--example-inputs", "{tmp}/missing.pt"], r"--example-inputs file '.*missing.pt' "
                                                    r"does not exist"),
        (["--example-inputs", "{tmp}/bad.txt"], r"must be a .pt/.pth or .npz file"),
    ],
    ids=["not-int", "zero", "both", "missing", "suffix"],
)
def test_example_input_errors(extra, message, model_file, capsys, tmp_path):
    (tmp_path / "bad.txt").write_text("1")
    args = [a.format(tmp=tmp_path) for a in extra]
    code, _, err = _run(capsys, "quantize", "--model", f"{model_file}:make",
                        "--data", f"{model_file}:batches", *args, "--out", tmp_path / "m.onnx")
    assert code == 2 and err.startswith("lowbit quantize: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("command", ["plan", "quantize"])
def test_help_lists_each_preset_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for name in QuantConfig.presets():
        assert len(re.findall(rf"(?<![\w-]){re.escape(name)}(?![\w-])", out)) <= 2, name
    # the list itself appears once; the default is named in words
    assert out.count("w8a8-qat") == 1 and out.count("w1a1-bnn") == 1
    for option in ("--input-shape", "--example-inputs"):
        assert option in out
    if command == "quantize":
        assert "--max-length" in out and "--exporter" in out
