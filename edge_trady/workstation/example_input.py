"""Example inputs: what a model's forward takes, so that tracing can run it.

Tracing (layer costs, BatchNorm / LayerNorm pairs, footprints) runs a model on an example batch:

- ``ImageInput(size)``: images, one float32 array ``[n, 3, S, S]`` (zeros) — every built-in model;
- ``TokenInput(max_tokens)``: text, token ids and an attention mask, two int64 arrays ``[n, T]``
  (every position a real token: the longest sequence the plan allows, the most memory).

``arrays(n)`` gives the numpy arrays of a batch of ``n``, passed positionally to the model (the torch
engines take the same tuple as their ``x``: ``engines.torch_state.torch_inputs``). A model whose
forward takes something else says so with an ``example_input`` attribute (see ``models.build_model``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageInput:
    """Square RGB images of ``size`` pixels."""

    size: int

    def arrays(self, batch: int) -> tuple[np.ndarray, ...]:
        return (np.zeros((batch, 3, self.size, self.size), dtype=np.float32),)

    @property
    def bytes_per_sample(self) -> int:
        """Bytes of one sample as the model takes it (float32 pixels)."""
        return 3 * self.size * self.size * 4

    def describe(self) -> str:
        return f"{self.size} px"


@dataclass(frozen=True)
class TokenInput:
    """Token ids and an attention mask of ``max_tokens`` positions; ids are ``fill_id`` (any id in
    the vocabulary will do: tracing needs shapes, not meaning)."""

    max_tokens: int
    fill_id: int = 1

    def arrays(self, batch: int) -> tuple[np.ndarray, ...]:
        ids = np.full((batch, self.max_tokens), self.fill_id, dtype=np.int64)
        return ids, np.ones((batch, self.max_tokens), dtype=np.int64)

    @property
    def bytes_per_sample(self) -> int:
        """Bytes of one sample as the model takes it (int64 ids and mask)."""
        return 2 * 8 * self.max_tokens

    def describe(self) -> str:
        return f"{self.max_tokens} tokens"


ExampleInput = ImageInput | TokenInput


def as_example(value: ExampleInput | int) -> ExampleInput:
    """An example input; an int is an image size (the form every image caller passes)."""
    if isinstance(value, ImageInput | TokenInput):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return ImageInput(value)
    raise TypeError(f"an example input or an image size, got {value!r}")
