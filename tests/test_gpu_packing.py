"""Trials packed on a cluster's GPUs from the memory plan's figures (engine/resources.py), checked
on CPU with Ray's fake GPU resources: small trials share GPUs as the plan allows, ranks of one
trial never share a GPU, a trial the plan shards asks for its GPUs, and every rank sees the GPU
ids Ray gave it."""

from __future__ import annotations

import json
import time
from argparse import Namespace

import pytest

from lora_diffusion.core.errors import UserError
from lora_diffusion.engine import preflight, tuner as tuner_lib
from lora_diffusion.engine.resources import PlanFigures, pack
from lora_diffusion.engine.trial import TrialPlan, make_trainer

SMALL = PlanFigures(gpus_per_trial=1, trials_per_gpu=4)  # a small trial: four fit one GPU


def test_small_single_rank_trials_share_gpus_as_the_plan_allows():
    placed = pack(2, SMALL, workers=1)
    assert (placed.workers, placed.gpus_per_worker, placed.max_concurrent, placed.shard) == (1, 0.25, 8, False)
    assert pack(2, PlanFigures(1, 3), workers=1).gpus_per_worker * 3 <= 1  # shares Ray can pack


def test_ranks_of_one_trial_never_share_a_gpu():
    placed = pack(4, SMALL, workers=2)
    assert (placed.workers, placed.gpus_per_worker, placed.max_concurrent, placed.shard) == (2, 1.0, 2, False)
    with pytest.raises(UserError, match="^--gpus-per-worker 0.5 with --workers 2: two ranks"):
        preflight.check_gpus(0.5, "auto", workers=2)
    with pytest.raises(UserError, match="^--gpus-per-worker 2: a worker"):
        preflight.check_gpus(2, "auto", workers=1)
    preflight.check_gpus(0.25, "auto", workers=1)  # one rank: a share is fine


def test_a_trial_the_plan_shards_gets_one_gpu_per_rank_and_fsdp():
    placed = pack(8, PlanFigures(gpus_per_trial=3, trials_per_gpu=0), workers=1)
    assert (placed.workers, placed.gpus_per_worker, placed.max_concurrent, placed.shard) == (3, 1.0, 2, True)
    assert pack(8, PlanFigures(3, 0), workers=4).workers == 4  # more ranks asked: data parallel over shards
    with pytest.raises(UserError, match="^sweep: by the memory plan a trial fits no number of GPUs"):
        pack(8, PlanFigures(None, 0), workers=1)


def _requested(plan: TrialPlan) -> tuple[int, dict, object]:
    trainer = make_trainer({}, plan, "request-check", time.time(), [])
    scaling = trainer.scaling_config
    return scaling.num_workers, dict(scaling.resources_per_worker), trainer.train_loop_config["shard"]


def _plan_of(placed, tmp_path) -> TrialPlan:
    return TrialPlan(fixed={}, workers=placed.workers, cpus_per_worker=1.0, gpus_per_worker=placed.gpus_per_worker,
                     train_storage=str(tmp_path), max_failures=0, shard=placed.shard)


def test_an_8b_full_fine_tuning_trial_asks_ray_for_the_gpus_the_plan_says(tmp_path):
    """The resource request only: the trial cannot run on CPU."""
    from lora_diffusion.core import config as config_lib, memory_plan

    config = config_lib.from_dict({}, {"method": "full", "max_length": 1024, "train.batch_size": 4,
                                       "train.gradient_checkpointing": True})
    p = memory_plan.plan(config, source="llada-8b", response_tokens=1024, gpu_memory_gib=80)
    need = p.fit["gpus_per_trial"]
    assert need >= 2
    placed = pack(8, PlanFigures.of(p.fit), workers=1)
    assert _requested(_plan_of(placed, tmp_path)) == (need, {"CPU": 1.0, "GPU": 1.0}, True)


def test_a_gpu_sweep_whose_trial_fits_no_gpu_is_refused_before_ray_starts(tiny_config, monkeypatch):
    """On a machine or cluster with GPUs the sweep plans its base configuration before ray.init:
    a trial whose activations alone exceed a GPU is one error naming the field to change."""
    import ray
    import torch

    from lora_diffusion.engine import sweep

    config = tiny_config()
    spec = Namespace(fixed={"backbone": config.backbone, "data_dir": config.data_dir, "max_length": 32,
                            "trajectory.injection_layers": [0], "train.batch_size": 64},
                     sweep=Namespace(workers=1))
    args = Namespace(gpus_per_worker=None, gpu_memory_gib=0.001)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match=r"field (train\.micro_batch_size|max_length|train\.gradient_checkpointing)"):
        sweep.planned(args, spec, "local")
    assert not ray.is_initialized()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU sweep here plans nothing
    assert sweep.planned(args, spec, "local") is None


def test_a_sharded_trial_asks_ray_for_one_gpu_per_rank(tmp_path):
    placed = pack(8, PlanFigures(gpus_per_trial=3, trials_per_gpu=0), workers=1)
    assert _requested(_plan_of(placed, tmp_path)) == (3, {"CPU": 1.0, "GPU": 1.0}, True)
    small = pack(2, SMALL, workers=1)
    assert _requested(_plan_of(small, tmp_path)) == (1, {"CPU": 1.0, "GPU": 0.25}, False)


# ----------------------------------------------------------------------------- Ray, fake GPUs

TRIALS = 8


def _gated_loop(loop_config: dict) -> None:
    """A Train worker that says which GPUs it was given and waits until every trial's worker is
    up at once (or a minute has passed): the gate counts how many were running together."""
    import os

    import ray
    import ray.train

    gate = ray.get_actor("packing-gate")
    ids = [str(g) for g in ray.get_gpu_ids()]
    ray.get(gate.arrive.remote(ids))
    deadline = time.time() + 60
    while ray.get(gate.count.remote()) < TRIALS and time.time() < deadline:
        time.sleep(0.5)
    ray.train.report({"gpu_ids_json": json.dumps(ids), "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                      "together": ray.get(gate.count.remote())})


def _packed_trial(params: dict, plan: TrialPlan) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    make_trainer({}, plan, f"packed-{params['i']}", time.time(), [TuneReportCallback()], loop=_gated_loop).fit()


@pytest.fixture
def ray_with_two_fake_gpus(monkeypatch):
    import os

    import ray

    # Ray's workers unpickle this module's functions: they inherit the path to it
    here = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow  # a local Ray, 8 trials each with its own Train run: about 4 minutes on 2 cores
def test_eight_small_trials_on_two_gpus_run_four_to_a_gpu_and_see_their_gpu_ids(ray_with_two_fake_gpus, tmp_path):
    import ray
    from ray import tune

    @ray.remote(num_cpus=0)
    class Gate:
        def __init__(self):
            self.seen = []

        def arrive(self, ids):
            self.seen.append(ids)

        def count(self):
            return len(self.seen)

    gate = Gate.options(name="packing-gate").remote()
    args = Namespace(gpus_per_worker=None, cpus_per_worker=None, max_concurrent=None)
    res = tuner_lib.resources(args, workers=1, max_concurrent=2, figures=SMALL)
    assert (res.max_concurrent, res.gpus_per_worker, res.workers) == (TRIALS, 0.25, 1)  # was 2 trials, 1 GPU each
    plan = TrialPlan(fixed={}, workers=res.workers, cpus_per_worker=res.cpus_per_worker,
                     gpus_per_worker=res.gpus_per_worker, train_storage=str(tmp_path / "train"), max_failures=0,
                     shard=res.shard, backend="gloo")  # fake GPUs: no NCCL on this machine
    trainable = tune.with_resources(tune.with_parameters(_packed_trial, plan=plan), {"CPU": tuner_lib.TRIAL_CPUS})
    results = tune.Tuner(trainable, param_space={"i": tune.grid_search(list(range(TRIALS)))},
                         tune_config=tune.TuneConfig(max_concurrent_trials=res.max_concurrent),
                         run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0)).fit()
    assert not results.errors, results.errors
    rows = [r.metrics for r in results]
    assert all(r["together"] == TRIALS for r in rows)  # all eight ran at once
    ids = [json.loads(r["gpu_ids_json"]) for r in rows]
    assert all(len(i) == 1 for i in ids)  # one GPU id each rank, the one CUDA_VISIBLE_DEVICES names
    assert all(r["cuda_visible"] == i[0] for r, i in zip(rows, ids, strict=True))
    per_gpu = {}
    for (gpu,) in ids:
        per_gpu[gpu] = per_gpu.get(gpu, 0) + 1
    assert sorted(per_gpu.values()) == [4, 4]  # four trials to a GPU, on both GPUs
    del gate
