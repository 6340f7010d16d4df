"""Fashion-MNIST from IDX files (the Debian package ``dataset-fashion-mnist``), streamed so only the
images kept and one chunk are held."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ...errors import DataError
from .images import empty_images, fit_arrays
from .splits import Source

FASHION_MNIST_ENV = "EDGE_TRADY_FASHION_MNIST"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist/"
IDX_CHUNK_BYTES = 1 << 20  # an IDX file is streamed this much at a time
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def open_fashion_mnist(arg: str, split: str) -> Source:
    """The ``train`` or ``val`` (t10k) files of ``fashion-mnist[:DIR]``."""
    directory = Path(arg or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR).expanduser()
    if not directory.is_dir():
        raise DataError(
            f"{directory}: no such directory; install the Debian package dataset-fashion-mnist, "
            f"pass fashion-mnist:DIR or set {FASHION_MNIST_ENV}"
        )
    prefix = "train" if split == "train" else "t10k"
    labels_path = _idx_file(directory, f"{prefix}-labels-idx1-ubyte")
    images_path = _idx_file(directory, f"{prefix}-images-idx3-ubyte")
    labels = _read_idx(labels_path, 1).astype(np.int64)
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{labels_path}: label {labels.max()} out of range [0, 10)")

    def read(indices: np.ndarray, size: int) -> np.ndarray:
        images, count = _read_idx_rows(images_path, 3, indices)
        if count != len(labels):
            raise DataError(f"{images_path}: {count} images but {labels_path.name} has {len(labels)} labels")
        return fit_arrays(images[..., None], size)

    part = f"{prefix} files"
    description = f"fashion-mnist {directory}"
    return Source(labels, list(FASHION_MNIST_CLASSES), read, False, description, part, empty_images)


def _idx_file(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{directory}: missing {stem}.gz (or {stem})")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes with ``ndim`` dimensions (gzipped if ``.gz``), read whole."""
    with _idx_open(path) as f:
        shape = _idx_shape(f, path, ndim)
        data = f.read()
    if len(data) != math.prod(shape):
        raise _idx_truncated(path, shape, len(data))
    return np.frombuffer(data, np.uint8).reshape(shape)


def _read_idx_rows(path: Path, ndim: int, rows: np.ndarray) -> tuple[np.ndarray, int]:
    """Entries ``rows`` of the first axis of an IDX array (in that order) and the array's length.

    The file is streamed IDX_CHUNK_BYTES at a time, so only the rows kept and one chunk are ever
    held (Fashion-MNIST's training file whole is 45 MiB, and gzip's join held it twice)."""
    with _idx_open(path) as f:
        shape = _idx_shape(f, path, ndim)
        row_bytes = math.prod(shape[1:])
        order = np.argsort(rows, kind="stable")
        wanted = rows[order]
        out = np.empty((len(rows), row_bytes), np.uint8)
        step = max(1, IDX_CHUNK_BYTES // max(row_bytes, 1))
        done = 0  # rows of the file read so far
        taken = 0  # entries of ``wanted`` filled so far
        while done < shape[0]:
            n = min(step, shape[0] - done)
            block = f.read(n * row_bytes)
            if len(block) != n * row_bytes:
                raise _idx_truncated(path, shape, done * row_bytes + len(block))
            end = int(np.searchsorted(wanted, done + n))
            chunk = np.frombuffer(block, np.uint8).reshape(n, row_bytes)
            out[order[taken:end]] = chunk[wanted[taken:end] - done]
            taken, done = end, done + n
        if f.read(1):
            raise DataError(f"{path}: truncated or corrupt IDX file (more bytes than its shape {shape} needs)")
    return out.reshape(len(rows), *shape[1:]), shape[0]


@contextmanager
def _idx_open(path: Path) -> Iterator[BinaryIO]:
    """The IDX file (gunzipped if ``.gz``); a truncated or corrupt file, while open or read, is one DataError."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            yield f
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read IDX file, truncated or corrupt ({e})") from e


def _idx_shape(f: BinaryIO, path: Path, ndim: int) -> tuple[int, ...]:
    """Read and check an IDX header of ``ndim``-D unsigned bytes; its shape."""
    header = f.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim or int.from_bytes(header[:4], "big") != 0x800 | ndim:
        raise DataError(f"{path}: not an IDX file of {ndim}-D unsigned bytes (bad magic number)")
    return tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))


def _idx_truncated(path: Path, shape: tuple[int, ...], found: int) -> DataError:
    return DataError(
        f"{path}: truncated or corrupt IDX file (shape {shape} needs {math.prod(shape)} bytes of data, found {found})"
    )
