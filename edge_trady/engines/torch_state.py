"""What the two torch engines share: a checkpoint of their ``model`` in one file, and its finiteness."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS_FILE = "weights.pt"


class TorchModuleState:
    """Checkpoint methods of the ``Engine`` protocol for an engine that trains ``self.model``."""

    model: nn.Module

    def save_state(self, directory: Path) -> None:
        torch.save(self.model.state_dict(), directory / WEIGHTS_FILE)

    def load_state(self, directory: Path) -> None:
        self.model.load_state_dict(torch.load(directory / WEIGHTS_FILE, weights_only=True))

    def weights_finite(self) -> bool:
        with torch.no_grad():
            return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
