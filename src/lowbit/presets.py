"""Ready-made configs, by name. ``QuantConfig.preset(name)`` builds one; every preset
round-trips through YAML/JSON (tested).

Defaults follow what integer CPU kernels run fast: int8 symmetric per-channel weights and
uint8 affine per-tensor activations (ONNX Runtime's u8s8 path).
"""

from __future__ import annotations

from collections.abc import Callable

from lowbit.config import LayerRule, QuantConfig, QuantSpec

WEIGHT_LAYERS = ["Conv1d", "Conv2d", "Linear"]


def _weights(bits: int) -> QuantSpec:
    return QuantSpec(bits=bits, symmetric=True, granularity="per_channel", observer="minmax")


def _activations(observer: str = "mse") -> QuantSpec:
    return QuantSpec(bits=8, symmetric=False, observer=observer)


def w8a8() -> QuantConfig:
    """Static int8: per-channel int8 weights, uint8 inputs calibrated with the MSE observer."""
    return QuantConfig(rules=[LayerRule(types=WEIGHT_LAYERS, weight=_weights(8),
                                        input=_activations())])


def w4a8() -> QuantConfig:
    """4-bit per-channel weights (stored as int8 codes), uint8 inputs."""
    return QuantConfig(rules=[LayerRule(types=WEIGHT_LAYERS, weight=_weights(4),
                                        input=_activations())])


def w8() -> QuantConfig:
    """Dynamic int8: int8 weights; Linear inputs quantized at run time from their own range,
    convolutions weight-only (dequantized to float at run time)."""
    dynamic = QuantSpec(bits=8, symmetric=False, dynamic=True)
    return QuantConfig(rules=[
        LayerRule(types=["Conv1d", "Conv2d"], weight=_weights(8)),
        LayerRule(types=["Linear"], weight=_weights(8), input=dynamic),
    ])


PRESETS: dict[str, Callable[[], QuantConfig]] = {
    "w8a8": w8a8,
    "w4a8": w4a8,
    "w8": w8,
}
