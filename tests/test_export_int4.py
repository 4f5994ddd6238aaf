"""4-bit per-group Linear weights in ONNX: packed INT4 DequantizeLinear or MatMulNBits.

Both formats must store half a byte per code, run in ONNX Runtime like the torch deploy model
(2-D inputs and 3-D inputs with dynamic batch/sequence axes) and hold exactly the deploy
model's codes; other weights must not notice the option.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import lowbit
from lowbit import LayerRule, QuantConfig, QuantSpec
from lowbit.deploy import IntWeight
from lowbit.export.verify import check_weights

FORMATS = ["dequantize", "matmulnbits"]
K, HIDDEN, GROUP = 128, 256, 64
DYNAMIC = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
SPECS = {
    "sym": QuantSpec(bits=4, symmetric=True, granularity="per_group", group_size=GROUP),
    "asym": QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=GROUP),
}


def _deploy(spec: QuantSpec, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(K, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, K))
    qm = lowbit.quantize(model, QuantConfig(rules=[LayerRule(types=["Linear"], weight=spec)]))
    return lowbit.convert(qm)


@pytest.fixture(scope="module")
def deploy() -> dict[str, nn.Module]:
    return {name: _deploy(spec) for name, spec in SPECS.items()}


@pytest.fixture(scope="module")
def exports(deploy, tmp_path_factory) -> dict[tuple[str, str, str], lowbit.ExportReport]:
    """(spec, format, "2d"/"3d") → report; each export is verified in ORT on its inputs."""
    out = tmp_path_factory.mktemp("int4")
    reports = {}
    for spec, dm in deploy.items():
        for fmt in FORMATS:
            reports[spec, fmt, "2d"] = lowbit.export_onnx(
                dm, out / f"{spec}_{fmt}_2d.onnx", (torch.randn(4, K),), int4_format=fmt)
            reports[spec, fmt, "3d"] = lowbit.export_onnx(
                dm, out / f"{spec}_{fmt}_3d.onnx", (torch.randn(2, 3, K),), int4_format=fmt,
                dynamic_shapes=DYNAMIC, verify_inputs=[(torch.randn(5, 7, K),)])
    return reports


def _weights(dm: nn.Module) -> dict[str, IntWeight]:
    return {n: m for n, m in dm.named_modules() if isinstance(m, IntWeight)}


def _session(path, accuracy_level: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if accuracy_level is not None:
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy_level)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_file_holds_half_a_byte_per_weight_code(exports, deploy, fmt):
    report = exports["sym", fmt, "2d"]
    codes = sum(w.codes.numel() for w in _weights(deploy["sym"]).values())
    scales = sum(w.scale.numel() for w in _weights(deploy["sym"]).values())
    biases = HIDDEN + K
    size = report.onnx_path.stat().st_size
    # 1/8 of the float weights, plus one float scale per group, the biases and the graph.
    assert codes // 2 < size < codes // 2 + 4 * (scales + biases) + 2048
    assert size < 0.16 * 4 * codes
    assert report.size_ratio < 0.16
    assert sorted(report.int4_weights) == ["0.weight", "2.weight"]


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rank", ["2d", "3d"])
def test_ort_computes_what_the_deploy_model_computes(exports, deploy, spec, fmt, rank):
    report = exports[spec, fmt, rank]
    x = torch.randn(4, K) if rank == "2d" else torch.randn(3, 9, K)  # 2-D: static shape
    with torch.no_grad():
        ref = deploy[spec](x).numpy()
    # "dequantize" runs as MatMulNBits too, with int8 activations unless the session asks for
    # accuracy level 0; the file itself means float activations.
    sess = _session(report.onnx_path, "0" if fmt == "dequantize" else None)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    parity = report.parity
    if fmt == "matmulnbits":
        assert parity.output_max_abs < 1e-5
    else:  # export_onnx's own check runs ORT's defaults: about one int8 step of activations
        assert parity.output_max_lsb is not None and parity.output_max_lsb < 4


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_codes_read_back_from_the_file_are_the_deploy_models(exports, deploy, spec, fmt):
    report = exports[spec, fmt, "3d"]
    assert report.parity.weights_compared == 2 and not report.parity.weights_differing
    proto = onnx.load(str(report.onnx_path))
    inits = {i.name: i for i in proto.graph.initializer}
    for name, w in _weights(deploy[spec]).items():
        stored = inits[f"{name}.codes"]
        if fmt == "dequantize":  # [K, N], decoded by onnx itself
            codes = numpy_helper.to_array(stored).astype(np.int64).T
        else:  # [N, K / block, block / 2] uint8, low nibble first, signed codes + 8
            b = numpy_helper.to_array(stored).astype(np.int64).reshape(w.codes.shape[0], -1)
            codes = np.stack([b & 15, b >> 4], axis=-1).reshape(w.codes.shape)
            codes = codes - (8 if w.grid.signed else 0)
        np.testing.assert_array_equal(codes, w.codes.numpy())


def test_the_code_check_finds_a_changed_code(exports, deploy):
    proto = onnx.load(str(exports["asym", "matmulnbits", "2d"].onnx_path))
    assert check_weights(deploy["asym"], proto) == (2, [])
    init = next(i for i in proto.graph.initializer if i.name == "2.weight.codes")
    b = numpy_helper.to_array(init).copy()
    b.flat[5] ^= 0x10  # one code of one byte
    init.CopyFrom(numpy_helper.from_array(b, init.name))
    assert check_weights(deploy["asym"], proto) == (2, ["2.weight"])


@pytest.mark.parametrize("spec", list(SPECS))
def test_matmulnbits_replaces_the_weight_and_its_matmul(exports, spec):
    proto = onnx.load(str(exports[spec, "matmulnbits", "3d"].onnx_path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 2
    assert "DequantizeLinear" not in ops and "MatMul" not in ops and "Transpose" not in ops
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert all(n.domain == "com.microsoft" for n in nbits)
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs == {"K": K, "N": HIDDEN, "bits": 4, "block_size": GROUP}
    # Zero points travel only where they are not MatMulNBits' default (8 = signed 0).
    assert all(len(n.input) == (4 if spec == "asym" else 3) for n in nbits)
    inits = {i.name: i for i in proto.graph.initializer}
    b = inits[nbits[0].input[1]]
    assert b.data_type == onnx.TensorProto.UINT8
    assert list(b.dims) == [HIDDEN, K // GROUP, GROUP // 2]
    floats = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert max(int(np.prod(i.dims)) for i in floats) <= HIDDEN * K // GROUP  # scales, biases


@pytest.mark.parametrize("spec", list(SPECS))
def test_dequantize_stores_int4_initializers_that_ort_fuses(exports, spec, tmp_path):
    path = exports[spec, "dequantize", "3d"].onnx_path
    proto = onnx.load(str(path))
    int4 = onnx.TensorProto.INT4 if spec == "sym" else onnx.TensorProto.UINT4
    inits = {i.name: i for i in proto.graph.initializer}
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 2
    for dq in dqs:
        assert inits[dq.input[0]].data_type == int4
        assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": GROUP}
        if spec == "asym":
            assert inits[dq.input[2]].data_type == int4
        else:
            assert len(dq.input) == 2  # zero point 0 is the default
    assert list(inits["0.weight.codes"].dims) == [K, HIDDEN]  # [K, N] feeding MatMul
    assert {n.op_type for n in proto.graph.node} >= {"MatMul"} and "Transpose" not in {
        n.op_type for n in proto.graph.node}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ran = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert ran.count("MatMulNBits") == 2 and "DequantizeLinear" not in ran


@pytest.mark.parametrize("bad", ["int4", "MatMulNBits", "", None, 4])
def test_a_bad_int4_format_is_refused(deploy, tmp_path, bad):
    with pytest.raises(ValueError, match=r"`int4_format` must be one of \['auto', "
                                         r"'dequantize', 'matmulnbits'\], got") as err:
        lowbit.export_onnx(deploy["sym"], tmp_path / "m.onnx", (torch.randn(2, K),),
                           int4_format=bad)
    assert repr(bad) in str(err.value)
    assert not (tmp_path / "m.onnx").exists()


def test_other_weights_do_not_notice_the_option(tmp_path):
    """8-bit per-group, 4-bit per-channel and 8-bit per-channel weights stay int8 DQ, and a
    4-bit per-group weight whose group is no MatMulNBits block falls back to INT4 DQ."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    rules = [
        LayerRule(names=["0"], weight=QuantSpec(bits=8, granularity="per_group", group_size=32)),
        LayerRule(names=["2"], weight=QuantSpec(bits=4, granularity="per_channel")),
        LayerRule(names=["4"], weight=QuantSpec(bits=8, granularity="per_channel")),
        LayerRule(names=["6"], weight=QuantSpec(bits=4, granularity="per_group", group_size=8)),
    ]
    dm = lowbit.convert(lowbit.quantize(model, QuantConfig(rules=rules)))
    graphs = {}
    for fmt in ["auto", *FORMATS]:
        report = lowbit.export_onnx(dm, tmp_path / f"{fmt}.onnx", (torch.randn(3, 64),),
                                    int4_format=fmt)
        assert report.int4_weights == ["6.weight"]
        assert report.int4_storage.startswith("matmulnbits" if fmt == "auto" else fmt)
        assert report.parity.weights_compared == 4 and not report.parity.weights_differing
        proto = onnx.load(str(report.onnx_path))
        inits = {i.name: i for i in proto.graph.initializer}
        eight = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        assert all(inits[f"{n}.weight.codes"].data_type in eight for n in "024")
        assert inits["6.weight.codes"].data_type == onnx.TensorProto.INT4
        assert "MatMulNBits" not in [n.op_type for n in proto.graph.node]
        graphs[fmt] = proto.graph.SerializeToString()
    assert graphs["dequantize"] == graphs["matmulnbits"] == graphs["auto"]
