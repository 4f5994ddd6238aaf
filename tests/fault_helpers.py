"""Shared pieces of the fault-injection tests: tiny deploy models, a script that exports one
in a child process, and the check that a folder holds one complete export set."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

import lowbit

SRC = str(Path(__file__).resolve().parents[1] / "src")
TEMP_MARKERS = (".lowbit-stage-", ".lowbit-export-")


def deploy_model(seed: int = 0, width: int = 16) -> nn.Module:
    """A calibrated, converted two-layer MLP; different seeds give different files."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = lowbit.quantize(model, lowbit.QuantConfig.preset("w8a8"))
        lowbit.calibrate(qm, [torch.randn(8, width)], progress=False)
    return lowbit.convert(qm)


def export(dm: nn.Module, path: Path, width: int = 16) -> lowbit.ExportReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lowbit.export_onnx(dm, path, (torch.randn(4, width),))


def leftovers(folder: Path) -> list[str]:
    """Temp files and staging folders a writer left behind."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name.startswith(TEMP_MARKERS) or p.name.endswith(".lowbit-tmp"))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every regular file of ``folder`` (name → bytes)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_one_complete_set(onnx_path: Path, old: dict[str, bytes],
                            new: dict[str, bytes] | None = None) -> str:
    """The folder holds the complete ``old`` set or a complete new one (``new`` if given, else
    any set whose three files all differ from the old ones), checked by ``load_export`` (which
    also finishes an interrupted commit first), and no temp files. Returns "old" or "new"."""
    loaded = lowbit.load_export(onnx_path)  # raises on a mixed set
    assert loaded.quant_params["onnx"] == onnx_path.name
    folder = onnx_path.parent
    assert leftovers(folder) == []
    files = snapshot(folder)
    if files == old:
        return "old"
    assert files.keys() == old.keys(), sorted(files)
    if new is not None:
        assert files == new
    else:
        assert all(files[k] != old[k] for k in old), "a mix of old and new files"
    return "new"


CHILD_EXPORT = r"""
import os, sys, time, warnings
sys.path.insert(0, {src!r})
sys.path.insert(0, {tests!r})
import lowbit.io
from fault_helpers import deploy_model, export
from pathlib import Path

slow = float(sys.argv[3])
real_replace = os.replace
def slow_replace(a, b):
    time.sleep(slow)  # widen the rename window the parent aims its kill at
    real_replace(a, b)
os.replace = slow_replace
real_commit = lowbit.io.FileSet.commit
def commit(self):
    print("commit", flush=True)
    real_commit(self)
lowbit.io.FileSet.commit = commit
dm = deploy_model(int(sys.argv[2]))
print("ready", flush=True)
export(dm, Path(sys.argv[1]))
print("done", flush=True)
"""


def child_script(folder: Path) -> Path:
    script = folder.parent / f"child_export_{os.getpid()}.py"
    script.write_text(CHILD_EXPORT.format(src=SRC, tests=str(Path(__file__).parent)))
    return script
