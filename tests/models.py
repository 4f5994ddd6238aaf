"""Small models shared by several test files."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """A residual ``x + y`` written as plain Python in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)) + x


def conv_net() -> nn.Module:
    """Two Conv → BN → ReLU stages, a global pool and a Linear, on 1x8x8 inputs (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


class LastHidden(nn.Module):
    """A Hugging Face encoder as tensors in, tensor out — ``(input_ids, attention_mask)`` →
    ``last_hidden_state`` — what the exporter and ONNX Runtime see."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class Logits(nn.Module):
    """A Hugging Face image classifier as tensor in, tensor out: ``pixel_values`` → ``logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class TwoHeads(nn.Module):
    """One hidden state read by two Linears (as q, k and v read one): traced, they share its
    input quantizer."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return self.a(h) + self.b(h)


def tiny_bert(vocab_size: int, hidden_size: int, heads: int, intermediate_size: int) -> nn.Module:
    """A random-init two-layer ``BertModel`` (seed 0) in eval mode; skips without transformers."""
    import pytest

    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                                     num_hidden_layers=2, num_attention_heads=heads,
                                     intermediate_size=intermediate_size,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()
