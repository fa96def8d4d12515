"""An ablation grid on the sweep engine, interrupted midway and resumed, gives the table of an
uninterrupted grid.

The grid (2 ranks x 2 schedules x 2 seeds, tiny backbone, real SST-2 rows) runs through
jobs/ablation_grid.py; its driver is SIGKILLed while one trial has finished and another is still
running, then resumed with --resume. The uninterrupted reference is the same 8 configurations
trained one after another in this process by the same Recipe (runs are deterministic given
config and seed, and a resumed run continues exactly): the grid table read back from MLflow must
hold exactly those accuracies, each cell-seed once, and the report must be on the parent run.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from support.procs import kill_session, start_driver
from test_sweep_resume import trial_results, trial_status

from lora_diffusion.analysis.report import write_report
from lora_diffusion.analysis.trials import load_trials
from lora_diffusion.engine import grid as grid_lib

REPO = Path(__file__).resolve().parents[1]
AXES = {"trajectory.rank": [2, 4], "trajectory.rank_schedule": ["constant", "reversed"]}
SEEDS = [0, 1]


def _grid_file(tmp_path, backbone, data_dir) -> Path:
    grid = {"description": "resume test", "seeds": SEEDS, "grid": AXES,
            "reference": {"trajectory.rank_schedule": "constant"},
            "fixed": {"backbone": str(backbone), "data_dir": str(data_dir), "max_length": 32,
                      "max_train_examples": 64, "max_eval_examples": 24, "train_accuracy_examples": 8,
                      "train.steps": 8, "train.batch_size": 8, "train.eval_every": 2,
                      "train.warmup_steps": 1, "trajectory.injection_layers": [0],
                      "trajectory.num_phases": 2, "trajectory.min_rank": 1, "diffusion.eval_t_points": 2,
                      "diffusion.sampler_steps": 2}}
    path = tmp_path / "grid_resume.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _cmd(grid, storage, uri, *extra):
    return [sys.executable, "jobs/ablation_grid.py", "--grid", str(grid), "--name", "grid-resume",
            "--max-concurrent", "2", "--address", "local", "--storage-path", str(storage),
            "--tracking-uri", uri, "--verbose", "0", "--retrain-seeds", "0", *extra]  # test_retrain.py: the follow-up


def _direct_accuracies(grid_path) -> dict[tuple, float]:
    """(rank, schedule, seed) -> final validation accuracy of the same run, trained in this process."""
    import torch

    from lora_diffusion.core import config as config_lib
    from lora_diffusion.core.recipe import Recipe

    torch.set_num_threads(1)  # as the Train worker (one CPU per worker here)
    grid = grid_lib.load_grid(grid_path)
    out = {}
    for run in grid.runs():
        result = Recipe(config_lib.from_dict({}, run)).run()
        out[(run["trajectory.rank"], run["trajectory.rank_schedule"], run["train.seed"])] = result["validation/accuracy"]
    return out


@pytest.mark.slow
def test_grid_interrupted_and_resumed_gives_the_uninterrupted_table(tiny_backbone_dir, synthetic_data_dir, tmp_path):
    grid_path = _grid_file(tmp_path, tiny_backbone_dir, synthetic_data_dir)
    storage, uri = tmp_path / "sweeps", f"sqlite:///{tmp_path}/mlflow.db"
    exp_dir = storage / "grid-resume"
    env = {**os.environ, "LORA_DIFFUSION_DATA_DIR": str(synthetic_data_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    sessions = []
    try:
        proc = start_driver(_cmd(grid_path, storage, uri), tmp_path / "first.log", env, sessions)
        deadline, killed = time.time() + 240, False
        while time.time() < deadline and proc.poll() is None:
            status, results = trial_status(exp_dir), trial_results(exp_dir)
            done = [t for t, s in status.items() if s == "TERMINATED"]
            midway = [t for t, s in status.items() if s == "RUNNING" and results.get(t)
                      and not any("result_json" in r for r in results[t])]
            if done and midway and len(done) < 8:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.3)
        proc.wait(timeout=30)
        kill_session(proc.pid)
        assert killed, "never saw a finished and a running trial: " + (tmp_path / "first.log").read_text()[-3000:]

        proc2 = start_driver(_cmd(grid_path, storage, uri, "--resume"), tmp_path / "resume.log", env, sessions)
        rc = proc2.wait(timeout=300)
        assert rc == 0, (tmp_path / "resume.log").read_text()[-5000:]
    finally:
        for sid in sessions:
            kill_session(sid)

    # every cell x seed exactly once in MLflow, finished; the report is on the parent run
    df = load_trials(uri, "grid-resume")
    assert len(df) == 8 and set(df["status"]) == {"FINISHED"} and (df["n_runs"] == 1).all()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = df.attrs["parent_run_id"]
    logged = {f.path for f in client.list_artifacts(parent, "ablation")}
    assert {"ablation/grid.parquet", "ablation/trials.parquet", "ablation/summary.md", "ablation/pareto.png",
            "ablation/heatmap_trajectory.rank__trajectory.rank_schedule.png"} <= logged, logged
    assert client.get_run(parent).data.tags["ablation.axes"] == "trajectory.rank,trajectory.rank_schedule"

    # the table, rebuilt from MLflow with the axes and reference the grid tagged its parent with
    files = write_report(uri, "grid-resume", None, None, tmp_path / "report", log_to_mlflow=False)
    import pandas as pd

    table = pd.read_parquet(files["grid"])
    expected = _direct_accuracies(grid_path)
    assert len(table) == 4
    for _, row in table.iterrows():
        rank, sched = int(row["trajectory.rank"]), row["trajectory.rank_schedule"]
        vals = [expected[(rank, sched, s)] for s in SEEDS]
        assert row["n"] == 2 and row["n_failed"] == 0, row.to_dict()
        assert math.isclose(row["mean"], sum(vals) / 2, abs_tol=1e-9), (rank, sched, row["mean"], vals)
        ref = [expected[(rank, "constant", s)] for s in SEEDS]
        assert math.isclose(row["diff_mean"], (sum(vals) - sum(ref)) / 2, abs_tol=1e-9)
        assert row["step_time_s"] > 0 and row["trainable_params"] > 0
