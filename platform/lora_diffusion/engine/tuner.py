"""Ray and the Tune tuner of a sweep: the cluster to join, the resources a trial's workers reserve,
and the tuner: Tune's grid search for a grid file (BasicVariantGenerator, every trial to the end),
seeded Optuna TPE with ASHA for a search space, or the saved tuner of a sweep to resume. Every
one of them maximises the selection metric, or minimises it for the ELBO bound (`spec.mode`).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from . import search_space as space_lib
from .grid import SEED_FIELD
from .spec import GridSpec, SweepSpec

# Ray's local node start waits 30 s for its raylet (hard-coded in ray/_private/node.py) and then
# raises this; on a loaded machine that is a slow start, not a fault, and nothing of the sweep has
# started yet (engine/sweep.py), so init_ray starts the node again
RAY_START_TIMEOUT = "The current node timed out during startup"
LOCAL_START_ATTEMPTS = 3
TRIAL_CPUS = 0.01  # the trial's own actor only starts the TorchTrainer: its workers reserve the CPUs
HEAD_NODE = "node:__internal_head__"  # Ray's resource of the head node (1 there, absent elsewhere)
TRIAL_HEAD_SHARE = 0.001  # of HEAD_NODE per trial actor: as Ray pins its own state actors


def ray_address(arg: str | None) -> str:
    if arg:
        return arg
    if os.environ.get("RAY_ADDRESS"):
        return "auto"
    if (Path.home() / "ray_bootstrap_config.yaml").is_file():  # head node of a `ray up` cluster
        return "auto"
    return "local"


def init_ray(address: str, log_to_driver: bool = True) -> None:
    import ray

    if address == "local":
        # The dashboard serves the State API, which Ray Train's PlacementGroupCleaner needs to
        # free a worker group's placement group when Tune stops a trial (ASHA) by killing it:
        # without it the resources leak and later trials wait for their workers
        # (WorkerGroupStartupTimeoutError, retried). The cleaner finds the State API by
        # auto-detection, which fails in a worker of a `ray.init` cluster ("Found multiple
        # active Ray instances" beside another Ray; no address without one) and kills its
        # monitor thread; so this cluster's dashboard is named to every worker, which inherits
        # the environment of the raylet started here.
        for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
            port = free_port()
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            try:
                ray.init(address="local", include_dashboard=True, dashboard_port=port,
                         log_to_driver=log_to_driver, configure_logging=True, logging_level="WARNING")
                return
            except Exception as exc:  # Ray raises a bare Exception for it
                if RAY_START_TIMEOUT not in str(exc) or attempt == LOCAL_START_ATTEMPTS:
                    raise
            stop_half_started_ray()
            print(f"Ray's local node start timed out (attempt {attempt} of {LOCAL_START_ATTEMPTS}); "
                  "starting it again", file=sys.stderr, flush=True)
    else:
        ray.init(address=address, log_to_driver=log_to_driver)


def stop_half_started_ray() -> None:
    """After a failed local node start: Ray's state reset and the processes it had spawned (GCS,
    raylet, dashboard: children of this process whose command line runs Ray) killed, so the next
    attempt starts clean and nothing is left behind."""
    import psutil
    import ray

    ray.shutdown()
    children = [c for c in psutil.Process().children(recursive=True) if _runs_ray(c)]
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=10)


def _runs_ray(proc) -> bool:
    """A Ray process: its binaries (gcs_server, raylet), a script of the installed package
    (dashboard, log monitor, agents) or a worker (`ray::IDLE`); not merely a path with "ray" in it."""
    try:
        parts = proc.cmdline()
    except Exception:  # psutil.Error: gone already, or not ours to read
        return False
    return any(p.startswith("ray::") or "packages/ray/" in p or Path(p).name in ("gcs_server", "raylet")
               for p in parts)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trial_resources(max_concurrent: int) -> dict:
    """What a trial's own actor reserves: TRIAL_CPUS, on the head node when the head has CPUs
    for `max_concurrent` of them. Ray Train attaches the trial's Train controller to this actor's
    node, so a trial actor on a worker node dies with that node and its Tune trial fails (only
    --retry-failed, default 0, would run it again); on the head, which a sweep cannot lose
    anyway (the driver, Tune and MLflow live there), a lost worker node costs the trial only
    its Train workers, which Train restarts from the last checkpoint (--max-failures)."""
    import ray

    heads = [n for n in ray.nodes() if n.get("Alive") and HEAD_NODE in n.get("Resources", {})]
    if heads and heads[0]["Resources"].get("CPU", 0) >= TRIAL_CPUS * max_concurrent:
        return {"CPU": TRIAL_CPUS, HEAD_NODE: TRIAL_HEAD_SHARE}
    return {"CPU": TRIAL_CPUS}  # a head started with --num-cpus 0: trial actors go where CPUs are


@dataclass
class Resources:
    cpus_per_worker: float
    gpus_per_worker: float
    cluster_cpus: float
    cluster_gpus: float
    workers: int = 1  # ranks per trial
    max_concurrent: int = 2  # trials at once
    shard: bool | None = None  # FSDP2 over a trial's ranks (None: the recipe's default, method=full)
    why: str = ""  # how the GPUs were packed, for the banner


def resources(args, workers: int, max_concurrent: int, figures=None) -> Resources:
    """What each trial's workers reserve and how many trials run at once. On a cluster with GPUs
    and no --gpus-per-worker, the memory plan's `figures` (engine/resources.py) pack the trials:
    ranks per trial, GPU share per rank, concurrency (--max-concurrent, when given, wins). Else
    --gpus-per-worker as given, or 0 without GPUs, and `max_concurrent` trials. CPUs: the
    cluster's share per worker slot (ranks x concurrent trials), at most 1, or --cpus-per-worker."""
    import ray

    from .resources import pack

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 1)), float(total.get("GPU", 0))
    res = Resources(cpus_per_worker=0.0, gpus_per_worker=args.gpus_per_worker or 0.0, cluster_cpus=cpus,
                    cluster_gpus=gpus, workers=workers, max_concurrent=max_concurrent)
    if args.gpus_per_worker is None and gpus and figures is not None:
        placed = pack(gpus, figures, workers)
        res.gpus_per_worker, res.workers, res.shard, res.why = (placed.gpus_per_worker, placed.workers,
                                                                placed.shard, placed.why)
        res.max_concurrent = args.max_concurrent or placed.max_concurrent
    elif args.gpus_per_worker is None and gpus:  # no plan: one rank per GPU
        res.gpus_per_worker, res.why = 1.0, "one GPU per rank (no memory plan)"
    slots = res.workers * res.max_concurrent
    cpw = args.cpus_per_worker
    if cpw is None:
        cpw = max(0.01, min(1.0, math.floor(100 * (cpus - 0.1) / slots) / 100))
    res.cpus_per_worker = cpw
    return res


def grid_param_space(grid: GridSpec) -> dict:
    """Tune's param_space of a grid: every axis value (or listed cell, as `cell`) x every seed,
    each run one trial."""
    from ray import tune

    if grid.cells:
        space = {space_lib.CELL: tune.grid_search([dict(c) for c in grid.cells])}
    else:
        space = {axis: tune.grid_search(list(values)) for axis, values in grid.axes.items()}
    space[SEED_FIELD] = tune.grid_search(list(grid.seeds))
    return space


def make_tuner(spec: SweepSpec, trainable, callbacks: list, *, resume: bool, verbose: int):
    """The sweep's tuner: restored from its directory, or a new grid or Optuna tuner."""
    from ray import tune

    if resume:
        # the run config comes back from tuner.pkl; its callbacks are `DriverCallbacks` that
        # forward to the ones this driver registered (callbacks.py says why)
        return tune.Tuner.restore(spec.exp_dir, trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    run_config = tune.RunConfig(name=spec.name, storage_path=spec.storage, callbacks=callbacks,
                                verbose=verbose,
                                # a failed trial (its Train run out of worker restarts, its node
                                # lost) runs again; its Train run resumes from its last checkpoint
                                failure_config=tune.FailureConfig(max_failures=spec.sweep.max_trial_retries))
    if spec.kind == "grid":
        return _grid_tuner(spec, trainable, run_config)
    return _optuna_tuner(spec, trainable, run_config)


def _grid_tuner(spec: SweepSpec, trainable, run_config):
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    return tune.Tuner(
        trainable, param_space=grid_param_space(spec.grid),
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, num_samples=1,
            # FIFO (no scheduler): every run to the end; the generator limits concurrency
            search_alg=BasicVariantGenerator(max_concurrent=spec.sweep.max_concurrent)),
        run_config=run_config)


def _optuna_tuner(spec: SweepSpec, trainable, run_config):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    options = spec.sweep
    space = spec.parse_space()
    searcher = OptunaSearch(space=space.define_by_run(), metric=spec.metric, mode=spec.mode,
                            sampler=optuna.samplers.TPESampler(seed=options.seed))
    searcher = ConcurrencyLimiter(searcher, max_concurrent=options.max_concurrent)
    scheduler = ASHAScheduler(time_attr="step", max_t=spec.steps + 1, grace_period=options.grace_period,
                              reduction_factor=options.reduction_factor)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=searcher,
                                    scheduler=scheduler, num_samples=options.num_samples,
                                    max_concurrent_trials=options.max_concurrent),
        run_config=run_config)
