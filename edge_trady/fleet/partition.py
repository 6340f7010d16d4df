"""Split a data set into disjoint per-node ``.npz`` files, to try a fleet on one machine or to
benchmark it: ``iid`` (every class spread evenly) or ``labels`` (each class split across nodes by
Dirichlet(``alpha``) shares: small alpha, few classes per node)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.atomic import replacing
from ..device.data import IMAGENET, load_dataset
from ..errors import DataError

SKEWS = ("iid", "labels")


@dataclass(frozen=True)
class Partition:
    path: Path
    images: int
    per_class: list[int]


def split_indices(labels: np.ndarray, nodes: int, skew: str, alpha: float, seed: int) -> list[np.ndarray]:
    """Disjoint sorted index sets, one per node, covering every image; each node gets >= 1 image."""
    if nodes < 1 or len(labels) < nodes:
        raise DataError(f"cannot split {len(labels)} images into {nodes} nodes")
    if skew not in SKEWS:
        raise DataError(f"unknown skew {skew!r}; choose from {', '.join(SKEWS)}")
    rng = np.random.default_rng([seed, 5])
    parts: list[list[np.ndarray]] = [[] for _ in range(nodes)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if skew == "iid":
            cuts = np.linspace(0, len(members), nodes + 1).round().astype(int)[1:-1]
        else:
            cuts = (np.cumsum(rng.dirichlet(np.full(nodes, alpha)))[:-1] * len(members)).round().astype(int)
        for node, chunk in enumerate(np.split(members, cuts)):
            parts[node].append(chunk)
    split = [np.sort(np.concatenate(p)) for p in parts]
    for node in range(nodes):  # a node left empty by the draw takes one image from the largest
        if len(split[node]) == 0:
            donor = int(np.argmax([len(s) for s in split]))
            split[node], split[donor] = split[donor][:1], split[donor][1:]
    return split


def write_partitions(
    spec: str,
    nodes: int,
    out: Path,
    image_size: int,
    skew: str = "iid",
    per_class: int | None = None,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[Partition]:
    """``out/node-<i>.npz`` (uint8 ``x`` at ``image_size``, ``y``, ``class_names``) from the train split."""
    data = load_dataset(spec, "train", image_size, IMAGENET, per_class, seed)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for node, indices in enumerate(split_indices(data.labels, nodes, skew, alpha, seed)):
        path = out / f"node-{node}.npz"
        with replacing(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, x=data.pixels[indices], y=data.labels[indices], class_names=np.array(data.class_names))
        counts = np.bincount(data.labels[indices], minlength=data.num_classes).tolist()
        written.append(Partition(path, len(indices), counts))
    return written
