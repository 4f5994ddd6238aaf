"""More architectures beyond the zoo's families: ``python benchmarks/zoo.py --more``.

Each built like the zoo's own (``benchmarks/zoo_models.py``: small random-init ``transformers``
configs, nothing downloads) and chosen for what it does to a quantizer: torch's own
``nn.MultiheadAttention`` (CLIP/SigLIP heads), weights read by model code instead of calling the
layer (WavLM's attention, Mamba's mixer), mixtures of experts (Mixtral, Qwen2-MoE), multi-query
attention (GPT-BigCode), weight-standardized convs (BiT), convolution-attention hybrids (CvT,
FocalNet, PVTv2, ConvBERT), grouped 1x1 convs as Linears (SqueezeBERT), relative-position
Conformers.
"""

from __future__ import annotations

from zoo_models import GQA, IMAGE, SMALL_AUDIO, SMALL_LM, SMALL_TEXT, ZooModel, _hf

L = SMALL_LM
AUDIO_BASE = {
    k: v
    for k, v in SMALL_AUDIO.items()
    if k not in ("do_stable_layer_norm", "feat_extract_norm", "num_conv_pos_embeddings")
}

# SEW's defaults have 13 feature-encoder convs: give it the zoo's 7, with strides and kernels.
SEW_CONV = dict(conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2))

MORE: list[ZooModel] = [
    ZooModel("bit", "cnn", _hf("BitForImageClassification", "BitConfig", embedding_size=16,
             hidden_sizes=[16, 32], depths=[1, 1], num_groups=8, num_labels=10), "image"),
    ZooModel("focalnet", "vit", _hf("FocalNetForImageClassification", "FocalNetConfig",
             image_size=IMAGE, embed_dim=32, depths=[1, 1], num_labels=10), "image"),
    ZooModel("cvt", "vit", _hf("CvtForImageClassification", "CvtConfig", embed_dim=[32, 64, 128],
             depth=[1, 2, 3], num_heads=[1, 2, 2], num_labels=10), "image"),
    ZooModel("pvt_v2", "vit", _hf("PvtV2ForImageClassification", "PvtV2Config",
             hidden_sizes=[32, 64], depths=[1, 1], num_encoder_blocks=2,
             num_attention_heads=[1, 2], sr_ratios=[2, 1], patch_sizes=[7, 3], strides=[4, 2],
             mlp_ratios=[2, 2], num_labels=10), "image"),
    ZooModel("hiera", "vit", _hf("HieraForImageClassification", "HieraConfig", image_size=[64, 64],
             embed_dim=32, depths=[1, 1], num_heads=[1, 2], num_labels=10, masked_unit_size=[8, 8],
             query_stride=[2, 2], num_query_pool=1), "image", image_size=64),
    ZooModel("clip_vision", "vit", _hf("CLIPVisionModel", "CLIPVisionConfig", image_size=IMAGE,
             patch_size=8, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=256), "image", field="last_hidden_state"),
    ZooModel("siglip_vision", "vit", _hf("SiglipVisionModel", "SiglipVisionConfig",
             image_size=IMAGE, patch_size=8, hidden_size=128, num_hidden_layers=2,
             num_attention_heads=2, intermediate_size=256), "image", field="last_hidden_state"),
    ZooModel("mixtral", "decoder", _hf("MixtralForCausalLM", "MixtralConfig", **L, **GQA,
             num_local_experts=4, num_experts_per_tok=2), "tokens"),
    ZooModel("qwen2_moe", "decoder", _hf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **L, **GQA,
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
             shared_expert_intermediate_size=128), "tokens"),
    ZooModel("mamba", "decoder", _hf("MambaForCausalLM", "MambaConfig", vocab_size=128,
             hidden_size=128, num_hidden_layers=2, state_size=8, use_cache=False), "tokens"),
    ZooModel("gptj", "decoder", _hf("GPTJForCausalLM", "GPTJConfig", vocab_size=128, n_embd=128,
             n_layer=2, n_head=4, rotary_dim=16, n_positions=64, use_cache=False), "tokens"),
    ZooModel("codegen", "decoder", _hf("CodeGenForCausalLM", "CodeGenConfig", vocab_size=128,
             n_embd=128, n_layer=2, n_head=4, rotary_dim=16, n_positions=64, n_ctx=64,
             use_cache=False), "tokens"),
    ZooModel("stablelm", "decoder", _hf("StableLmForCausalLM", "StableLmConfig", **L, **GQA),
             "tokens"),
    ZooModel("olmo", "decoder", _hf("OlmoForCausalLM", "OlmoConfig", **L, **GQA), "tokens"),
    ZooModel("starcoder2", "decoder", _hf("Starcoder2ForCausalLM", "Starcoder2Config", **L, **GQA),
             "tokens"),
    ZooModel("gpt_bigcode", "decoder", _hf("GPTBigCodeForCausalLM", "GPTBigCodeConfig",
             vocab_size=128, n_embd=128, n_layer=2, n_head=4, n_positions=64, multi_query=True,
             use_cache=False), "tokens"),
    ZooModel("gemma2", "decoder", _hf("Gemma2ForCausalLM", "Gemma2Config", **L, **GQA, head_dim=32),
             "tokens"),
    ZooModel("phi3", "decoder", _hf("Phi3ForCausalLM", "Phi3Config", **L, **GQA, pad_token_id=0),
             "tokens"),
    ZooModel("qwen3", "decoder", _hf("Qwen3ForCausalLM", "Qwen3Config", **L, **GQA, head_dim=32),
             "tokens"),
    ZooModel("mpt", "decoder", _hf("MptForCausalLM", "MptConfig", vocab_size=128, d_model=128,
             n_layers=2, n_heads=4, max_seq_len=64, use_cache=False), "tokens"),
    ZooModel("xlm_roberta", "encoder", _hf("XLMRobertaModel", "XLMRobertaConfig", **SMALL_TEXT),
             "tokens", field="last_hidden_state"),
    ZooModel("mpnet", "encoder", _hf("MPNetModel", "MPNetConfig", **SMALL_TEXT), "tokens",
             field="last_hidden_state"),
    ZooModel("convbert", "encoder", _hf("ConvBertModel", "ConvBertConfig", **SMALL_TEXT), "tokens",
             field="last_hidden_state"),
    ZooModel("squeezebert", "encoder", _hf("SqueezeBertModel", "SqueezeBertConfig", **SMALL_TEXT,
             embedding_size=128, q_groups=1, k_groups=1, v_groups=1, post_attention_groups=1,
             intermediate_groups=1, output_groups=1), "tokens", field="last_hidden_state"),
    ZooModel("mobilebert", "encoder", _hf("MobileBertModel", "MobileBertConfig", **SMALL_TEXT,
             embedding_size=128, intra_bottleneck_size=128, true_hidden_size=128,
             num_feedforward_networks=1), "tokens", field="last_hidden_state"),
    ZooModel("modernbert", "encoder", _hf("ModernBertModel", "ModernBertConfig", vocab_size=128,
             hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             cls_token_id=1, sep_token_id=2), "tokens", field="last_hidden_state"),
    ZooModel("wavlm", "audio", _hf("WavLMModel", "WavLMConfig", **SMALL_AUDIO), "audio",
             field="last_hidden_state"),
    ZooModel("data2vec_audio", "audio", _hf("Data2VecAudioModel", "Data2VecAudioConfig",
             **AUDIO_BASE, num_conv_pos_embeddings=4), "audio", field="last_hidden_state"),
    ZooModel("sew", "audio", _hf("SEWModel", "SEWConfig", **{**AUDIO_BASE, **SEW_CONV},
             feat_extract_norm="group", num_conv_pos_embeddings=16), "audio",
             field="last_hidden_state"),
    ZooModel("unispeech", "audio", _hf("UniSpeechModel", "UniSpeechConfig", **SMALL_AUDIO), "audio",
             field="last_hidden_state"),
    ZooModel("w2v2_conformer", "audio", _hf("Wav2Vec2ConformerModel", "Wav2Vec2ConformerConfig",
             **SMALL_AUDIO, conv_depthwise_kernel_size=3, position_embeddings_type="relative"),
             "audio", field="last_hidden_state"),
]
