"""A failed trial retried (`--retry-failed N`, or the sweep file's `max_trial_retries`), end to end
on a local Ray with tests/support/faults injecting the failure:

- transient: the Train worker exits once at step DIE_AT and the Train run has no worker restarts
  of its own (--max-failures 0), so the Tune trial fails; retried once, it continues from its
  last Train checkpoint (before DIE_AT), finishes, and keeps its one MLflow run, tagged with two
  attempts and the first attempt's failure reason, its step axis one increasing sequence;
- permanent: every step's loss is NaN, so every attempt fails: after N + 1 attempts the trial is
  FAILED with the divergence guard's line, its run tagged with N + 1 attempts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_diffusion.engine.callbacks import ATTEMPTS_TAG, FAILURE_TAG
from support.procs import REPO, kill_session

STEPS, EVERY, DIE_AT = 6, 2, 4


def _sweep(tmp_path: Path, name: str, backbone, data_dir, fault_env: dict, *extra) -> tuple[int, str]:
    env = {**os.environ, "LORA_DIFFUSION_DATA_DIR": str(data_dir), **fault_env,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "tests" / "support" / "faults"),
                                                     os.environ.get("PYTHONPATH")) if p)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "jobs/rank_schedule_sweep.py", "--smoke", "--name", name, "--num-samples", "1",
           "--max-concurrent", "1", "--max-failures", "0", "--address", "local",
           "--storage-path", str(tmp_path / "sweeps"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
           "--verbose", "0", "--retrain-seeds", "0", "--set", f"backbone={backbone}",
           "--set", f"train.steps={STEPS}", "--set", f"train.eval_every={EVERY}", *extra]
    log = tmp_path / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=300)
    finally:
        kill_session(proc.pid)  # Ray's processes, if it hung
    return rc, log.read_text()


def _trial_runs(tmp_path: Path, name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("lora-diffusion-sweeps")
    runs = client.search_runs([exp.experiment_id], f"tags.sweep = '{name}'")
    return client, [r for r in runs if r.data.tags["role"] == "trial"]


@pytest.mark.slow
def test_a_trial_that_failed_once_is_retried_from_its_checkpoint_on_its_run(tiny_backbone_dir,
                                                                            synthetic_data_dir, tmp_path):
    marker = tmp_path / "died"
    rc, log = _sweep(tmp_path, "transient", tiny_backbone_dir, synthetic_data_dir,
                     {"LORA_DIFFUSION_TEST_KILL_WORKER": f"0:{DIE_AT}:{marker}"}, "--retry-failed", "1")
    assert marker.is_file(), log[-3000:]  # the fault happened
    assert rc == 0, log[-5000:]
    client, (run,) = _trial_runs(tmp_path, "transient")  # one run, not one per attempt
    assert run.info.status == "FINISHED"
    assert run.data.tags[ATTEMPTS_TAG] == "2"
    assert run.data.tags[f"attempt.1.{FAILURE_TAG}"], run.data.tags
    assert FAILURE_TAG not in run.data.tags  # it did not fail in the end
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS, steps  # one increasing axis to the end
    resumed = client.get_metric_history(run.info.run_id, "resumed_from_step")
    assert 0 < max(m.value for m in resumed) < DIE_AT  # continued from its checkpoint, not from 0


@pytest.mark.slow
def test_a_trial_that_fails_every_time_is_failed_after_n_plus_one_attempts(tiny_backbone_dir,
                                                                            synthetic_data_dir, tmp_path):
    rc, log = _sweep(tmp_path, "permanent", tiny_backbone_dir, synthetic_data_dir,
                     {"LORA_DIFFUSION_TEST_NAN_AT": "1"}, "--retry-failed", "2")
    assert rc == 1, log[-5000:]
    _, (run,) = _trial_runs(tmp_path, "permanent")
    assert run.info.status == "FAILED"
    assert run.data.tags[ATTEMPTS_TAG] == "3"
    assert run.data.tags[FAILURE_TAG].startswith("training diverged at step 1: loss nan"), run.data.tags
    assert run.data.tags[f"attempt.2.{FAILURE_TAG}"].startswith("training diverged"), run.data.tags
