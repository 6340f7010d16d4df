"""Image arrays in an ``.npz`` file: ``x``, ``y`` and optional ``class_names``, ``x_val``, ``y_val``."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from ...errors import DataError
from .images import empty_images, fit_arrays
from .splits import Source


def is_npz(path: Path) -> bool:
    return path.suffix.lower() == ".npz" and path.is_file()


def npz_has_validation_part(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return "x_val" in npz.files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: cannot read .npz file ({e})") from e


def open_npz(path: Path, split: str) -> Source:
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
        return fit_arrays(images, size)

    explicit = "y_val" in arrays
    part = f"{x_key}, {y_key}" if explicit else ""
    return Source(y.astype(np.int64), class_names, read, not explicit, str(path), part, empty_images)


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
