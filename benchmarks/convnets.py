"""The convnets the ONNX Runtime benchmarks time, each random-init with BatchNorm statistics
run through random data in train mode (so BN folding is not a no-op):

- ``resnet8``: a ResNet-8-style net for 3x32x32 (stem conv3x3-BN-ReLU 32, three basic residual
  blocks at 32, 64/s2, 128/s2 with 1x1 conv-BN projection shortcuts, GAP, Linear(128, 10)),
  residuals written as ``relu(bn2(conv2(...)) + shortcut(x))``;
- ``mobilenetv2``: a MobileNetV2-style net for 3x32x32: depthwise-separable inverted residual
  blocks (1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 project-BN, identity residual where
  the shape allows), widths 16-24-32-64, 1x1 conv 256, GAP, Linear(256, 10);
- ``inception``: an Inception-style net for 3x32x32: stem conv3x3-BN-ReLU 32, then Inception
  blocks (branches 1x1; 1x1→3x3; 1x1→3x3→3x3; maxpool3x3→1x1, each conv-BN-ReLU, joined with
  ``torch.cat`` along channels) at 64, 128/s2 and 128 channels, GAP, Linear(128, 10);
- ``hf-resnet``: ``transformers.ResNetModel`` from a small config (basic layers, hidden sizes
  32-64-128, 3x64x64), returning its pooled output — the model code Hugging Face users run,
  which torch.fx cannot trace.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU, conv3x3-BN, + shortcut (identity or 1x1 conv-BN), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + self.shortcut(x))


class ResNet8(nn.Module):
    """7 conv3x3 + 1 linear on the main path (ResNet-8 counting), widths 32/64/128."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU())
        self.layer1 = BasicBlock(32, 32, 1)
        self.layer2 = BasicBlock(32, 64, 2)
        self.layer3 = BasicBlock(64, 128, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups,
                                         bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = _conv_bn(cin, hidden, 1) if expand != 1 else nn.Identity()
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = _conv_bn(hidden, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class MobileNetV2ish(nn.Module):
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2))  # t, c, n, s

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        blocks: list[nn.Module] = [_conv_bn(3, 32, 3)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        blocks.append(_conv_bn(cin, 256, 1))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class InceptionBlock(nn.Module):
    """Four branches of ``cout // 4`` channels each, concatenated along channels."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        c = cout // 4
        self.b1 = _conv_bn_relu(cin, c, 1, stride)
        self.b3 = nn.Sequential(_conv_bn_relu(cin, c, 1), _conv_bn_relu(c, c, 3, stride))
        self.b5 = nn.Sequential(_conv_bn_relu(cin, c, 1), _conv_bn_relu(c, c, 3),
                                _conv_bn_relu(c, c, 3, stride))
        self.pool = nn.Sequential(nn.MaxPool2d(3, stride, 1), _conv_bn_relu(cin, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], dim=1)


class Inceptionish(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, 32, 3)
        self.blocks = nn.Sequential(InceptionBlock(32, 64), InceptionBlock(64, 128, 2),
                                    InceptionBlock(128, 128))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class UNetish(nn.Module):
    """A small U-Net written the way segmentation code often is: pooling and upsampling as
    calls (``F.max_pool2d``, ``F.interpolate``), skips joined by ``torch.cat``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.enc1, self.enc2 = _conv_bn_relu(3, 32, 3), _conv_bn_relu(32, 64, 3)
        self.mid = _conv_bn_relu(64, 128, 3)
        self.dec2, self.dec1 = _conv_bn_relu(128 + 64, 64, 3), _conv_bn_relu(64 + 32, 32, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(m, scale_factor=2), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2), e1], 1))
        return self.fc(torch.flatten(self.pool(d1), 1))


class HFResNet(nn.Module):
    """``transformers.ResNetModel`` returning its pooled features as one tensor."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        config = transformers.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128],
                                           depths=[1, 1, 1], layer_type="basic", image_size=64)
        self.model = transformers.ResNetModel(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.model(pixel_values=x).pooler_output, 1)


NETS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet8": (ResNet8, (3, 32, 32)),
    "mobilenetv2": (MobileNetV2ish, (3, 32, 32)),
    "inception": (Inceptionish, (3, 32, 32)),
    "unet": (UNetish, (3, 32, 32)),
    "hf-resnet": (HFResNet, (3, 64, 64)),
}


def available() -> list[str]:
    """The nets that can be built here (``hf-resnet`` needs ``transformers``)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return [n for n in NETS if not n.startswith("hf-")]
    return list(NETS)


def build(name: str, seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    """Random init; BN running statistics from 16 random batches in train mode; eval mode."""
    factory, shape = NETS[name]
    torch.manual_seed(seed)
    model = factory()
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    with torch.no_grad():
        for _ in range(16):
            model(torch.randn(32, *shape, generator=gen))
    return model.eval(), shape
