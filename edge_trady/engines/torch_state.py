"""What the two torch engines share: a checkpoint of their ``model`` in one file, its finiteness, and
how a batch becomes the model's inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

WEIGHTS_FILE = "weights.pt"


def torch_inputs(x: np.ndarray | tuple[np.ndarray, ...]) -> tuple[torch.Tensor, ...]:
    """The model's positional inputs for a batch ``x``: one array (images) or a tuple of arrays (e.g.
    token ids and attention mask, ``workstation.example_input.TokenInput``), shared with numpy."""
    arrays = x if isinstance(x, tuple) else (x,)
    return tuple(torch.from_numpy(array) for array in arrays)


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
