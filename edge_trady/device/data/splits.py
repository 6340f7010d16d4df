"""Sources and splits, whatever the modality: which examples of a source a split keeps (its own
validation part, or a seeded stratified holdout), and seeded per-class subsets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import DataError

SPLITS = ("train", "val", "all")

# Second entry of the seed sequence of each random stream (epoch_order uses [seed, epoch, 1]).
HOLDOUT_STREAM = 2
SUBSET_STREAM = 3
SYNTHETIC_STREAM = 4


@dataclass
class Source:
    """Labels of every example of a split; the examples are read only for those kept.

    ``read(indices, *args)`` returns the examples ``indices`` (in that order) as an array whose
    first axis is the example: ``args`` say how (an image size); ``empty(n, *args)`` allocates
    such an array for ``n`` examples."""

    labels: np.ndarray  # int64 [N]
    class_names: list[str]
    read: Callable[..., np.ndarray]
    holdout: bool  # True: no explicit val set, the split is a holdout of these examples
    description: str
    part: str = ""  # which files or arrays an explicit split is, e.g. "t10k files", "x_val, y_val"
    empty: Callable[..., np.ndarray] | None = None  # for join; default: an object array


def join(first: Source, second: Source) -> Source:
    """The examples of two parts of one data set (train then val), as one source without holdout.
    Each part is read and copied in turn, so only the result and one part are held at once."""
    n = len(first.labels)

    def read(indices: np.ndarray, *args: Any) -> np.ndarray:
        out = first.empty(len(indices), *args) if first.empty else np.empty(len(indices), object)
        ours = indices < n
        if ours.any():
            out[ours] = first.read(indices[ours], *args)
        if not ours.all():
            out[~ours] = second.read(indices[~ours] - n, *args)
        return out

    labels = np.concatenate([first.labels, second.labels])
    part = f"{first.part or 'train'} + {second.part or 'val'}"
    return Source(labels, first.class_names, read, False, first.description, part, first.empty)


def select(
    source: Source, split: str, per_class: int | None, seed: int, val_fraction: float, noun: str
) -> tuple[np.ndarray, str]:
    """Sorted indices of the examples of ``source`` that ``split`` keeps, and the description of
    the selection (e.g. ``train, 0.2 holdout, 50 per class, seed 0``). ``noun``: what an example is
    called in messages ("images")."""
    details = [f"{split}: {source.part}" if source.part else split]
    keep = np.arange(len(source.labels))
    if source.holdout and split != "all":
        keep = holdout(source.labels, len(source.class_names), split, seed, val_fraction)
        details.append(f"{val_fraction:g} holdout")
    if per_class is not None:
        keep = subset(source.labels, keep, len(source.class_names), per_class, seed)
        details.append(f"{per_class} per class")
    if len(details) > 1:
        details.append(f"seed {seed}")
    if keep.size == 0:
        hint = f" (a holdout needs at least 2 {noun} in a class)" if source.holdout else ""
        raise DataError(f"{source.description}: no {noun} in split '{split}'{hint}")
    return keep, ", ".join(details)


def holdout(labels: np.ndarray, num_classes: int, split: str, seed: int, val_fraction: float) -> np.ndarray:
    """Sorted indices of a split: ``val_fraction`` of each class (at least 1 of 2+) is val."""
    rng = np.random.default_rng([seed, HOLDOUT_STREAM])
    parts = []
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = len(members)
        n_val = min(max(round(n * val_fraction), 1), n - 1) if n > 1 else 0
        parts.append(members[:n_val] if split == "val" else members[n_val:])
    return np.sort(np.concatenate(parts))


def subset(labels: np.ndarray, candidates: np.ndarray, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Sorted seeded random subset of ``candidates`` with at most ``per_class`` per class."""
    rng = np.random.default_rng([seed, SUBSET_STREAM])
    parts = [rng.permutation(candidates[labels[candidates] == c])[:per_class] for c in range(num_classes)]
    return np.sort(np.concatenate(parts))


def check_selection_args(split: str, per_class: int | None, val_fraction: float, noun: str) -> None:
    """Raise DataError for a split, subset size or holdout fraction no data set could honour."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if per_class is not None and per_class < 1:
        raise DataError(f"{noun} per class must be >= 1, got {per_class}")
    if not 0 < val_fraction < 1:
        raise DataError(f"validation fraction must be in (0, 1), got {val_fraction}")
