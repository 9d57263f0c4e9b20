"""Benchmark streams Avalanche does not ship, built the way Avalanche builds its own."""

from __future__ import annotations

from pathlib import Path

from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils import DefaultTransformGroups, _make_taskaware_classification_dataset
from avalanche.benchmarks.utils.data import make_avalanche_dataset
from torchvision import transforms
from torchvision.datasets import FashionMNIST

__all__ = ["rotated_fashion_mnist"]

FASHION_MNIST_NORMALIZE = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))]
)


def rotated_fashion_mnist(rotations: list[float], root: Path, seed: int):
    """Avalanche's ``RotatedMNIST`` recipe on Fashion-MNIST: every experience holds all ten
    classes rotated by its own angle (a frozen ``RandomRotation((r, r))``), then
    Avalanche's Fashion-MNIST normalisation; domain-incremental, one head."""
    train = FashionMNIST(str(root), train=True, download=True)
    test = FashionMNIST(str(root), train=False, download=True)
    streams: tuple[list, list] = ([], [])
    for angle in rotations:
        rotation = transforms.RandomRotation(degrees=(angle, angle))
        for stream, data in zip(streams, (train, test)):
            stream.append(
                make_avalanche_dataset(
                    _make_taskaware_classification_dataset(data),
                    frozen_transform_groups=DefaultTransformGroups((rotation, None)),
                )
            )
    return nc_benchmark(
        streams[0],
        streams[1],
        n_experiences=len(rotations),
        task_labels=False,
        shuffle=False,
        seed=seed,
        class_ids_from_zero_in_each_exp=True,
        one_dataset_per_exp=True,
        train_transform=FASHION_MNIST_NORMALIZE,
        eval_transform=FASHION_MNIST_NORMALIZE,
    )
