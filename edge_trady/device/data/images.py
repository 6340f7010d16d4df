"""Images: held as resized ``uint8`` pixels (1 byte per value), normalised to ``float32`` one batch
at a time; the resizing shared by the image sources."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from .base import Dataset, Inputs


@dataclass(frozen=True)
class Normalization:
    """Per-channel normalisation: ``value = (pixel / 255 - mean) / std``."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"normalization needs 3 means and 3 positive stds, got {self}")

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Normalization:
        return cls(tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]))


MINUS_ONE_TO_ONE = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # EfficientNet-Lite
IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class ImageDataset(Dataset):
    """Resized images of one split, normalised batch by batch."""

    pixels: np.ndarray  # uint8 [N, S, S, 3]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]
    normalization: Normalization
    source: str  # human-readable description (spec + split)
    kind: ClassVar[str] = "images"

    @property
    def image_size(self) -> int:
        return self.pixels.shape[1]

    @property
    def nbytes(self) -> int:
        return self.pixels.nbytes

    def examples(self) -> tuple[np.ndarray, ...]:
        return (self.pixels,)

    def batch(self, indices: np.ndarray, out: Inputs | None = None) -> tuple[np.ndarray, np.ndarray]:
        """float32 [b, 3, S, S] normalised (C-contiguous), int64 labels [b]; written into ``out`` when it
        is an earlier batch of this shape (its values are replaced; no new pages to fault in)."""
        shape = (len(indices), 3, self.image_size, self.image_size)
        if isinstance(out, np.ndarray) and out.shape == shape and out.dtype == np.float32 and out.flags.c_contiguous:
            x = out
            np.copyto(x, self.pixels[indices].transpose(0, 3, 1, 2))
        else:
            x = self.pixels[indices].transpose(0, 3, 1, 2).astype(np.float32, order="C")
        # (pixel - 255 mean) / (255 std): exact -1 and 1 at 0 and 255 for MINUS_ONE_TO_ONE
        x -= (255 * np.asarray(self.normalization.mean, np.float32))[:, None, None]
        x /= (255 * np.asarray(self.normalization.std, np.float32))[:, None, None]
        return x, self.labels[indices]


def empty_images(n: int, size: int) -> np.ndarray:
    """uint8 [n, size, size, 3], to be filled."""
    return np.empty((n, size, size, 3), np.uint8)


def stack(images: Iterable[np.ndarray], n: int, size: int) -> np.ndarray:
    """uint8 [n, size, size, 3] from n images of [size, size, 1 or 3]."""
    out = empty_images(n, size)
    for i, image in enumerate(images):
        out[i] = image  # grey broadcasts to 3 channels
    return out


def fit(image: Image.Image, size: int) -> np.ndarray:
    """Bilinear resize to size x size; [S, S, 3] for RGB, [S, S, 1] for grey."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    pixels = np.asarray(image)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def fit_arrays(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [n, H, W, 1 or 3] -> uint8 [n, size, size, 3]."""
    grey = images.shape[-1] == 1
    pil = (Image.fromarray(image[..., 0] if grey else image) for image in images)
    return stack((fit(image, size) for image in pil), len(images), size)
