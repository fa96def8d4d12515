"""Data-parallel scaling: the same training run (trajectory LoRA, the size's backbone, SST-2)
fitted as a Ray Train job with 1 and with 2 workers (DDP on CPU: gloo all-reduce of the
gradients, engine/trial.py's `make_trainer` and `train_loop`, exactly as a sweep trial's Train
run, without Tune), at the same global batch and number of steps, and its training throughput.

Each run is a (workers, torch threads per worker) pair (workbench.py `scaling_runs`); every
worker reserves as many Ray CPUs as it runs threads. The runs, and why:
- 1 worker x 1 thread: the reference, "one worker" of the issue's target;
- 2 workers x 1 thread: data parallelism, a core per worker. Its ratio to the reference is the
  target's (2 workers >= 1.6 x one worker), which holds only where the machine has a core per
  worker (the report says "-" where it has fewer);
- 1 worker x 2 threads: the same cores as 2 x 1, spent on torch's intra-op threads instead.
  On a 2-core machine this is the fair comparison (the same cores used), reported beside the
  target's ratio as "x 1 worker, same cores": whether splitting the batch across processes
  beats splitting the matrix products across threads.
Runs are interleaved over `scaling_rounds` (A B C A B C ...; the median of each figure), in one
Ray cluster started here (or the one this process already joined).

Throughput is taken from the workers' own `timing/*` reports (engine/trial.py `Timing`, rank
0's, which Ray Train keeps with each checkpoint): the first report (after the warm-up steps:
the first step's allocations, gloo's first all-reduce) is subtracted from the last, so
`examples_per_s` = global batch x measured steps / their training seconds. The ratios are taken
on it: every run trains on the same global batches (the batch order is seeded; each worker takes
its strided share), so the work is identical. `tokens_per_s` is the recipe's count (a worker's
real tokens x world size: exact with one worker, within the two halves' length difference with
two). A run's wall time (`fit_wall_s`) adds the worker group's start-up, the backbone load and
the evaluations, reported apart.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

from ...core import config as config_lib

FIGURES = ("fit_wall_s", "startup_s", "train_s", "measured_s", "examples_per_s", "tokens_per_s")


def label(workers: int, threads: int) -> str:
    return f"{workers}x{threads}"


def run(size, data_dir: str | None, workdir: str | Path, log=print) -> dict:
    """Fit every run of the size, interleaved over its rounds; the summary of `summarise`."""
    import ray

    from ...engine.tuner import init_ray, ray_address

    storage = Path(workdir).resolve() / "train"
    storage.mkdir(parents=True, exist_ok=True)
    config = scaling_config(size, data_dir)
    own_ray = not ray.is_initialized()
    if own_ray:
        init_ray(ray_address(None), log_to_driver=False)
    try:
        measured: dict[str, list[dict]] = {label(*r): [] for r in size.scaling_runs}
        for _ in range(size.scaling_rounds):
            for workers, threads in size.scaling_runs:
                row = train_run(config, workers, threads, storage)
                measured[label(workers, threads)].append(row)
                if log:
                    log(f"scaling {label(workers, threads)}: {row['examples_per_s']:.1f} examples/s "
                        f"over {row['measured_steps']} steps, run wall {row['fit_wall_s']:.0f} s")
    finally:
        if own_ray:
            ray.shutdown()
    return summarise(size, measured, os.cpu_count() or 1)


def scaling_config(size, data_dir: str | None) -> dict:
    """The runs' config as a dict: trajectory LoRA at mid-depth (as train.py
    trajectory-mid), reports at every `warm-up` steps (the first one closes the warm-up),
    evaluation cut to a few rows and no diagnostics (their time is not training, but it is wall
    time), torch threads left to the worker's reserved CPUs (train.threads unset)."""
    from ...core.backbone import load_backbone
    from .workbench import mid_layer

    batch, max_length = size.scaling_shape
    warmup, steps = size.scaling_steps
    layers = len(load_backbone(size.backbone).layers)  # the packaged or tiny backbone: seconds
    sets = {"task": "sst2", "backbone": size.backbone, "data_dir": data_dir, "method": "trajectory",
            "trajectory.injection_layers": [mid_layer(layers)], "max_length": max_length,
            "max_train_examples": 8 * batch, "max_eval_examples": 8, "train_accuracy_examples": 8,
            "train.batch_size": batch, "train.steps": warmup + steps, "train.eval_every": warmup,
            "diagnostics.per_t_bins": 0, "diagnostics.phase_gains": False}
    return config_lib.from_dict({}, sets).to_dict()


def train_run(config: dict, workers: int, threads: int, storage: Path) -> dict:
    """One Train run of `workers` workers x `threads` threads; its `measure`."""
    from ...engine.trial import TrialPlan, make_trainer

    plan = TrialPlan(fixed={}, workers=workers, cpus_per_worker=float(threads), gpus_per_worker=0.0,
                     train_storage=str(storage), max_failures=0)
    t0 = time.time()
    result = make_trainer(config, plan, f"scaling-{label(workers, threads)}-{time.time_ns()}", t0, [],
                          keep=None).fit()
    wall = time.time() - t0
    reports = [m for _, m in result.best_checkpoints or []]
    shutil.rmtree(result.path, ignore_errors=True)  # its checkpoints: nothing the benchmark keeps
    return measure(reports, config["train"]["batch_size"], wall)


def measure(reports: list[dict], batch: int, wall: float) -> dict:
    """Throughput between the first report (end of the warm-up) and the last, from rank 0's
    `timing/*` figures; start-up (worker group + set-up) and the run's training seconds."""
    reports = sorted(reports, key=lambda m: m["step"])
    if len(reports) < 2:
        raise RuntimeError(f"a scaling run reported {len(reports)} time(s): the warm-up and the end are needed")
    first, last = reports[0], reports[-1]
    steps = last["step"] - first["step"]
    seconds = last["timing/train_s"] - first["timing/train_s"]
    tokens = last["timing/train_tokens"] - first["timing/train_tokens"]
    out = {"fit_wall_s": wall, "startup_s": last["timing/worker_startup_s"] + last["timing/setup_s"],
           "train_s": last["timing/train_s"], "measured_steps": steps, "measured_s": seconds,
           "examples_per_s": batch * steps / seconds, "tokens_per_s": tokens / seconds}
    accounting = next((json.loads(r["accounting_json"]) for r in reports if "accounting_json" in r), None)
    if accounting:  # what every step all-reduces
        out["trainable_params"] = accounting["trainable_params"]
    return out


def summarise(size, measured: dict[str, list[dict]], cores: int) -> dict:
    """One row per run: the median of each figure over the rounds, its ratio to the first run
    (the reference: one worker, one thread) and to the one-worker run on the same cores."""
    batch, max_length = size.scaling_shape
    warmup, steps = size.scaling_steps
    rows = []
    for workers, threads in size.scaling_runs:
        rounds = measured[label(workers, threads)]
        row = {"run": label(workers, threads), "workers": workers, "threads_per_worker": threads,
               "cores_used": workers * threads, "oversubscribed": workers * threads > cores,
               "rounds": len(rounds), "examples_per_s_rounds": [r["examples_per_s"] for r in rounds],
               **{k: statistics.median(r[k] for r in rounds) for k in FIGURES}}
        if "trainable_params" in rounds[0]:
            row["trainable_params"] = rounds[0]["trainable_params"]
        rows.append(row)
    ref = rows[0]["examples_per_s"]
    one_worker = {r["cores_used"]: r["examples_per_s"] for r in rows if r["workers"] == 1}
    for row in rows:
        row["ratio_to_reference"] = row["examples_per_s"] / ref
        if row["cores_used"] in one_worker:
            row["ratio_same_cores"] = row["examples_per_s"] / one_worker[row["cores_used"]]
    return {"reference": rows[0]["run"], "backbone": size.backbone, "method": "trajectory", "batch": batch,
            "max_length": max_length, "warmup_steps": warmup, "measured_steps": steps, "cores": cores,
            "rows": rows}
