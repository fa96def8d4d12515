"""The sweep engine: Ray Tune trials that each run a Ray Train `TorchTrainer`, Optuna + ASHA, MLflow.

    python jobs/rank_schedule_sweep.py                      # the real sweep (MiniLM, SST-2, ~20 min on 2 cores)
    python jobs/rank_schedule_sweep.py --smoke              # tiny random BERT built on the fly, ~1 min
    python jobs/rank_schedule_sweep.py --resume             # continue an interrupted sweep of that name
    ray submit cluster.yaml jobs/rank_schedule_sweep.py     # on a cluster (joins it: address "auto")

Shape (Ray 2.60, Train V2):
- a trial is a Tune function trainable that builds and fits a TorchTrainer with N workers
  (`ray_worker.train_loop`); `TuneReportCallback` forwards each evaluation's report to Tune;
  the Train run is named by the trial id under `<sweep>/train/`, so a restored trial's Train run
  finds its own latest checkpoint; `FailureConfig` restarts failed workers from it.
- OptunaSearch (seeded TPE) samples the search space define-by-run (conditional parameters);
  ASHA stops weak trials on dev/accuracy at rungs of the recipe's step counter.
- `tracking.MlflowSweepCallback` logs one parent run per sweep and one child run per trial,
  re-attaching to them on resume.
- A grid file (search_spaces/grid_*.yaml, see grid.py) instead of a search space runs every
  cell x seed once: Tune's grid search (BasicVariantGenerator), no early stopping; at the end
  the ablation report (table, parquet, heatmaps, Pareto plot) is written on the parent run.
- Everything the user can get wrong (space file, --set keys, existing sweep) raises a
  `UserError` before Ray starts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

from ..core import config as config_lib
from . import search_space as space_lib
from ..core import tasks
from ..core.errors import UserError
from .storage import SweepStorage

METRIC, MODE = "dev/accuracy", "max"
SPEC_FILE = "sweep.json"
SEED_FIELD = "train.seed"
TINY_BACKBONE = "tiny-random"  # --smoke's backbone (backbone.py builds it locally on first use)  # a grid's seeds: one trial per cell x seed

# --smoke: the tiny random backbone (built in the sweep directory) and a few steps per trial
SMOKE_OVERRIDES = {
    "max_length": 32, "max_train_examples": 64, "max_eval_examples": 16, "train_accuracy_examples": 16,
    "train.steps": 6, "train.batch_size": 8, "train.eval_every": 2, "train.warmup_steps": 1,
    "trajectory.injection_layers": [0], "diffusion.eval_t_points": 2, "diffusion.sampler_steps": 2,
}
SMOKE_SWEEP = {"num_samples": 4, "max_concurrent": 2, "workers": 1, "grace_period": 2, "reduction_factor": 2}
DEFAULT_SWEEP = {"num_samples": 8, "max_concurrent": 2, "workers": 1, "seed": 0, "grace_period": 50,
                 "reduction_factor": 3}


def repo_root() -> Path:
    """The checkout the package is installed from (editable install), else the current directory."""
    here = Path(__file__).resolve().parents[3]
    if (here / "pyproject.toml").is_file() and (here / "platform" / "lora_diffusion").is_dir():
        return here
    return Path.cwd()


# ----------------------------------------------------------------------------- options


def build_parser(default_space: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"Ray Tune + Optuna + ASHA sweep (default space: {default_space})")
    p.add_argument("--space", "--grid", dest="space", default=default_space,
                   help="search space or ablation grid: a YAML file or a name in search_spaces/ "
                        "(default: %(default)s)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random backbone built on the fly and a few steps per trial (about a minute)")
    p.add_argument("--num-samples", type=int, help="trials (default: the space's sweep.num_samples)")
    p.add_argument("--storage-path", help="where sweeps live: a directory or an object-store URI such as "
                   "s3://bucket/sweeps (default: $LORA_DIFFUSION_STORAGE, else <repo>/runs/sweeps)")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/runs/mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: lora-diffusion-sweeps)")
    p.add_argument("--resume", action="store_true", help="continue the sweep of this name where it stopped")
    p.add_argument("--name", help="sweep name (default: the space's name, plus -smoke with --smoke)")
    p.add_argument("--workers", type=int, help="Ray Train workers per trial")
    p.add_argument("--max-concurrent", type=int, help="trials running at once")
    p.add_argument("--seed", type=int, help="Optuna sampler seed (trials' train.seed comes from --set)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="base config override for every trial, e.g. train.steps=300")
    p.add_argument("--address", help="Ray address: 'auto' joins the running cluster, 'local' starts a "
                   "private one (default: $RAY_ADDRESS, else auto on a `ray up` head node, else local)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs each Train worker reserves "
                   "(default: the cluster's CPUs shared among workers x concurrent trials, at most 1)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs each worker reserves (default: 1 if the "
                   "cluster has GPUs, else 0)")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts per trial (default 2)")
    p.add_argument("--verbose", type=int, default=1, help="Tune's verbosity (0 quiet, 1 status tables)")
    return p


def _positive(name: str, value):
    if value is not None and value < 1:
        raise UserError(f"--{name}: must be >= 1, got {value}")
    return value


# ----------------------------------------------------------------------------- the trial


def run_trial(params: dict, spec: dict) -> None:
    """Tune function trainable: resolve the trial's config and fit a TorchTrainer on it."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from .worker import train_loop

    trial_id = tune.get_context().get_trial_id()
    config = config_lib.from_dict({}, {**spec["fixed"], **space_lib.overrides(params)})
    res = spec["resources"]
    per_worker = {"CPU": res["cpus_per_worker"]}
    if res["gpus_per_worker"]:
        per_worker["GPU"] = res["gpus_per_worker"]
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.to_dict(), "test_kill_worker": spec.get("test_kill_worker"),
                           "threads": max(1, int(res["cpus_per_worker"]))},
        torch_config=TorchConfig(backend="nccl" if res["gpus_per_worker"] else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec["workers"], use_gpu=bool(res["gpus_per_worker"]),
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            name=trial_id,  # deterministic: a restored trial finds its own Train run and checkpoint
            storage_path=spec["train_storage"],
            failure_config=FailureConfig(max_failures=spec["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


class TrialResolver:
    """trial config (sampled params) -> (flat resolved config for MLflow params, tags)."""

    def __init__(self, fixed: dict, code_version: str):
        self.fixed, self.code_version = fixed, code_version

    def __call__(self, params: dict):
        params = space_lib.flatten(params)
        config = config_lib.from_dict({}, {**self.fixed, **space_lib.overrides(params)})
        flat = config.flat()
        flat.update({f"sampled.{k}": v for k, v in params.items() if k != SEED_FIELD})
        tags = {"method": config.method, "seed": config.train.seed, "code_version": self.code_version,
                "task": config.task}
        return flat, tags


def _short(params: dict) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return " ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in space_lib.flatten(params).items())


def progress_callback_class():
    from ray.tune import Callback

    class ProgressLines(Callback):
        """One readable line per trial report, and one when a trial ends."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._step_line(trial, result)
            if result.get("result_json"):
                r = json.loads(result["result_json"])
                acc = r.get("accounting", {})
                print(f"[trial {trial.trial_id}] final  step {r.get('steps')}  "
                      f"dev/accuracy {r.get('dev/accuracy', float('nan')):.4f}  "
                      f"dev/accuracy_sampler {r.get('dev/accuracy_sampler', float('nan')):.4f}  "
                      f"train/accuracy {r.get('train/accuracy', float('nan')):.4f}  "
                      f"params {acc.get('trainable_params')}", flush=True)

        def _step_line(self, trial, result):
            print(f"[trial {trial.trial_id}] step {int(result.get('step', 0)):5d}  "
                  f"loss {result.get('train/loss', float('nan')):.4f}  "
                  f"dev/accuracy {result.get(METRIC, float('nan')):.4f}"
                  + (f"  (resumed from step {result['resumed_from_step']})" if result.get("resumed_from_step") else "")
                  + f"  | {_short(trial.config)}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            print(f"[trial {trial.trial_id}] done at step {trial.last_result.get('step')}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[trial {trial.trial_id}] FAILED (see {trial.local_path})", flush=True)

    return ProgressLines


# ----------------------------------------------------------------------------- ray


def _ray_address(arg: str | None) -> str:
    if arg:
        return arg
    if os.environ.get("RAY_ADDRESS"):
        return "auto"
    if (Path.home() / "ray_bootstrap_config.yaml").is_file():  # head node of a `ray up` cluster
        return "auto"
    return "local"


def _init_ray(address: str, log_to_driver: bool = True) -> None:
    import ray

    if address == "local":
        # The dashboard serves the State API, which Ray Train's PlacementGroupCleaner needs to
        # free a worker group's placement group when Tune stops a trial (ASHA) by killing it:
        # without it the resources leak and later trials wait forever for their workers.
        ray.init(address="local", include_dashboard=True, log_to_driver=log_to_driver,
                 configure_logging=True, logging_level="WARNING")
    else:
        ray.init(address=address, log_to_driver=log_to_driver)


def _resources(args, spec_sweep: dict) -> dict:
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 1)), float(total.get("GPU", 0))
    slots = spec_sweep["workers"] * spec_sweep["max_concurrent"]
    cpw = args.cpus_per_worker
    if cpw is None:
        cpw = max(0.01, min(1.0, math.floor(100 * (cpus - 0.1) / slots) / 100))
    gpw = args.gpus_per_worker
    if gpw is None:
        gpw = 1.0 if gpus >= slots else (math.floor(100 * gpus / slots) / 100 if gpus else 0.0)
    return {"cpus_per_worker": cpw, "gpus_per_worker": gpw, "trial_cpus": 0.01,
            "cluster_cpus": cpus, "cluster_gpus": gpus}


# ----------------------------------------------------------------------------- main


def prepare(args, default_space: str) -> dict:
    """Everything checked before Ray starts: the spec of a new sweep, or the saved one to resume."""
    run_dir = repo_root() / "runs"
    storage = SweepStorage(storage_location(args.storage_path))
    for name in ("num_samples", "workers", "max_concurrent"):
        _positive(name.replace("_", "-"), getattr(args, name))

    if args.resume:
        name = args.name or (Path(space_lib.resolve_path(args.space, repo_root())).stem
                             + ("-smoke" if args.smoke else ""))
        if not storage.exists(f"{name}/{SPEC_FILE}") or not storage.exists(f"{name}/tuner.pkl"):
            raise UserError(f"--resume: no sweep named {name!r} in {storage.join()} (expected "
                            f"{storage.join(name, SPEC_FILE)} and {storage.join(name, 'tuner.pkl')}); "
                            "start it without --resume")
        spec = json.loads(storage.read_text(f"{name}/{SPEC_FILE}"))
        # the space is validated again (the code may have changed since)
        if spec.get("kind") == "grid":
            _parse_grid(spec["space_yaml"], spec["space_path"], spec["base_overrides"])
        else:
            space_lib.parse(spec["space_yaml"], spec["space_path"], spec["base_overrides"])
        if args.set or args.num_samples or args.workers:
            print("note: --resume continues the saved sweep; --set, --num-samples and --workers are ignored",
                  file=sys.stderr)
        spec["tracking_uri"] = args.tracking_uri or spec["tracking_uri"]
        return spec

    import yaml

    path = space_lib.resolve_path(args.space, repo_root())
    raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    base = dict(SMOKE_OVERRIDES) if args.smoke else {}
    data_env = os.environ.get("LORA_DIFFUSION_DATA_DIR")
    if data_env:
        base["data_dir"] = str(Path(data_env).resolve())
    base.update(config_lib.parse_sets(args.set))
    name = args.name or path.stem + ("-smoke" if args.smoke else "")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise UserError(f"--name: {name!r} must be letters, digits, '_', '.', '-' (it names a directory "
                        "and an MLflow tag)")
    if args.smoke and "backbone" not in config_lib.parse_sets(args.set):
        base["backbone"] = TINY_BACKBONE  # built on each node on first use: no shared path needed
    if storage.is_nonempty_dir(name):
        raise UserError(f"sweep {name!r} already exists in {storage.join(name)}: pass --resume to "
                        f"continue it, --name to start another, or delete it")
    kind = "grid" if isinstance(raw, dict) and ("grid" in raw or "cells" in raw) else "optuna"
    if kind == "grid":
        if args.smoke:
            raw = smoke_grid(raw)
        # validates file, keys, every cell x seed; UserError names file and key
        grid = _parse_grid(raw, str(path), base, sets=config_lib.parse_sets(args.set))
        fixed, base = grid.fixed, {k: v for k, v in base.items() if k not in grid.axes}
        sweep = {**DEFAULT_SWEEP, **grid.sweep, **(SMOKE_SWEEP if args.smoke else {})}
        if args.num_samples is not None:
            raise UserError("--num-samples: a grid runs every cell x seed once; edit the grid file's "
                            "axes or seeds instead")
        sweep["num_samples"] = len(grid.runs())
        grid_spec = {"axes": grid.axes, "seeds": grid.seeds, "reference": grid.reference,
                     "cells": grid.explicit_cells}
    else:
        space = space_lib.load(path, base)  # validates file, keys, values: UserError names file and key
        fixed, grid_spec = space.fixed, None
        sweep = {**DEFAULT_SWEEP, **space.sweep, **(SMOKE_SWEEP if args.smoke else {})}
    for key in ("num_samples", "workers", "max_concurrent", "seed"):
        if getattr(args, key) is not None:
            sweep[key] = getattr(args, key)
    fixed_cfg = config_lib.from_dict({}, fixed)
    cell_tasks = {c["task"] for c in (grid_spec or {}).get("cells") or [] if "task" in c}
    for task in {fixed_cfg.task} | cell_tasks:  # before Ray: not one failure per trial
        tasks.check_local_data(task, fixed_cfg.data_dir, fixed_cfg.allow_hub)
    steps, every = fixed_cfg.train.steps, fixed_cfg.train.eval_every
    if args.smoke:  # ASHA's first rung halfway, whatever --set made of the steps
        sweep["grace_period"] = max(every, steps // 2)
    sweep["grace_period"] = min(sweep["grace_period"], steps)
    tracking_uri = args.tracking_uri or _default_uri(run_dir)
    return {
        "name": name, "storage": storage.join(), "exp_dir": storage.join(name), "space_path": str(path),
        "space_yaml": raw, "base_overrides": base, "fixed": fixed, "sweep": sweep, "kind": kind,
        "grid": grid_spec,
        "smoke": bool(args.smoke), "tracking_uri": tracking_uri,
        "experiment": args.experiment or "lora-diffusion-sweeps", "max_failures": args.max_failures,
        "steps": steps, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "sweep_id": f"{name}-{uuid.uuid4().hex[:8]}",  # MLflow runs are found by this, not the name
    }


def _parse_grid(raw, source: str, base: dict, sets: dict | None = None):
    """A grid file's content, validated with the sweep's overrides. --smoke's own overrides
    give way to the grid's axes; a --set of an axis is an error."""
    from .grid import parse_grid

    axes = {}
    if isinstance(raw, dict):
        axes = raw.get("grid") if isinstance(raw.get("grid"), dict) else \
            {k: None for k in (raw.get("axes") or []) if isinstance(k, str)}
    sets = sets or {}
    base = {k: v for k, v in base.items() if k not in axes or k in sets}
    return parse_grid(raw, source, base_overrides=base)


def smoke_grid(raw: dict) -> dict:
    """--smoke on a grid: two values per axis (the reference value first) and two seeds."""
    raw = dict(raw)
    axes, ref = raw.get("grid"), raw.get("reference") or {}
    if isinstance(axes, dict) and isinstance(ref, dict):
        raw["grid"] = {k: ([ref[k]] + [v for v in vals if v != ref[k]] if k in ref else list(vals))[:2]
                       if isinstance(vals, list) else vals for k, vals in axes.items()}
    if isinstance(raw.get("seeds"), list):
        raw["seeds"] = raw["seeds"][:2]
    return raw


def grid_param_space(grid: dict) -> dict:
    """Tune's param_space of a grid: every axis value (or listed cell, as `cell`) x every seed,
    each run one trial."""
    from ray import tune

    if grid.get("cells"):
        space = {space_lib.CELL: tune.grid_search([dict(c) for c in grid["cells"]])}
    else:
        space = {axis: tune.grid_search(list(values)) for axis, values in grid["axes"].items()}
    space[SEED_FIELD] = tune.grid_search(list(grid["seeds"]))
    return space


def storage_location(arg: str | None) -> str:
    """--storage-path, else $LORA_DIFFUSION_STORAGE, else <repo>/runs/sweeps."""
    return arg or os.environ.get("LORA_DIFFUSION_STORAGE") or str(repo_root() / "runs" / "sweeps")


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the sqlite store in <repo>/runs."""
    return _default_uri(repo_root() / "runs")


def _default_uri(run_dir: Path) -> str:
    from .tracking import default_tracking_uri

    return default_tracking_uri(run_dir)


def run(args, default_space: str, report: Callable[[dict], None] | None = None) -> int:
    """Run (or resume) the sweep; `report(spec)` is called when every trial has ended (the
    analysis layer passes the ablation report: the engine does not import analysis)."""
    spec = prepare(args, default_space)  # every user error surfaces here, before ray.init
    from .tracking import prepare_uri

    prepare_uri(spec["tracking_uri"])
    storage, exp_dir = SweepStorage(spec["storage"]), spec["exp_dir"]
    if not args.resume:
        storage.check_writable()
        storage.write_text(f"{spec['name']}/{SPEC_FILE}", json.dumps(spec, indent=2, default=str))

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from . import tracking

    sweep = spec["sweep"]
    # Tune snapshots the experiment every >= 10 s by default: a driver killed in between would
    # re-run trials that had already finished. The state of a sweep is small; save it often.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    address = _ray_address(args.address)
    t0 = time.time()
    _init_ray(address)
    try:
        spec["resources"] = _resources(args, sweep)
        spec["workers"] = sweep["workers"]
        spec["train_storage"] = storage.join(spec["name"], "train")
        spec["test_kill_worker"] = os.environ.get("LORA_DIFFUSION_TEST_KILL_WORKER")
        res = spec["resources"]
        print(f"sweep {spec['name']}: {sweep['num_samples']} trials x {sweep['workers']} worker(s), "
              f"{sweep['max_concurrent']} at a time, {spec['steps']} steps each; space {spec['space_path']}; "
              f"ray {address} ({res['cluster_cpus']:g} CPU, {res['cluster_gpus']:g} GPU; "
              f"{res['cpus_per_worker']:g} CPU / {res['gpus_per_worker']:g} GPU per worker); "
              f"storage {exp_dir}; mlflow {spec['tracking_uri']}", flush=True)

        version = tracking.code_version(repo_root())
        tracker = tracking.SweepTracker(spec["tracking_uri"], spec["name"], spec["experiment"],
                                        sweep_id=spec.get("sweep_id"), tags={"code_version": version, "space": Path(spec["space_path"]).stem})
        mlflow_cb = tracking.MlflowSweepCallback(tracker, TrialResolver(spec["fixed"], version))
        ends = trial_ends_class()()
        callbacks = [mlflow_cb, progress_callback_class()(), ends]
        trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec),
                                        {"CPU": res["trial_cpus"]})

        if args.resume:
            tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
            # the run config (and its callbacks) comes back from tuner.pkl: use this session's
            # callbacks, which carry this invocation's tracking URI
            tuner._local_tuner.get_run_config().callbacks = callbacks
        elif spec.get("kind") == "grid":
            from ray.tune.search import BasicVariantGenerator

            tuner = tune.Tuner(
                trainable, param_space=grid_param_space(spec["grid"]),
                tune_config=tune.TuneConfig(
                    metric=METRIC, mode=MODE, num_samples=1,
                    # FIFO (no scheduler): every run to the end; the generator limits concurrency
                    search_alg=BasicVariantGenerator(max_concurrent=sweep["max_concurrent"])),
                run_config=tune.RunConfig(name=spec["name"], storage_path=spec["storage"],
                                          callbacks=callbacks, verbose=args.verbose,
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        else:
            space = space_lib.parse(spec["space_yaml"], spec["space_path"], spec["base_overrides"])
            import optuna

            searcher = OptunaSearch(space=space.define_by_run(), metric=METRIC, mode=MODE,
                                    sampler=optuna.samplers.TPESampler(seed=sweep["seed"]))
            searcher = ConcurrencyLimiter(searcher, max_concurrent=sweep["max_concurrent"])
            scheduler = ASHAScheduler(time_attr="step", max_t=spec["steps"] + 1,
                                      grace_period=sweep["grace_period"],
                                      reduction_factor=sweep["reduction_factor"])
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher,
                                            scheduler=scheduler, num_samples=sweep["num_samples"],
                                            max_concurrent_trials=sweep["max_concurrent"]),
                run_config=tune.RunConfig(name=spec["name"], storage_path=spec["storage"],
                                          callbacks=callbacks, verbose=args.verbose,
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        tracker.parent_run(params={"space": Path(spec["space_path"]).stem, "smoke": spec["smoke"],
                                   **{f"sweep.{k}": v for k, v in sweep.items()},
                                   **{f"fixed.{k}": v for k, v in spec["fixed"].items()}})
        if spec.get("kind") == "grid":  # so that `lora-diffusion report --sweep NAME` rebuilds the same table
            tracker.client.set_tag(tracker.parent_run(), "ablation.axes", ",".join(spec["grid"]["axes"]))
            tracker.client.set_tag(tracker.parent_run(), "ablation.reference",
                                   json.dumps(spec["grid"]["reference"]))
        results = tuner.fit()
        rc = _summarise(results, spec, mlflow_cb, ends, time.time() - t0)
        if report is not None and not _interrupted(results, spec, ends):  # failed cells included
            report(spec)
        return rc
    finally:
        ray.shutdown()


def trial_ends_class():
    from ray.tune import Callback

    class TrialEnds(Callback):
        """Counts the trials that ended: ran out or were stopped by the scheduler (ASHA), in this
        driver or before a resume. On Ctrl-C Tune stops the running trials and marks them
        TERMINATED too, but without `on_trial_complete`: status alone would let a sweep interrupted
        while its last trials ran pass for a finished one."""

        def __init__(self):
            self.started, self.ended, self.trials = set(), set(), []

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started.add(trial.trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.ended.add(trial.trial_id)

        def on_experiment_end(self, trials, **info):
            self.trials = list(trials)

        def finished(self) -> int:
            return sum(1 for t in self.trials if t.status == "TERMINATED"
                       and (t.trial_id in self.ended or t.trial_id not in self.started))

    return TrialEnds


def _interrupted(results, spec, ends) -> bool:
    """Trials neither finished nor failed, or never started: the driver was interrupted (Ctrl-C)."""
    return ends.finished() + results.num_errors < spec["sweep"]["num_samples"]


def _summarise(results, spec, mlflow_cb, ends, wall: float) -> int:
    rows = []
    for r in results:
        if r.metrics and METRIC in r.metrics:
            rows.append(r)
    errors = [r for r in results if r.error]
    if _interrupted(results, spec, ends):
        print(f"\nsweep {spec['name']} interrupted ({ends.finished()} of "
              f"{spec['sweep']['num_samples']} trials finished): rerun the same command with --resume "
              "to continue it")
        return 1
    best = None
    if rows:
        b = max(rows, key=lambda r: r.metrics[METRIC])
        best = {"trial_id": b.metrics.get("trial_id"), "dev/accuracy": b.metrics[METRIC],
                "step": b.metrics.get("step"), "params": b.config,
                "config": TrialResolver(spec["fixed"], "")(b.config)[0]}
    status = "FINISHED" if not errors else "FAILED"
    mlflow_cb.finish(best, status)
    print(f"\nsweep {spec['name']}: {len(results)} trials ({len(errors)} failed) in {wall:.0f} s")
    if best:
        print(f"best trial {best['trial_id']}: dev/accuracy {best['dev/accuracy']:.4f} at step {best['step']}")
        for k, v in best["params"].items():
            print(f"  {k} = {v}")
    SweepStorage(spec["storage"]).write_text(f"{spec['name']}/best.json",
                                             json.dumps({**(best or {}), "wall_s": wall}, indent=2, default=str))
    return 0 if not errors else 1


def main(argv: list[str] | None = None, *, default_space: str = "rank_schedule",
         report: Callable[[dict], None] | None = None) -> int:
    args = build_parser(default_space).parse_args(argv)
    try:
        return run(args, default_space, report)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
