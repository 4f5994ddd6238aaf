"""ONNX export: integer initializers, ORT parity for every exportable layer, side files,
atomic writes."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.export.params import unpack_weight
from lowbit.nn import Add, MatMul

W8 = QuantSpec(bits=8, granularity="per_channel")
A8 = QuantSpec(bits=8, symmetric=False, observer="minmax")


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.add = Add()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(torch.relu(self.conv(x)), x)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.mm = MatMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mm(self.q(x), self.k(x).transpose(-1, -2))


CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)),
               (8, 16), [LayerRule(types=["Linear"], weight=W8, input=A8)]),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 3)),
               (4, 3, 20), [LayerRule(types=["Conv1d"], weight=W8, input=A8)]),
    "conv2d-grouped": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(),
                                             nn.Conv2d(8, 8, 3, groups=8, padding=1)),
                       (4, 4, 10, 10), [LayerRule(types=["Conv2d"], weight=W8, input=A8)]),
    "per-tensor-w4-output": (lambda: nn.Sequential(nn.Linear(16, 16)), (8, 16),
                             [LayerRule(types=["Linear"], weight=QuantSpec(bits=4),
                                        input=A8, output=A8)]),
    "a4-narrow": (lambda: nn.Sequential(nn.Linear(16, 16)), (8, 16),
                  [LayerRule(types=["Linear"], weight=QuantSpec(bits=8, narrow_range=True),
                             input=QuantSpec(bits=4, symmetric=False))]),
    "per-group": (lambda: nn.Sequential(nn.Linear(32, 16)), (8, 32),
                  [LayerRule(types=["Linear"], input=A8,
                             weight=QuantSpec(bits=4, granularity="per_group", group_size=8))]),
    "dynamic": (lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), (8, 16),
                QuantConfig.preset("w8").rules),
    "add": (Residual, (2, 4, 6, 6), [LayerRule(types=["Conv2d"], weight=W8, input=A8),
                                     LayerRule(types=["add"], input=A8)]),
    "matmul": (Attention, (2, 5, 8), [LayerRule(types=["Linear"], weight=W8, input=A8),
                                      LayerRule(types=["matmul"], input=A8)]),
}


def _export(name, tmp_path, **kwargs):
    factory, shape, rules = CASES[name]
    model = factory().eval()
    qm = lowbit.quantize(model, QuantConfig(rules=rules))
    lowbit.calibrate(qm, [torch.randn(shape) for _ in range(4)], progress=False)
    dm = lowbit.convert(qm)
    x = torch.randn(shape)
    report = lowbit.export_onnx(dm, tmp_path / f"{name}.onnx", (x,), **kwargs)
    return qm, dm, x, report


@pytest.mark.parametrize("name", list(CASES))
def test_ort_runs_the_export_like_torch(name, tmp_path, quiet):
    qm, dm, x, report = _export(name, tmp_path)
    onnx.checker.check_model(str(report.onnx_path))
    with torch.no_grad():
        if name == "dynamic":  # integer accumulation vs float matmul: rounding order differs
            assert torch.allclose(dm(x), qm(x), atol=1e-5)
        else:
            assert torch.equal(dm(x), qm(x)), "the deploy model must compute the fake-quant model"
    parity = report.parity
    assert parity.output_max_lsb is not None and parity.output_max_lsb <= 1.01
    if parity.codes_identical is not None:
        # Fused integer kernels requantize in their own order: off-by-one codes happen, rarely.
        assert parity.codes_max_diff <= 1
        assert parity.codes_identical >= 0.95
    assert not parity.unmatched


def test_weights_are_integer_initializers_and_the_file_shrinks(tmp_path, quiet):
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval()
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    lowbit.calibrate(qm, [torch.randn(16, 256)], progress=False)
    report = lowbit.export_onnx(lowbit.convert(qm), tmp_path / "m.onnx", (torch.randn(4, 256),))
    proto = onnx.load(str(report.onnx_path))
    big = [i for i in proto.graph.initializer if np.prod(i.dims) >= 256 * 256]
    assert len(big) == 2
    assert all(i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) for i in big)
    assert report.size_ratio < 0.3
    assert report.onnx_path.stat().st_size < 0.3 * 2 * 256 * 256 * 4


def test_side_files_hold_the_quant_params_and_packed_codes(tmp_path, quiet):
    qm, dm, x, report = _export("per-tensor-w4-output", tmp_path)
    params = json.loads(report.params_path.read_text())
    layer = params["layers"]["0"]
    assert layer["weight"]["bits"] == 4 and layer["weight"]["granularity"] == "per_tensor"
    assert layer["input"]["signed"] is False and layer["output"]["bits"] == 8
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(report.weights_path))
    with safe_open(str(report.weights_path), "pt") as fh:
        meta = fh.metadata()
    codes = unpack_weight(tensors, meta, "0.weight")
    assert torch.equal(codes, dm[0].weight.codes.to(torch.int64))
    assert tensors["0.weight"].numel() == (16 * 16 + 1) // 2  # two 4-bit codes a byte


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_weight_storage_dtype_keeps_the_values(dtype, tmp_path, quiet):
    qm, dm, x, report = _export("linear", tmp_path, weight_dtype=dtype)
    proto = onnx.load(str(report.onnx_path))
    codes = [i for i in proto.graph.initializer if i.name.endswith("weight.codes")]
    want = onnx.TensorProto.INT8 if dtype == "int8" else onnx.TensorProto.UINT8
    assert codes and all(i.data_type == want for i in codes)
    # Same values either way: the ONNX reference evaluator reproduces the torch deploy model.
    with torch.no_grad():
        assert np.allclose(_onnx_reference(report.onnx_path, x), dm(x).numpy(), atol=1e-5)


def _onnx_reference(path, x):
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(str(path)).run(None, {"input": x.numpy()})[0]


def test_failed_export_leaves_no_file(tmp_path, quiet):
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    lowbit.calibrate(qm, [torch.randn(4, 16)], progress=False)
    dm = lowbit.convert(qm)
    with pytest.raises(ValueError, match=r"layer '0' \(DeployLinear\) rejected its input"):
        lowbit.export_onnx(dm, tmp_path / "bad.onnx", (torch.randn(4, 3),))  # wrong width
    assert list(tmp_path.iterdir()) == []


def test_export_validates_its_arguments(tmp_path, quiet):
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    lowbit.calibrate(qm, [torch.randn(4, 16)], progress=False)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="lowbit.convert"):
        lowbit.export_onnx(qm, tmp_path / "m.onnx", (x,))
    dm = lowbit.convert(qm)
    with pytest.raises(ValueError, match="does not exist"):
        lowbit.export_onnx(dm, tmp_path / "missing" / "m.onnx", (x,))
    with pytest.raises(TypeError, match="example_inputs"):
        lowbit.export_onnx(dm, tmp_path / "m.onnx", x)
    with pytest.raises(ValueError, match="weight_dtype"):
        lowbit.export_onnx(dm, tmp_path / "m.onnx", (x,), weight_dtype="int4")
    with pytest.raises(TypeError, match="path"):
        lowbit.export_onnx(dm, 3, (x,))


def test_export_restores_the_training_flag(tmp_path, quiet):
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    lowbit.calibrate(qm, [torch.randn(4, 16)], progress=False)
    dm = lowbit.convert(qm).train()
    with pytest.raises(ValueError, match="rejected its input"):
        lowbit.export_onnx(dm, tmp_path / "bad.onnx", (torch.randn(4, 3),))
    assert dm.training
    lowbit.export_onnx(dm, tmp_path / "m.onnx", (torch.randn(4, 16),))
    assert dm.training


def test_report_names_float_layers(tmp_path):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    cfg = QuantConfig(rules=[LayerRule(types=["Linear"], weight=W8, input=A8),
                             LayerRule(names=["2"])])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm = lowbit.quantize(model, cfg)
    assert any("'2'" in str(w.message) or "2:" in str(w.message) for w in caught)
    lowbit.calibrate(qm, [torch.randn(4, 16)], progress=False)
    report = lowbit.export_onnx(lowbit.convert(qm), tmp_path / "m.onnx", (torch.randn(2, 16),))
    assert "2" in report.float_layers
    assert "float layers" in str(report) and "kept in float" in str(report)
    params = json.loads(report.params_path.read_text())
    assert "2" in params["float_layers"] and "2" not in params["layers"]


@pytest.mark.parametrize(("vnni", "machine", "want"), [
    (True, "x86_64", "int8"), (False, "x86_64", "uint8"), (None, "x86_64", "uint8"),
    (None, "aarch64", "int8")], ids=["x86-vnni", "x86-avx2", "x86-unknown", "arm"])
def test_auto_weight_dtype_avoids_saturating_kernels(vnni, machine, want, monkeypatch):
    from lowbit.export import encoding

    monkeypatch.setattr(encoding, "cpu_has_vnni", lambda: vnni)
    monkeypatch.setattr(encoding.platform, "machine", lambda: machine)
    dtype, reason = encoding.resolve_weight_dtype("auto")
    assert dtype == want and reason.startswith("auto")
    assert encoding.resolve_weight_dtype("int8") == ("int8", "as requested")


def test_a_saturating_export_is_reported_with_the_fix(tmp_path, quiet, monkeypatch):
    """Large uint8 codes times full-range int8 weights: exact on VNNI, wrong without it."""
    from lowbit.export import encoding

    model = nn.Sequential(nn.Linear(256, 64)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.sign(torch.randn(64, 256)))  # every weight at ±127
    cfg = QuantConfig(rules=[LayerRule(types=["Linear"], weight=W8, input=A8, output=A8)])
    qm = lowbit.quantize(model, cfg)
    x = torch.rand(32, 256) * 4 + 1  # all inputs near the top of the uint8 grid
    lowbit.calibrate(qm, [x], progress=False)
    dm = lowbit.convert(qm)
    exact = lowbit.export_onnx(dm, tmp_path / "u.onnx", (x,), weight_dtype="uint8")
    assert exact.parity.codes_max_diff <= 1
    if encoding.cpu_has_vnni() is False:  # this CPU saturates: the report must say so
        with pytest.warns(UserWarning, match="weight_dtype='uint8'"):
            lowbit.export_onnx(dm, tmp_path / "s.onnx", (x,), weight_dtype="int8")
