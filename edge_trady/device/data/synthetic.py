"""Synthetic images: K learnable classes of coloured stripes plus noise, generated (no file)."""

from __future__ import annotations

import colorsys

import numpy as np

from ...errors import DataError
from .images import ImageDataset, Normalization
from .splits import SYNTHETIC_STREAM

SYNTHETIC_PER_CLASS = 32


def synthetic(
    spec: str,
    arg: str,
    split: str,
    size: int,
    normalization: Normalization,
    per_class: int | None,
    seed: int,
) -> ImageDataset:
    """K classes of stripes: class c has hue c/K and stripe angle pi c/K; phase and noise vary.
    Each split has ``per_class`` images per class (default 32); ``all`` is train then val."""
    if arg and not (arg.isdigit() and int(arg) >= 1):
        raise DataError(f"{spec}: K must be a positive integer (e.g. synthetic:4)")
    if split == "all":
        parts = [synthetic(spec, arg, s, size, normalization, per_class, seed) for s in ("train", "val")]
        return ImageDataset(
            pixels=np.concatenate([p.pixels for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            class_names=parts[0].class_names,
            normalization=normalization,
            source=parts[0].source.replace("(train,", "(all: train + val,"),
        )
    num_classes = int(arg) if arg else 4
    n = SYNTHETIC_PER_CLASS if per_class is None else per_class
    rng = np.random.default_rng([seed, SYNTHETIC_STREAM, 0 if split == "train" else 1])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    pixels = np.empty((num_classes * n, size, size, 3), np.uint8)
    for c in range(num_classes):
        angle = np.pi * c / num_classes
        colour = np.array(colorsys.hsv_to_rgb(c / num_classes, 0.7, 0.9), np.float32)
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
        wave = np.sin(2 * np.pi * 3 * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        noise = rng.standard_normal((n, size, size, 3), dtype=np.float32) * 0.08
        image = colour * (0.6 + 0.3 * wave[..., None]) + noise
        pixels[c * n : (c + 1) * n] = np.clip(np.rint(image * 255), 0, 255)
    return ImageDataset(
        pixels=pixels,
        labels=np.repeat(np.arange(num_classes, dtype=np.int64), n),
        class_names=[f"class{c}" for c in range(num_classes)],
        normalization=normalization,
        source=f"synthetic:{num_classes} ({split}, {n} per class, seed {seed})",
    )
