"""Trials packed on a cluster's GPUs from the memory plan's figures: how many Ray Train workers
(ranks) a trial runs, what GPU share each reserves, how many trials run at once, and whether the
trial is FSDP-sharded.

The figures are the plan's (core/memory_plan.py, `MemoryPlan.fit`): GPUs per trial (1 when a
trial fits one GPU, N when only N shards fit, None when it fits nowhere) and trials per GPU.

- A trial that fits one GPU with one rank reserves 1/trials_per_gpu of a GPU: Ray packs that
  many trials on each GPU and the sweep runs GPUs x trials_per_gpu at once.
- A trial of several data-parallel ranks reserves one whole GPU per rank: Ray does not promise
  that two fractional bundles of one placement group land on different GPUs, and two NCCL ranks
  of one trial on one GPU fail (or deadlock), so ranks are never packed.
- A trial that needs N GPUs runs max(N, workers) ranks, one GPU each, sharded with FSDP2.

A sweep given --gpus-per-worker or --max-concurrent keeps what it was given; preflight.check_gpus
refuses the two requests that cannot work (a fraction per rank with several ranks, several GPUs
per rank: a rank drives one GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.errors import UserError

DEFAULT_GPU_MEMORY_GIB = 80.0  # cluster.yaml's GPU node type: 80 GB cards
GPU_SHARE_DIGITS = 4  # Ray accounts fractional resources to 1e-4


@dataclass(frozen=True)
class PlanFigures:
    """What the packing needs of a memory plan."""
    gpus_per_trial: int | None
    trials_per_gpu: int

    @classmethod
    def of(cls, fit: dict) -> PlanFigures:
        """From `MemoryPlan.fit` ({"fits", "gpus_per_trial", "trials_per_gpu"})."""
        return cls(gpus_per_trial=fit["gpus_per_trial"], trials_per_gpu=int(fit["trials_per_gpu"]))


@dataclass(frozen=True)
class Placement:
    workers: int  # ranks per trial
    gpus_per_worker: float
    max_concurrent: int
    shard: bool  # FSDP2 over the trial's ranks
    why: str  # one line for the sweep's banner


def pack(cluster_gpus: float, figures: PlanFigures, workers: int) -> Placement:
    """The placement of a sweep's trials on `cluster_gpus` GPUs (see the module docstring)."""
    gpus = int(math.floor(cluster_gpus + 1e-9))
    need = figures.gpus_per_trial
    if need is None:
        raise UserError("sweep: by the memory plan a trial fits no number of GPUs (activations alone "
                        "exceed one GPU); lower train.micro_batch_size or max_length, or turn on "
                        "train.gradient_checkpointing (`lora-diffusion plan` shows the figures)")
    if need > 1:
        ranks = max(need, workers)
        return Placement(ranks, 1.0, max(1, gpus // ranks), True,
                         f"sharded: {ranks} GPUs a trial (the plan needs {need})")
    if workers > 1:
        return Placement(workers, 1.0, max(1, gpus // workers), False,
                         f"{workers} data-parallel ranks a trial, one GPU each")
    per_gpu = max(1, figures.trials_per_gpu)
    share = math.floor(10**GPU_SHARE_DIGITS / per_gpu) / 10**GPU_SHARE_DIGITS
    return Placement(1, share, max(1, gpus * per_gpu), False,
                     f"{per_gpu} trial(s) per GPU by the memory plan")
