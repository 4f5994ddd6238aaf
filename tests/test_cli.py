"""The ``lowbit`` command: help texts, ``plan`` / ``quantize`` / ``report`` end to end on a
tiny model from a ``file.py:factory``, and clear errors (exit code 2) for bad input."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lowbit
from lowbit.cli import main

MODEL_SOURCE = '''
from torch import nn


class Tiny(nn.Module):
    """Conv-BN-ReLU, then a Linear head; the ConvTranspose2d is never called."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.unused = nn.ConvTranspose2d(4, 4, 2)

    def forward(self, x):
        return self.fc(self.relu(self.bn(self.conv(x))).flatten(1))


def make():
    return Tiny()


def not_a_module():
    return 42
'''
STEM = "lowbit_cli_tiny_model"
FLOAT_WARNING = r"left 1 layer\(s\) in float: unused: ConvTranspose2d is not supported yet"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The model file, its trained-looking weights (.pt and .safetensors) and .npy data."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("cli")
    source = root / f"{STEM}.py"
    source.write_text(MODEL_SOURCE)
    namespace: dict = {}
    exec(compile(MODEL_SOURCE, str(source), "exec"), namespace)
    torch.manual_seed(1)
    model = namespace["make"]()
    with torch.no_grad():  # weights no fresh factory call would give
        model.conv.weight.mul_(3.0)
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    torch.save(model.state_dict(), root / "weights.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(root / "weights.safetensors"))
    data = np.random.default_rng(0).standard_normal((10, 3, 6, 6)).astype(np.float32)
    np.save(root / "data.npy", data)
    yield {"root": root, "model": source, "pt": root / "weights.pt",
           "safetensors": root / "weights.safetensors", "data": root / "data.npy",
           "float_model": model.eval()}
    sys.modules.pop(STEM, None)  # load_object registers the file under its stem


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _quantize_tiny(capsys: pytest.CaptureFixture, files: dict[str, Any], weights: str,
                   *argv: Any) -> tuple[int, str, str]:
    """``lowbit quantize`` on the tiny model with ``files[weights]`` and its .npy data; its
    unused ConvTranspose2d is the one layer left in float, and the warning says so."""
    with pytest.warns(UserWarning, match=FLOAT_WARNING):
        return _run(capsys, "quantize", "--model", f"{files['model']}:make",
                    "--weights", files[weights], "--data", files["data"], *argv)


# ------------------------------------------------------------------------------ help


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        ([], ["demo", "plan", "quantize", "report", "lowbit COMMAND --help"]),
        (["demo"], ["--out", "--epochs", "--weight-bits"]),
        (["plan"], ["--model", "--weights", "--preset", "--config", "--out", "w8a8"]),
        (["quantize"], ["--model", "--weights", "--preset", "--config", "--plan", "--data",
                        "--batch-size", "--max-batches", "--out", "--weight-dtype",
                        "--dynamic-batch"]),
        (["report"], ["params", "quant_params.json"]),
    ],
    ids=["lowbit", "demo", "plan", "quantize", "report"],
)
def test_help(argv: list[str], mentions: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in mentions:
        assert word in out, word


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


# ------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_plan_writes_an_editable_plan(files, suffix: str, capsys, tmp_path: Path) -> None:
    out = tmp_path / f"plan{suffix}"
    code, stdout, _ = _run(capsys, "plan", "--model", f"{files['model']}:make",
                           "--weights", files["pt"], "--preset", "w4a8", "--out", out)
    assert code == 0
    the_plan = lowbit.Plan.from_file(out)
    assert [x.name for x in the_plan.layers] == ["conv", "fc"]
    assert the_plan["conv"].weight.bits == 4
    assert the_plan.fusions == (("conv", "bn", "relu"),)
    assert the_plan.skipped == {"unused": "ConvTranspose2d is not supported yet"}
    assert "int4/C/minmax" in stdout and f"wrote {out}" in stdout


def test_plan_with_a_config_file(files, capsys, tmp_path: Path) -> None:
    config = lowbit.QuantConfig(rules=[lowbit.LayerRule(types=["Linear"],
                                                        weight=lowbit.QuantSpec(bits=2))])
    config.to_file(tmp_path / "config.json")
    code, _, _ = _run(capsys, "plan", "--model", f"{files['model']}:make",
                      "--config", tmp_path / "config.json", "--out", tmp_path / "plan.yaml")
    assert code == 0
    the_plan = lowbit.Plan.from_file(tmp_path / "plan.yaml")
    assert the_plan["conv"].is_float and the_plan["fc"].weight.bits == 2


def _ort_output(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_quantize_with_an_edited_plan_then_report(files, capsys, tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.yaml"
    assert _run(capsys, "plan", "--model", f"{files['model']}:make", "--out", plan_path)[0] == 0
    data = lowbit.Plan.from_file(plan_path).to_dict()
    data["layers"]["fc"]["input"] = None  # the head keeps float inputs
    lowbit.Plan.from_dict(data).to_file(plan_path)

    onnx_path = tmp_path / "tiny.onnx"
    code, stdout, _ = _quantize_tiny(capsys, files, "pt", "--plan", plan_path,
                                     "--batch-size", 4, "--out", onnx_path)
    assert code == 0
    assert onnx_path.is_file() and "ORT parity" in stdout
    params = json.loads((tmp_path / "tiny.quant_params.json").read_text())
    assert set(params["layers"]) == {"conv", "fc"}
    assert "input" in params["layers"]["conv"] and "input" not in params["layers"]["fc"]

    # the ONNX model runs the saved weights (not the factory's fresh ones)
    x = np.load(files["data"])[:4]
    with torch.no_grad():
        expected = files["float_model"](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_ort_output(onnx_path, x), expected, atol=0.1)

    code, stdout, _ = _run(capsys, "report", tmp_path / "tiny.quant_params.json")
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].split()[:5] == ["layer", "type", "weight", "input", "output"]
    assert lines[1].startswith("conv ") and "per_channel" in lines[1]
    assert lines[2].startswith("fc ") and lines[2].split()[-2:] == ["float", "float"]
    assert "unused" in stdout and "ConvTranspose2d is not supported yet" in stdout


def test_quantize_safetensors_dynamic_batch(files, capsys, tmp_path: Path) -> None:
    onnx_path = tmp_path / "tiny.w8.onnx"
    code, _, _ = _quantize_tiny(capsys, files, "safetensors", "--preset", "w8",
                                "--batch-size", 5, "--max-batches", 1, "--dynamic-batch",
                                "--out", onnx_path)
    assert code == 0
    assert onnx_path.is_file()
    x = np.load(files["data"])[:7]  # a batch size the export never saw
    with torch.no_grad():
        expected = files["float_model"](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_ort_output(onnx_path, x), expected, atol=0.1)

    code, stdout, _ = _run(capsys, "report", tmp_path / "tiny.w8.quant_params.json")
    assert code == 0
    assert "uint8 dynamic" in stdout  # the Linear's input is quantized at run time


def test_quantize_with_tuned_scales(files, capsys, tmp_path: Path) -> None:
    onnx_path = tmp_path / "tiny.w4.onnx"
    code, stdout, _ = _quantize_tiny(capsys, files, "safetensors", "--preset", "w4a8",
                                     "--batch-size", 4, "--tune-scales", 5, "--out", onnx_path)
    assert code == 0
    assert re.search(r"tuned the scales of 2 layer\(s\) for 5 step\(s\)", stdout), stdout
    assert onnx_path.is_file()


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("model_ref", "message"),
    [
        ("{root}/lowbit_cli_tiny_model.py", r"--model must look like 'pkg.module:name' or "
                                             r"'file.py:name', got "),
        ("{root}/missing.py:make", r"--model: file '.*missing.py' does not exist"),
        ("{root}/lowbit_cli_tiny_model.py:build", r"--model: '.*' has no attribute 'build'"),
        ("{root}/lowbit_cli_tiny_model.py:not_a_module",
         r"--model factory must return a torch.nn.Module, got int"),
        ("no_such_pkg_xyz:make", r"--model: cannot import 'no_such_pkg_xyz'"),
    ],
    ids=["no-colon", "missing-file", "missing-factory", "factory-returns-int", "no-module"],
)
def test_bad_model_reference(files, model_ref: str, message: str, capsys, tmp_path) -> None:
    ref = model_ref.format(root=files["root"])
    code, _, err = _run(capsys, "plan", "--model", ref, "--out", tmp_path / "plan.yaml")
    assert code == 2
    assert err.startswith("lowbit plan: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "plan.yaml").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "{root}/nothing.npy"], r"--data file '.*nothing.npy' does not exist"),
        (["--data", "{root}/data.npy", "--weights", "{root}/nothing.pt"],
         r"--weights file '.*nothing.pt' does not exist"),
        (["--data", "{root}/data.npy", "--config", "{root}/config.txt"],
         r"`path` must end in .yaml, .yml or .json"),
        (["--data", "{root}/data.npy", "--config", "{root}/nothing.yaml"],
         r"nothing.yaml' does not exist"),
        (["--data", "{root}/data.npy", "--batch-size", "0"],
         r"--batch-size must be a positive int, got 0"),
        (["--data", "{root}/data.npy", "--tune-scales", "0"],
         r"--tune-scales must be a positive number of steps, got 0"),
    ],
    ids=["missing-data", "missing-weights", "bad-config-suffix", "missing-config",
         "batch-size-0", "tune-scales-0"],
)
def test_quantize_input_errors(files, extra: list[str], message: str, capsys,
                               tmp_path: Path) -> None:
    args = [a.format(root=files["root"]) for a in extra]
    code, _, err = _run(capsys, "quantize", "--model", f"{files['model']}:make", *args,
                        "--out", tmp_path / "m.onnx")
    assert code == 2
    assert err.startswith("lowbit quantize: error: ")
    assert re.search(message, err), err
    assert list(tmp_path.iterdir()) == []


def test_report_of_another_json_file(capsys, tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text('{"format": "something else"}')
    code, _, err = _run(capsys, "report", path)
    assert code == 2
    assert "lowbit report: error: " in err and "is not a lowbit quant_params.json file" in err


def test_bad_choice_is_a_usage_error(files, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", f"{files['model']}:make", "--preset", "w3a3"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'w3a3'" in capsys.readouterr().err


def test_weights_that_do_not_fit_the_model(files, capsys, tmp_path: Path) -> None:
    import torch

    bad = tmp_path / "bad.pt"
    torch.save({"nope.weight": torch.zeros(1)}, bad)
    code, _, err = _run(capsys, "plan", "--model", f"{files['model']}:make", "--weights", bad,
                        "--out", tmp_path / "plan.yaml")
    assert code == 2 and "do not fit the model" in err


def test_report_of_a_missing_file(capsys, tmp_path: Path) -> None:
    code, _, err = _run(capsys, "report", tmp_path / "missing.json")
    assert code == 2 and "lowbit report: error: " in err
