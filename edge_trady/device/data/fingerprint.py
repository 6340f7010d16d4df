"""The fingerprint of a data set: what a checkpoint records of the data it was trained on, so a
resumed run refuses other data."""

from __future__ import annotations

import hashlib

import numpy as np


def fingerprint(examples: tuple[np.ndarray, ...], labels: np.ndarray, source: str, kind: str) -> str:
    """``source: N <kind>, blake2b <hash>``: a hash of the examples' arrays (dtype, shape and
    bytes of each; e.g. pixels, or token ids and their offsets) and of the labels."""
    digest = hashlib.blake2b(digest_size=12)
    for array in (*examples, labels):
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return f"{source}: {len(labels)} {kind}, blake2b {digest.hexdigest()}"
