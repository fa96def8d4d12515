"""The sweep's store made read-only mid-sweep (a full or remounted disk), end to end on a local Ray:
the trial's Train worker pauses before it reports step PAUSE_AT (tests/support/faults), the
sweep's directory is remounted read-only (a bind mount: root ignores file modes; without mount
rights the test uses modes, and skips where neither stops a write), and the worker goes on.

Promised: the sweep ends with one clear error line naming the path it could not write; nothing it
half-wrote is read back (the resumed trial continues from a checkpoint that was whole); once the
store is writable again, `--resume` finishes the sweep with the trial's one MLflow run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.procs import REPO, kill_session

STEPS, EVERY, PAUSE_AT = 6, 2, 4
NAME = "read-only"


@contextlib.contextmanager
def read_only(directory: Path):
    """`directory` made read-only while the block runs: a read-only bind mount of itself (root),
    else its modes; pytest.skip where a write still succeeds."""
    mounted = os.geteuid() == 0 and subprocess.run(
        ["sh", "-c", f"mount --bind '{directory}' '{directory}' && mount -o remount,bind,ro '{directory}'"],
        capture_output=True).returncode == 0
    modes = {}
    if not mounted:
        subprocess.run(["umount", str(directory)], capture_output=True)  # a bind that did not go ro
        modes = {p: p.stat().st_mode for p in [directory, *directory.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
    try:
        with contextlib.suppress(OSError):
            (directory / ".probe").write_text("x")
            pytest.skip("cannot make a directory read-only here (root without mount rights)")
        yield
    finally:
        if mounted:
            subprocess.run(["umount", str(directory)], check=True)
        for p, mode in modes.items():
            p.chmod(mode)


def _start(tmp_path: Path, backbone, data_dir, *extra, pause: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "LORA_DIFFUSION_DATA_DIR": str(data_dir),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "tests" / "support" / "faults"),
                                                     os.environ.get("PYTHONPATH")) if p)}
    if pause:
        env["LORA_DIFFUSION_TEST_PAUSE_AT"] = f"{PAUSE_AT}:{pause}"
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "jobs/rank_schedule_sweep.py", "--smoke", "--name", NAME, "--num-samples", "1",
           "--max-concurrent", "1", "--max-failures", "0", "--address", "local",
           "--storage-path", str(tmp_path / "sweeps"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
           "--verbose", "0", "--retrain-seeds", "0", "--set", f"backbone={backbone}",
           "--set", f"train.steps={STEPS}", "--set", f"train.eval_every={EVERY}", *extra]
    log = open(tmp_path / f"sweep{'-resume' if '--resume' in extra else ''}.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        kill_session(proc.pid)  # Ray's processes, if it hung


@pytest.mark.slow
def test_a_store_made_read_only_mid_sweep_is_named_and_the_sweep_resumes(tiny_backbone_dir,
                                                                        synthetic_data_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    pause = tmp_path / "paused"
    proc = _start(tmp_path, tiny_backbone_dir, synthetic_data_dir, pause=pause)
    deadline = time.time() + 240
    while not pause.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert pause.exists(), (tmp_path / "sweep.log").read_text()[-3000:]
    sweep_dir = tmp_path / "sweeps" / NAME
    with read_only(sweep_dir):
        pause.unlink()  # the worker reports step PAUSE_AT into a read-only store
        rc = _wait(proc, 240)
    log = (tmp_path / "sweep.log").read_text()
    assert rc != 0, log[-5000:]
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert errors and "--storage-path" in errors[-1] and str(sweep_dir) in errors[-1], log[-5000:]
    assert "--resume" in errors[-1]
    rc = _wait(_start(tmp_path, tiny_backbone_dir, synthetic_data_dir, "--resume"), 300)
    log = (tmp_path / "sweep-resume.log").read_text()
    assert rc == 0, log[-5000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("lora-diffusion-sweeps")
    runs = client.search_runs([exp.experiment_id], f"tags.sweep = '{NAME}'")
    (trial,) = [r for r in runs if r.data.tags["role"] == "trial"]
    (parent,) = [r for r in runs if r.data.tags["role"] == "sweep"]
    assert trial.info.status == "FINISHED" and parent.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(trial.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS, steps
    resumed = client.get_metric_history(trial.info.run_id, "resumed_from_step")
    assert 0 < max(m.value for m in resumed) < PAUSE_AT  # the whole checkpoint before the fault
