"""Trace a model on the workstation to get the sizes the memory model needs.

What autograd keeps for backward is measured, not guessed: a training step's forward runs under
``torch.autograd.graph.saved_tensors_hooks`` at batch 1 and 2, and every saved storage that is not
a parameter or buffer is counted. The difference gives the per-sample part, the rest is fixed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.selection import Selection
from ..engines.base import Engine
from ..engines.torch_state import torch_inputs
from .example_input import ExampleInput, as_example


@dataclass(frozen=True)
class Footprint:
    """Byte sizes of a model at one input size (activation sizes are per sample)."""

    weight_bytes: int  # parameters and buffers
    input_bytes_per_sample: int
    largest_activation_per_sample: int
    forward_peak_per_sample: int  # max over layers of input + output (inference working set)
    saved_bytes_per_sample: int  # what the engine's autograd graph keeps, per sample
    saved_bytes_fixed: int
    trainable_weight_bytes: int  # gradient buffers of the traced selection

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Footprint:
        return cls(**data)


def trace_footprint(
    model: nn.Module, engine: Engine, selection: Selection, example: ExampleInput | int, num_classes: int
) -> Footprint:
    """Measure the model's activation sizes and what ``engine`` saves for ``selection``, on batches of
    ``example`` (an int: an image size)."""
    example = as_example(example)
    largest, forward_peak = _activation_sizes(model, example)
    engine.set_selection(selection)
    one = _saved_bytes(model, engine, 1, example, num_classes)
    two = _saved_bytes(model, engine, 2, example, num_classes)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return Footprint(
        weight_bytes=weights,
        input_bytes_per_sample=example.bytes_per_sample,
        largest_activation_per_sample=largest,
        forward_peak_per_sample=forward_peak,
        saved_bytes_per_sample=two - one,
        saved_bytes_fixed=max(0, 2 * one - two),
        trainable_weight_bytes=trainable,
    )


def _activation_sizes(model: nn.Module, example: ExampleInput) -> tuple[int, int]:
    largest = peak = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal largest, peak
        if not isinstance(output, torch.Tensor) or not inputs or not isinstance(inputs[0], torch.Tensor):
            return
        out_bytes = output.numel() * output.element_size()
        largest = max(largest, out_bytes)
        peak = max(peak, out_bytes + inputs[0].numel() * inputs[0].element_size())

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(*torch_inputs(example.arrays(1)))
    finally:
        for handle in handles:
            handle.remove()
    return largest, peak


def _saved_bytes(model: nn.Module, engine: Engine, batch: int, example: ExampleInput, num_classes: int) -> int:
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = example.arrays(batch)
    y = np.arange(batch, dtype=np.int64) % num_classes
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward = getattr(engine, "forward_loss", None)
        if forward is not None:
            forward(x, y)
        else:
            F.cross_entropy(model(*torch_inputs(x)), torch.from_numpy(y))
    return sum(storages.values())
