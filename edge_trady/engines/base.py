"""The interface every training engine implements (torch masked, torch sparse, ONNX Runtime
training, portable)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..core.selection import Selection


class Engine(Protocol):
    """Trains a model's selected input channels with plain SGD; knows nothing of the schedule."""

    name: str

    def set_selection(self, selection: Selection) -> None:
        """Channels whose weights may change until the next call (the classifier always)."""

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, int]:
        """One SGD step on a batch; returns (mean loss, correct predictions)."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch, no gradient."""

    def save_state(self, directory: Path) -> None:
        """Write the weights that can change (for checkpoints)."""

    def load_state(self, directory: Path) -> None:
        """Restore what ``save_state`` wrote."""

    def weights_finite(self) -> bool:
        """False if a weight that training changes is NaN or infinite (the loop stops: diverged)."""

    def trainable_state(self) -> dict[str, np.ndarray]:
        """The current value of every tensor that can change (candidate layers' full weights, the
        classifier's weight and bias), by parameter name; read-only, valid until the next step.
        With ``core.slices`` a caller can take out (and put back) only the selected entries.
        Implemented by the portable engine; the torch engines get it with the fleet (issue 13)."""

    def load_trainable_state(self, state: dict[str, np.ndarray]) -> None:
        """Set every tensor ``trainable_state`` names from ``state`` (same names and shapes)."""
