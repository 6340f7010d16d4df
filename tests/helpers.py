"""Shared test helpers (imported by test modules: ``from helpers import ...``)."""

from __future__ import annotations

import torch
from torch import nn


def randomize_batchnorm(model: nn.Module, gen: torch.Generator, var_spread: float = 1.0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine (eval mode), so that folding them matters:
    mean in [-0.5, 0.5), variance in [0.5, 0.5 + var_spread), scale in [0.5, 1.5), shift in [-0.2, 0.2)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=gen) * var_spread + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return model.eval()
