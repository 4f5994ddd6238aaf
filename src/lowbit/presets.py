"""Ready-made configs, by name. ``QuantConfig.preset(name)`` builds one; every preset
round-trips through YAML/JSON (tested).

Defaults follow what integer CPU kernels run fast: int8 symmetric per-channel weights and
uint8 affine per-tensor activations (ONNX Runtime's u8s8 path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lowbit.config import Granularity, LayerRule, QuantConfig, QuantSpec

WEIGHT_LAYERS = ["Conv1d", "Conv2d", "Linear"]


def _weights(bits: int) -> QuantSpec:
    return QuantSpec(bits=bits, symmetric=True, granularity="per_channel", observer="minmax")


def _activations(observer: str = "mse") -> QuantSpec:
    return QuantSpec(bits=8, symmetric=False, observer=observer)


def for_integer_kernels(weight: QuantSpec, input: QuantSpec) -> list[LayerRule]:
    """Where ONNX Runtime needs quantizers to run the quantized layers on integer kernels:
    residual adds, concatenations, max pools and nearest upsamplings between quantized layers
    get the layers' input spec, and a conv whose output goes to float ops only (a mean, a
    LayerNorm, an add the model's code keeps float) quantizes that output too (ORT fuses
    ``DQ → Conv → Q``, not a conv with a float output). Sigmoid gates after such outputs, the
    products of two quantized tensors and the squeezes that read them complete squeeze-excite
    blocks (``QLinearSigmoid``, ``QLinearMul``)."""
    return [between_ops(input),
            # The last residual add (or concat) before a global average pool and a classifier:
            # quantized inputs and output give ORT QLinearAdd → QLinearGlobalAveragePool, as its
            # own file.
            LayerRule(types=["add", "cat"], positions=["before_pool"], input=input, output=input),
            # Max pools and nearest upsamplings between quantized layers: their input shares the
            # tensor's quantizer and their readers share it too (both keep values on the grid),
            # so ORT runs them on uint8.
            LayerRule(types=["MaxPool1d", "MaxPool2d", "Upsample"], positions=["between"],
                      input=input),
            LayerRule(types=["Conv1d", "Conv2d"], positions=["feeds_float"], weight=weight,
                      input=input, output=input),
            # A sigmoid or SiLU reading such an output: its sigmoid on a uint8 grid (min-max:
            # a gate in (0, 1) has no outliers to clip) lets ORT run it and the product after
            # it on integers (QLinearSigmoid, QLinearMul), as in its own EfficientNet files.
            LayerRule(types=["Sigmoid", "SiLU"], positions=["gate"],
                      output=QuantSpec(bits=8, symmetric=False, observer="minmax")),
            # A product of two such tensors (a squeeze-excite gate times its feature map): ORT
            # runs it as QLinearMul, the gate read on its own grid (lowbit.share).
            LayerRule(types=["mul"], positions=["between"], input=input),
            # A pool reading such a product (the squeeze before the gate, a classifier's
            # pooler): its input shares the product's quantizer, so ORT runs the SiLU's own
            # product as QLinearMul.
            LayerRule(types=["AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AvgPool1d", "AvgPool2d"],
                      positions=["between"], input=input)]


def between_ops(input: QuantSpec) -> LayerRule:
    """Functional adds and concatenations between quantized layers (residual connections,
    Inception/DenseNet/U-Net branches) get the layers' own input spec: ONNX Runtime then sees a
    quantized output after the producing conv and runs it on an integer kernel (with the add
    left float, it keeps the conv in float: int8 files ran slower than FP32 on residual nets),
    and runs the concatenation as ``QLinearConcat``. The same spec keeps one quantizer per
    tensor where a tensor feeds both a layer and an add or cat."""
    return LayerRule(types=["add", "cat"], positions=["between"], input=input)


def w8a8() -> QuantConfig:
    """Static int8: per-channel int8 weights, uint8 inputs calibrated with the MSE observer,
    residual adds between quantized layers quantized the same way."""
    return QuantConfig(rules=[LayerRule(types=WEIGHT_LAYERS, weight=_weights(8),
                                        input=_activations()),
                              *for_integer_kernels(_weights(8), _activations())])


def w4a8() -> QuantConfig:
    """4-bit per-channel weights (stored as int8 codes), uint8 inputs and residual adds."""
    return QuantConfig(rules=[LayerRule(types=WEIGHT_LAYERS, weight=_weights(4),
                                        input=_activations()),
                              *for_integer_kernels(_weights(4), _activations())])


def _embeddings() -> LayerRule:
    """Word/position tables: int8 rows, each on its own scale (weight-only; about 1/4 size)."""
    return LayerRule(types=["Embedding"], weight=_weights(8))


def w8() -> QuantConfig:
    """Dynamic int8: int8 weights; Linear inputs quantized at run time from their own range,
    convolutions and embeddings weight-only (dequantized to float at run time)."""
    dynamic = QuantSpec(bits=8, symmetric=False, dynamic=True)
    return QuantConfig(rules=[
        LayerRule(types=["Conv1d", "Conv2d"], weight=_weights(8)),
        LayerRule(types=["Linear"], weight=_weights(8), input=dynamic),
        _embeddings(),
    ])


# ------------------------------------------------------------------------- transformers
# Measured on all-MiniLM-L6-v2 (benchmarks/minilm.py): per-tensor ranges of the FFN
# down-projection input cost most of the fidelity (outliers ~12x the 99.9th percentile);
# SmoothQuant with α = 0.8 moves them into the per-channel weight scales.
SMOOTHING_ALPHA = 0.8


def w8a8_transformer() -> QuantConfig:
    """Static int8 for transformer encoders: SmoothQuant (α 0.8) on every Linear input,
    uint8 per-tensor activations (percentile ranges), int8 per-channel weights, int8
    embedding rows."""
    x = QuantSpec(bits=8, symmetric=False, observer="percentile", smoothing=SMOOTHING_ALPHA)
    return QuantConfig(rules=[LayerRule(types=["Linear"], weight=_weights(8), input=x),
                              _embeddings()])


def w8_transformer() -> QuantConfig:
    """Dynamic int8 for transformer encoders: ``w8`` plus SmoothQuant (α 0.8) on every Linear
    input, so its per-tensor run-time ranges are not set by outlier channels. Calibrate to
    smooth (without calibration it is plain ``w8``)."""
    x = QuantSpec(bits=8, symmetric=False, dynamic=True, smoothing=SMOOTHING_ALPHA)
    return QuantConfig(rules=[LayerRule(types=["Linear"], weight=_weights(8), input=x),
                              _embeddings()])


def _weight_only(bits: int, group_size: int, algorithm: str = "rtn") -> Callable[[], QuantConfig]:
    # Affine groups (uint4 with a zero point per group): on MiniLM GPTQ g128 reached cosine
    # 0.978 affine vs 0.970 symmetric; MatMulNBits takes the zero points.
    def build() -> QuantConfig:
        w = QuantSpec(bits=bits, symmetric=False, granularity="per_group", group_size=group_size,
                      algorithm=algorithm)
        return QuantConfig(rules=[LayerRule(types=["Linear"], weight=w), _embeddings()])

    build.__doc__ = (f"Weight-only uint{bits} Linear weights in groups of {group_size} input "
                     f"channels ({algorithm}), int8 embedding rows; activations stay float.")
    return build


WEIGHT_ONLY_PRESETS: dict[str, Callable[[], QuantConfig]] = {
    f"w4-g{g}{suffix}": _weight_only(4, g, algorithm)
    for g in (32, 64, 128)
    for suffix, algorithm in (("", "rtn"), ("-gptq", "gptq"), ("-awq", "awq"))
}


# ------------------------------------------------------------- quantization-aware training
# Low-bit recipes keep the first and last layers with weights at 8 bits (LSQ, DoReFa, BNN and
# XNOR papers all treat them apart): a rule with ``positions`` that comes last, so it wins.


def _qat_weights(bits: int, method: str = "ste", **extra: Any) -> QuantSpec:
    gran: Granularity = "per_channel" if method in ("ste", "lsq") else "per_tensor"
    return QuantSpec(bits=bits, symmetric=True, granularity=gran, method=method, **extra)


def _qat_activations(bits: int = 8, method: str = "ste") -> QuantSpec:
    if method == "binary":
        # {0, 1} codes with a learned threshold: ±1 codes of a post-ReLU input are all +1.
        # On digits this trained best on ReLU and Hardtanh nets alike (docs/design.md).
        return QuantSpec(bits=1, method="binary", signed=False)
    observer = "ema" if method == "ste" else "minmax"
    return QuantSpec(bits=bits, symmetric=False, observer=observer, method=method)


def _qat(weight: QuantSpec, input: QuantSpec | None) -> QuantConfig:
    rules = [LayerRule(types=WEIGHT_LAYERS, weight=weight, input=input)]
    if input is not None and input.bits > 1:  # binary activations have no integer kernels
        rules.extend(for_integer_kernels(weight, input))
    if weight.bits < 8 or (input is not None and input.bits < 8):
        edges_input = None if input is None else _qat_activations(8)
        rules.append(LayerRule(types=WEIGHT_LAYERS, positions=["first", "last"],
                               weight=_qat_weights(8), input=edges_input))
    return QuantConfig(rules=rules)


def _recipe(weight: tuple[Any, ...], input: tuple[Any, ...] | None,
            **weight_extra: Any) -> Callable[[], QuantConfig]:
    """A preset builder; specs are built when called (the quantizer registry is full by then)."""

    def build() -> QuantConfig:
        return _qat(_qat_weights(*weight, **weight_extra),
                    None if input is None else _qat_activations(*input))

    return build


QAT_PRESETS: dict[str, Callable[[], QuantConfig]] = {
    # Jacob et al.: straight-through fake quant, EMA activation ranges.
    "w8a8-qat": _recipe((8,), (8,)),
    "w4a8-qat": _recipe((4,), (8,)),
    # LSQ: learned step sizes for weights and activations.
    "w4a8-lsq": _recipe((4, "lsq"), (8, "lsq")),
    "w4a4-lsq": _recipe((4, "lsq"), (4, "lsq")),
    "w2a2-lsq": _recipe((2, "lsq"), (2, "lsq")),
    # PACT activations (learned clip) with LSQ weights.
    "w2a2-pact": _recipe((2, "lsq"), (2, "pact")),
    "w4a4-pact": _recipe((4, "lsq"), (4, "pact")),
    # DoReFa weights (tanh-normalised), float activations.
    "w2-dorefa": _recipe((2, "dorefa"), None),
    "w4-dorefa": _recipe((4, "dorefa"), None),
    # Binary: BNN (sign weights, {0, 1} activations with a learned threshold), XNOR
    # (per-filter scale, 8-bit activations).
    "w1a1-bnn": _recipe((1, "binary"), (1, "binary")),
    "w1a8-xnor": _recipe((1, "binary"), (8,), xnor=True),
    # SLB: weights searched over a discrete value set, 8-bit or float activations.
    "w1a8-slb": _recipe((1, "slb"), (8,)),
    "w2a8-slb": _recipe((2, "slb"), (8,)),
    "w4a8-slb": _recipe((4, "slb"), (8,)),
    "w1-slb": _recipe((1, "slb"), None),
    "w2-slb": _recipe((2, "slb"), None),
    "w4-slb": _recipe((4, "slb"), None),
}

PRESETS: dict[str, Callable[[], QuantConfig]] = {
    "w8a8": w8a8,
    "w4a8": w4a8,
    "w8": w8,
    "w8a8-transformer": w8a8_transformer,
    "w8-transformer": w8_transformer,
    **WEIGHT_ONLY_PRESETS,
    **QAT_PRESETS,
}
