"""A sweep's driver killed twice (SIGKILL to its process group) and interrupted once (Ctrl-C while
its last trials run), resumed with --resume each time, and one Train worker killed mid-trial, ends
as an uninterrupted sweep would.

One ablation grid (2 ranks x 2 schedules, one seed, tiny backbone, one Train worker a trial, so
that the in-process reference below is the same computation) runs through jobs/ablation_grid.py
under the soak's machinery (experiments/soak.py, which jobs/soak.py runs with more kills); the
worker's death is tests/support/faults' hook (the worker exits when it is about to report step
DIE_AT, once). Two-worker trials under a driver kill: test_sweep_resources.py. Checked after the
last resume:

- the fault matrix is clean: no trial lost, no run duplicated, none left RUNNING, no metric lost;
- Tune: every trial TERMINATED with its final report once; a trial killed midway continued from its
  Train checkpoint; a trial that had ended before a fault was not run again;
- the dead worker's trial restarted from its checkpoint before DIE_AT (Tune and MLflow), finished once;
- Ctrl-C while the last trials ran: exit 1, "interrupted (k of 4 trials finished)", no ablation
  report (Tune marks the stopped trials TERMINATED: the sweep must not pass for a finished one);
- MLflow: one parent run (FINISHED), one child run per trial (FINISHED, under the parent, steps one
  increasing sequence, result.json, accounting, params, code version);
- the grid table read back from MLflow equals that of the same 4 runs trained one after another
  in this process (runs are deterministic given config and seed, and a resumed run continues
  exactly), and the report is on the parent run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import yaml

from lora_diffusion.analysis import fault_matrix as fm
from lora_diffusion.experiments.soak import SIGINT_FAULT, SIGKILL_FAULT, WORKER_FAULT, SoakPlan, run_soak

AXES = {"trajectory.rank": [2, 4], "trajectory.rank_schedule": ["constant", "reversed"]}
SEEDS = [0]  # 4 trials; the mean over seeds is test_ablation.py's (no Ray)
STEPS, EVERY, DIE_AT = 12, 2, 4
NAME = "grid-resume"


def _grid_file(tmp_path, backbone, data_dir) -> Path:
    grid = {"description": "resume test", "seeds": SEEDS, "grid": AXES,
            "reference": {"trajectory.rank_schedule": "constant"},
            "fixed": {"backbone": str(backbone), "data_dir": str(data_dir), "max_length": 32,
                      "max_train_examples": 64, "max_eval_examples": 24, "train_accuracy_examples": 8,
                      "train.steps": STEPS, "train.batch_size": 8, "train.eval_every": EVERY,
                      "train.warmup_steps": 1, "trajectory.injection_layers": [0],
                      "trajectory.num_phases": 2, "trajectory.min_rank": 1, "diffusion.eval_t_points": 2,
                      "diffusion.sampler_steps": 2}}
    path = tmp_path / "grid_resume.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _direct_accuracies(grid_path) -> dict[tuple, float]:
    """(rank, schedule, seed) -> final validation accuracy of the same run, trained in this process."""
    import torch

    from lora_diffusion.core import config as config_lib
    from lora_diffusion.core.recipe import Recipe
    from lora_diffusion.engine import grid as grid_lib

    torch.set_num_threads(1)  # as the Train worker (one CPU per worker here)
    out = {}
    for run in grid_lib.load_grid(grid_path).runs():
        result = Recipe(config_lib.from_dict({}, run)).run()
        key = (run["trajectory.rank"], run["trajectory.rank_schedule"], run["train.seed"])
        out[key] = result["validation/accuracy"]
    return out


@pytest.fixture(scope="module")
def soaked(tiny_backbone_dir, synthetic_data_dir, tmp_path_factory):
    """The grid, killed twice at seeded random moments and interrupted once, resumed each time."""
    tmp = tmp_path_factory.mktemp("soak")
    grid = _grid_file(tmp, tiny_backbone_dir, synthetic_data_dir)
    plan = SoakPlan(job=["jobs/ablation_grid.py", "--grid", str(grid), "--max-concurrent", "2",
                         "--verbose", "0", "--retrain-seeds", "0"],  # test_retrain.py: the follow-up stage
                    env={"LORA_DIFFUSION_DATA_DIR": str(synthetic_data_dir)},  # else it overrides the grid's
                    name=NAME, storage=tmp / "sweeps", tracking_uri=f"sqlite:///{tmp}/mlflow.db", kills=2,
                    interrupts=1, kill_worker=f"0:{DIE_AT}", seed=0, max_delay=2.0, start_timeout=240,
                    log_dir=tmp / "logs")
    t0 = time.time()
    result = run_soak(plan)
    print(f"soak: {result['starts']} starts in {time.time() - t0:.0f} s")
    print(fm.markdown(result["matrix"]))
    final_log = Path(result["final_log"]).read_text(errors="replace")
    assert [i["fault"] for i in result["injections"]] == [SIGKILL_FAULT] * 2 + [SIGINT_FAULT, WORKER_FAULT], \
        (result["injections"], final_log[-3000:])
    assert result["final_rc"] == 0, final_log[-5000:]
    return {"plan": plan, "result": result, "grid": grid, "uri": plan.tracking_uri}


@pytest.mark.slow
def test_killed_and_interrupted_grid_loses_and_duplicates_nothing(soaked):
    result, exp_dir = soaked["result"], soaked["plan"].exp_dir
    assert fm.clean(result["matrix"]), fm.markdown(result["matrix"])

    # -- Tune: every trial terminated, its final report once (a grid runs every trial to its end)
    status, results = fm.trial_status(exp_dir), fm.trial_results(exp_dir)
    assert len(status) == 4 and set(status.values()) == {"TERMINATED"}, status
    assert all(fm.finals(rows) == 1 for rows in results.values())
    midway = {t for inj in result["injections"] for t in inj["midway"]}
    assert midway, "no fault found a trial midway"
    resumed = result["resumed_from_seen"]  # every restart's, as the soak read them (see soak.observe)
    for tid in midway:  # continued from its Train checkpoint
        assert max(resumed[tid]) > 0, resumed[tid]
    for inj in result["injections"]:  # a trial that had ended before a fault reported nothing after it
        for tid, reports in inj["ended"].items():
            assert result["reports_seen"][tid] == reports, (inj["fault"], tid, reports, result["reports_seen"][tid])

    # -- the Train worker that died (at step DIE_AT): its group restarted from the checkpoint before
    (died,) = [i["touched"][0] for i in result["injections"] if i["fault"] == WORKER_FAULT]
    assert DIE_AT - EVERY in resumed[died], resumed[died]

    # -- Ctrl-C while the last trials ran: an interrupt, not a finished sweep
    (interrupt,) = [i for i in result["injections"] if i["fault"] == SIGINT_FAULT]
    log = Path(interrupt["log"]).read_text(errors="replace")
    assert interrupt["rc"] == 1 and interrupt["said_interrupted"], log[-3000:]
    assert not interrupt["wrote_report"]


@pytest.mark.slow
def test_killed_grid_keeps_one_mlflow_run_per_trial(soaked):
    from mlflow.tracking import MlflowClient

    client, status = MlflowClient(soaked["uri"]), fm.trial_status(soaked["plan"].exp_dir)
    (died,) = [i["touched"][0] for i in soaked["result"]["injections"] if i["fault"] == WORKER_FAULT]
    parents, children, _ = fm.sweep_runs(soaked["uri"], NAME)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["trial_id"] for r in children) == sorted(status)
    for r in children:
        assert r.info.status == "FINISHED", (r.data.tags["trial_id"], r.info.status)
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        for key in ("train/loss", "validation/accuracy"):
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert steps == list(range(EVERY, STEPS + 1, EVERY)), (key, steps)
        assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["result.json"]
        assert "accounting/trainable_params" in r.data.metrics
        assert r.data.params["trajectory.rank_schedule"] and r.data.tags["code_version"]
        if r.data.tags["trial_id"] == died:
            resumed = client.get_metric_history(r.info.run_id, "resumed_from_step")
            assert DIE_AT - EVERY in [m.value for m in resumed]


@pytest.mark.slow
def test_killed_grid_gives_the_uninterrupted_table(soaked, tmp_path):
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from lora_diffusion.analysis.report import write_report
    from lora_diffusion.analysis.trials import load_trials

    uri = soaked["uri"]
    df = load_trials(uri, NAME)  # every cell x seed exactly once, finished; the report on the parent run
    assert len(df) == 4 and set(df["status"]) == {"FINISHED"} and (df["n_runs"] == 1).all()
    client, parent = MlflowClient(uri), df.attrs["parent_run_id"]
    logged = {f.path for f in client.list_artifacts(parent, "ablation")}
    assert {"ablation/grid.parquet", "ablation/trials.parquet", "ablation/summary.md", "ablation/pareto.png",
            "ablation/heatmap_trajectory.rank__trajectory.rank_schedule.png"} <= logged, logged
    assert client.get_run(parent).data.tags["ablation.axes"] == "trajectory.rank,trajectory.rank_schedule"

    # the table, rebuilt from MLflow with the axes and reference the grid tagged its parent with
    table = pd.read_parquet(write_report(uri, NAME, None, None, tmp_path / "report", log_to_mlflow=False)["grid"])
    expected = _direct_accuracies(soaked["grid"])
    assert len(table) == 4
    for _, row in table.iterrows():
        rank, sched = int(row["trajectory.rank"]), row["trajectory.rank_schedule"]
        vals = [expected[(rank, sched, s)] for s in SEEDS]
        assert row["n"] == len(SEEDS) and row["n_failed"] == 0, row.to_dict()
        assert math.isclose(row["mean"], sum(vals) / len(SEEDS), abs_tol=1e-9), (rank, sched, row["mean"], vals)
        ref = [expected[(rank, "constant", s)] for s in SEEDS]
        assert math.isclose(row["diff_mean"], (sum(vals) - sum(ref)) / len(SEEDS), abs_tol=1e-9)
        assert row["step_time_s"] > 0 and row["trainable_params"] > 0
