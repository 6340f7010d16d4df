"""A tiny Engine in numpy for fast tests of the shared loop, checkpoints and run folders: a
linear softmax classifier on the pixels, whose candidate "layer" ``fc`` has one input channel
per colour channel (selected channels train; the bias always trains)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_trady.core.selection import CandidateLayer, ChannelSampler, Selection

WEIGHTS_FILE = "weights.npz"


class NumpyEngine:
    name = "numpy-test"

    def __init__(self, image_size: int, num_classes: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.size = image_size
        self.weight = rng.normal(0, 0.01, (num_classes, 3, image_size * image_size)).astype(np.float32)
        self.bias = np.zeros(num_classes, np.float32)
        self.channels = np.zeros(0, np.int64)

    def set_selection(self, selection: Selection) -> None:
        self.channels = selection.channels.get("fc", np.zeros(0, np.int64))

    def _logits(self, x: np.ndarray) -> np.ndarray:
        flat = x.reshape(len(x), 3, -1)
        return np.einsum("bcp,kcp->bk", flat, self.weight) + self.bias

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, int]:
        logits = self._logits(x).astype(np.float64)
        shifted = logits - logits.max(1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)
        loss = float(-np.log(probs[np.arange(len(y)), y] + 1e-300).mean())
        grad = probs
        grad[np.arange(len(y)), y] -= 1
        grad /= len(y)
        flat = x.reshape(len(x), 3, -1)
        with np.errstate(all="ignore"):
            for c in self.channels:
                self.weight[:, c] -= (lr * grad.T @ flat[:, c]).astype(np.float32)
            self.bias -= (lr * grad.sum(0)).astype(np.float32)
        return loss, int((logits.argmax(1) == y).sum())

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._logits(x)

    def save_state(self, directory: Path) -> None:
        with open(directory / WEIGHTS_FILE, "wb") as handle:
            np.savez(handle, weight=self.weight, bias=self.bias)

    def load_state(self, directory: Path) -> None:
        with np.load(directory / WEIGHTS_FILE) as saved:
            self.weight, self.bias = saved["weight"].copy(), saved["bias"].copy()

    def weights_finite(self) -> bool:
        return bool(np.isfinite(self.weight).all() and np.isfinite(self.bias).all())


def sampler(seed: int = 0, budget: float = 2.0) -> ChannelSampler:
    """TraDy over the one layer ``fc`` (3 channels of cost 1): 2 channels redrawn every epoch."""
    return ChannelSampler("trady", [CandidateLayer("fc", 3, 1.0)], budget, seed)
