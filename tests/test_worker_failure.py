"""A Train worker dies mid-trial: the worker group restarts from the last checkpoint and the trial
finishes once (FailureConfig(max_failures >= 1)).

The death is injected from outside the package: tests/support/faults/sitecustomize.py on the
driver's PYTHONPATH (Ray's workers inherit it) with LORA_DIFFUSION_TEST_KILL_WORKER=RANK:STEP:MARKER
makes rank 1 call os._exit(1) when it reports evaluation step 20, once (the marker file says it did).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.procs import kill_session

REPO = Path(__file__).resolve().parents[1]
FAULTS = REPO / "tests" / "support" / "faults"
STEPS, EVERY, DIE_AT = 40, 10, 20


@pytest.mark.slow
def test_worker_death_resumes_from_checkpoint(tiny_backbone_dir, synthetic_data_dir, tmp_path):
    storage, uri = tmp_path / "sweeps", f"sqlite:///{tmp_path}/mlflow.db"
    marker = tmp_path / "worker-died"
    env = {**os.environ, "LORA_DIFFUSION_DATA_DIR": str(synthetic_data_dir), "PYTHONUNBUFFERED": "1",
           "LORA_DIFFUSION_TEST_KILL_WORKER": f"1:{DIE_AT}:{marker}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH")) if p)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "jobs/rank_schedule_sweep.py", "--smoke", "--name", "failure-test",
           "--num-samples", "1", "--workers", "2", "--max-concurrent", "1", "--max-failures", "2",
           "--address", "local", "--storage-path", str(storage), "--tracking-uri", uri, "--verbose", "0",
           "--set", f"backbone={tiny_backbone_dir}", "--set", f"train.steps={STEPS}",
           "--set", f"train.eval_every={EVERY}", "--retrain-seeds", "0"]  # the failure, not the follow-up
    t0 = time.time()
    with open(tmp_path / "sweep.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        rc = proc.wait(timeout=240)
    finally:
        kill_session(proc.pid)
    out = (tmp_path / "sweep.log").read_text()
    print(f"sweep with a worker failure: {time.time() - t0:.0f} s")
    assert rc == 0, out[-5000:]
    assert marker.is_file(), "the worker never died: " + out[-3000:]

    files = glob.glob(str(storage / "failure-test" / "run_trial_*" / "result.json"))
    assert len(files) == 1
    rows = [json.loads(line) for line in Path(files[0]).read_text().splitlines()]
    finals = [r for r in rows if "result_json" in r]
    assert len(finals) == 1 and finals[0]["step"] == STEPS
    # before the death the run started at 0; after it, from the checkpoint before DIE_AT
    assert [r["resumed_from_step"] for r in rows][0] == 0
    restarted = [r for r in rows if r["resumed_from_step"] > 0]
    assert restarted and restarted[0]["resumed_from_step"] == DIE_AT - EVERY
    assert json.loads(finals[0]["result_json"])["steps"] == STEPS

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lora-diffusion-sweeps")
    runs = client.search_runs([exp.experiment_id], "tags.sweep = 'failure-test' and tags.role = 'trial'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps == list(range(EVERY, STEPS + 1, EVERY))
    resumed = client.get_metric_history(runs[0].info.run_id, "resumed_from_step")
    assert max(m.value for m in resumed) == DIE_AT - EVERY
