"""Spec strings: which source kind a ``--data`` value names, the split a data set is scored on, and
loading a split of it."""

from __future__ import annotations

from pathlib import Path

from ...errors import DataError
from .fashion_mnist import IDX_CHUNK_BYTES, open_fashion_mnist
from .image_folder import open_image_folder
from .images import ImageDataset, Normalization
from .npz import is_npz, npz_has_validation_part, open_npz
from .splits import Source, check_selection_args, join, select
from .synthetic import synthetic

SPEC_FORMS = (
    "fashion-mnist[:DIR], synthetic[:K], a .npz file (x, y[, class_names, x_val, y_val]) "
    "or an image folder (one sub-folder of JPEG/PNG images per class)"
)


def load_dataset(
    spec: str,
    split: str,
    image_size: int,
    normalization: Normalization,
    per_class: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> ImageDataset:
    """Load split ``train``, ``val`` or ``all`` of a data set, resized to ``image_size`` squared.

    ``per_class`` keeps a seeded, stratified random subset of at most that many images per class
    (chosen before any image is decoded or resized). Raises DataError for bad input.
    """
    check_selection_args(split, per_class, val_fraction, "images")
    if image_size < 1:
        raise DataError(f"image size must be >= 1, got {image_size}")
    name, _, arg = spec.partition(":")
    if name == "synthetic":
        return synthetic(spec, arg, split, image_size, normalization, per_class, seed)
    source = open_source(spec, split)
    keep, details = select(source, split, per_class, seed, val_fraction, "images")
    return ImageDataset(
        pixels=source.read(keep, image_size),
        labels=source.labels[keep],
        class_names=source.class_names,
        normalization=normalization,
        source=f"{source.description} ({details})",
    )


def open_source(spec: str, split: str) -> Source:
    """The source of split ``train``, ``val`` or ``all`` of a data set given by a file-backed spec."""
    if split == "all":
        train = open_source(spec, "train")
        return train if train.holdout else join(train, open_source(spec, "val"))
    name, _, arg = spec.partition(":")
    if name == "fashion-mnist":
        return open_fashion_mnist(arg, split)
    path = Path(spec).expanduser()
    if is_npz(path):
        return open_npz(path, split)
    if path.is_dir():
        return open_image_folder(path, split)
    problem = "not a directory or .npz file" if path.exists() else "no such file or directory"
    raise DataError(f"{spec}: {problem}; expected {SPEC_FORMS}")


def has_validation_part(spec: str) -> bool:
    """True when the data set has its own validation part (Fashion-MNIST's t10k files, an .npz with
    ``x_val``/``y_val``, an image folder with ``train/`` and ``val/`` or ``test/``, synthetic data);
    False when its ``val`` split would be a holdout. Reads no image."""
    name, _, arg = spec.partition(":")
    if name in ("fashion-mnist", "synthetic"):
        return True
    path = Path(spec).expanduser()
    if is_npz(path):
        return npz_has_validation_part(path)
    if path.is_dir():
        return (path / "train").is_dir() and any((path / d).is_dir() for d in ("val", "test"))
    return open_source(spec, "train").holdout  # not a data set: raises the DataError that says why


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


def load_transient_bytes(spec: str) -> int:
    """Memory held only while a split of ``spec`` is decoded: an IDX file's chunk (streamed), an npz
    read whole."""
    name, _, _ = spec.partition(":")
    if name == "fashion-mnist":
        return IDX_CHUNK_BYTES
    path = Path(spec).expanduser()
    if is_npz(path):
        return path.stat().st_size
    return 0
