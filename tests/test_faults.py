"""Faults inside a sweep, without Ray: a diverging trial stops with one line naming the step and
the loss, that line becomes the trial's `failure_reason` in MLflow, a failed (or NaN) trial is
never the sweep's best, a sweep whose every trial failed says so and writes no best.json, and a
sweep that died before its first trial can be rerun under its name.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lora_diffusion.core.errors import TrainingDiverged
from lora_diffusion.engine import spec as spec_lib, sweep
from lora_diffusion.engine.callbacks import ATTEMPTS_TAG, FAILURE_TAG, MlflowSweepCallback, failure_reason
from lora_diffusion.engine.options import build_parser
from lora_diffusion.engine.spec import METRIC
from lora_diffusion.engine.storage import SweepStorage
from lora_diffusion.engine.tracking import SweepTracker
from support.procs import kill_session


def test_a_nan_loss_stops_training_with_one_line_naming_step_and_loss(tiny_config):
    from lora_diffusion.core.recipe import Recipe

    recipe = Recipe(tiny_config())
    recipe.train_step()
    with torch.no_grad():
        next(iter(recipe.method.trainable().values())).fill_(float("nan"))
    before = {k: v.clone() for k, v in recipe.method.trainable().items()}
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 2: loss nan"):
        recipe.train_step()
    assert recipe.step == 1  # the step did not happen: the optimizer never saw the NaN
    for k, v in recipe.method.trainable().items():
        assert torch.equal(v.isnan(), before[k].isnan())


TRACEBACK = """Traceback (most recent call last):
  File "ray/tune/trainable/function_trainable.py", line 261, in _trainable_func
ray.train.v2.api.exceptions.WorkerGroupError: Training failed due to worker errors:
[Rank 0 Error Snippet]:
Traceback (most recent call last):
  File "platform/lora_diffusion/core/recipe.py", line 215, in train_step
    raise TrainingDiverged(f"training diverged at step {self.step + 1}: loss {float(loss):g}, "
lora_diffusion.core.errors.TrainingDiverged: training diverged at step 7: loss nan, regularizer 0
"""


@pytest.mark.parametrize("text, reason", [
    (TRACEBACK, "training diverged at step 7: loss nan, regularizer 0"),
    ("Traceback...\n  File x\nValueError: bad shape\n\n", "ValueError: bad shape"),
    ("Traceback...\nray.exceptions.RayTaskError(KeyError): oops\n", "RayTaskError(KeyError): oops"),
    ("worker died\n", "worker died"),
    ("", "unknown error (no error text)"),
])
def test_failure_reason_is_one_line_of_the_traceback(text, reason):
    assert failure_reason(text) == reason


def _result(metric, error=None, tid="t"):
    metrics = {"trial_id": tid, "step": 4} if metric is None else {"trial_id": tid, "step": 4, METRIC: metric}
    return SimpleNamespace(metrics=metrics, error=error, config={"trajectory.rank": 4})


def test_best_trial_is_a_completed_trial_with_a_finite_metric():
    results = [_result(0.99, error=RuntimeError("died after reporting"), tid="failed"),
               _result(float("nan"), tid="nan"), _result(float("inf"), tid="inf"), _result(None, tid="none"),
               _result(0.6, tid="ok"), _result(0.7, tid="best")]
    assert sweep.best_result(results).metrics["trial_id"] == "best"
    assert sweep.best_result(results[:4]) is None


@pytest.fixture
def tracker(tmp_path):
    return SweepTracker(f"sqlite:///{tmp_path}/mlflow.db", "faults", sweep_id="faults-0")


def test_every_trial_failed_fails_the_sweep_and_writes_no_best_json(tracker, tmp_path, capsys):
    class Results(list):
        num_errors = 2

    failed = [_result(0.9, error=RuntimeError("x"), tid="a"), _result(None, error=RuntimeError("y"), tid="b")]
    spec = SimpleNamespace(name="faults", metric="validation/accuracy", storage=str(tmp_path / "sweeps"), fixed={},
                           sweep=SimpleNamespace(num_samples=2))
    ends = SimpleNamespace(finished=lambda: 0)
    callback = MlflowSweepCallback(tracker, resolve=None)
    rc = sweep._summarise(Results(failed), spec, callback, ends, wall=1.0)
    assert rc == 1
    assert not (tmp_path / "sweeps" / "faults" / "best.json").exists()
    assert "every trial failed (2 of 2)" in capsys.readouterr().err
    (parent,) = tracker.find_runs(role="sweep")
    assert parent.info.status == "FAILED"
    assert parent.data.tags[FAILURE_TAG] == "every trial failed (2 of 2)"
    assert "best_trial_id" not in parent.data.tags


def test_a_failed_trial_records_its_reason_on_its_run(tracker, tmp_path):
    error_file = tmp_path / "error.txt"
    error_file.write_text(TRACEBACK)
    trial = SimpleNamespace(trial_id="t1", config={"train.lr": 1e-3}, last_result={},
                            get_error=lambda: error_file.read_text())
    callback = MlflowSweepCallback(tracker, resolve=lambda config: ({"train.lr": 1e-3}, {}))
    callback.on_trial_error(iteration=1, trials=[trial], trial=trial)
    (run,) = tracker.trial_runs()
    assert run.info.status == "FAILED"
    assert run.data.tags[FAILURE_TAG] == "training diverged at step 7: loss nan, regularizer 0"


def test_a_failed_trials_reason_is_read_before_tune_syncs_it_to_storage(tracker, tmp_path):
    """At `on_trial_error` the error file is only in the driver's staging directory (`error_file`);
    `get_error` reads storage, where it is not yet."""
    error_file = tmp_path / "staging" / "error.txt"
    error_file.parent.mkdir()
    error_file.write_text("Failure # 1 (occurred at 2026-01-01)\n" + TRACEBACK)
    trial = SimpleNamespace(trial_id="t2", config={"train.lr": 1e-3}, last_result={}, error_file=str(error_file),
                            get_error=lambda: None)
    callback = MlflowSweepCallback(tracker, resolve=lambda config: ({"train.lr": 1e-3}, {}))
    callback.on_trial_error(iteration=1, trials=[trial], trial=trial)
    (run,) = tracker.trial_runs()
    assert run.data.tags[FAILURE_TAG] == "training diverged at step 7: loss nan, regularizer 0"


def test_a_retried_trial_counts_its_attempts_and_keeps_each_reason_on_one_run(tracker, tmp_path):
    """--retry-failed: Tune recovers a failed trial (`on_trial_recover`) before it runs again; its one
    run counts the attempts and keeps why each earlier one failed; the last failure ends it FAILED."""
    error_file = tmp_path / "error.txt"
    error_file.write_text(TRACEBACK)
    trial = SimpleNamespace(trial_id="t3", config={"train.lr": 1e-3}, last_result={}, num_failures=0,
                            error_file=str(error_file), get_error=lambda: None)
    callback = MlflowSweepCallback(tracker, resolve=lambda config: ({"train.lr": 1e-3}, {}))
    callback.on_trial_start(iteration=1, trials=[trial], trial=trial)
    for failures in (1, 2):
        trial.num_failures = failures
        callback.on_trial_recover(iteration=1, trials=[trial], trial=trial)
        callback.on_trial_start(iteration=1, trials=[trial], trial=trial)
    (run,) = tracker.trial_runs()
    assert run.info.status == "RUNNING" and run.data.tags[ATTEMPTS_TAG] == "3"
    assert run.data.tags[f"attempt.2.{FAILURE_TAG}"] == "training diverged at step 7: loss nan, regularizer 0"
    trial.num_failures = 3
    callback.on_trial_error(iteration=1, trials=[trial], trial=trial)
    (run,) = tracker.trial_runs()
    assert run.info.status == "FAILED" and run.data.tags[ATTEMPTS_TAG] == "3"


def test_retries_come_from_the_command_line_over_the_sweep_file(tmp_path, synthetic_data_dir, monkeypatch):
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(synthetic_data_dir))
    grid = tmp_path / "grid_retries.yaml"
    grid.write_text("grid:\n  trajectory.rank: [2, 4]\nseeds: [0]\nsweep: {max_trial_retries: 2}\n")
    spec = spec_lib.prepare(_args(tmp_path / "s", "--space", str(grid)))
    assert spec.sweep.max_trial_retries == 2
    spec = spec_lib.prepare(_args(tmp_path / "s", "--space", str(grid), "--retry-failed", "0"))
    assert spec.sweep.max_trial_retries == 0
    assert spec_lib.prepare(_args(tmp_path / "s")).sweep.max_trial_retries == 0  # default: none


def _args(storage: Path, *extra):
    return build_parser("rank_schedule").parse_args(
        ["--smoke", "--name", "early", "--storage-path", str(storage), "--tracking-uri",
         f"sqlite:///{storage}/m.db", *extra])


def test_a_sweep_that_died_before_its_first_trial_reruns_under_its_name(tmp_path, synthetic_data_dir,
                                                                        monkeypatch):
    """sweep.json written, then Ray or MLflow failed: no experiment state. The same command
    without --resume starts it afresh, and --resume starts it from its saved spec."""
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(synthetic_data_dir))
    storage = tmp_path / "sweeps"
    first = spec_lib.prepare(_args(storage))
    SweepStorage(storage).write_text(f"early/{spec_lib.SPEC_FILE}", first.to_json())
    (storage / "early" / "tuner.pkl").write_bytes(b"written by Tuner(), before any trial")
    assert not spec_lib.started(SweepStorage(storage), "early")
    assert spec_lib.prepare(_args(storage)).name == "early"  # no "already exists"
    assert spec_lib.prepare(_args(storage, "--resume")).sweep_id == first.sweep_id

    (storage / "early" / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    assert spec_lib.started(SweepStorage(storage), "early")
    with pytest.raises(spec_lib.UserError, match="already exists"):
        spec_lib.prepare(_args(storage))


def test_smoke_on_a_grid_says_what_it_changed(tmp_path, synthetic_data_dir, monkeypatch):
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(synthetic_data_dir))
    grid = tmp_path / "grid_x.yaml"
    grid.write_text("fixed: {train.steps: 300}\ngrid:\n  trajectory.rank: [2, 4, 8]\nseeds: [0, 1, 2]\n")
    spec = spec_lib.prepare(_args(tmp_path / "sweeps", "--space", str(grid)))
    note = spec_lib.smoke_note(spec)
    assert "trajectory.rank 3->2 values" in note and "seeds 3->2" in note and "train.steps 300->6" in note
    assert spec.sweep.num_samples == 4 and math.isfinite(spec.steps)


@pytest.mark.slow
def test_a_sweep_whose_every_trial_diverges_fails_without_a_best_trial(tiny_backbone_dir, synthetic_data_dir,
                                                                      tmp_path):
    """End to end on Ray: every trial's loss is NaN from its first step (tests/support/faults), so the
    divergence guard stops each one: the sweep exits 1, its parent run is FAILED with the reason, each
    trial's run FAILED with the guard's line, and no best.json is written."""
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    repo = Path(__file__).resolve().parents[1]
    storage, uri = tmp_path / "sweeps", f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "LORA_DIFFUSION_DATA_DIR": str(synthetic_data_dir), "LORA_DIFFUSION_TEST_NAN_AT": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(repo / "tests" / "support" / "faults"),
                                                     os.environ.get("PYTHONPATH")) if p)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "jobs/rank_schedule_sweep.py", "--smoke", "--name", "diverges", "--num-samples", "2",
           "--max-concurrent", "2", "--max-failures", "0", "--address", "local", "--storage-path", str(storage),
           "--tracking-uri", uri, "--verbose", "0", "--retrain-seeds", "0", "--set", f"backbone={tiny_backbone_dir}",
           "--set", "train.steps=2", "--set", "train.eval_every=1"]
    with open(tmp_path / "sweep.log", "w") as f:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=300)
    finally:
        kill_session(proc.pid)  # Ray's processes, if it hung
    log = (tmp_path / "sweep.log").read_text()
    assert rc == 1, log[-5000:]
    assert "sweep diverges FAILED: every trial failed (2 of 2); no best trial" in log, log[-3000:]
    assert not (storage / "diverges" / "best.json").exists()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lora-diffusion-sweeps").experiment_id],
                              "tags.sweep = 'diverges'")
    (parent,) = [r for r in runs if r.data.tags["role"] == "sweep"]
    assert parent.info.status == "FAILED" and parent.data.tags[FAILURE_TAG] == "every trial failed (2 of 2)"
    assert "best_trial_id" not in parent.data.tags
    trials = [r for r in runs if r.data.tags["role"] == "trial"]
    assert len(trials) == 2 and {r.info.status for r in trials} == {"FAILED"}
    for r in trials:
        assert r.data.tags[FAILURE_TAG].startswith("training diverged at step 1: loss nan"), r.data.tags[FAILURE_TAG]


def _tune_trial(exp_dir: Path, tid: str, steps: list[int], final: bool) -> None:
    import json

    d = exp_dir / f"run_trial_{tid}"
    d.mkdir(parents=True)
    rows = [{"trial_id": tid, "step": s, "train/loss": 1.0 / s, "resumed_from_step": 0, "timestamp": s} for s in steps]
    if final:
        rows[-1]["result_json"] = "{}"
    d.joinpath("result.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"trial_id\": ")  # torn line


def test_the_fault_matrix_counts_lost_duplicated_running_and_missing(tmp_path):
    """Three trials, each with one fault the soak looks for: a metric reported but not logged, a
    second MLflow run, a run left RUNNING; a fourth trial never started. The soak's clean verdict
    must rest on figures that would show these."""
    import json

    from lora_diffusion.analysis import fault_matrix as fm

    exp_dir, uri = tmp_path / "sweeps" / "soaked", f"sqlite:///{tmp_path}/mlflow.db"
    state = {"trial_data": [[json.dumps({"trial_id": t, "status": s})] for t, s in
                            (("a", "TERMINATED"), ("b", "TERMINATED"), ("c", "RUNNING"))]}
    exp_dir.mkdir(parents=True)
    (exp_dir / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))
    for tid in "abc":
        _tune_trial(exp_dir, tid, [2, 4], final=tid != "c")
    tracker = SweepTracker(uri, "soaked", sweep_id="soaked-0")
    for tid, steps in {"a": [2], "b": [2, 4], "c": [2, 4]}.items():  # a: step 4 reported, never logged
        run = tracker.trial_run(tid)
        for step in steps:
            tracker.client.log_metric(run, "train/loss", 1.0 / step, step=step)
        if tid != "c":  # c: left RUNNING
            tracker.end_run(run)
    second = tracker.client.create_run(tracker.experiment_id, tags={"sweep": "soaked", "sweep_id": "soaked-0",
                                                                    "role": "trial", "trial_id": "b"})
    tracker.end_run(second.info.run_id)  # b: a second run, as a tracker that did not re-attach would make
    tracker.end_run(tracker.parent_run())

    per_trial = fm.trial_faults(exp_dir, uri, "soaked", expected_trials=4)
    assert per_trial["trials"]["a"] == {"lost": 0, "duplicated": 0, "running": 0, "metrics_lost": 1}
    assert per_trial["trials"]["b"]["duplicated"] == 1
    assert per_trial["trials"]["c"] == {"lost": 1, "duplicated": 0, "running": 1, "metrics_lost": 0}
    rows = fm.fault_matrix(per_trial, [{"fault": "driver SIGKILL", "touched": ["a", "c"]}])
    assert rows[0] == {"fault": "driver SIGKILL", "injected": 1, "trials_lost": 1, "runs_duplicated": 0,
                       "runs_left_running": 1, "metrics_lost": 1}
    assert rows[-1] == {"fault": "whole sweep", "injected": 1, "trials_lost": 2, "runs_duplicated": 1,
                        "runs_left_running": 1, "metrics_lost": 1}
    assert not fm.clean(rows) and "| driver SIGKILL | 1 | 1 | 0 | 1 | 1 |" in fm.markdown(rows)


def test_the_soak_keeps_reports_a_resume_rewrites(tmp_path):
    """A resumed driver starts a restarted trial's result.json afresh: the reports seen before stay counted."""
    from lora_diffusion.experiments.soak import SoakPlan, observe

    plan = SoakPlan(job=[], name="s", storage=tmp_path, tracking_uri="sqlite:///unused.db")
    _tune_trial(tmp_path / "s", "a", [2, 4], final=False)
    observe(plan)
    result = tmp_path / "s" / "run_trial_a" / "result.json"
    result.write_text('{"trial_id": "a", "step": 6, "train/loss": 0.5, "resumed_from_step": 4, "timestamp": 9}\n')
    observe(plan)
    assert plan.seen["a"]["reported"] == {("train/loss", 2), ("train/loss", 4), ("train/loss", 6)}
    assert plan.seen["a"]["resumed"] == {0, 4} and len(plan.seen["a"]["rows"]) == 3


def test_the_soak_starts_again_a_driver_that_died_in_rays_node_start(tmp_path, monkeypatch):
    """Ray's 30 s node-start wait fails on a loaded machine before anything of the sweep starts:
    the soak resumes that start (counted), up to its limit; a driver that failed otherwise, or
    still runs, is left alone."""
    from lora_diffusion.experiments import soak

    plan = soak.SoakPlan(job=[], name="s", storage=tmp_path, tracking_uri="sqlite:///unused.db")
    log = tmp_path / "start.log"
    log.write_text("Traceback ...\nException: The current node timed out during startup. This could happen\n")
    died, running = SimpleNamespace(pid=1, poll=lambda: 1), SimpleNamespace(pid=1, poll=lambda: None)
    starts = []
    monkeypatch.setattr(soak, "kill_session", lambda pid: None)
    monkeypatch.setattr(soak, "start_driver", lambda p, resume, n: starts.append((resume, n)) or ("proc", "log"))
    assert soak._started_again(plan, running, log, 3) is None
    for retry in range(soak.MAX_START_RETRIES):
        assert soak._started_again(plan, died, log, 3 + retry) == ("proc", "log", 4 + retry)
    assert soak._started_again(plan, died, log, 9) is None  # the retries are spent
    assert plan.start_retries == soak.MAX_START_RETRIES and starts[0] == (True, 4)
    log.write_text("Traceback ...\nValueError: something else\n")
    assert not soak.ray_start_failed(died, log)


def test_a_grid_files_data_dir_wins_over_the_environment_and_set_over_both(tmp_path, synthetic_data_dir,
                                                                            monkeypatch):
    """$LORA_DIFFUSION_DATA_DIR is a default, as for `lora-diffusion train`; not an override."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(elsewhere))
    grid = tmp_path / "grid_x.yaml"
    grid.write_text(f"fixed: {{data_dir: {synthetic_data_dir}}}\ngrid:\n  trajectory.rank: [2]\n")
    assert spec_lib.prepare(_args(tmp_path / "a", "--space", str(grid))).fixed["data_dir"] == str(synthetic_data_dir)
    grid.write_text("grid:\n  trajectory.rank: [2]\n")
    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(synthetic_data_dir))
    assert spec_lib.prepare(_args(tmp_path / "b", "--space", str(grid))).fixed["data_dir"] == str(
        synthetic_data_dir.resolve())


def test_a_local_ray_start_that_times_out_is_started_again_and_other_errors_are_not(monkeypatch, capsys):
    import ray

    from lora_diffusion.engine import tuner

    calls, stopped = [], []
    def flaky_init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise Exception(tuner.RAY_START_TIMEOUT + ". This could happen because ...")
    monkeypatch.setattr(ray, "init", flaky_init)
    monkeypatch.setattr(tuner, "stop_half_started_ray", lambda: stopped.append(1))
    tuner.init_ray("local")
    assert len(calls) == 2 and stopped == [1] and "starting it again" in capsys.readouterr().err

    def broken_init(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("something else")
    calls.clear()
    monkeypatch.setattr(ray, "init", broken_init)
    with pytest.raises(RuntimeError, match="something else"):
        tuner.init_ray("local")
    assert len(calls) == 1

    def always_late(**kwargs):
        calls.append(kwargs)
        raise Exception(tuner.RAY_START_TIMEOUT)
    calls.clear()
    monkeypatch.setattr(ray, "init", always_late)
    with pytest.raises(Exception, match="timed out during startup"):
        tuner.init_ray("local")
    assert len(calls) == tuner.LOCAL_START_ATTEMPTS


def test_a_half_started_rays_processes_are_killed_and_nothing_else():
    import subprocess
    import sys

    from lora_diffusion.engine import tuner

    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    ray_like = subprocess.Popen(sleep + ["/venv/lib/site-packages/ray/dashboard/dashboard.py"])
    other = subprocess.Popen(sleep + ["/home/ray/an-unrelated-child"])  # "ray" in a path is not Ray
    try:
        tuner.stop_half_started_ray()
        assert ray_like.wait(timeout=10) is not None
        assert other.poll() is None
    finally:
        for p in (ray_like, other):
            p.kill()
            p.wait()
