"""Real model code from transformers (tiny random-init configs, nothing downloads): GPT-2's
Conv1D layers are quantized as Linears under every Linear preset and export with ONNX Runtime
parity; MobileNetV2 and ViT (whose code reads the layers' attributes) export; wav2vec2's
weight-normed positional conv is quantized."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from torch import nn

import lowbit
from lowbit import QuantConfig
from lowbit.deploy import DynamicLinear, IntWeight
from lowbit.nn import QuantConv1d, QuantLinear

GPT2_PRESETS = ("w8a8", "w8", "w8a8-transformer", "w4-g32")


class Output(nn.Module):
    """Tensor in, tensor out (one field of a transformers output)."""

    def __init__(self, model: nn.Module, field: str) -> None:
        super().__init__()
        self.model, self.field = model, field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(x), self.field)


def tiny_gpt2(head: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config) if head else transformers.GPT2Model(config)
    return model.eval()


def conv1d_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]


def ids(seed: int, n: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def export_checked(dm: nn.Module, path, x: torch.Tensor) -> lowbit.export.report.ExportReport:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no parity warning
        return lowbit.export_onnx(dm, path, (x,))


@pytest.mark.parametrize("preset", GPT2_PRESETS)
def test_every_gpt2_conv1d_is_quantized_and_exports(preset, tmp_path):
    model = tiny_gpt2()
    names = conv1d_names(model)
    assert len(names) == 4  # c_attn, c_proj, mlp.c_fc, mlp.c_proj
    the_plan = lowbit.plan(model, QuantConfig.preset(preset))
    planned = {x.name: x for x in the_plan.layers}
    assert all(planned[n].type == "Linear" and planned[n].module_type == "Conv1D"
               and planned[n].weight is not None for n in names)
    qm = lowbit.quantize(model, the_plan)
    assert all(isinstance(qm.get_submodule(n), QuantLinear) for n in names)
    lowbit.calibrate(qm, [ids(s) for s in range(3)], progress=False)
    dm = lowbit.convert(qm)
    for n in names:
        layer = dm.get_submodule(n)
        want = DynamicLinear if preset == "w8" else type(layer)
        assert isinstance(layer, want)
        assert (layer.nf, layer.nx) == (model.get_submodule(n).nf, model.get_submodule(n).nx)
    x = ids(9)
    with torch.no_grad():
        ref = model(x).last_hidden_state
        got = dm(x).last_hidden_state
    assert (got - ref).norm() / ref.norm() < (0.15 if preset == "w4-g32" else 0.05)
    report = export_checked(Output(dm, "last_hidden_state"), tmp_path / "gpt2.onnx", x)
    assert report.parity.output_max_abs < 1e-4
    if preset == "w4-g32":  # Conv1D weights packed as 4-bit MatMulNBits / INT4 blocks
        assert {f"model.{n}.weight" for n in names} <= set(report.int4_weights)


def test_gpt2_lm_head_model_quantizes_every_conv1d_and_the_head(tmp_path):
    model = tiny_gpt2(head=True)
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    names = conv1d_names(model) + ["lm_head"]
    assert all(isinstance(qm.get_submodule(n), QuantLinear) for n in names)
    lowbit.calibrate(qm, [ids(s) for s in range(3)], progress=False)
    dm = lowbit.convert(qm)
    assert all(isinstance(dm.get_submodule(n).weight, IntWeight) for n in names)
    report = export_checked(Output(dm, "logits"), tmp_path / "lm.onnx", ids(5))
    assert report.parity.output_max_abs < 1e-3


def test_gpt2_awq_and_gptq_run_on_conv1d():
    model = tiny_gpt2()
    x = ids(4)
    with torch.no_grad():
        ref = model(x).last_hidden_state
    for preset in ("w4-g32-gptq", "w4-g32-awq"):
        qm = lowbit.quantize(model, QuantConfig.preset(preset))
        lowbit.calibrate(qm, [ids(s, n=4, length=12) for s in range(4)], progress=False)
        attn = qm.h[0].attn.c_attn
        assert bool(attn.weight_quant.pinned), preset
        with torch.no_grad():
            got = lowbit.convert(qm)(x).last_hidden_state
        assert (got - ref).norm() / ref.norm() < 0.15, preset


def test_mobilenet_v2_exports_under_w8a8(tmp_path):
    """Its same-padding code reads each conv's kernel_size, stride and dilation."""
    torch.manual_seed(0)
    config = transformers.MobileNetV2Config(image_size=16, depth_multiplier=0.25,
                                            tf_padding=True)
    model = transformers.MobileNetV2Model(config).eval()
    qm = lowbit.quantize(model, QuantConfig.preset("w8a8"))
    lowbit.calibrate(qm, [torch.randn(2, 3, 16, 16) for _ in range(2)], progress=False)
    dm = lowbit.convert(qm)
    stem = dm.conv_stem.first_conv.convolution
    assert stem.kernel_size == (3, 3) and stem.stride == (2, 2)
    x = torch.randn(2, 3, 16, 16)
    report = lowbit.export_onnx(Output(dm, "last_hidden_state"), tmp_path / "mnv2.onnx", (x,))
    assert report.parity.output_max_abs < 1e-3


def test_vit_exports_under_w8a8(tmp_path):
    """Its code casts the pixels to ``projection.weight.dtype`` (the patch conv's)."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64)
    model = transformers.ViTModel(config).eval()
    the_plan = lowbit.plan(model, QuantConfig.preset("w8a8"))
    # The class token and position table are parameters of ViTEmbeddings: listed, not quantized.
    assert "cls_token" in the_plan.skipped["embeddings"]
    qm = lowbit.quantize(model, the_plan)
    lowbit.calibrate(qm, [torch.randn(2, 3, 16, 16) for _ in range(2)], progress=False)
    dm = lowbit.convert(qm)
    assert dm.embeddings.patch_embeddings.projection.weight.dtype == torch.float32
    x = torch.randn(2, 3, 16, 16)
    report = lowbit.export_onnx(Output(dm, "last_hidden_state"), tmp_path / "vit.onnx", (x,))
    assert report.parity.output_max_abs < 1e-4


def test_wav2vec2_positional_conv_is_quantized():
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4)
    model = transformers.Wav2Vec2Model(config).eval()
    conv = model.encoder.pos_conv_embed.conv
    assert nn.utils.parametrize.is_parametrized(conv)  # weight norm (new API)
    the_plan = lowbit.plan(model, QuantConfig.preset("w8a8"))
    name = "encoder.pos_conv_embed.conv"
    assert the_plan[name].type == "Conv1d" and the_plan[name].weight is not None
    assert not any(name in n for n in the_plan.skipped)
    qm = lowbit.quantize(model, the_plan)
    wrapper = qm.get_submodule(name)
    assert isinstance(wrapper, QuantConv1d) and wrapper.groups == 4
    assert torch.allclose(wrapper.weight, conv.weight)
    audio = [torch.randn(2, 800) for _ in range(3)]
    lowbit.calibrate(qm, audio[:2], progress=False)
    dm = lowbit.convert(qm)
    assert isinstance(dm.get_submodule(name).weight, IntWeight)
    with torch.no_grad():
        ref = model(audio[2]).last_hidden_state
        got = dm(audio[2]).last_hidden_state
    assert (got - ref).norm() / ref.norm() < 0.1
