"""The benchmark registry: each entry builds an Avalanche benchmark from the harness's options.

Adding a benchmark is one :class:`BenchmarkEntry` in :data:`BENCHMARKS`. Every entry builds
Avalanche's own class (``RotatedMNIST``, ``SplitFMNIST``, ...) or, where Avalanche has none
(Rotated Fashion-MNIST), builds the stream the way Avalanche builds its own. With
``validation`` every benchmark evaluates on held-out *training* images, never on its test set.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from avalanche.benchmarks import (
    benchmark_with_validation_stream,
    nc_benchmark,
    split_validation_class_balanced,
)
from avalanche.benchmarks.classic import PermutedMNIST, RotatedMNIST, SplitCIFAR100, SplitFMNIST, SplitMNIST
from avalanche.benchmarks.utils import DefaultTransformGroups, _make_taskaware_classification_dataset
from avalanche.benchmarks.utils.data import make_avalanche_dataset
from torchvision import transforms

from avalanche_rebasin_experiments.datasets import (
    DEBIAN_FASHION_MNIST,
    prepare_embedded_mnist,
    prepare_fashion_mnist,
)

__all__ = ["BENCHMARKS", "BenchmarkEntry", "Problem", "rotated_fashion_mnist"]

Problem = str | None  # what keeps a benchmark from loading, with the fix; None when it loads
FASHION_MNIST_NORMALIZE = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))]
)
CIFAR_VALIDATION_FRACTION = 0.1


@dataclass(frozen=True)
class BenchmarkEntry:
    """How to build one benchmark; ``build(args, seed)`` returns an Avalanche benchmark whose
    ``test_stream`` is what the harness evaluates (the validation stream under ``--validation``)."""

    name: str
    classes: int
    class_incremental: bool  # new classes in every experience (the replay budget is per class seen)
    default_experiences: int
    build: Callable[[argparse.Namespace, int], object]
    problem: Callable[[argparse.Namespace], Problem] = lambda args: None  # checked before anything runs
    divides: int | None = None  # --experiences must divide this many classes


def _rotations(n: int) -> list[float]:
    return [float(r) for r in np.linspace(0, 180, n)]


def mnist_root(args: argparse.Namespace) -> Path:
    """The embedded digits (or their validation split), or full MNIST with ``--full-mnist``."""
    if not args.full_mnist:
        name = "mnist-embedded-validation" if args.validation else "mnist-embedded"
        return prepare_embedded_mnist(Path(args.cache) / name, validation=args.validation)
    root = Path(args.data_root or Path(args.cache) / "mnist-full")
    if not args.validation:
        return root
    from torchvision.datasets import MNIST

    MNIST(str(root), train=True, download=True)  # where there is network; else the copy under root
    return _held_out_copy(root / "MNIST" / "raw", Path(args.cache) / "mnist-full-validation", "MNIST")


def _held_out_copy(raw: Path, root: Path, folder: str) -> Path:
    """``root`` holding a validation split (last 10 % per class) of the idx files in ``raw``."""
    from avalanche_rebasin_experiments.datasets import (
        IDX_NAMES,
        VALIDATION_FRACTION,
        held_out_split,
        read_idx,
        write_split,
    )

    if not all((root / folder / "raw" / n).exists() for n in IDX_NAMES):
        images, labels = read_idx(raw / IDX_NAMES[0]), read_idx(raw / IDX_NAMES[1])
        keep, held = held_out_split(labels, None, VALIDATION_FRACTION)
        write_split(root / folder / "raw", (images[keep], labels[keep]), (images[held], labels[held]))
    return root


def _first_missing(path: Path) -> Path | None:
    """The topmost folder of ``path`` that does not exist yet (what a failed download would leave)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            return missing
        missing = folder
    return missing


def _loads(dataset: type, root: Callable[[], Path], watch: Path, label: str, fix: str) -> Problem:
    """None if ``dataset`` (train and test) loads from ``root()``, downloading where there is
    network; else the reason and ``fix``, and nothing left behind under ``watch``."""
    created = _first_missing(watch)
    try:
        path = root()
        for train in (True, False):
            dataset(str(path), train=train, download=True)
    except (OSError, RuntimeError) as error:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        return f"{label} could not be read or downloaded ({error}); {fix}"
    return None


def mnist_problem(args: argparse.Namespace) -> Problem:
    """The embedded digits always load; full MNIST must be under the root or downloadable."""
    if not args.full_mnist:
        return None
    from torchvision.datasets import MNIST

    root = Path(args.data_root or Path(args.cache) / "mnist-full")
    fix = (
        "run where there is network, pass --data-root with torchvision's MNIST/raw files, "
        "or drop --full-mnist"
    )
    return _loads(MNIST, lambda: root, root, "--full-mnist: MNIST", fix)


def fashion_root(args: argparse.Namespace) -> Path:
    """``--data-root`` (torchvision's layout), else a cache copy of Debian's package (``make data``),
    else the folder torchvision downloads to where there is network; with ``--validation`` a
    held-out split of its training images."""
    if args.data_root:
        root = Path(args.data_root)
        if args.validation:
            return _held_out_copy(
                root / "FashionMNIST" / "raw", Path(args.cache) / "fashion-mnist-validation", "FashionMNIST"
            )
        return root
    name = "fashion-mnist-validation" if args.validation else "fashion-mnist"
    if DEBIAN_FASHION_MNIST.exists():
        return prepare_fashion_mnist(Path(args.cache) / name, validation=args.validation)
    root = Path(args.cache) / "fashion-mnist"
    if args.validation:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=True, download=True)
        return _held_out_copy(root / "FashionMNIST" / "raw", Path(args.cache) / name, "FashionMNIST")
    return root


def fashion_problem(args: argparse.Namespace) -> Problem:
    from torchvision.datasets import FashionMNIST

    fix = (
        "run `make data` (Debian's dataset-fashion-mnist) or pass --data-root with torchvision's "
        "FashionMNIST/raw files"
    )
    watch = Path(args.data_root or args.cache)
    return _loads(FashionMNIST, lambda: fashion_root(args), watch, "Fashion-MNIST", fix)


def cifar_root(args: argparse.Namespace) -> Path:
    return Path(args.data_root or Path(args.cache) / "cifar100")


def missing_cifar(root: Path) -> str:
    return (
        f"Split CIFAR-100 needs a local copy: put torchvision's 'cifar-100-python' folder under "
        f"{root} (e.g. on an online machine: torchvision.datasets.CIFAR100('{root}', download=True)) "
        "and pass --data-root."
    )


def cifar_problem(args: argparse.Namespace) -> Problem:
    """None if CIFAR-100 is usable (downloading it first where there is network), else the fix."""
    from torchvision.datasets import CIFAR100

    root = cifar_root(args)
    present, created = (root / "cifar-100-python").exists(), _first_missing(root)
    try:
        for train in (True, False):
            CIFAR100(str(root), train=train, download=not present)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
        return (
            f"the CIFAR-100 copy under {root} does not match the official archive ({error}); replace "
            "its 'cifar-100-python' folder with the official one, or delete it to download it again"
        )
    except OSError as error:  # no network (URLError is an OSError)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)  # leave nothing behind
        return f"{missing_cifar(root)} Downloading it failed: {error}"
    return None


def rotated_fashion_mnist(rotations: list[float], root: Path, seed: int):
    """Avalanche's ``RotatedMNIST`` recipe on Fashion-MNIST: every experience holds all ten
    classes rotated by its own angle (a frozen ``RandomRotation((r, r))``), then Avalanche's
    Fashion-MNIST normalisation; domain-incremental, one head."""
    from torchvision.datasets import FashionMNIST

    train = FashionMNIST(str(root), train=True, download=True)
    test = FashionMNIST(str(root), train=False, download=True)
    streams: tuple[list, list] = ([], [])
    for angle in rotations:
        rotation = transforms.RandomRotation(degrees=(angle, angle))
        for stream, data in zip(streams, (train, test)):
            groups = DefaultTransformGroups((rotation, None))
            stream.append(
                make_avalanche_dataset(
                    _make_taskaware_classification_dataset(data), frozen_transform_groups=groups
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


def split_cifar100(args: argparse.Namespace, seed: int):
    """Class-incremental, one head (as the authors' incremental-learning setting); under
    ``--validation`` each class's training images are split 90/10 (an experience's classes are its own,
    so the held-out images belong to no other experience) and the validation stream evaluated."""
    bench = SplitCIFAR100(
        args.experiences, return_task_id=False, seed=seed, fixed_class_order=list(range(100)),
        dataset_root=cifar_root(args),
    )  # fmt: skip
    if not args.validation:
        return bench
    with torch.random.fork_rng():  # the split draws from torch's global generator: a fixed one,
        torch.manual_seed(0)  # the same for every seed and strategy, and the caller's state untouched
        bench = benchmark_with_validation_stream(
            bench,
            split_strategy=lambda data: split_validation_class_balanced(CIFAR_VALIDATION_FRACTION, data),
        )
    bench.test_stream = bench.valid_stream
    return bench


def _split(cls: type, root: Callable[[argparse.Namespace], Path]) -> Callable:
    def build(args: argparse.Namespace, seed: int):
        order = list(range(10))
        return cls(
            args.experiences,
            return_task_id=False,
            seed=seed,
            fixed_class_order=order,
            dataset_root=root(args),
        )

    return build


BENCHMARKS: dict[str, BenchmarkEntry] = {
    e.name: e
    for e in (
        BenchmarkEntry(
            "rotated-mnist", 10, False, 20,
            lambda a, s: RotatedMNIST(
                a.experiences, seed=s, rotations_list=_rotations(a.experiences), dataset_root=mnist_root(a)
            ),
            problem=mnist_problem,
        ),
        BenchmarkEntry(
            "permuted-mnist", 10, False, 10,
            lambda a, s: PermutedMNIST(a.experiences, seed=s, dataset_root=mnist_root(a)),
            problem=mnist_problem,
        ),
        BenchmarkEntry("split-mnist", 10, True, 5, _split(SplitMNIST, mnist_root), mnist_problem, 10),
        BenchmarkEntry(
            "rotated-fashion-mnist", 10, False, 20,
            lambda a, s: rotated_fashion_mnist(_rotations(a.experiences), fashion_root(a), s),
            problem=fashion_problem,
        ),
        BenchmarkEntry(
            "split-fashion-mnist", 10, True, 5, _split(SplitFMNIST, fashion_root), fashion_problem, 10
        ),
        BenchmarkEntry("split-cifar100", 100, True, 20, split_cifar100, cifar_problem, 100),
    )
}  # fmt: skip
