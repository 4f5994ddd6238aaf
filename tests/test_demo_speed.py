"""The demo's speed lines: why int8 is not faster at batch 1, and the batch where it is."""

from __future__ import annotations

import numpy as np

from lowbit.demo import SpeedRow, speed_by_batch, speed_note


def _row(batch: int, fp32: float, int8: float) -> SpeedRow:
    return {"batch": batch, "fp32_ms": fp32, "int8_ms": int8}


def test_note_names_the_first_batch_where_int8_is_faster():
    note = speed_note([_row(1, 0.02, 0.03), _row(64, 0.6, 0.7), _row(512, 5.0, 4.0),
                       _row(2048, 20.0, 10.0)])
    first, second = note.splitlines()
    assert first.startswith("int8 at batch 1: 0.67x the speed of fp32") and "per-node" in first
    assert second.startswith("int8 is faster from batch 512 here (5.00 ms fp32 vs 4.00 ms int8")
    assert "b2048 2.00x" in second


def test_the_batch_1_reason_follows_the_measured_ratio():
    """A shared machine can time int8 ahead at batch 1: the line must not then say that the
    overhead outweighs the integer arithmetic."""
    note = speed_note([_row(1, 0.033, 0.03), _row(512, 5.0, 4.0)])
    first = note.splitlines()[0]
    assert first.startswith("int8 at batch 1: 1.10x the speed of fp32") and "outweigh" not in first
    assert "outweigh" in speed_note([_row(1, 0.02, 0.03)]).splitlines()[0]


def test_note_says_so_when_int8_never_wins():
    note = speed_note([_row(1, 0.02, 0.03), _row(512, 5.0, 6.0)])
    assert "not faster at any batch size measured here (b1 0.67x, b512 0.83x)" in note


def test_speed_by_batch_measures_each_size(tmp_path, quiet):
    import torch

    import lowbit
    from lowbit.demo import export_float

    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
    export_float(model, tmp_path / "f.onnx", torch.randn(4, 16))
    qm = lowbit.quantize(model, lowbit.QuantConfig.preset("w8a8"))
    lowbit.calibrate(qm, [torch.randn(8, 16)], progress=False)
    lowbit.export_onnx(lowbit.convert(qm), tmp_path / "q.onnx", (torch.randn(4, 16),),
                       dynamic_shapes=({0: torch.export.Dim("batch")},))
    pool = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)  # < 12 rows
    rows = speed_by_batch(tmp_path / "f.onnx", tmp_path / "q.onnx", pool, batches=(1, 12),
                          repeats=2)
    assert [r["batch"] for r in rows] == [1, 12]
    assert all(r["fp32_ms"] > 0 and r["int8_ms"] > 0 for r in rows)
