"""Kill a running sweep's driver (SIGKILL to its process group) and resume it with --resume.

After the resume: every trial finished exactly once, one MLflow child run per trial and none left
RUNNING, each run's steps one increasing sequence, the Optuna study kept its earlier trials, and
no Ray process of ours is left behind.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import signal
import sys
import time
from pathlib import Path

import pytest
from support.procs import kill_session, start_driver

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 60, 10


def trial_results(exp_dir: Path) -> dict[str, list[dict]]:
    """trial id -> its Tune results (result.json lines, across restarts)."""
    out = {}
    for f in glob.glob(str(exp_dir / "run_trial_*" / "result.json")):
        rows = []
        for line in Path(f).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line being written
        if rows:  # Optuna's trial ids are "86590df9", grid search's "3c563_00001": read, don't parse
            out[rows[0]["trial_id"]] = rows
    return out


def trial_status(exp_dir: Path) -> dict[str, str]:
    """trial id -> status in the latest saved experiment state."""
    files = sorted(glob.glob(str(exp_dir / "experiment_state-*.json")))
    if not files:
        return {}
    try:
        state = json.loads(Path(files[-1]).read_text())
    except (json.JSONDecodeError, OSError):
        return {}
    out = {}
    for item in state["trial_data"]:
        t = json.loads(item[0])
        out[t["trial_id"]] = t["status"]
    return out


def sweep_cmd(storage, uri, backbone, *extra):
    return [sys.executable, "jobs/rank_schedule_sweep.py", "--smoke", "--name", "resume-test",
            "--num-samples", "4", "--workers", "2", "--max-concurrent", "2", "--address", "local",
            "--storage-path", str(storage), "--tracking-uri", uri, "--verbose", "0",
            "--set", f"backbone={backbone}", "--set", f"train.steps={STEPS}",
            "--set", f"train.eval_every={EVERY}", *extra]


@pytest.mark.slow
def test_kill_driver_then_resume(tiny_backbone_dir, synthetic_data_dir, tmp_path):
    storage, uri = tmp_path / "sweeps", f"sqlite:///{tmp_path}/mlflow.db"
    exp_dir = storage / "resume-test"
    env = {**os.environ, "LORA_DIFFUSION_DATA_DIR": str(synthetic_data_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    sessions = []
    t_start = time.time()
    try:
        proc = start_driver(sweep_cmd(storage, uri, tiny_backbone_dir), tmp_path / "first.log", env, sessions)
        deadline = time.time() + 240
        killed_midway = None
        while time.time() < deadline and proc.poll() is None:
            status, results = trial_status(exp_dir), trial_results(exp_dir)
            done = [t for t, s in status.items() if s == "TERMINATED"]
            midway = [t for t, s in status.items() if s == "RUNNING" and results.get(t)
                      and not any("result_json" in r for r in results[t])
                      and max(r["step"] for r in results[t]) < STEPS]
            if done and midway:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_midway = {t: max(r["step"] for r in results[t]) for t in midway}
                break
            time.sleep(0.3)
        proc.wait(timeout=30)
        kill_session(proc.pid)
        assert killed_midway, "never saw a finished and a running trial: " + (tmp_path / "first.log").read_text()[-3000:]
        before = trial_status(exp_dir)
        optuna_before = _study(exp_dir)

        # (that the same name without --resume refuses is tested in test_search_space.py)
        t_kill = time.time()
        proc2 = start_driver(sweep_cmd(storage, uri, tiny_backbone_dir, "--resume"), tmp_path / "resume.log",
                             env, sessions)
        rc = proc2.wait(timeout=300)
        print(f"first run until the kill: {t_kill - t_start:.0f} s, resume: {time.time() - t_kill:.0f} s")
        out = (tmp_path / "resume.log").read_text()
        assert rc == 0, out[-5000:]
    finally:
        for sid in sessions:
            kill_session(sid)

    # -- Tune: every trial terminated, each final report at most once (ASHA may stop a trial early)
    status, results = trial_status(exp_dir), trial_results(exp_dir)
    assert len(status) == 4 and set(status.values()) == {"TERMINATED"}, status
    for tid, rows in results.items():
        finals = [r for r in rows if "result_json" in r]
        assert len(finals) <= 1, (tid, len(finals))
    for tid in killed_midway:  # the interrupted trial continued from its Train checkpoint
        resumed = [r["resumed_from_step"] for r in results[tid]]
        assert max(resumed) > 0, resumed
    for tid, s in before.items():
        if s == "TERMINATED":  # finished before the kill: not run again
            assert all(r["resumed_from_step"] == 0 for r in results[tid])

    # -- Optuna: the study kept the trials it had and knows all four now
    optuna_after = _study(exp_dir)
    assert len(optuna_after.trials) == 4
    for old in optuna_before.trials:
        assert optuna_after.trials[old.number].params == old.params
    assert sum(t.state.name == "COMPLETE" for t in optuna_before.trials) >= 1

    # -- MLflow: one parent, one child per trial, none RUNNING, steps continuous
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lora-diffusion-sweeps")
    runs = client.search_runs([exp.experiment_id], "tags.sweep = 'resume-test'")
    parents = [r for r in runs if r.data.tags.get("role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags["trial_id"] for r in children) == sorted(status)
    for r in children:
        assert r.info.status == "FINISHED", (r.data.tags["trial_id"], r.info.status)
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        for key in ("train/loss", "validation/accuracy"):
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert steps == list(range(EVERY, EVERY * len(steps) + 1, EVERY)), (key, steps)
        assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["result.json"]
        assert "accounting/trainable_params" in r.data.metrics
        assert r.data.params["trajectory.rank_schedule"] and r.data.tags["code_version"]
    print(f"mlflow: {len(parents)} parent, {len(children)} child runs, statuses "
          f"{sorted(r.info.status for r in children)}; killed midway: {killed_midway}")


def _study(exp_dir: Path):
    files = sorted(glob.glob(str(exp_dir / "searcher-state-*.pkl")))
    assert files, "no searcher state saved"
    with open(files[-1], "rb") as f:
        state = pickle.load(f)
    searcher = state["searcher"] if isinstance(state, dict) and "searcher" in state else state
    if isinstance(searcher, dict) and "_ot_study" in searcher:
        return searcher["_ot_study"]
    return _find_study(searcher)


def _find_study(obj, depth=0):
    import optuna

    if isinstance(obj, optuna.Study):
        return obj
    if depth > 4:
        return None
    items = obj.values() if isinstance(obj, dict) else getattr(obj, "__dict__", {}).values()
    for v in items:
        found = _find_study(v, depth + 1)
        if found is not None:
            return found
    return None


@pytest.mark.slow
def test_ctrl_c_while_the_last_trials_run_is_an_interrupt_not_a_finished_sweep(tiny_backbone_dir, synthetic_data_dir,
                                                                                 tmp_path):
    """SIGINT to the driver once every trial has started and none has ended. Tune stops the running
    trials and marks them TERMINATED: the sweep must still say it was interrupted, count only the
    trials that ended, exit non-zero without writing the report, and finish on --resume."""
    storage, uri = tmp_path / "sweeps", f"sqlite:///{tmp_path}/mlflow.db"
    exp_dir = storage / "resume-test"
    env = {**os.environ, "LORA_DIFFUSION_DATA_DIR": str(synthetic_data_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = sweep_cmd(storage, uri, tiny_backbone_dir) + ["--num-samples", "2"]  # both trials start at once
    sessions = []
    try:
        proc = start_driver(cmd, tmp_path / "first.log", env, sessions)
        deadline, sent = time.time() + 240, False
        while time.time() < deadline and proc.poll() is None:
            results = trial_results(exp_dir)
            if len(results) == 2 and not any("result_json" in r for rows in results.values() for r in rows):
                os.kill(proc.pid, signal.SIGINT)  # Ctrl-C reaches the driver; Tune handles it
                sent = True
                break
            time.sleep(0.3)
        rc = proc.wait(timeout=120)
        out = (tmp_path / "first.log").read_text()
        assert sent, "never saw both trials running: " + out[-3000:]
        ended = sum(any("result_json" in r for r in rows) for rows in trial_results(exp_dir).values())
        assert rc == 1, out[-5000:]
        assert f"interrupted ({ended} of 2 trials finished)" in out, out[-3000:]
        assert "ablation report" not in out

        proc2 = start_driver(cmd + ["--resume"], tmp_path / "resume.log", env, sessions)
        rc = proc2.wait(timeout=300)
        assert rc == 0, (tmp_path / "resume.log").read_text()[-5000:]
    finally:
        for sid in sessions:
            kill_session(sid)
    status, results = trial_status(exp_dir), trial_results(exp_dir)
    assert len(status) == 2 and set(status.values()) == {"TERMINATED"}, status
    for tid, rows in results.items():
        assert sum("result_json" in r for r in rows) <= 1, tid
