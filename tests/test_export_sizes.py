"""The report's sizes are bytes: the file written, and the exact serialized size of the same
graph with float32 weights (checked by building that graph), close to a real FP32 export."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantConfig
from lowbit.deploy import DynamicLinear, IntBias, IntWeight, QuantizeDequantize


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10)).eval()


def _export(model, preset, path):
    qm = lowbit.quantize(model, QuantConfig.preset(preset))
    lowbit.calibrate(qm, [torch.randn(8, 64) for _ in range(3)], progress=False)
    dm = lowbit.convert(qm)
    return dm, lowbit.export_onnx(dm, path, (torch.randn(4, 64),))


def _float_graph(proto, model) -> onnx.ModelProto:
    """The written graph with each weight as one float32 initializer, built explicitly."""
    import numpy as np

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    drop, add = set(), []
    for name, m in model.named_modules():
        if isinstance(m, (IntWeight, IntBias)):
            drop |= {f"{name}.codes", f"{name}.scale", f"{name}.zero_point"}
            add.append((name, m.codes.shape))
        elif isinstance(m, DynamicLinear):
            drop |= {f"{name}.weight_t", f"{name}.weight_scale", f"{name}.weight_zero_point"}
            add.append((f"{name}.weight", m.weight_t.shape))
        elif isinstance(m, QuantizeDequantize):
            drop |= {f"{name}.scale", f"{name}.zero_point"}
    keep = [i for i in out.graph.initializer if i.name not in drop]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    for name, shape in add:
        out.graph.initializer.append(onnx.numpy_helper.from_array(
            np.zeros(tuple(shape), np.float32), name))
    return out


@pytest.mark.parametrize("preset", ["w8a8", "w8", "w4a8"])
def test_sizes_are_the_bytes_written_and_exact_float_bytes(preset, tmp_path, quiet):
    dm, report = _export(_mlp(), preset, tmp_path / "m.onnx")
    assert report.onnx_bytes == (tmp_path / "m.onnx").stat().st_size
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert report.float_bytes == _float_graph(proto, dm).ByteSize()
    assert report.size_ratio == report.onnx_bytes / report.float_bytes


def test_float_bytes_match_a_real_fp32_export(tmp_path, quiet):
    from lowbit.export.onnx import quiet_exporter, strip_metadata

    model = _mlp()
    _, report = _export(model, "w8a8", tmp_path / "q.onnx")
    with quiet_exporter():
        program = torch.onnx.export(model, (torch.randn(4, 64),), dynamo=True)
    assert program is not None
    program.save(str(tmp_path / "f.onnx"))
    onnx.save(strip_metadata(onnx.load(str(tmp_path / "f.onnx"))), str(tmp_path / "f.onnx"))
    fp32 = (tmp_path / "f.onnx").stat().st_size
    # The same weights as float32; the quantized graph's extra Q/DQ nodes add a few hundred bytes.
    assert fp32 <= report.float_bytes <= fp32 * 1.03 + 2048
    assert 0.25 < report.size_ratio < 0.3  # int8 codes: a quarter of the weight bytes, plus scales


def test_external_data_counts(tmp_path, quiet):
    from lowbit.export.report import written_bytes

    model = _mlp()
    _, report = _export(model, "w8a8", tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.save(proto, str(tmp_path / "ext.onnx"), save_as_external_data=True,
              location="ext.data", size_threshold=0)
    on_disk = (tmp_path / "ext.onnx").stat().st_size + (tmp_path / "ext.data").stat().st_size
    assert written_bytes(tmp_path / "ext.onnx") == on_disk
    assert on_disk > (tmp_path / "ext.onnx").stat().st_size
