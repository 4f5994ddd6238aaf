"""The CLI never prints a traceback (unless --debug): every subcommand run with missing, wrong
and corrupted inputs fails with one line on stderr and exit code 2 (bad usage or input) or 1
(a failure while running). To extend: add a row to CASES."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from fault_helpers import SRC, deploy_model, export

import lowbit.io as lio
from lowbit.cli import main

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def make():
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))

    def broken():
        raise KeyError("the factory itself fails")

    not_callable = 3
""")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "fault_cli_model.py").write_text(FACTORY)
    (tmp_path / "syntax_error_model.py").write_text("def make(:\n")
    np.save(tmp_path / "data.npy", np.random.randn(16, 6).astype(np.float32))
    np.save(tmp_path / "wide.npy", np.random.randn(16, 5).astype(np.float32))
    np.save(tmp_path / "scalar.npy", np.float32(1.0))
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 not a zip")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "dup.yaml").write_text("version: 1\nversion: 1\n")
    (tmp_path / "bad.json").write_text('{"version": 1,}')
    (tmp_path / "params.quant_params.json").write_text("{not json")
    (tmp_path / "outdir.onnx").mkdir()
    return tmp_path


MODEL = "{root}/fault_cli_model.py:make"
CASES: dict[str, tuple[list[str], int, str]] = {
    "plan-no-colon": (["plan", "--model", "{root}/fault_cli_model.py"], 2, r"must look like"),
    "plan-factory-raises": (["plan", "--model", "{root}/fault_cli_model.py:broken"], 2,
                            r"KeyError"),
    "plan-factory-not-callable": (["plan", "--model", "{root}/fault_cli_model.py:not_callable"],
                                  2, r"must name a callable"),
    "plan-syntax-error": (["plan", "--model", "{root}/syntax_error_model.py:make"], 2,
                          r"running .*syntax_error_model.py' failed: SyntaxError"),
    "plan-weights-corrupt-pt": (["plan", "--model", MODEL, "--weights", "{root}/corrupt.pt"],
                                2, r"cannot be read as a torch state dict"),
    "plan-weights-corrupt-safetensors": (["plan", "--model", MODEL, "--weights",
                                          "{root}/corrupt.safetensors"], 2,
                                         r"not a valid safetensors file"),
    "plan-weights-not-dict": (["plan", "--model", MODEL, "--weights", "{root}/list.pt"], 2,
                              r"must hold a state dict, got list"),
    "plan-config-duplicate-key": (["plan", "--model", MODEL, "--config", "{root}/dup.yaml"], 2,
                                  r"dup.yaml:2: duplicate key 'version'"),
    "plan-config-bad-json": (["plan", "--model", MODEL, "--config", "{root}/bad.json"], 2,
                             r"bad.json:1:15: invalid JSON"),
    "plan-out-missing-folder": (["plan", "--model", MODEL, "--out", "{root}/no/plan.yaml"], 2,
                                r"folder .* does not exist"),
    "plan-out-bad-suffix": (["plan", "--model", MODEL, "--out", "{root}/plan.txt"], 2,
                            r"must end in .yaml"),
    "plan-preset-unknown": (["plan", "--model", MODEL, "--preset", "w3a3"], 2,
                            r"invalid choice: 'w3a3'"),
    "quantize-data-missing": (["quantize", "--model", MODEL, "--data", "{root}/none.npy"], 2,
                              r"does not exist"),
    "quantize-data-corrupt": (["quantize", "--model", MODEL, "--data", "{root}/corrupt.npy"],
                              2, r"cannot be read as a NumPy array"),
    "quantize-data-scalar": (["quantize", "--model", MODEL, "--data", "{root}/scalar.npy"], 2,
                             r"holds a scalar"),
    "quantize-data-wrong-width": (["quantize", "--model", MODEL, "--data", "{root}/wide.npy"],
                                  2, r"layer '0' \(QuantLinear\) rejected its input"),
    "quantize-plan-duplicate-key": (["quantize", "--model", MODEL, "--data", "{root}/data.npy",
                                     "--plan", "{root}/dup.yaml"], 2, r"duplicate key"),
    "quantize-max-batches-0": (["quantize", "--model", MODEL, "--data", "{root}/data.npy",
                                "--max-batches", "0"], 2, r"`max_batches` must be a positive"),
    "quantize-batch-size-word": (["quantize", "--model", MODEL, "--data", "{root}/data.npy",
                                  "--batch-size", "many"], 2, r"invalid int value: 'many'"),
    "quantize-out-directory": (["quantize", "--model", MODEL, "--data", "{root}/data.npy",
                                "--out", "{root}/outdir.onnx"], 2, r"is a directory"),
    "report-missing": (["report", "{root}/none.quant_params.json"], 2, r"does not exist"),
    "report-corrupt": (["report", "{root}/params.quant_params.json"], 2,
                       r"params.quant_params.json:1:2: not a valid quant_params.json"),
    "report-no-argument": (["report"], 2, r"the following arguments are required: params"),
    "demo-epochs-word": (["demo", "--epochs", "x"], 2, r"invalid int value"),
    "no-command": ([], 2, r"the following arguments are required: COMMAND"),
}


def _one_line_error(err: str) -> str:
    # A progress bar redraws itself with "\r" on one terminal line; count visible lines.
    lines = [line.split("\r")[-1] for line in err.split("\n") if line.split("\r")[-1].strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_cli_errors_are_one_line(case: str, root: Path, capsys, monkeypatch) -> None:
    argv, code, match = CASES[case]
    monkeypatch.chdir(root)
    before = sorted(p.name for p in root.iterdir())
    try:
        got = main([a.format(root=root) for a in argv])
    except SystemExit as exit_info:  # argparse: bad usage
        got = exit_info.code
    assert got == code
    line = _one_line_error(capsys.readouterr().err)
    assert "error" in line
    import re

    assert re.search(match, line), line
    assert sorted(p.name for p in root.iterdir()) == before, "a failed command left files"


def test_report_names_a_side_file_that_does_not_belong(tmp_path, capsys) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    export(deploy_model(0), a / "m.onnx")
    export(deploy_model(1), b / "m.onnx")
    assert main(["report", str(a / "m.quant_params.json")]) == 0
    capsys.readouterr()
    (a / "m.quant_params.json").write_bytes((b / "m.quant_params.json").read_bytes())
    assert main(["report", str(a / "m.quant_params.json")]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "MismatchedFileSetError: m.quant_params.json does not belong to m.onnx" in line


def test_a_full_disk_is_a_runtime_failure(root, capsys, monkeypatch) -> None:
    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lio, "_write_all", full)
    code = main(["quantize", "--model", MODEL.format(root=root), "--data", str(root / "data.npy"),
                 "--out", str(root / "m.onnx")])
    assert code == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "No space left on device; free some disk space" in line and "--debug" in line
    assert not (root / "m.onnx").exists()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_debug_shows_the_traceback_and_plain_runs_do_not(root) -> None:
    args = ["report", str(root / "params.quant_params.json")]
    plain = _cli(*args, cwd=root)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.count("\n") == 1
    debug = _cli("--debug", *args, cwd=root)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
