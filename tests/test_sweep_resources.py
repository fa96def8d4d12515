"""A sweep whose trials ASHA stops frees their resources for the next trials: Ray Train's
PlacementGroupCleaner (which removes a killed trial's worker-group placement group) can reach
the State API of the sweep's own local Ray, even with another Ray instance on the machine, so no
trial waits for a worker group a stopped trial still holds (`WorkerGroupStartupTimeoutError`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def other_ray(tmp_path):
    """Another Ray instance on the machine, as beside other users' sweeps."""
    code = "import ray, time; ray.init(address='local', include_dashboard=False); print('up', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    yield
    proc.terminate()
    proc.wait(timeout=60)


@pytest.mark.slow
def test_asha_stopped_trials_free_their_workers(other_ray, tiny_backbone_dir, synthetic_data_dir, tmp_path):
    cmd = [sys.executable, "jobs/rank_schedule_sweep.py", "--smoke", "--name", "asha-free", "--num-samples", "4",
           "--max-concurrent", "2", "--address", "local", "--storage-path", str(tmp_path / "sweeps"),
           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--verbose", "0",
           "--set", f"backbone={tiny_backbone_dir}", "--set", f"data_dir={synthetic_data_dir}",
           "--set", "train.steps=8", "--set", "train.eval_every=2"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "Exception in thread PlacementGroupCleanerMonitor" not in log  # the cleaner kept watching
    assert "WorkerGroupStartupTimeoutError" not in log
