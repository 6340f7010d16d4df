"""Tests of edge_trady.device.data: loaders, subsets, splits, batches and error messages."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_trady.device.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_ENV,
    IMAGENET,
    MINUS_ONE_TO_ONE,
    ImageDataset,
    Normalization,
    epoch_order,
    evaluation_split,
    has_validation_part,
    load_dataset,
    validation_source,
)
from edge_trady.errors import DataError

HAS_FASHION_MNIST = Path(FASHION_MNIST_DIR).is_dir()


def make_folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (12, 9)) -> Path:
    """One sub-folder per class; image i of class c is filled with grey value 10 * c + i."""
    for c, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", size, (10 * c + i,) * 3).save(root / name / f"{i:02d}.png")
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def all_batch(ds: ImageDataset) -> tuple[np.ndarray, np.ndarray]:
    return ds.batch(np.arange(len(ds)))


def image_ids(ds: ImageDataset) -> set[tuple[int, int]]:
    """(label, grey value) of each image of a folder made by make_folder."""
    return {(int(label), int(p[0, 0, 0])) for label, p in zip(ds.labels, ds.pixels, strict=True)}


# Normalisation and batches


def test_normalization_round_trip_and_validation() -> None:
    assert Normalization.from_dict(json.loads(json.dumps(IMAGENET.to_dict()))) == IMAGENET
    with pytest.raises(ValueError):
        Normalization((0.5, 0.5, 0.5), (0.5, 0.0, 0.5))


def test_batch_normalises_to_minus_one_one_and_imagenet() -> None:
    pixels = np.zeros((2, 4, 4, 3), np.uint8)
    pixels[1] = 255
    pixels[0, 0, 0] = (128, 64, 0)
    ds = ImageDataset(pixels, np.array([0, 1]), ["a", "b"], MINUS_ONE_TO_ONE, "test")
    x, y = ds.batch(np.array([1, 0]))
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.tolist() == [1, 0]
    assert (x[0] == 1.0).all() and x[1, :, 1:, :].min() == -1.0
    np.testing.assert_allclose(x[1, :, 0, 0], [128 / 127.5 - 1, 64 / 127.5 - 1, -1], rtol=1e-6)
    ds.normalization = IMAGENET
    x, _ = ds.batch(np.array([0]))
    expected = (np.array([128, 64, 0]) / 255 - np.array(IMAGENET.mean)) / np.array(IMAGENET.std)
    np.testing.assert_allclose(x[0, :, 0, 0], expected, rtol=1e-5)


def test_batch_written_into_an_earlier_batch_equals_a_new_one() -> None:
    rng = np.random.default_rng(0)
    ds = ImageDataset(rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8), np.arange(6), ["c"], IMAGENET, "test")
    first, _ = ds.batch(np.array([0, 1, 2]))
    again, labels = ds.batch(np.array([5, 3, 4]), out=first)
    assert again is first and labels.tolist() == [5, 3, 4]
    assert np.array_equal(again, ds.batch(np.array([5, 3, 4]))[0])
    partial, _ = ds.batch(np.array([1]), out=first)  # another shape: a new array
    assert partial is not first and np.array_equal(partial, ds.batch(np.array([1]))[0])


def test_batches_cover_order_once_and_keep_last_partial() -> None:
    n = 10
    ds = ImageDataset(np.zeros((n, 2, 2, 3), np.uint8), np.arange(n), ["c"], IMAGENET, "test")
    order = epoch_order(n, seed=3, epoch=0)
    batches = list(ds.batches(4, order))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert np.concatenate([y for _, y in batches]).tolist() == order.tolist()
    assert sorted(order.tolist()) == list(range(n))


def test_epoch_order_deterministic_and_varies_by_epoch() -> None:
    a = epoch_order(50, seed=1, epoch=0)
    assert np.array_equal(a, epoch_order(50, seed=1, epoch=0))
    assert np.array_equal(a, np.random.default_rng([1, 0, 1]).permutation(50))
    assert not np.array_equal(a, epoch_order(50, seed=1, epoch=1))
    assert not np.array_equal(a, epoch_order(50, seed=2, epoch=0))
    assert epoch_order(5, seed=1, epoch=4, shuffle=False).tolist() == [0, 1, 2, 3, 4]


# Synthetic


def test_synthetic_shapes_determinism_and_splits() -> None:
    ds = load_dataset("synthetic:3", "train", 16, MINUS_ONE_TO_ONE, seed=5)
    assert ds.pixels.shape == (96, 16, 16, 3) and ds.pixels.dtype == np.uint8
    assert ds.labels.dtype == np.int64 and np.bincount(ds.labels).tolist() == [32, 32, 32]
    assert ds.num_classes == 3 and ds.image_size == 16 and len(ds) == 96
    x, _ = all_batch(ds)
    assert -1.0 <= x.min() < -0.5 and 0.5 < x.max() <= 1.0
    again = load_dataset("synthetic:3", "train", 16, MINUS_ONE_TO_ONE, seed=5)
    assert np.array_equal(ds.pixels, again.pixels)
    val = load_dataset("synthetic:3", "val", 16, MINUS_ONE_TO_ONE, seed=5)
    assert not np.array_equal(ds.pixels, val.pixels)
    assert len(load_dataset("synthetic", "train", 8, IMAGENET, per_class=2)) == 8


def test_synthetic_is_learnable() -> None:
    """A nearest-centroid classifier fit on train is accurate on val."""
    train = load_dataset("synthetic:6", "train", 16, IMAGENET, seed=1)
    val = load_dataset("synthetic:6", "val", 16, IMAGENET, seed=1)
    xt, xv = (all_batch(d)[0].reshape(len(d), -1) for d in (train, val))
    centroids = np.stack([xt[train.labels == c].mean(0) for c in range(6)])
    predicted = ((xv[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == val.labels).mean() > 0.9


# Image folders


def test_folder_holdout_is_stratified_disjoint_and_seeded(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", {"b": 10, "a": 5})
    train = load_dataset(str(root), "train", 8, IMAGENET, seed=0)
    val = load_dataset(str(root), "val", 8, IMAGENET, seed=0)
    assert train.class_names == ["a", "b"] and train.pixels.shape == (12, 8, 8, 3)
    assert np.bincount(val.labels).tolist() == [1, 2]
    assert image_ids(train).isdisjoint(image_ids(val))
    assert len(image_ids(train) | image_ids(val)) == 15
    assert image_ids(val) == image_ids(load_dataset(str(root), "val", 8, IMAGENET, seed=0))
    others = [image_ids(load_dataset(str(root), "val", 8, IMAGENET, seed=s)) for s in range(1, 6)]
    assert any(o != image_ids(val) for o in others)


def test_folder_explicit_splits_modes_and_extensions(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
    Image.new("L", (20, 10), 77).save(root / "train" / "cat" / "grey.PNG")
    Image.new("RGBA", (10, 10), (200, 100, 50, 128)).save(root / "train" / "dog" / "rgba.png")
    Image.new("P", (10, 10), 3).save(root / "test" / "dog" / "pal.png")
    Image.new("RGB", (30, 12), (0, 255, 0)).save(root / "test" / "cat" / "photo.JPG")
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    train = load_dataset(str(root), "train", 6, IMAGENET)
    assert train.class_names == ["cat", "dog"] and train.labels.tolist() == [0, 1]
    assert (train.pixels[0] == 77).all()  # grey repeated to 3 identical channels
    assert train.pixels[1, 0, 0].tolist() == [200, 100, 50]
    val = load_dataset(str(root), "val", 6, IMAGENET)
    assert val.labels.tolist() == [0, 1] and val.pixels.shape == (2, 6, 6, 3)
    assert abs(int(val.pixels[0, 3, 3, 1]) - 255) < 10 and val.pixels[0, 3, 3, 0] < 10
    assert train.source == f"{root} (train)" and val.source == f"{root} (val: test/)"


def test_per_class_subset_sizes_determinism_and_nesting(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", {"a": 12, "b": 3, "c": 9})
    first = load_dataset(str(root), "train", 4, IMAGENET, per_class=4, seed=7)
    assert np.bincount(first.labels).tolist() == [4, 2, 4]
    assert np.all(np.diff(first.labels) >= 0)  # classes keep their order
    again = load_dataset(str(root), "train", 4, IMAGENET, per_class=4, seed=7)
    assert np.array_equal(first.pixels, again.pixels)
    other_seeds = [load_dataset(str(root), "train", 4, IMAGENET, per_class=4, seed=s).pixels for s in range(8, 12)]
    assert any(not np.array_equal(first.pixels, o) for o in other_seeds)


def test_folder_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        load_dataset(str(tmp_path / "nowhere"), "train", 8, IMAGENET)
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match="bare: no class folders"):
        load_dataset(str(tmp_path / "bare"), "train", 8, IMAGENET)
    root = make_folder(tmp_path / "imgs", {"full": 2})
    (root / "hollow").mkdir()
    with pytest.raises(DataError, match="hollow: empty class folder"):
        load_dataset(str(root), "train", 8, IMAGENET)
    shutil.rmtree(root / "hollow")
    (root / "solo").mkdir()  # a class of one image: it is always in the train split
    (root / "solo" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg: cannot read image \(corrupt"):
        load_dataset(str(root), "train", 8, IMAGENET)
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(DataError, match="notes.txt: not a directory or .npz file; expected"):
        load_dataset(str(text), "train", 8, IMAGENET)


def test_bad_arguments_raise_data_error() -> None:
    with pytest.raises(DataError, match="split"):
        load_dataset("synthetic", "test", 8, IMAGENET)
    with pytest.raises(DataError, match="positive integer"):
        load_dataset("synthetic:zero", "train", 8, IMAGENET)
    with pytest.raises(DataError, match="per class"):
        load_dataset("synthetic", "train", 8, IMAGENET, per_class=0)


# .npz


def test_npz_layouts_float_scaling_and_val_arrays(tmp_path: Path) -> None:
    x = np.zeros((4, 3, 5, 5), np.float32)  # [N, C, H, W], float in [0, 1]
    x[:, 0] = 1.0
    x[:, 1] = 0.5
    path = tmp_path / "d.npz"
    grey_val = np.full((2, 5, 5), 40, np.uint8)
    np.savez(path, x=x, y=np.array([0, 1, 0, 1]), x_val=grey_val, y_val=np.array([1, 0]))
    train = load_dataset(str(path), "train", 5, MINUS_ONE_TO_ONE)
    assert len(train) == 4 and train.class_names == ["0", "1"]
    assert train.pixels[0, 2, 2].tolist() == [255, 128, 0]
    val = load_dataset(str(path), "val", 7, MINUS_ONE_TO_ONE)
    assert val.labels.tolist() == [1, 0] and val.pixels.shape == (2, 7, 7, 3)
    assert (val.pixels == 40).all()

    nhwc = np.random.default_rng(0).integers(0, 256, (10, 6, 6, 3), dtype=np.uint8)
    names = np.array(["zero", "one", "two"])
    np.savez(path, x=nhwc, y=np.arange(10) % 2, class_names=names)
    train = load_dataset(str(path), "train", 6, IMAGENET, seed=1)
    val = load_dataset(str(path), "val", 6, IMAGENET, seed=1)
    assert train.class_names == ["zero", "one", "two"] and len(train) + len(val) == 10
    assert np.bincount(val.labels).tolist() == [1, 1]
    rows = {p.tobytes() for p in np.concatenate([train.pixels, val.pixels])}
    assert rows == {p.tobytes() for p in nhwc}


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 4, 4), np.uint8)}, "missing array"),
        ({"x": np.zeros((2, 4), np.uint8), "y": np.zeros(2, int)}, "'x' has shape"),
        ({"x": np.zeros((2, 4, 4, 2), np.uint8), "y": np.zeros(2, int)}, "'x' has shape"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(3, int)}, r"len\(x\) = 2"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0.5, 1])}, "integer class labels"),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, -1])}, "negative label"),
        ({"x": np.zeros((2, 4, 4), np.int32), "y": np.zeros(2, int)}, "dtype int32"),
        ({"x": np.full((2, 4, 4), 2.0), "y": np.zeros(2, int)}, r"outside \[0, 1\]"),
        (
            {"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, 2]), "class_names": ["a", "b"]},
            r"label 2 in 'y' out of range \[0, 2\)",
        ),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(2), "x_val": np.zeros(1)}, "y_val"),
    ],
)
def test_npz_errors_name_the_file(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad_data.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(str(path), "train", 4, IMAGENET)
    assert str(path) in str(info.value)


def test_corrupt_npz_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=r"junk\.npz: cannot read \.npz file"):
        load_dataset(str(path), "train", 4, IMAGENET)


# Fashion-MNIST


def test_idx_files_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.arange(6 * 28 * 28, dtype=np.int64).reshape(6, 28, 28) % 256
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images)  # un-gzipped
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 9, 3, 3, 3]))
    val = load_dataset(f"fashion-mnist:{tmp_path}", "val", 28, IMAGENET)
    assert val.class_names == FASHION_MNIST_CLASSES and val.labels.tolist() == [9, 0, 9, 3, 3, 3]
    assert np.array_equal(val.pixels[..., 1], images) and np.array_equal(val.pixels[..., 2], images)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    small = load_dataset("fashion-mnist", "val", 14, IMAGENET, per_class=1)
    assert sorted(small.labels.tolist()) == [0, 3, 9] and small.pixels.shape == (3, 14, 14, 3)
    pairs = load_dataset("fashion-mnist", "val", 28, IMAGENET, per_class=2)
    picked = pairs.pixels[:, 0, 0, 0].astype(int) // 16  # image k starts with grey 16 k
    assert np.all(np.diff(picked) > 0)  # the subset keeps the file order
    assert pairs.labels.tolist() == [[9, 0, 9, 3, 3, 3][k] for k in picked]
    assert np.bincount(pairs.labels).tolist() == [1, 0, 0, 2, 0, 0, 0, 0, 0, 2]
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", "train", 28, IMAGENET)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:5])
    with pytest.raises(DataError, match="5 images but"):
        load_dataset("fashion-mnist", "val", 28, IMAGENET)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros((2, 3)))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: .*magic"):
        load_dataset("fashion-mnist", "val", 28, IMAGENET)


@pytest.mark.skipif(not HAS_FASHION_MNIST, reason="Debian package dataset-fashion-mnist absent")
def test_fashion_mnist_real_files_per_class() -> None:
    ds = load_dataset("fashion-mnist", "train", 32, MINUS_ONE_TO_ONE, per_class=5)
    assert len(ds) == 50 and ds.num_classes == 10 and ds.pixels.shape == (50, 32, 32, 3)
    assert np.bincount(ds.labels).tolist() == [5] * 10
    assert np.array_equal(ds.pixels[..., 0], ds.pixels[..., 2])
    x, _ = ds.batch(np.arange(50))
    assert x.min() == -1.0 and x.max() <= 1.0
    val = load_dataset("fashion-mnist", "val", 28, MINUS_ONE_TO_ONE, per_class=2)
    assert np.bincount(val.labels).tolist() == [2] * 10


@pytest.mark.skipif(not HAS_FASHION_MNIST, reason="Debian package dataset-fashion-mnist absent")
def test_truncated_idx_file_gives_data_error(tmp_path: Path) -> None:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(Path(FASHION_MNIST_DIR) / name, tmp_path / name)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: cannot read IDX"):
        load_dataset(f"fashion-mnist:{tmp_path}", "val", 28, IMAGENET, per_class=1)
    # a complete gzip stream of a truncated IDX payload
    raw = gzip.decompress((Path(FASHION_MNIST_DIR) / images.name).read_bytes())
    images.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: truncated or corrupt"):
        load_dataset(f"fashion-mnist:{tmp_path}", "val", 28, IMAGENET, per_class=1)


def test_missing_fashion_mnist_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="absent: no such directory.*dataset-fashion-mnist"):
        load_dataset(f"fashion-mnist:{tmp_path / 'absent'}", "train", 28, IMAGENET)


# Splits: "all" and what evaluation means


def test_all_of_a_file_without_validation_part_is_every_image(tmp_path: Path) -> None:
    path = tmp_path / "test.npz"
    x = np.random.default_rng(0).integers(0, 256, (25, 4, 4), dtype=np.uint8)
    np.savez(path, x=x, y=np.arange(25) % 3)
    assert not has_validation_part(str(path)) and evaluation_split(str(path)) == "all"
    every = load_dataset(str(path), "all", 4, IMAGENET)
    assert len(every) == 25 and np.array_equal(every.pixels[..., 0], x) and every.source == f"{path} (all)"
    train, val = (load_dataset(str(path), s, 4, IMAGENET) for s in ("train", "val"))
    assert (len(train), len(val)) == (19, 6) and "0.2 holdout" in val.source  # what "val" would have scored
    assert np.bincount(load_dataset(str(path), "all", 4, IMAGENET, per_class=2).labels).tolist() == [2, 2, 2]
    folder = make_folder(tmp_path / "flat", {"a": 4, "b": 3})
    assert evaluation_split(str(folder)) == "all" and len(load_dataset(str(folder), "all", 4, IMAGENET)) == 7


def test_all_of_a_data_set_with_validation_part_joins_both(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 3, 3), np.uint8), y=[0, 1, 0, 1], x_val=np.full((2, 3, 3), 9, np.uint8), y_val=[1, 0])
    assert has_validation_part(str(path)) and evaluation_split(str(path)) == "val"
    every = load_dataset(str(path), "all", 3, IMAGENET)
    assert every.labels.tolist() == [0, 1, 0, 1, 1, 0] and every.pixels[:, 0, 0, 0].tolist() == [0] * 4 + [9] * 2
    assert every.source == f"{path} (all: x, y + x_val, y_val)"
    assert load_dataset(str(path), "val", 3, IMAGENET).source == f"{path} (val: x_val, y_val)"
    picked = load_dataset(str(path), "all", 3, IMAGENET, per_class=1, seed=3)
    assert sorted(picked.labels.tolist()) == [0, 1]

    write_idx(tmp_path / "train-images-idx3-ubyte", np.full((3, 28, 28), 5))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2]))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.full((2, 28, 28), 7))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([2, 2]))
    spec = f"fashion-mnist:{tmp_path}"
    assert evaluation_split(spec) == "val"
    fashion = load_dataset(spec, "all", 28, IMAGENET)
    assert fashion.labels.tolist() == [0, 1, 2, 2, 2] and fashion.pixels[:, 0, 0, 0].tolist() == [5, 5, 5, 7, 7]
    assert fashion.source.endswith("(all: train files + t10k files)")

    synthetic = load_dataset("synthetic:2", "all", 8, IMAGENET, per_class=3)
    halves = [load_dataset("synthetic:2", s, 8, IMAGENET, per_class=3).pixels for s in ("train", "val")]
    assert np.array_equal(synthetic.pixels, np.concatenate(halves)) and "all: train + val" in synthetic.source


def test_validation_source_scores_separate_data_whole(tmp_path: Path) -> None:
    test_file = tmp_path / "test.npz"
    np.savez(test_file, x=np.zeros((4, 3, 3), np.uint8), y=[0, 1, 0, 1])
    assert validation_source(None, "synthetic:4") == ("synthetic:4", "val")
    assert validation_source(str(test_file), "synthetic:4") == (str(test_file), "all")
    assert validation_source(str(test_file), str(test_file)) == (str(test_file), "val")  # not the training images
    assert validation_source("fashion-mnist", "synthetic:10") == ("fashion-mnist", "val")
    with pytest.raises(DataError, match="no such file"):
        evaluation_split(str(tmp_path / "absent.npz"))
    with pytest.raises(DataError, match="split must be one of train, val, all"):
        load_dataset(str(test_file), "test", 3, IMAGENET)


def test_import_without_torch() -> None:
    code = "import sys; sys.modules['torch'] = None; import edge_trady.device.data; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
