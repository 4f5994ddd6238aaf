"""4-bit embedding rows: packed two codes a byte in the deploy model and the ONNX file, gathered
exactly as the fake-quantized table, per row or in groups along each row."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.deploy import IntWeight, PackedIntWeight

SPECS = {
    "uint4-g16": QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=16),
    "int4-rows": QuantSpec(bits=4, symmetric=True, granularity="per_channel"),
    "uint4-rows": QuantSpec(bits=4, symmetric=False, granularity="per_channel"),
}


class Bag(nn.Module):
    """An embedding table read by a Linear: ids in, floats out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(50, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(ids))


def deployed(spec: QuantSpec) -> tuple[nn.Module, nn.Module]:
    config = QuantConfig(rules=[LayerRule(types=["Embedding"], weight=spec),
                                LayerRule(types=["Linear"], weight=QuantSpec(
                                    bits=8, granularity="per_channel"), input=QuantSpec(
                                    bits=8, symmetric=False, dynamic=True))])
    qm = lowbit.quantize(Bag().eval(), config)
    return qm, lowbit.convert(qm)


@pytest.mark.parametrize("name", SPECS)
def test_packed_rows_gather_the_fake_quantized_table_exactly(name):
    qm, dm = deployed(SPECS[name])
    weight = dm.table.weight
    assert isinstance(weight, PackedIntWeight) and weight.packed.dtype == torch.uint8
    assert weight.packed.shape == (50, 16) and weight.shape == (50, 32)
    ids = torch.tensor([[0, 7, 49], [3, 3, 12]])
    with torch.no_grad():
        assert torch.equal(dm.table(ids), qm.table(ids))
        assert torch.equal(weight(), qm.table.weight_quant(qm.table.weight))  # unpacked codes
    grid = weight.grid
    assert int(weight.codes.min()) >= grid.qmin and int(weight.codes.max()) <= grid.qmax


@pytest.mark.parametrize("name", SPECS)
def test_packed_rows_export_as_uint8_and_match_onnx_runtime(name, tmp_path):
    _, dm = deployed(SPECS[name])
    ids = torch.tensor([[1, 2, 3], [40, 41, 49]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no parity warning
        report = lowbit.export_onnx(dm, tmp_path / "bag.onnx", (ids,),
                                    verify_inputs=[(torch.tensor([[0, 5, 6], [9, 49, 0]]),)])
    assert report.parity.output_max_abs < 1e-5
    tables = [i for i in onnx.load(str(tmp_path / "bag.onnx")).graph.initializer
              if list(i.dims[:1]) == [50] and i.data_type in (onnx.TensorProto.UINT8,
                                                              onnx.TensorProto.INT8)]
    assert [list(t.dims) for t in tables if len(t.dims) == 2 and t.dims[1] >= 16] == [[50, 16]]


def test_eight_bit_rows_stay_one_code_a_byte():
    _, dm = deployed(QuantSpec(bits=8, symmetric=True, granularity="per_channel"))
    assert type(dm.table.weight) is IntWeight and dm.table.weight.codes.shape == (50, 32)


def test_an_embedding_weight_across_rows_is_refused():
    spec = QuantSpec(bits=4, granularity="per_channel", axis=1)
    with pytest.raises(ValueError, match=r"'table' \(Embedding\): the weight must be per_tensor, "
                                         r"per_channel along rows \(axis 0\) or per_group"):
        lowbit.quantize(Bag(), QuantConfig(rules=[LayerRule(types=["Embedding"], weight=spec)]))


def test_the_export_report_counts_a_packed_table_as_float32_for_its_size_ratio(tmp_path):
    reports = {}
    for name, spec in (("int4", SPECS["uint4-rows"]),
                       ("int8", QuantSpec(bits=8, symmetric=True, granularity="per_channel"))):
        _, dm = deployed(spec)
        reports[name] = lowbit.export_onnx(dm, tmp_path / f"{name}.onnx",
                                           (torch.tensor([[1, 2, 3]]),))
    # the same float32 table behind both (the unpacking nodes add ~500 bytes of graph); left
    # out, the packed one would lack its 50 x 32 x 4 = 6400 bytes
    assert abs(reports["int4"].float_bytes - reports["int8"].float_bytes) < 1000
