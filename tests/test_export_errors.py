"""Export works or says why: ``ExportError`` names the module and op where each exporter failed
and what to try; bad arguments are ``ValueError``/``TypeError``; ``exporter="auto"`` falls back
to the TorchScript exporter (proved on a transformers Swin model the dynamo exporter rejects);
every submodule's training flag survives an export."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantConfig


@torch.library.custom_op("lowbit_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    """An op neither exporter knows."""
    return x * 2


@mystery.register_fake
def _(x):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


class Odd(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mystery(x)


class WithMystery(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.odd = Odd()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.odd(self.fc(x))


def _deploy(model: nn.Module, shape: tuple[int, ...], preset: str = "w8a8") -> nn.Module:
    qm = lowbit.quantize(model.eval(), QuantConfig.preset(preset))
    lowbit.calibrate(qm, [torch.randn(shape) for _ in range(3)], progress=False)
    return lowbit.convert(qm)


def test_unknown_op_names_module_op_and_what_to_try(tmp_path, quiet):
    dm = _deploy(WithMystery(), (4, 8))
    with pytest.raises(lowbit.ExportError) as info:
        lowbit.export_onnx(dm, tmp_path / "m.onnx", (torch.randn(4, 8),))
    err = info.value
    assert isinstance(err, RuntimeError)
    assert [f.exporter for f in err.failures] == ["dynamo", "torchscript"]
    for failure in err.failures:
        assert failure.module is not None and "'odd'" in failure.module and "Odd" in failure.module
        assert failure.op is not None and "mystery" in failure.op
        assert failure.summary
    message = str(err)
    assert "module 'odd' (Odd)" in message and "lowbit_test.mystery" in message
    assert "What to try" in message and "wrapper module" in message
    assert list(tmp_path.iterdir()) == []


def test_one_exporter_only_and_the_other_is_suggested(tmp_path, quiet):
    dm = _deploy(WithMystery(), (4, 8))
    with pytest.raises(lowbit.ExportError, match="exporter='torchscript'") as info:
        lowbit.export_onnx(dm, tmp_path / "m.onnx", (torch.randn(4, 8),), exporter="dynamo")
    assert [f.exporter for f in info.value.failures] == ["dynamo"]
    with pytest.raises(lowbit.ExportError, match="exporter='dynamo'") as info:
        lowbit.export_onnx(dm, tmp_path / "m.onnx", (torch.randn(4, 8),),
                           exporter="torchscript")
    assert info.value.failures[0].op == "lowbit_test::mystery"


def test_wrong_input_names_the_layer(tmp_path, quiet):
    dm = _deploy(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), (4, 16))
    # The inputs are run once before any exporter: the error names the layer that rejects them.
    with pytest.raises(ValueError, match=r"layer '0' \(DeployLinear\) rejected its input") as info:
        lowbit.export_onnx(dm, tmp_path / "m.onnx", (torch.randn(4, 3),))  # wrong width
    assert "example_inputs" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"exporter": "onnxruntime"}, ValueError, r"`exporter` must be one of 'auto', "
                                                  r"'dynamo', 'torchscript', got 'onnxruntime'"),
        ({"opset": 12}, ValueError, r"`opset` must be in 13\.\.\d+ .*got 12"),
        ({"opset": "19"}, TypeError, r"`opset` must be an int or None, got str '19'"),
        ({"dynamic_shapes": 0}, TypeError, r"`dynamic_shapes` must be a tuple"),
    ],
    ids=["exporter", "opset-low", "opset-type", "dynamic-shapes"],
)
def test_bad_arguments_are_value_or_type_errors(kwargs, error, message, tmp_path, quiet):
    dm = _deploy(nn.Sequential(nn.Linear(16, 8)), (4, 16))
    with pytest.raises(error, match=message):
        lowbit.export_onnx(dm, tmp_path / "m.onnx", (torch.randn(2, 16),), **kwargs)
    assert list(tmp_path.iterdir()) == []


class TwoBranches(nn.Module):
    """A block in eval next to a block in train mode, each with dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5))
        self.head = nn.Sequential(nn.Linear(16, 4), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_restores_every_training_flag(exporter, tmp_path, quiet):
    dm = _deploy(TwoBranches(), (4, 16))
    dm.train()
    dm.encoder.eval()
    flags = {name: m.training for name, m in dm.named_modules()}
    assert dm.training and not dm.encoder.training and dm.head[1].training
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = dm.encoder(x)  # eval: deterministic
        state = {k: v.clone() for k, v in dm.state_dict().items()}
    report = lowbit.export_onnx(dm, tmp_path / "m.onnx", (x,), exporter=exporter)
    assert report.exporter == exporter
    assert {name: m.training for name, m in dm.named_modules()} == flags
    with torch.no_grad():
        torch.testing.assert_close(dm.encoder(x), before, rtol=0, atol=0)
    assert all(torch.equal(v, state[k]) for k, v in dm.state_dict().items())
    # the file is the eval model (dropout off): ORT agrees with torch in eval
    assert report.parity.output_max_lsb is not None and report.parity.output_max_lsb < 2


def _swin() -> nn.Module:
    from transformers import SwinConfig, SwinModel

    cfg = SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1],
                     num_heads=[2, 2], window_size=4)

    class LastHidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.swin = SwinModel(cfg)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.swin(pixel_values=pixel_values).last_hidden_state

    return LastHidden().eval()


def test_swin_w8a8_falls_back_to_torchscript_with_parity(tmp_path):
    pytest.importorskip("transformers")
    dm = _deploy(_swin(), (2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"dynamo exporter failed at module "
                                         r"'swin\.encoder\..*' \(SwinAttention\), op aten\.view"):
        report = lowbit.export_onnx(dm, tmp_path / "swin.onnx", (x,),
                                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    verify_inputs=[(torch.randn(3, 3, 32, 32),)])
    assert report.exporter.startswith("torchscript (dynamo failed: at module 'swin.encoder")
    assert "exporter       torchscript" in str(report)
    assert report.parity.weights_compared >= 10 and not report.parity.weights_differing
    assert report.parity.codes_identical is not None and report.parity.codes_identical > 0.999
    assert report.parity.codes_max_diff <= 1
    proto = onnx.load(str(tmp_path / "swin.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8 = [i for i in proto.graph.initializer
            if i.name.endswith(".codes") and i.data_type in (onnx.TensorProto.INT8,
                                                              onnx.TensorProto.UINT8)]
    assert len(int8) == report.parity.weights_compared
    assert report.size_ratio < 1


@pytest.mark.parametrize("int4_format", ["matmulnbits", "dequantize"])
def test_swin_w4_g128_falls_back_at_opset_21(int4_format, tmp_path, quiet):
    """Per-group weights need opset 21, which the legacy exporter cannot write: it writes 20 and
    onnx's version converter lifts the file, so the fallback covers 4-bit models too."""
    pytest.importorskip("transformers")
    from lowbit.export.verify import session

    dm = _deploy(_swin(), (2, 3, 32, 32), "w4-g128")
    x = torch.randn(2, 3, 32, 32)
    report = lowbit.export_onnx(dm, tmp_path / "swin.onnx", (x,), int4_format=int4_format,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert report.exporter.startswith("torchscript (dynamo failed")
    assert report.opset == 21 and report.int4_weights  # the layers 128 wide or more
    assert not report.parity.weights_differing
    proto = onnx.load(str(tmp_path / "swin.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {21}
    int4 = [i for i in proto.graph.initializer
            if i.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)]
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert (len(nbits), len(int4) > 0) == ((len(report.int4_weights), False)
                                           if int4_format == "matmulnbits" else (0, True))
    x3 = torch.randn(3, 3, 32, 32)  # a batch size the export never saw
    got = session(tmp_path / "swin.onnx").run(None, {"pixel_values": x3.numpy()})[0]
    with torch.no_grad():
        want = dm(x3).numpy()
    atol = 1e-4 if int4_format == "matmulnbits" else 0.1  # int8 activations in ORT's fused kernel
    np.testing.assert_allclose(got, want, atol=atol)


def test_swin_says_where_dynamo_fails(tmp_path, quiet):
    pytest.importorskip("transformers")
    dm = _deploy(_swin(), (1, 3, 32, 32))
    with pytest.raises(lowbit.ExportError) as info:
        lowbit.export_onnx(dm, tmp_path / "f.onnx", (torch.randn(1, 3, 32, 32),),
                           exporter="dynamo")
    failure = info.value.failures[0]
    assert failure.op == "aten.view.default" and "SwinAttention" in (failure.module or "")
    assert failure.source is not None and "modeling_swin.py" in failure.source
    assert "Cannot view a tensor" in failure.cause


@pytest.mark.parametrize("preset", ["w8a8", "w8"])
def test_torchscript_export_keeps_integer_weights_and_dynamic_batch(preset, tmp_path, quiet):
    from lowbit.export.verify import session

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    dm = _deploy(model, (4, 3, 8, 8), preset)
    report = lowbit.export_onnx(dm, tmp_path / "m.onnx", (torch.randn(2, 3, 8, 8),),
                                exporter="torchscript",
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert report.exporter == "torchscript"
    assert not report.parity.weights_differing
    proto = onnx.load(str(tmp_path / "m.onnx"))
    integer = {i.name for i in proto.graph.initializer if i.data_type in (
        onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    assert "0.weight.codes" in integer
    assert ("3.weight.codes" if preset == "w8a8" else "3.weight_t") in integer
    assert proto.graph.input[0].name == "input"  # the forward's argument name, as dynamo
    x = torch.randn(5, 3, 8, 8)  # a batch size the export never saw
    sess = session(tmp_path / "m.onnx")
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = dm(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_the_fallback_warning_can_be_silenced_by_choosing(tmp_path):
    dm = _deploy(nn.Sequential(nn.Linear(16, 8)), (4, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no warning
        report = lowbit.export_onnx(dm, tmp_path / "m.onnx", (torch.randn(2, 16),))
    assert report.exporter == "dynamo"
