"""The dataset interface every modality implements, and the order of an epoch's examples."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import ClassVar

import numpy as np

from .fingerprint import fingerprint

# What a model takes for a batch: float32 images [B, 3, S, S], or named int64 arrays (text).
Inputs = np.ndarray | Mapping[str, np.ndarray]


class Dataset(ABC):
    """The examples of one split with their labels, turned into a model's inputs one batch at a time.

    Subclasses (dataclasses) hold ``labels`` (int64 [N]), ``class_names`` and ``source`` (a
    human-readable description: spec and split) beside their examples."""

    labels: np.ndarray
    class_names: list[str]
    source: str
    kind: ClassVar[str]  # what an example is called in messages: "images", "texts"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Memory the examples hold while loaded (what the runner's memory guard counts)."""

    @abstractmethod
    def batch(self, indices: np.ndarray, out: Inputs | None = None) -> tuple[Inputs, np.ndarray]:
        """The model's inputs for the examples ``indices`` and their int64 labels [b]. ``out``: an
        earlier batch of this dataset that the caller no longer needs, which a modality may write the
        new inputs into (no new memory pages per step) or ignore."""

    @abstractmethod
    def examples(self) -> tuple[np.ndarray, ...]:
        """The arrays that identify the examples as the model sees them (hashed by the fingerprint)."""

    def batches(self, batch_size: int, order: np.ndarray) -> Iterator[tuple[Inputs, np.ndarray]]:
        """Consecutive batches following `order`; last partial batch kept."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start : start + batch_size])

    def fingerprint(self) -> str:
        """One line identifying the data: description, size and a hash of examples and labels."""
        return fingerprint(self.examples(), self.labels, self.source, self.kind)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Data order of an epoch: np.random.default_rng([seed, epoch, 1]).permutation(n), or arange."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, 1]).permutation(n)
