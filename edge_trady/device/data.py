"""Data sets for fine-tuning and evaluation (numpy, PIL and the standard library only: runs on
the device).

A data set is held as resized ``uint8`` pixels (1 byte per value) and normalised to ``float32``
one batch at a time. Spec strings accepted by :func:`load_dataset`:

- ``fashion-mnist`` or ``fashion-mnist:DIR``: IDX files of the Debian package
  ``dataset-fashion-mnist`` (DIR defaults to ``$EDGE_TRADY_FASHION_MNIST`` or
  ``/usr/share/datasets/fashion-mnist/``); ``val`` is the t10k test set.
- ``synthetic`` or ``synthetic:K``: K (default 4) learnable classes of coloured stripes plus noise.
- ``PATH.npz``: arrays ``x``, ``y`` and optional ``class_names``, ``x_val``, ``y_val``.
- a directory: an image folder with one sub-folder of JPEG/PNG images per class, optionally
  inside ``train/`` and ``val/`` (or ``test/``).

Without an explicit validation set, ``val`` is a seeded, stratified holdout of ``val_fraction``
and ``train`` the rest; ``all`` is every image of every part (train + val/test; for synthetic data,
both generated splits). Data passed for evaluation or validation is scored whole unless it has an
explicit validation part (:func:`evaluation_split`).
"""

from __future__ import annotations

import colorsys
import gzip
import math
import os
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from ..errors import DataError

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
SPEC_FORMS = (
    "fashion-mnist[:DIR], synthetic[:K], a .npz file (x, y[, class_names, x_val, y_val]) "
    "or an image folder (one sub-folder of JPEG/PNG images per class)"
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_IMAGE_PIXELS = 4096 * 4096  # decoded images larger than this are refused (max_image_pixels)
MAX_IMAGE_PIXELS_ENV = "EDGE_TRADY_MAX_IMAGE_PIXELS"
SYNTHETIC_PER_CLASS = 32
SPLITS = ("train", "val", "all")

# Second entry of the seed sequence of each random stream (epoch_order uses [seed, epoch, 1]).
_HOLDOUT_STREAM = 2
_SUBSET_STREAM = 3
_SYNTHETIC_STREAM = 4


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
class Dataset:
    """Resized images of one split, normalised batch by batch."""

    pixels: np.ndarray  # uint8 [N, S, S, 3]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]
    normalization: Normalization
    source: str  # human-readable description (spec + split)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return self.pixels.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def batch(self, indices: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """float32 [b, 3, S, S] normalised (C-contiguous), int64 labels [b]. ``out``: an earlier batch
        of this shape to write the images into (its values are replaced; no new pages to fault in)."""
        shape = (len(indices), 3, self.image_size, self.image_size)
        if out is not None and out.shape == shape and out.dtype == np.float32 and out.flags.c_contiguous:
            x = out
            np.copyto(x, self.pixels[indices].transpose(0, 3, 1, 2))
        else:
            x = self.pixels[indices].transpose(0, 3, 1, 2).astype(np.float32, order="C")
        # (pixel - 255 mean) / (255 std): exact -1 and 1 at 0 and 255 for MINUS_ONE_TO_ONE
        x -= (255 * np.asarray(self.normalization.mean, np.float32))[:, None, None]
        x /= (255 * np.asarray(self.normalization.std, np.float32))[:, None, None]
        return x, self.labels[indices]

    def batches(self, batch_size: int, order: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Consecutive batches following `order`; last partial batch kept."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start : start + batch_size])


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Data order of an epoch: np.random.default_rng([seed, epoch, 1]).permutation(n), or arange."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, 1]).permutation(n)


def load_dataset(
    spec: str,
    split: str,
    image_size: int,
    normalization: Normalization,
    per_class: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> Dataset:
    """Load split ``train``, ``val`` or ``all`` of a data set, resized to ``image_size`` squared.

    ``per_class`` keeps a seeded, stratified random subset of at most that many images per class
    (chosen before any image is decoded or resized). Raises DataError for bad input.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if image_size < 1:
        raise DataError(f"image size must be >= 1, got {image_size}")
    if per_class is not None and per_class < 1:
        raise DataError(f"images per class must be >= 1, got {per_class}")
    if not 0 < val_fraction < 1:
        raise DataError(f"validation fraction must be in (0, 1), got {val_fraction}")

    name, _, arg = spec.partition(":")
    if name == "synthetic":
        return _synthetic(spec, arg, split, image_size, normalization, per_class, seed)
    source = _open(spec, split)
    details = [f"{split}: {source.part}" if source.part else split]
    keep = np.arange(len(source.labels))
    if source.holdout and split != "all":
        keep = _holdout(source.labels, len(source.class_names), split, seed, val_fraction)
        details.append(f"{val_fraction:g} holdout")
    if per_class is not None:
        keep = _subset(source.labels, keep, len(source.class_names), per_class, seed)
        details.append(f"{per_class} per class")
    if len(details) > 1:
        details.append(f"seed {seed}")
    if keep.size == 0:
        hint = " (a holdout needs at least 2 images in a class)" if source.holdout else ""
        raise DataError(f"{source.description}: no images in split '{split}'{hint}")
    return Dataset(
        pixels=source.read(keep, image_size),
        labels=source.labels[keep],
        class_names=source.class_names,
        normalization=normalization,
        source=f"{source.description} ({', '.join(details)})",
    )


@dataclass
class _Source:
    """Labels of every image of a split; pixels are read only for the images kept."""

    labels: np.ndarray  # int64 [N]
    class_names: list[str]
    read: Callable[[np.ndarray, int], np.ndarray]  # (indices, size) -> uint8 [n, S, S, 3]
    holdout: bool  # True: no explicit val set, the split is a holdout of these images
    description: str
    part: str = ""  # which files or arrays an explicit split is, e.g. "t10k files", "x_val, y_val"


def has_validation_part(spec: str) -> bool:
    """True when the data set has its own validation part (Fashion-MNIST's t10k files, an .npz with
    ``x_val``/``y_val``, an image folder with ``train/`` and ``val/`` or ``test/``, synthetic data);
    False when its ``val`` split would be a holdout. Reads no image."""
    name, _, arg = spec.partition(":")
    if name in ("fashion-mnist", "synthetic"):
        return True
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return "x_val" in npz.files
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise DataError(f"{path}: cannot read .npz file ({e})") from e
    if path.is_dir():
        return (path / "train").is_dir() and any((path / d).is_dir() for d in ("val", "test"))
    return _open(spec, "train").holdout  # not a data set: raises the DataError that says why


def evaluation_split(spec: str) -> str:
    """The split that scoring ``spec`` means by default: its validation part if it has one, else
    every image (a test file passed to evaluate, or as separate validation data, is scored whole)."""
    return "val" if has_validation_part(spec) else "all"


def validation_source(val_spec: str | None, train_spec: str) -> tuple[str, str]:
    """(spec, split) of the validation data of a run: the ``val`` split of the training data when
    no separate validation data is given (or it is the training data itself), else that data set's
    :func:`evaluation_split`."""
    if val_spec is None or val_spec == train_spec:
        return train_spec, "val"
    return val_spec, evaluation_split(val_spec)


def _open(spec: str, split: str) -> _Source:
    if split == "all":
        train = _open(spec, "train")
        return train if train.holdout else _join(train, _open(spec, "val"))
    name, _, arg = spec.partition(":")
    if name == "fashion-mnist":
        directory = arg or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR
        return _open_fashion_mnist(Path(directory).expanduser(), split)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".npz" and path.is_file():
        return _open_npz(path, split)
    if path.is_dir():
        return _open_folder(path, split)
    problem = "not a directory or .npz file" if path.exists() else "no such file or directory"
    raise DataError(f"{spec}: {problem}; expected {SPEC_FORMS}")


def _join(first: _Source, second: _Source) -> _Source:
    """The images of two parts of one data set (train then val), as one source without holdout."""
    n = len(first.labels)

    def read(indices: np.ndarray, size: int) -> np.ndarray:
        out = np.empty((len(indices), size, size, 3), np.uint8)
        ours = indices < n
        if ours.any():
            out[ours] = first.read(indices[ours], size)
        if not ours.all():
            out[~ours] = second.read(indices[~ours] - n, size)
        return out

    labels = np.concatenate([first.labels, second.labels])
    return _Source(
        labels, first.class_names, read, False, first.description, f"{first.part or 'train'} + {second.part or 'val'}"
    )


def _holdout(labels: np.ndarray, num_classes: int, split: str, seed: int, val_fraction: float) -> np.ndarray:
    """Sorted indices of a split: ``val_fraction`` of each class (at least 1 of 2+) is val."""
    rng = np.random.default_rng([seed, _HOLDOUT_STREAM])
    parts = []
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = len(members)
        n_val = min(max(round(n * val_fraction), 1), n - 1) if n > 1 else 0
        parts.append(members[:n_val] if split == "val" else members[n_val:])
    return np.sort(np.concatenate(parts))


def _subset(labels: np.ndarray, candidates: np.ndarray, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Sorted seeded random subset of ``candidates`` with at most ``per_class`` per class."""
    rng = np.random.default_rng([seed, _SUBSET_STREAM])
    parts = [rng.permutation(candidates[labels[candidates] == c])[:per_class] for c in range(num_classes)]
    return np.sort(np.concatenate(parts))


def _stack(images: Iterable[np.ndarray], n: int, size: int) -> np.ndarray:
    """uint8 [n, size, size, 3] from n images of [size, size, 1 or 3]."""
    out = np.empty((n, size, size, 3), np.uint8)
    for i, image in enumerate(images):
        out[i] = image  # grey broadcasts to 3 channels
    return out


def _fit(image: Image.Image, size: int) -> np.ndarray:
    """Bilinear resize to size x size; [S, S, 3] for RGB, [S, S, 1] for grey."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    pixels = np.asarray(image)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _fit_arrays(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [n, H, W, 1 or 3] -> uint8 [n, size, size, 3]."""
    grey = images.shape[-1] == 1
    pil = (Image.fromarray(image[..., 0] if grey else image) for image in images)
    return _stack((_fit(image, size) for image in pil), len(images), size)


# Fashion-MNIST (IDX files)


def _open_fashion_mnist(directory: Path, split: str) -> _Source:
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
        return _fit_arrays(images[..., None], size)

    part = f"{prefix} files"
    return _Source(labels, list(FASHION_MNIST_CLASSES), read, False, f"fashion-mnist {directory}", part)


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


# Image folders


def _open_folder(root: Path, split: str) -> _Source:
    val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    explicit = (root / "train").is_dir() and val_dir is not None
    class_root = root / "train" if explicit else root
    class_names = [d.name for d in _class_dirs(class_root)]
    split_root = val_dir if explicit and split == "val" else class_root
    files: list[Path] = []
    labels: list[int] = []
    for class_dir in _class_dirs(split_root):
        if class_dir.name not in class_names:
            raise DataError(f"{class_dir}: class folder not in {class_root}")
        images = _image_files(class_dir)
        files += images
        labels += [class_names.index(class_dir.name)] * len(images)

    def read(indices: np.ndarray, size: int) -> np.ndarray:
        return _stack((_read_image(files[i], size) for i in indices), len(indices), size)

    part = f"{split_root.name}/" if explicit and split_root.name != split else ""  # val from test/
    return _Source(np.array(labels, np.int64), class_names, read, not explicit, str(root), part)


def _class_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"{root}: no class folders (expected one sub-folder of images per class)")
    return dirs


def _image_files(class_dir: Path) -> list[Path]:
    files = sorted(
        p
        for p in class_dir.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    if not files:
        raise DataError(f"{class_dir}: empty class folder (no JPEG/PNG images)")
    return files


def max_image_pixels() -> int:
    """Largest image (width x height, after JPEG draft scaling) the loader decodes: decoding holds
    the whole image (3-4 bytes per pixel, twice while converting), whatever the size it is
    resized to. ``$EDGE_TRADY_MAX_IMAGE_PIXELS`` overrides the default."""
    value = os.environ.get(MAX_IMAGE_PIXELS_ENV, "")
    if not value:
        return MAX_IMAGE_PIXELS
    if not value.isdigit() or int(value) < 1:
        raise DataError(f"${MAX_IMAGE_PIXELS_ENV}={value!r}: expected a positive number of pixels")
    return int(value)


def _read_image(path: Path, size: int) -> np.ndarray:
    limit = max_image_pixels()
    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale >= size
            width, height = image.size
            if width * height > limit:
                raise DataError(
                    f"{path}: {width} x {height} pixels, more than the {limit:,}-pixel cap on decoded images "
                    f"(decoding it would take ~{_mib(width * height * 8)} MiB); shrink it, or raise "
                    f"${MAX_IMAGE_PIXELS_ENV}"
                )
            return _fit(ImageOps.exif_transpose(image).convert("RGB"), size)
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: refused by Pillow's decompression-bomb check ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read image (corrupt or not an image)") from e


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


# .npz arrays


def _open_npz(path: Path, split: str) -> _Source:
    arrays = _load_npz(path, split)
    x_key = "x_val" if "x_val" in arrays else "x"
    x = _npz_images(arrays[x_key], path, x_key)
    label_keys = [k for k in ("y", "y_val") if k in arrays]
    for key in label_keys:
        _check_labels(arrays[key], path, key)
    y_key = "y_val" if x_key == "x_val" else "y"
    y = arrays[y_key]
    if len(x) != len(y):
        raise DataError(f"{path}: len({x_key}) = {len(x)} but len({y_key}) = {len(y)}")
    if "class_names" in arrays:
        class_names = _npz_class_names(arrays["class_names"], path)
        for key in label_keys:
            if arrays[key].size and arrays[key].max() >= len(class_names):
                raise DataError(
                    f"{path}: label {arrays[key].max()} in '{key}' out of range "
                    f"[0, {len(class_names)}) for {len(class_names)} class_names"
                )
    else:
        top = max((int(arrays[k].max()) for k in label_keys if arrays[k].size), default=0)
        class_names = [str(c) for c in range(top + 1)]

    def read(indices: np.ndarray, size: int) -> np.ndarray:
        images = x[indices]
        if images.dtype != np.uint8:
            images = np.rint(images * 255).astype(np.uint8)
        return _fit_arrays(images, size)

    explicit = "y_val" in arrays
    part = f"{x_key}, {y_key}" if explicit else ""
    return _Source(y.astype(np.int64), class_names, read, not explicit, str(path), part)


def _load_npz(path: Path, split: str) -> dict[str, np.ndarray]:
    """The arrays a split needs: its images (``x`` or ``x_val``), labels and class names."""
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: not an .npz archive (save it with numpy.savez)")
        with npz:
            found = set(npz.files)
            missing = [k for k in ("x", "y") if k not in found]
            if ("x_val" in found) != ("y_val" in found):
                missing.append("y_val" if "x_val" in found else "x_val")
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {', '.join(missing)} (found: "
                    f"{', '.join(sorted(found)) or 'none'}; expected x, y and optional "
                    "class_names, x_val, y_val)"
                )
            x_key = "x_val" if split == "val" and "x_val" in found else "x"
            keys = [x_key, "y", "y_val", "class_names"]
            return {k: npz[k] for k in keys if k in found}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot read .npz file ({e})") from e


def _npz_images(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    """[N, H, W, C] view of ``x`` (uint8, or float checked to be in [0, 1])."""
    shape = x.shape
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim == 4 and x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(
            f"{path}: '{key}' has shape {shape}; expected [N, H, W], [N, H, W, C] or [N, C, H, W] with C = 1 or 3"
        )
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind != "f":
        raise DataError(f"{path}: '{key}' has dtype {x.dtype}; expected uint8, or float in [0, 1]")
    if x.size and not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
        raise DataError(f"{path}: '{key}' is float with values outside [0, 1]")
    return x


def _check_labels(y: np.ndarray, path: Path, key: str) -> None:
    if y.ndim != 1:
        raise DataError(f"{path}: '{key}' has shape {y.shape}; expected one label per image")
    whole = y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all()
    if y.dtype.kind not in "iu" and not whole:
        raise DataError(f"{path}: '{key}' must hold integer class labels (dtype {y.dtype})")
    if y.size and y.min() < 0:
        raise DataError(f"{path}: '{key}' has a negative label ({y.min()})")


def _npz_class_names(names: np.ndarray, path: Path) -> list[str]:
    if names.ndim != 1 or names.dtype.kind not in "US" or names.size == 0:
        raise DataError(f"{path}: 'class_names' must be a non-empty 1-D array of strings")
    return names.astype(str).tolist()


# Synthetic


def _synthetic(
    spec: str,
    arg: str,
    split: str,
    size: int,
    normalization: Normalization,
    per_class: int | None,
    seed: int,
) -> Dataset:
    """K classes of stripes: class c has hue c/K and stripe angle pi c/K; phase and noise vary.
    Each split has ``per_class`` images per class (default 32); ``all`` is train then val."""
    if arg and not (arg.isdigit() and int(arg) >= 1):
        raise DataError(f"{spec}: K must be a positive integer (e.g. synthetic:4)")
    if split == "all":
        parts = [_synthetic(spec, arg, s, size, normalization, per_class, seed) for s in ("train", "val")]
        return Dataset(
            pixels=np.concatenate([p.pixels for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            class_names=parts[0].class_names,
            normalization=normalization,
            source=parts[0].source.replace("(train,", "(all: train + val,"),
        )
    num_classes = int(arg) if arg else 4
    n = SYNTHETIC_PER_CLASS if per_class is None else per_class
    rng = np.random.default_rng([seed, _SYNTHETIC_STREAM, 0 if split == "train" else 1])
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
    return Dataset(
        pixels=pixels,
        labels=np.repeat(np.arange(num_classes, dtype=np.int64), n),
        class_names=[f"class{c}" for c in range(num_classes)],
        normalization=normalization,
        source=f"synthetic:{num_classes} ({split}, {n} per class, seed {seed})",
    )


def load_transient_bytes(spec: str) -> int:
    """Memory held only while a split of ``spec`` is decoded: an IDX file's chunk (streamed), an npz
    read whole."""
    name, _, _ = spec.partition(":")
    if name == "fashion-mnist":
        return IDX_CHUNK_BYTES
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".npz" and path.is_file():
        return path.stat().st_size
    return 0
