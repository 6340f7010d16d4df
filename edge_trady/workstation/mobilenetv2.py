"""MobileNetV2 (Sandler et al. 2018) with a width multiplier, written for this repo.

Depthwise separable inverted-residual blocks, ReLU6, BatchNorm; random initialisation.
Used by tests and as a small architecture with depthwise and pointwise convolutions.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s) from the paper, for 224 px input.
_BLOCKS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(inp: int, out: int, kernel: int, stride: int, groups: int = 1) -> list[nn.Module]:
    pad = (kernel - 1) // 2
    conv = nn.Conv2d(inp, out, kernel, stride, pad, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(out)]


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = inp * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*_conv_bn(inp, hidden, 1, 1), nn.ReLU6(inplace=False)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=False)]
        layers += _conv_bn(hidden, out, 1, 1)
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        channels = _divisible(32 * width)
        last = _divisible(1280 * max(1.0, width))
        features: list[nn.Module] = [nn.Sequential(*_conv_bn(3, channels, 3, 2), nn.ReLU6())]
        for expansion, out, repeats, stride in _BLOCKS:
            out = _divisible(out * width)
            for i in range(repeats):
                features.append(InvertedResidual(channels, out, stride if i == 0 else 1, expansion))
                channels = out
        features.append(nn.Sequential(*_conv_bn(channels, last, 1, 1), nn.ReLU6()))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


def calibrate_batchnorm(model: nn.Module, image_size: int, seed: int = 0, batches: int = 4) -> None:
    """Set BatchNorm running statistics from random images.

    With frozen BN (eval mode), a randomly initialised network otherwise lets activations shrink
    layer after layer (to ~1e-8 at the classifier), and nothing but the head would learn.
    """
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(16, 3, image_size, image_size, generator=generator))
    for norm in norms:
        norm.momentum = 0.1
    model.eval()
