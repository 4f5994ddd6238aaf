"""The architectures of the zoo sweep: small random-init ``transformers`` models, one per family
member, each wrapped to take tensors and return one tensor.

Nothing downloads: every model is built from a config (CNNs 16-32 channels, transformers 128
wide, 1-2 layers, 32-64 px images, 16-token sequences, a quarter second of audio). BatchNorm
statistics are run through a few random batches (only the BN layers in train mode), so folding
them is not a no-op. Each CNN also has a ``_224`` row at a width one deploys (the config's
default channels, one block per stage, 224 px), run through ``w8a8`` only: on the 16-channel
32 px nets ONNX Runtime's per-node overhead outweighs any kernel, so their speed says nothing
about int8 on a real CNN.
``benchmarks/zoo.py`` runs them; ``tests/test_zoo.py`` runs a few.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

VOCAB = 128
SEQ = 16
IMAGE = 32
AUDIO_SAMPLES = 4000  # 0.25 s at 16 kHz: 12 frames after wav2vec2's 320x feature encoder
MELS, FRAMES = 16, 64  # Whisper encoder input: (batch, mel bins, 2 x max_source_positions)


class TensorOut(nn.Module):
    """Tensors in, one tensor out: the HF output's ``field`` (``logits``, ``last_hidden_state``,
    ...). What the exporter and ONNX Runtime see. One subclass per input kind, each with an
    explicit ``forward`` signature, so that the wrapper itself traces (``torch.fx`` cannot trace
    ``*args`` unpacking) and only the wrapped model decides whether lowbit's tracers work."""

    def __init__(self, model: nn.Module, field: str) -> None:
        super().__init__()
        self.model = model
        self.field = field

    def pick(self, out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else getattr(out, self.field)


class ImageOut(TensorOut):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pick(self.model(pixel_values=pixel_values))


class TokensOut(TensorOut):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pick(self.model(input_ids=input_ids, attention_mask=attention_mask))


class AudioOut(TensorOut):
    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        return self.pick(self.model(input_values=input_values))


class MelOut(TensorOut):
    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.pick(self.model(input_features=input_features))


class PlainOut(TensorOut):
    """torchvision / timm models: already tensor in, tensor out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@dataclass(frozen=True)
class ZooModel:
    """One architecture: how to build it and feed it."""

    name: str
    family: str  # "cnn" | "vit" | "decoder" | "encoder" | "audio"
    factory: Callable[[], nn.Module]  # the HF model (random init)
    input_kind: str  # "image" | "tokens" | "audio" | "mel"
    field: str = "logits"
    requires: str = "transformers"  # the package that must import for the row to run
    image_size: int = IMAGE
    presets: tuple[str, ...] = ()  # () = the family's presets (benchmarks/zoo.py)

    @property
    def is_cnn(self) -> bool:
        return self.family == "cnn"

    def available(self) -> str | None:
        """None when the row can run, else why not (its package is missing or fails to import:
        torchvision and timm do not import beside some torch builds)."""
        if importlib.util.find_spec(self.requires) is None:
            return f"{self.requires} is not installed"
        try:
            importlib.import_module(self.requires)
        except Exception as err:  # noqa: BLE001 - any import failure means the row cannot run
            return f"{self.requires} does not import: {first_line(err)}"
        return None

    def build(self, seed: int = 0) -> nn.Module:
        """The wrapped float model in eval mode, BN statistics set from random batches."""
        torch.manual_seed(seed)
        wrapper = WRAPPERS[self.input_kind] if self.requires == "transformers" else PlainOut
        model = wrapper(self.factory(), self.field).eval()
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if norms:
            for m in norms:
                # Some HF inits draw BN's gamma from N(0, 0.02) (EfficientNet): each BN would
                # shrink the signal 50x and the output vanish (~1e-37). Start from gamma 1.
                if m.affine:
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                m.train()
            with torch.no_grad():
                for i in range(4):
                    model(*self.inputs(8, 1000 + i))
            model.eval()
        return model

    def inputs(self, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        if self.input_kind == "image":
            return (torch.randn(batch, 3, self.image_size, self.image_size, generator=g),)
        if self.input_kind == "tokens":
            ids = torch.randint(3, VOCAB, (batch, SEQ), generator=g)
            return ids, torch.ones_like(ids)
        if self.input_kind == "audio":
            return (torch.randn(batch, AUDIO_SAMPLES, generator=g),)
        return (torch.randn(batch, MELS, FRAMES, generator=g),)

    def dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        """Batch dimension dynamic on every input."""
        batch = torch.export.Dim("batch", max=1024)
        return tuple({0: batch} for _ in ARG_NAMES[self.input_kind])


WRAPPERS: dict[str, type[TensorOut]] = {"image": ImageOut, "tokens": TokensOut,
                                          "audio": AudioOut, "mel": MelOut}
ARG_NAMES = {
    "image": ("pixel_values",),
    "tokens": ("input_ids", "attention_mask"),
    "audio": ("input_values",),
    "mel": ("input_features",),
}


def _hf(class_name: str, config_name: str, **config: Any) -> Callable[[], nn.Module]:
    """A factory building ``transformers.<class_name>(<config_name>(**config))``."""

    def make() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_name)(**config)
        return getattr(transformers, class_name)(cfg)

    return make


def _encoder_of(class_name: str, config_name: str, **config: Any) -> Callable[[], nn.Module]:
    """The encoder half of an encoder-decoder model (BART, Whisper)."""
    make_full = _hf(class_name, config_name, **config)

    def make() -> nn.Module:
        return make_full().get_encoder()

    return make


# Transformers are 128 wide: every Linear's input width a multiple of 128, so that the groups of
# ``w4-g128`` fit (the preset refuses a layer whose input width its group size does not divide).
SMALL_VIT = dict(image_size=IMAGE, patch_size=8, hidden_size=128, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=256, num_labels=10)
SMALL_TEXT = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=256, max_position_embeddings=64)
# Decoders: grouped-query attention where the family has it (4 query heads, 2 key/value heads).
SMALL_LM = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=256, max_position_embeddings=64, use_cache=False)
GQA = dict(num_key_value_heads=2)
SMALL_AUDIO = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=256, conv_dim=(32, 32, 32, 32, 32, 32, 128),
                   num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                   do_stable_layer_norm=False, feat_extract_norm="group")


MODELS: list[ZooModel] = [
    # ---------------------------------------------------------------------------------- CNNs
    ZooModel("resnet", "cnn", _hf("ResNetForImageClassification", "ResNetConfig",
                                  embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                  layer_type="basic", num_labels=10), "image"),
    ZooModel("convnext", "cnn", _hf("ConvNextForImageClassification", "ConvNextConfig",
                                    hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                    num_labels=10), "image"),
    ZooModel("convnextv2", "cnn", _hf("ConvNextV2ForImageClassification", "ConvNextV2Config",
                                      hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                      num_labels=10), "image"),
    ZooModel("mobilenet_v1", "cnn", _hf("MobileNetV1ForImageClassification",
                                        "MobileNetV1Config", depth_multiplier=0.25,
                                        image_size=IMAGE, num_labels=10), "image"),
    ZooModel("mobilenet_v2", "cnn", _hf("MobileNetV2ForImageClassification",
                                        "MobileNetV2Config", depth_multiplier=0.25,
                                        image_size=IMAGE, num_labels=10), "image"),
    ZooModel("efficientnet", "cnn", _hf("EfficientNetForImageClassification",
                                        "EfficientNetConfig", image_size=IMAGE,
                                        width_coefficient=0.25, depth_coefficient=0.25,
                                        hidden_dim=320, num_labels=10), "image"),
    ZooModel("regnet", "cnn", _hf("RegNetForImageClassification", "RegNetConfig",
                                  embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                  groups_width=8, num_labels=10), "image"),
    ZooModel("poolformer", "cnn", _hf("PoolFormerForImageClassification", "PoolFormerConfig",
                                      hidden_sizes=[16, 32], depths=[1, 1], num_encoder_blocks=2,
                                      patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1],
                                      num_labels=10), "image"),
    # ---------------------------------------------------------------------- vision transformers
    ZooModel("vit", "vit", _hf("ViTForImageClassification", "ViTConfig", **SMALL_VIT), "image"),
    ZooModel("deit", "vit", _hf("DeiTForImageClassification", "DeiTConfig", **SMALL_VIT),
             "image"),
    ZooModel("beit", "vit", _hf("BeitForImageClassification", "BeitConfig", **SMALL_VIT,
                                use_relative_position_bias=True), "image"),
    ZooModel("dinov2", "vit", _hf("Dinov2ForImageClassification", "Dinov2Config", **SMALL_VIT),
             "image"),
    ZooModel("swin", "vit", _hf("SwinForImageClassification", "SwinConfig", image_size=IMAGE,
                                patch_size=4, embed_dim=128, depths=[1, 1], num_heads=[2, 4],
                                window_size=4, num_labels=10), "image"),
    ZooModel("swinv2", "vit", _hf("Swinv2ForImageClassification", "Swinv2Config",
                                  image_size=IMAGE, patch_size=4, embed_dim=128, depths=[1, 1],
                                  num_heads=[2, 4], window_size=4, num_labels=10), "image"),
    ZooModel("levit", "vit", _hf("LevitForImageClassification", "LevitConfig",
                                 image_size=64, hidden_sizes=[128, 256], num_attention_heads=[2, 4],
                                 depths=[1, 1], key_dim=[32, 32], mlp_ratio=[2, 2],
                                 attention_ratio=[2, 2],
                                 down_ops=[["Subsample", 32, 4, 4, 2, 2]], num_labels=10),
             "image", image_size=64),  # a 16x conv stem: 4x4 tokens from 64 px
    ZooModel("mobilevit", "vit", _hf("MobileViTForImageClassification", "MobileViTConfig",
                                     image_size=IMAGE, hidden_sizes=[128, 128, 128],
                                     neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                                     num_attention_heads=2, num_labels=10), "image"),
    ZooModel("segformer", "vit", _hf("SegformerForImageClassification", "SegformerConfig",
                                     num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                     hidden_sizes=[128, 128], patch_sizes=[7, 3], strides=[4, 2],
                                     num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                                     num_labels=10), "image"),
    # ---------------------------------------------------------------------------- decoder LMs
    ZooModel("gpt2", "decoder", _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=128,
                                    n_layer=2, n_head=4, n_positions=64, use_cache=False,
                                    bos_token_id=0, eos_token_id=0),
             "tokens"),
    ZooModel("gpt_neox", "decoder", _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", **SMALL_LM),
             "tokens"),
    ZooModel("opt", "decoder", _hf("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB,
                                   hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   ffn_dim=256, max_position_embeddings=64, word_embed_proj_dim=128,
                                   use_cache=False), "tokens"),
    ZooModel("bloom", "decoder", _hf("BloomForCausalLM", "BloomConfig", vocab_size=VOCAB,
                                     hidden_size=128, n_layer=2, n_head=4, use_cache=False),
             "tokens"),
    ZooModel("falcon", "decoder", _hf("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB,
                                      hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      new_decoder_architecture=True, num_kv_heads=2,
                                      use_cache=False), "tokens"),
    ZooModel("phi", "decoder", _hf("PhiForCausalLM", "PhiConfig", **SMALL_LM), "tokens"),
    ZooModel("llama", "decoder", _hf("LlamaForCausalLM", "LlamaConfig", **SMALL_LM, **GQA),
             "tokens"),
    ZooModel("mistral", "decoder", _hf("MistralForCausalLM", "MistralConfig", **SMALL_LM, **GQA,
                                       sliding_window=8), "tokens"),
    ZooModel("qwen2", "decoder", _hf("Qwen2ForCausalLM", "Qwen2Config", **SMALL_LM, **GQA),
             "tokens"),
    ZooModel("gemma", "decoder", _hf("GemmaForCausalLM", "GemmaConfig", **SMALL_LM, **GQA,
                                     head_dim=32), "tokens"),
    # ------------------------------------------------------------ encoders, encoder-decoders
    ZooModel("bert", "encoder", _hf("BertModel", "BertConfig", **SMALL_TEXT), "tokens",
             "last_hidden_state"),
    ZooModel("roberta", "encoder", _hf("RobertaModel", "RobertaConfig", **SMALL_TEXT), "tokens",
             "last_hidden_state"),
    ZooModel("distilbert", "encoder", _hf("DistilBertModel", "DistilBertConfig",
                                          vocab_size=VOCAB, dim=128, n_layers=2, n_heads=2,
                                          hidden_dim=256, max_position_embeddings=64), "tokens",
             "last_hidden_state"),
    ZooModel("albert", "encoder", _hf("AlbertModel", "AlbertConfig", **SMALL_TEXT,
                                      embedding_size=128), "tokens", "last_hidden_state"),
    ZooModel("deberta_v2", "encoder", _hf("DebertaV2Model", "DebertaV2Config", **SMALL_TEXT),
             "tokens", "last_hidden_state"),
    ZooModel("electra", "encoder", _hf("ElectraModel", "ElectraConfig", **SMALL_TEXT,
                                       embedding_size=128), "tokens", "last_hidden_state"),
    ZooModel("t5_encoder", "encoder", _hf("T5EncoderModel", "T5Config", vocab_size=VOCAB,
                                          d_model=128, d_kv=64, d_ff=256, num_layers=2,
                                          num_heads=2), "tokens", "last_hidden_state"),
    ZooModel("bart_encoder", "encoder", _encoder_of("BartModel", "BartConfig", vocab_size=VOCAB,
                                                    d_model=128, encoder_layers=2,
                                                    decoder_layers=1, encoder_attention_heads=2,
                                                    decoder_attention_heads=2,
                                                    encoder_ffn_dim=256, decoder_ffn_dim=256,
                                                    max_position_embeddings=64), "tokens",
             "last_hidden_state"),
    # --------------------------------------------------------------------------------- audio
    ZooModel("wav2vec2", "audio", _hf("Wav2Vec2Model", "Wav2Vec2Config", **SMALL_AUDIO), "audio",
             "last_hidden_state"),
    ZooModel("hubert", "audio", _hf("HubertModel", "HubertConfig", **SMALL_AUDIO), "audio",
             "last_hidden_state"),
    ZooModel("whisper_encoder", "audio", _encoder_of("WhisperModel", "WhisperConfig",
                                                     vocab_size=VOCAB, num_mel_bins=MELS,
                                                     d_model=128, encoder_layers=2,
                                                     decoder_layers=1,
                                                     encoder_attention_heads=2,
                                                     decoder_attention_heads=2,
                                                     encoder_ffn_dim=256, decoder_ffn_dim=256,
                                                     max_source_positions=FRAMES // 2,
                                                     max_target_positions=32,
                                                     pad_token_id=0, bos_token_id=0,
                                                     eos_token_id=0, decoder_start_token_id=0),
             "mel",
             "last_hidden_state"),
]

# The CNNs at a width one deploys: the config's default channels (ResNet-18's for ResNet), one
# block per stage, 224 px. Their rows answer "is int8 faster than FP32 on this architecture?".
DEPLOY_IMAGE = 224
DEPLOY_CNNS = {
    "resnet": _hf("ResNetForImageClassification", "ResNetConfig", depths=[1, 1, 1, 1],
                  layer_type="basic", hidden_sizes=[64, 128, 256, 512], num_labels=10),
    "convnext": _hf("ConvNextForImageClassification", "ConvNextConfig", depths=[1, 1, 1, 1],
                    num_labels=10),
    "convnextv2": _hf("ConvNextV2ForImageClassification", "ConvNextV2Config",
                      depths=[1, 1, 1, 1], num_labels=10),
    "mobilenet_v1": _hf("MobileNetV1ForImageClassification", "MobileNetV1Config",
                        image_size=DEPLOY_IMAGE, num_labels=10),
    "mobilenet_v2": _hf("MobileNetV2ForImageClassification", "MobileNetV2Config",
                        image_size=DEPLOY_IMAGE, num_labels=10),
    "efficientnet": _hf("EfficientNetForImageClassification", "EfficientNetConfig",
                        image_size=DEPLOY_IMAGE, depth_coefficient=0.5, num_labels=10),
    "regnet": _hf("RegNetForImageClassification", "RegNetConfig", depths=[1, 1, 1, 1],
                  num_labels=10),
    "poolformer": _hf("PoolFormerForImageClassification", "PoolFormerConfig",
                      depths=[1, 1, 1, 1], num_labels=10),
}
MODELS += [ZooModel(f"{name}_{DEPLOY_IMAGE}", "cnn", factory, "image", image_size=DEPLOY_IMAGE,
                    presets=("w8a8",)) for name, factory in DEPLOY_CNNS.items()]


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=10)

    return make


def _timm(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)

    return make


# Rows that run only where their package imports.
MODELS += [
    ZooModel("tv_resnet18", "cnn", _torchvision("resnet18"), "image", requires="torchvision"),
    ZooModel("tv_mobilenet_v3_small", "cnn", _torchvision("mobilenet_v3_small"), "image",
             requires="torchvision"),
    ZooModel("timm_efficientnet_b0", "cnn", _timm("efficientnet_b0"), "image", requires="timm"),
]


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` (what a table cell can hold)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


BY_NAME = {m.name: m for m in MODELS}
