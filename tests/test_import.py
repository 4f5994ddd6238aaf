"""Importing lowbit is cheap: no exporter, runtime or data library until it is used."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("onnx", "onnxruntime", "onnxscript", "sklearn", "yaml", "safetensors")


def test_import_pulls_in_no_optional_dependency():
    code = ("import sys, lowbit; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_names():
    import lowbit

    for name in ("QuantConfig", "LayerRule", "QuantSpec", "Plan", "plan", "quantize",
                 "calibrate", "set_calibrating", "convert", "export_onnx"):
        assert hasattr(lowbit, name)
