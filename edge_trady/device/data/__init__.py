"""Data sets for fine-tuning and evaluation (numpy, PIL and the standard library only: runs on
the device).

Every modality implements one interface (:class:`Dataset`, ``base``): labels, class names, a
description, ``batch(indices) -> (inputs, labels)``, the memory it holds (``nbytes``, for the
runner's memory guard) and a fingerprint (for checkpoints). One module per source kind:

- ``fashion_mnist``: ``fashion-mnist`` or ``fashion-mnist:DIR``: IDX files of the Debian package
  ``dataset-fashion-mnist`` (DIR defaults to ``$EDGE_TRADY_FASHION_MNIST`` or
  ``/usr/share/datasets/fashion-mnist/``); ``val`` is the t10k test set.
- ``synthetic``: ``synthetic`` or ``synthetic:K``: K (default 4) learnable classes of coloured
  stripes plus noise.
- ``npz``: ``PATH.npz``: arrays ``x``, ``y`` and optional ``class_names``, ``x_val``, ``y_val``.
- ``image_folder``: a directory with one sub-folder of JPEG/PNG images per class, optionally
  inside ``train/`` and ``val/`` (or ``test/``).

Images are held as resized ``uint8`` pixels (1 byte per value) and normalised to ``float32`` one
batch at a time (``images``). Without an explicit validation set, ``val`` is a seeded, stratified
holdout of ``val_fraction`` and ``train`` the rest; ``all`` is every example of every part (train +
val/test; for synthetic data, both generated splits) (``splits``). Data passed for evaluation or
validation is scored whole unless it has an explicit validation part (:func:`evaluation_split`).
``guard`` holds the caps on what one input may make a loader hold.
"""

from .base import Dataset, Inputs, epoch_order
from .fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_ENV, IDX_CHUNK_BYTES
from .guard import MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS_ENV, max_image_pixels
from .image_folder import IMAGE_SUFFIXES
from .images import IMAGENET, MINUS_ONE_TO_ONE, ImageDataset, Normalization
from .specs import (
    SPEC_FORMS,
    evaluation_split,
    has_validation_part,
    load_dataset,
    load_transient_bytes,
    validation_source,
)
from .splits import SPLITS
from .synthetic import SYNTHETIC_PER_CLASS

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV",
    "IDX_CHUNK_BYTES",
    "IMAGENET",
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_PIXELS_ENV",
    "MINUS_ONE_TO_ONE",
    "SPEC_FORMS",
    "SPLITS",
    "SYNTHETIC_PER_CLASS",
    "Dataset",
    "ImageDataset",
    "Inputs",
    "Normalization",
    "epoch_order",
    "evaluation_split",
    "has_validation_part",
    "load_dataset",
    "load_transient_bytes",
    "max_image_pixels",
    "validation_source",
]
