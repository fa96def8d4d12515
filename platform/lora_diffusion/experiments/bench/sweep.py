"""What the sweep engine costs: a small real sweep (Optuna + ASHA, MiniLM, two trials at a time)
run as `lora-diffusion sweep` in a subprocess, its wall time against the sum of its trials'
training time over the concurrency, and where the rest went, from the `timing/*` figures every
trial reports (engine/trial.py `Timing`) and MLflow keeps as the trial run's last values.

The slot-seconds of the sweep (wall x concurrent trials) split into: Ray and driver start-up
(before the first trial runs), per trial the Train worker group's start-up (trial actor ->
worker loop, which includes waiting for resources), set-up (data, backbone, method), training
steps, evaluation, checkpointing and the hand-off to Tune (`ray.train.report`), and idle: slots
with no trial between its first and last report (Tune scheduling, a stopped trial's teardown,
the driver's end). MLflow logging runs on the driver, inside the hand-off wait when it delays it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

# The search alone: `sweep` would go on to retrain the selected configuration (another sweep, its
# trials outside this one's timings), which counted as idle wall time here (measured: 278 of 635 s).
DEFAULT_ARGS = ["--num-samples", "4", "--max-concurrent", "2", "--set", "train.steps=100",
                "--set", "train.eval_every=50", "--set", "train.threads=1", "--verbose", "0",
                "--retrain-seeds", "0"]
PARTS = ("worker_startup_s", "setup_s", "train_s", "eval_s", "checkpoint_s", "report_s")


def run_sweep(extra: list[str], workdir: str | Path, log=print) -> dict:
    """Run the sweep, then read its trials' timings back from MLflow."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    name = f"bench-sweep-{int(time.time())}"
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    args = [*DEFAULT_ARGS, *extra, "--name", name, "--storage-path", str(workdir / "sweeps"), "--tracking-uri", uri]
    logfile = workdir / f"{name}.log"
    t0 = time.time()
    with open(logfile, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "lora_diffusion.cli", "sweep", *args], stdout=fh,
                            stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
    wall = time.time() - t0
    text = logfile.read_text(errors="replace")
    trials = trial_timings(uri, name)
    out = breakdown(trials, wall, t0, concurrency=_arg(args, "--max-concurrent", 2), interrupted=rc != 0)
    out.update(command="lora-diffusion sweep " + " ".join(args[:-6]), returncode=rc, log=str(logfile),
               startup_timeouts=len(re.findall(r"WorkerGroupStartupTimeoutError", text)))
    if log:
        log(f"sweep {name}: wall {wall:.0f} s, {out['wall_over_train']:.2f} x the trials' training time "
            f"over {out['concurrency']} slots")
    return out


def _arg(args: list[str], flag: str, default: int) -> int:
    return int(args[len(args) - 1 - args[::-1].index(flag) + 1]) if flag in args else default


def trial_timings(uri: str, sweep: str) -> list[dict]:
    """Each trial's last `timing/*` figures and step count, from its MLflow run."""
    from ...analysis.trials import find_parent, mlflow_client

    parent = find_parent(uri, sweep)
    sweep_id = parent.data.tags.get("sweep_id", sweep)
    runs = mlflow_client(uri).search_runs([parent.info.experiment_id], max_results=1000,
                                          filter_string=f"tags.sweep_id = '{sweep_id}' and tags.role = 'trial'")
    client, rows = mlflow_client(uri), []
    for run in runs:
        m = run.data.metrics
        if "timing/trial_started_at" not in m:
            continue
        history = client.get_metric_history(run.info.run_id, "timing/train_s")  # logged at the trial's step
        rows.append({"trial_id": run.data.tags.get("trial_id"), "steps": max(h.step for h in history),
                     "stopped_early": run.data.tags.get("stopped_early") == "true",
                     **{k[len("timing/"):]: v for k, v in m.items() if k.startswith("timing/")}})
    return rows


def breakdown(trials: list[dict], wall: float, t0: float, concurrency: int, interrupted: bool = False) -> dict:
    """Slot-seconds of the sweep by where they went, and the issue's two ratios. An interrupted
    sweep is measured up to its last report (trials still running then have reported nothing
    of their time since)."""
    if interrupted and trials:
        wall = max(t["reported_at"] for t in trials) - t0
    slots = wall * concurrency
    parts = {p: sum(t.get(p, 0.0) for t in trials) for p in PARTS}
    spans = sum(t["reported_at"] - t["trial_started_at"] for t in trials)
    first = min((t["trial_started_at"] for t in trials), default=t0)
    train = parts["train_s"]
    steps = sum(t["steps"] for t in trials)
    step_s = train / steps if steps else float("nan")
    startup = [t["worker_startup_s"] + t["setup_s"] for t in trials]
    return {
        "wall_s": wall, "interrupted": interrupted, "concurrency": concurrency, "trials": len(trials),
        "stopped_early": sum(t["stopped_early"] for t in trials), "trial_rows": trials,
        "slot_s": {"ray_and_driver_startup": (first - t0) * concurrency, **parts,
                   "idle": max(0.0, slots - spans - (first - t0) * concurrency)},
        "wall_over_train": wall / (train / concurrency) if train else float("nan"),
        "wall_over_trial_spans": wall / (spans / concurrency) if spans else float("nan"),
        "step_s": step_s,
        "startup_s_median": sorted(startup)[len(startup) // 2] if startup else float("nan"),
        "startup_share_of_300_steps": (sorted(startup)[len(startup) // 2] / (300 * step_s)) if startup
        else float("nan"),
        "eval_share_of_trial": parts["eval_s"] / spans if spans else float("nan"),
    }
