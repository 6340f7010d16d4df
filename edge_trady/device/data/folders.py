"""The layout of a folder data set, whatever its files hold: one sub-folder per class, optionally
inside ``train/`` and ``val/`` (or ``test/``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import DataError


@dataclass
class FolderSplit:
    """The files of one split of a class-folder data set and their labels."""

    files: list[Path]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]
    explicit: bool  # train/ and val/ (or test/) sub-folders: no holdout
    part: str  # "test/" when the val split comes from test/, else ""


def folder_split(root: Path, split: str, suffixes: tuple[str, ...], what: str) -> FolderSplit:
    """The files ending in ``suffixes`` (any case) of split ``train`` or ``val`` of ``root``;
    ``what`` names them in messages (e.g. "JPEG/PNG images")."""
    val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    explicit = (root / "train").is_dir() and val_dir is not None
    class_root = root / "train" if explicit else root
    class_names = [d.name for d in class_dirs(class_root, what)]
    split_root = val_dir if explicit and split == "val" else class_root
    files: list[Path] = []
    labels: list[int] = []
    for class_dir in class_dirs(split_root, what):
        if class_dir.name not in class_names:
            raise DataError(f"{class_dir}: class folder not in {class_root}")
        found = class_files(class_dir, suffixes)
        if not found:
            raise DataError(f"{class_dir}: empty class folder (no {what})")
        files += found
        labels += [class_names.index(class_dir.name)] * len(found)
    part = f"{split_root.name}/" if explicit and split_root.name != split else ""  # val from test/
    return FolderSplit(files, np.array(labels, np.int64), class_names, explicit, part)


def class_dirs(root: Path, what: str) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"{root}: no class folders (expected one sub-folder of {what} per class)")
    return dirs


def class_files(class_dir: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The regular files of a class folder ending in ``suffixes``, hidden ones left out, sorted."""
    return sorted(
        p for p in class_dir.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file()
    )
