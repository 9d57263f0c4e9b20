"""Train RebasinStrategy on 3 tiny experiences, alone or as one rank of a gloo ``torchrun``.

Usage: ``python distributed_rebasin_run.py VARIANT=OUT ...`` (single process) or
``torchrun --nproc_per_node 2 distributed_rebasin_run.py VARIANT=OUT ...``, VARIANT ``mlp`` or
``multitask``; the variants run in turn. Every process builds the same data and model; each
takes ``GLOBAL_BATCH / world_size`` samples per step. With
``shuffle=False`` the DistributedSampler gives rank ``r`` the samples ``r, r + W, r + 2W, …``,
so step ``k``'s batches of all ranks together are exactly the single process's batch ``k``
(every experience has a multiple of ``GLOBAL_BATCH`` samples, so no rank is padded), and
DDP's gradient mean over the ranks equals the gradient of the global batch's mean loss.
Rank 0 saves the user's final weights, those after experience 0, and the commit reports to OUT.
``multitask``: MTSimpleMLP (dropout off) on task-labelled experiences; its heads are grown
for experience 0 before DDP wraps it (DDP would not all-reduce a head replaced afterwards).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from avalanche.distributed import DistributedHelper
from avalanche.models import MTSimpleMLP, SimpleMLP
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin

from avalanche_rebasin.avalanche.strategy import RebasinStrategy

N_CLASSES, PER_CLASS, GLOBAL_BATCH = 6, 48, 16  # 96 samples (6 steps) per experience


def benchmark(task_labels: bool) -> Any:
    """3 experiences of 2 classes, 48 samples each, same on every rank."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(N_CLASSES, 1, 4, 4, generator=g) * 2

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(N_CLASSES).repeat_interleave(n)
        return centers[y] + torch.randn(len(y), 1, 4, 4, generator=g), y

    train = _make_taskaware_tensor_classification_dataset(*sample(PER_CLASS))
    test = _make_taskaware_tensor_classification_dataset(*sample(8))
    return nc_benchmark(train, test, n_experiences=3, task_labels=task_labels, seed=0)


class ModelRecorder(SupervisedPlugin, supports_distributed=True):
    """Records, per experience, what ``strategy.model`` is and the per-process batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.models: list[str] = []
        self.batches: list[list[int]] = []

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.batches.append([])

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if len(self.models) < len(self.batches):
            inner = type(DistributedHelper.unwrap_model(strategy.model)).__name__
            self.models.append(f"{type(strategy.model).__name__}({inner})")
        self.batches[-1].append(len(strategy.mb_y))


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the user's (unwrapped) weights."""
    return {k: v.detach().clone() for k, v in DistributedHelper.unwrap_model(model).state_dict().items()}


def run(out: str, multitask: bool) -> None:
    """Train 3 experiences; rank 0 writes the result to ``out``."""
    DistributedHelper.set_random_seeds(0)
    world = DistributedHelper.world_size
    assert GLOBAL_BATCH % world == 0
    bench = benchmark(multitask)
    torch.manual_seed(0)
    user_model: torch.nn.Module
    if multitask:
        user_model = MTSimpleMLP(input_size=16, hidden_size=32)
        user_model.features[2].p = 0.0  # its Dropout
        avalanche_model_adaptation(user_model, bench.train_stream[0])
    else:
        user_model = SimpleMLP(num_classes=N_CLASSES, input_size=16, hidden_size=32, drop_rate=0)
    model = DistributedHelper.wrap_model(user_model)
    recorder = ModelRecorder()
    strategy = RebasinStrategy(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        train_mb_size=GLOBAL_BATCH // world,
        train_epochs=2,
        rebasin_epochs=2,
        evaluator=EvaluationPlugin(loggers=[]),
        device="cpu",
        seed=0,
        plugins=[recorder],
    )
    after_first: dict[str, torch.Tensor] = {}
    for exp in bench.train_stream:
        assert len(exp.dataset) % GLOBAL_BATCH == 0
        strategy.train(exp, eval_streams=[], shuffle=False)
        if exp.current_experience == 0:
            after_first = state_of(user_model)
    assert DistributedHelper.unwrap_model(strategy.model) is user_model
    if DistributedHelper.is_main_process:
        result = {
            "world_size": world,
            "final": state_of(user_model),
            "after_first": after_first,
            "reports": [vars(r) for r in strategy.reports],
            "models": recorder.models,
            "batches": recorder.batches,
        }
        torch.save(result, out)
    DistributedHelper.barrier()


def main(jobs: list[str]) -> None:
    """Run each ``VARIANT=OUT`` of ``jobs`` in turn."""
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the single process warns that torchrun's variables are missing
        DistributedHelper.init_distributed(random_seed=0, backend="gloo", use_cuda=False)
    try:
        for job in jobs:
            variant, out = job.split("=", 1)
            assert variant in ("mlp", "multitask"), variant
            run(out, multitask=variant == "multitask")
    finally:
        if DistributedHelper.is_distributed:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
