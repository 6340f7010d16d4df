"""Image folders: one sub-folder of JPEG/PNG images per class (optionally in ``train/`` and
``val/`` or ``test/``), each image decoded under the pixel cap and resized."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ...errors import DataError
from .folders import folder_split
from .guard import MAX_IMAGE_PIXELS_ENV, max_image_pixels, mib
from .images import empty_images, fit, stack
from .splits import Source

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def open_image_folder(root: Path, split: str) -> Source:
    found = folder_split(root, split, IMAGE_SUFFIXES, "JPEG/PNG images")
    files = found.files

    def read(indices: np.ndarray, size: int) -> np.ndarray:
        return stack((read_image(files[i], size) for i in indices), len(indices), size)

    return Source(found.labels, found.class_names, read, not found.explicit, str(root), found.part, empty_images)


def read_image(path: Path, size: int) -> np.ndarray:
    limit = max_image_pixels()
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale >= size
            width, height = image.size
            if width * height > limit:
                raise DataError(
                    f"{path}: {width} x {height} pixels, more than the {limit:,}-pixel cap on decoded images "
                    f"(decoding it would take ~{mib(width * height * 8)} MiB); shrink it, or raise "
                    f"${MAX_IMAGE_PIXELS_ENV}"
                )
            return fit(ImageOps.exif_transpose(image).convert("RGB"), size)
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: refused by Pillow's decompression-bomb check ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image (corrupt or not an image)") from e
