"""The sweep engine: Ray Tune trials that each run a Ray Train `TorchTrainer`, Optuna + ASHA, MLflow.

    python jobs/rank_schedule_sweep.py                      # the real sweep (MiniLM, SST-2, ~20 min on 2 cores)
    python jobs/rank_schedule_sweep.py --smoke              # tiny random BERT built on the fly, ~1 min
    python jobs/rank_schedule_sweep.py --resume             # continue an interrupted sweep of that name
    ray submit cluster.yaml jobs/rank_schedule_sweep.py     # on a cluster (joins it: address "auto")

Shape (Ray 2.60, Train V2):
- options.py: the command line; spec.py: the sweep spec (sweep.json), every user error raised
  as a `UserError` before Ray starts; preflight.py: the MLflow store, the Ray address and the
  GPUs checked before anything is written (a sweep that still dies before Tune saved its state
  reruns under its name, with or without --resume);
- the best trial (tagged on the parent run, best.json; printed unless the caller sums the job up
  itself: cli.sweep_main prints one summary after the retrain) is a trial that did not fail
  with a finite selection metric, the highest, or the lowest for the ELBO bound of an ELBO-only
  generation sweep (generation.text_scores false; spec.mode); when there is none the sweep
  fails, saying why;
- a trial (trial.py) is a Tune function trainable that builds and fits a TorchTrainer with N
  workers; `TuneReportCallback` forwards each evaluation's report to Tune; the Train run is named
  by the trial id under `<sweep>/train/`, so a restored trial's Train run finds its own latest
  checkpoint; `FailureConfig` restarts failed workers from it;
- tuner.py: OptunaSearch (seeded TPE) samples the search space define-by-run (conditional
  parameters) and ASHA stops weak trials on the task's validation metric (accuracy, f1 for
  xquad, rougeL for xsum, elbo_nats_per_token ELBO-only: spec.selection_metric) at rungs of the recipe's step counter;
  a grid file (search_spaces/grid_*.yaml, see grid.py) runs every cell x seed once instead
  (Tune's grid search, no early stopping);
- callbacks.py: one MLflow parent run per sweep and one child run per trial (tracking.py),
  re-attached on resume; progress lines; the count of trials that ended;
- when every trial has ended, `report(spec)` writes the ablation report (table, parquet,
  heatmaps, Pareto plot) on the parent run: the analysis layer passes it in;
- best.json holds the selected configuration (best validation among completed trials) and its
  selection score, never a test figure: cli.sweep_main then retrains it with fresh seeds as the
  grid sweep `<name>-retrain` and adds test ± std (experiments/retrain.py).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..core.errors import UserError
from ..core.task_specs import direction, oriented
from . import preflight, tracking, tuner as tuner_lib
from .grid import SEED_FIELD
from .options import build_parser, repo_root
from .spec import METRIC, SPEC_FILE, SweepSpec, prepare, smoke_note, started
from .storage import SweepStorage


def main(argv: list[str] | None = None, *, default_space: str = "rank_schedule",
         report: Callable[[dict], None] | None = None, closing: bool = True) -> int:
    """`closing`: print the selection and the link to compare trials when the sweep ends; False
    when the caller prints one summary of its own after a follow-up stage (cli.sweep_main)."""
    args = build_parser(default_space).parse_args(argv)
    try:
        return run(args, report, closing)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args, report: Callable[[dict], None] | None = None, closing: bool = True) -> int:
    """Run (or resume) the sweep; `report(spec)` (the spec as sweep.json holds it) is called when
    every trial has ended (the analysis layer passes the ablation report: the engine does not
    import analysis)."""
    spec = prepare(args)  # every user error surfaces here, before ray.init
    address = tuner_lib.ray_address(args.address)
    preflight.check_tracking_uri(spec.tracking_uri)  # the world: a few seconds at most, nothing written
    preflight.check_address(address)
    preflight.check_gpus(args.gpus_per_worker, address, spec.sweep.workers)
    figures = planned(args, spec, address)  # a trial that cannot fit is refused here, before Ray
    tracking.prepare_uri(spec.tracking_uri)
    storage = SweepStorage(spec.storage)
    restore = args.resume and started(storage, spec.name)  # else no trial ever ran: start it afresh
    if not args.resume and smoke_note(spec):
        print(f"note: {smoke_note(spec)}", file=sys.stderr)
    if not args.resume:
        storage.check_writable()
        storage.write_kept(f"{spec.name}/{SPEC_FILE}", spec.to_json())

    import ray

    from . import callbacks

    # Tune snapshots the experiment every >= 10 s by default: a driver killed in between would
    # re-run trials that had already finished. The state of a sweep is small; save it often.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    t0 = time.time()
    tuner_lib.init_ray(address)
    try:
        res = tuner_lib.resources(args, spec.sweep.workers, spec.sweep.max_concurrent,
                                  figures if ray.cluster_resources().get("GPU") else None)
        preflight.check_cluster_gpus(res.gpus_per_worker, res.cluster_gpus)
        spec.sweep.workers, spec.sweep.max_concurrent = res.workers, res.max_concurrent  # the tuner's
        _banner(spec, address, res)
        version = tracking.code_version(repo_root())
        tracker = tracking.SweepTracker(spec.tracking_uri, spec.name, spec.experiment, sweep_id=spec.sweep_id,
                                        tags={"code_version": version, "space": Path(spec.space_path).stem})
        mlflow_cb = callbacks.MlflowSweepCallback(tracker, callbacks.TrialResolver(spec.fixed, version),
                                                spec.metric)
        ends = callbacks.TrialEnds()
        run_callbacks = callbacks.for_this_driver(spec.sweep_id,
                                                  [mlflow_cb, callbacks.ProgressLines(spec.metric), ends])
        tuner = tuner_lib.make_tuner(spec, _trainable(spec, res), run_callbacks, resume=restore,
                                     verbose=args.verbose)
        link = _log_parent(mlflow_cb, spec)
        results = _fit(tuner, spec, mlflow_cb)
        if results is None:
            return 1
        rc = _summarise(results, spec, mlflow_cb, ends, time.time() - t0, closing)
        if closing:
            print(tracking.compare_line(spec.tracking_uri, link))
        if report is not None and not _interrupted(results, spec, ends):  # failed cells included
            report(spec.to_dict())
        return rc
    finally:
        callbacks.release(spec.sweep_id)
        ray.shutdown()


def planned(args, spec: SweepSpec, address: str):
    """The memory plan of the sweep's base configuration (its fixed overrides), before Ray starts,
    for a sweep that may run on GPUs: --gpus-per-worker given (a trial that does not fit the GPUs
    it asks for is refused, naming the field), or left to the packing on a cluster or a machine
    with a GPU (a trial that fits no number of GPUs is refused; the figures go to the packing).
    None for a CPU sweep on this machine, which plans nothing."""
    import torch

    from ..core import config as config_lib, memory_plan
    from .resources import DEFAULT_GPU_MEMORY_GIB, PlanFigures

    if args.gpus_per_worker == 0 or (args.gpus_per_worker is None and address == "local"
                                     and not torch.cuda.is_available()):
        return None
    config, memory = config_lib.from_dict({}, spec.fixed), args.gpu_memory_gib or DEFAULT_GPU_MEMORY_GIB
    if args.gpus_per_worker:
        preflight.check_memory(config, args.gpus_per_worker, spec.sweep.workers, memory)
        return None
    fit = memory_plan.plan(config, gpu_memory_gib=memory, workers=spec.sweep.workers).fit
    if fit["gpus_per_trial"] is None:
        memory_plan.refuse_unfit(config, gpu_memory_gib=memory, workers=spec.sweep.workers)
    return PlanFigures.of(fit)


def _trainable(spec: SweepSpec, res):
    from ray import tune

    from .trial import TrialPlan, run_trial
    from .tuner import trial_resources

    plan = TrialPlan(fixed=spec.fixed, workers=spec.sweep.workers, cpus_per_worker=res.cpus_per_worker,
                     gpus_per_worker=res.gpus_per_worker, shard=res.shard,
                     train_storage=SweepStorage(spec.storage).join(spec.name, "train"),
                     max_failures=spec.max_failures, extra_resources=spec.sweep.worker_resources)
    return tune.with_resources(tune.with_parameters(run_trial, plan=plan),
                               trial_resources(spec.sweep.max_concurrent))


def _banner(spec: SweepSpec, address: str, res) -> None:
    sweep = spec.sweep
    print(f"sweep {spec.name}: {sweep.num_samples} trials x {sweep.workers} worker(s), "
          f"{sweep.max_concurrent} at a time, {spec.steps} steps each; space {spec.space_path}; "
          f"ray {address} ({res.cluster_cpus:g} CPU, {res.cluster_gpus:g} GPU; "
          f"{res.cpus_per_worker:g} CPU / {res.gpus_per_worker:g} GPU per worker{'; ' + res.why if res.why else ''}); "
          f"storage {spec.exp_dir}; mlflow {spec.tracking_uri}", flush=True)


def _log_parent(mlflow_cb, spec: SweepSpec) -> str:
    """The sweep's parent run, with its params (and a grid's axes, so that `lora-diffusion report
    --sweep NAME` rebuilds the same table), its knobs and description. Returns the UI link."""
    tracker = mlflow_cb.tracker
    parent = tracker.parent_run(params={"space": Path(spec.space_path).stem, "smoke": spec.smoke,
                                        **{f"sweep.{k}": v for k, v in spec.to_dict()["sweep"].items()},
                                        **{f"fixed.{k}": v for k, v in spec.fixed.items()}})
    if spec.kind == "grid":
        tracker.client.set_tag(parent, "ablation.axes", ",".join(spec.grid.axes))
        tracker.client.set_tag(parent, "ablation.reference", json.dumps(spec.grid.reference))
        if spec.grid.only:
            tracker.client.set_tag(parent, "ablation.only", json.dumps(spec.grid.only))
    return mlflow_cb.describe_parent(_knobs(spec), _resume_command(spec))


def _knobs(spec: SweepSpec) -> list[str]:
    """The config keys a sweep varies: a grid's axes and seed, a search space's params."""
    if spec.kind == "grid":
        return [*spec.grid.axes, SEED_FIELD]
    return list(dict.fromkeys(p.field for p in spec.parse_space().params if p.field))  # no switches


def _resume_command(spec: SweepSpec) -> str:
    """This job's command line for --resume (the job file, or `lora-diffusion sweep`)."""
    job = Path(sys.argv[0])
    if job.name == "lora-diffusion":
        command = "lora-diffusion sweep"
    else:
        command = "python " + (os.path.relpath(job, repo_root()) if job.is_absolute() else str(job))
    return f"{command} --name {spec.name} --storage-path {spec.storage} --resume"


def _fit(tuner, spec: SweepSpec, mlflow_cb):
    """The tuner's results; None when the store could not be written as the sweep ran (its trials
    or Tune's own snapshots failed there: said in one error line, the parent run FAILED with it)."""
    try:
        results = tuner.fit()
    except Exception as exc:  # Tune itself failed: the parent run must not stay RUNNING
        lost = _unwritable(spec)
        mlflow_cb.finish(None, "FAILED", reason=lost or f"{type(exc).__name__}: {exc}".splitlines()[0])
        if not lost:
            raise
    else:
        lost = _unwritable(spec)
        if not lost:
            return results
        mlflow_cb.finish(None, "FAILED", reason=lost)
    print(f"error: {lost}", file=sys.stderr)
    return None


def _unwritable(spec: SweepSpec) -> str | None:
    """The error line of a sweep whose store could not be written as it ran (read-only, full),
    naming the directory; None if it can be written. What the failed writes left is never read
    back: Tune and Train read only the checkpoints and state their snapshots list, and those are
    written after the files they name."""
    try:
        SweepStorage(spec.exp_dir).check_writable()
    except UserError as exc:
        return (f"{exc}; the sweep stopped there: make it writable (free space, remount), then rerun "
                f"with --resume ({_resume_command(spec)})")
    return None


def _interrupted(results, spec: SweepSpec, ends) -> bool:
    """Trials neither finished nor failed, or never started: the driver was interrupted (Ctrl-C)."""
    return ends.finished() + results.num_errors < spec.sweep.num_samples


def _select(results, spec: SweepSpec) -> dict | None:
    """The configuration the sweep selects: the best validation score among COMPLETED trials (run
    to their last step; a trial ASHA stopped early was scored at another step count). Its score
    is the selection score, not a result: `experiments.retrain` reports test with fresh seeds."""
    from .callbacks import TrialResolver

    resolve = TrialResolver(spec.fixed, "")
    metric = spec.metric
    rows = [(r, resolve(r.config)[0]) for r in results if _usable(r, metric)]
    rows = [(r, config) for r, config in rows if (r.metrics.get("step") or 0) >= config["train.steps"]]
    if not rows:
        return None
    b, config = max(rows, key=lambda rc: oriented(metric, rc[0].metrics[metric]))
    return {"trial_id": b.metrics.get("trial_id"), "step": b.metrics.get("step"), "params": b.config,
            "selection": {"metric": metric, "mode": spec.mode, "score": b.metrics[metric],
                          "completed_trials": len(rows),
                          "note": "the best validation score of the search: what the configuration was "
                                  "selected by, optimistic; the result is retrain's test"},
            "config": {k: v for k, v in config.items() if not k.startswith("sampled.")}}


def _summarise(results, spec: SweepSpec, mlflow_cb, ends, wall: float, closing: bool = True) -> int:
    """The sweep's end: best.json and the parent run's status, or how to resume it; with
    `closing`, the selected trial and its configuration printed."""
    if _interrupted(results, spec, ends):
        print(f"\nsweep {spec.name} interrupted ({ends.finished()} of {spec.sweep.num_samples} trials "
              "finished): rerun the same command with --resume to continue it")
        return 1
    errors = [r for r in results if r.error]
    best = _select(results, spec)
    reason = None if best else (f"every trial failed ({len(errors)} of {len(results)})" if errors
                                else f"no trial reported a finite {spec.metric} at its last step")
    mlflow_cb.finish(best, "FINISHED" if not errors else "FAILED", reason=reason)
    print(f"\nsweep {spec.name}: {len(results)} trials ({len(errors)} failed) in {wall:.0f} s")
    if best is None:  # no best.json: nothing downstream may take a failed trial for the best one
        print(f"sweep {spec.name} FAILED: {reason}; no best trial", file=sys.stderr)
        return 1
    if closing:
        print(selection_line(best) + "".join(f"\n  {k} = {v}" for k, v in best["params"].items()))
    SweepStorage(spec.storage).write_kept(f"{spec.name}/best.json",
                                          json.dumps({**best, "wall_s": wall}, indent=2, default=str))
    return 0 if not errors else 1


def selection_line(best: dict) -> str:
    """What best.json's `selection` says: the trial, its score, that it is no result."""
    sel = best["selection"]
    return (f"selected trial {best['trial_id']}: selection score {sel['metric']} {sel['score']:.4f} "
            f"({direction(sel['metric'])}; the best of {sel['completed_trials']} completed trials "
            "on validation: optimistic, not a result)")


def _usable(r, metric: str = METRIC) -> bool:
    """A trial that did not fail and reported a finite `metric` (a failed trial's last report, or
    a NaN, never wins)."""
    value = (r.metrics or {}).get(metric)
    return r.error is None and isinstance(value, (int, float)) and math.isfinite(value)


def best_result(results, metric: str = METRIC):
    """The usable trial with the best final `metric` (the highest, the lowest for the ELBO bound:
    metric_mode); None if there is none."""
    rows = [r for r in results if _usable(r, metric)]
    return max(rows, key=lambda r: oriented(metric, r.metrics[metric])) if rows else None
