"""An MLflow server down for longer than the client's retries, under the sweep driver's tracking
callback (engine/callbacks.py, engine/tracking.HeldWrites), against a real `mlflow server` on a
loopback port that is stopped and started again on the same store:

- while it is down, the trial's reports do not raise and do not stall the driver for the client's
  retry budget; they are held, in order;
- once it answers again, every held step is logged: the trial's run has every step once, one
  increasing axis, and ends FINISHED; the parent run ends FINISHED with the sweep;
- a server still down when the sweep ends: the sweep's end waits (LORA_DIFFUSION_TRACKING_WAIT_S),
  then says so in one error line naming the server and how many writes it did not log, and the
  parent run is not marked as anything it is not (it stays as the server last saw it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_diffusion.core.errors import UserError
from lora_diffusion.engine.callbacks import MlflowSweepCallback
from lora_diffusion.engine.tracking import SweepTracker
from support.loopback import free_port

STEPS = (2, 4, 6, 8)


class Server:
    """`mlflow server` on a loopback port over one sqlite store, stopped and started at will."""

    def __init__(self, tmp_path: Path):
        self.store, self.port, self.log = f"sqlite:///{tmp_path}/mlflow.db", free_port(), tmp_path / "server.log"
        self.artifacts, self.proc = tmp_path / "artifacts", None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store, "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1", "--artifacts-destination", str(self.artifacts)],
            stdout=self.log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                time.sleep(0.5)
        raise AssertionError("mlflow server did not answer in 90 s")

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
            self.proc = None


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the client's retries: spent at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # a busy machine is slow, not down
    s = Server(tmp_path)
    s.start()
    yield s
    s.stop()


def _report(callback, trial, step: int) -> None:
    callback.on_trial_result(iteration=step, trials=[trial], trial=trial,
                             result={"step": step, "train/loss": 1.0 / step, "validation/accuracy": 0.5})


def _trial():
    return SimpleNamespace(trial_id="t1", config={"train.lr": 1e-3}, last_result={}, num_failures=0)


@pytest.mark.slow
def test_a_long_tracking_outage_loses_no_metric_and_the_runs_end_truthfully(server):
    tracker = SweepTracker(server.uri, "outage", sweep_id="outage-0")
    callback = MlflowSweepCallback(tracker, resolve=lambda config: ({"train.lr": 1e-3}, {}))
    callback.setup()
    trial = _trial()
    callback.on_trial_start(iteration=0, trials=[trial], trial=trial)
    _report(callback, trial, STEPS[0])
    server.stop()
    t0 = time.time()
    for step in STEPS[1:3]:
        _report(callback, trial, step)  # held, not raised
    assert time.time() - t0 < 30  # not the client's retry budget per report
    assert len(callback.writes.held) == 2
    server.start()
    _report(callback, trial, STEPS[3])  # the held steps first, then this one
    callback.on_trial_complete(iteration=9, trials=[trial], trial=trial)
    callback.finish(None)
    assert not callback.writes.held
    (run,) = tracker.trial_runs()
    steps = [m.step for m in tracker.client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(STEPS)
    assert run.info.status == "FINISHED"
    (parent,) = tracker.find_runs(role="sweep")
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_a_server_still_down_when_the_sweep_ends_is_named_in_one_line(server, monkeypatch):
    monkeypatch.setenv("LORA_DIFFUSION_TRACKING_WAIT_S", "3")
    tracker = SweepTracker(server.uri, "gone", sweep_id="gone-0")
    callback = MlflowSweepCallback(tracker, resolve=lambda config: ({"train.lr": 1e-3}, {}))
    callback.setup()
    trial = _trial()
    callback.on_trial_start(iteration=0, trials=[trial], trial=trial)
    _report(callback, trial, STEPS[0])
    server.stop()
    _report(callback, trial, STEPS[1])
    callback.on_trial_complete(iteration=9, trials=[trial], trial=trial)
    with pytest.raises(UserError) as exc:
        callback.finish(None)
    line = str(exc.value)
    assert "\n" not in line and server.uri in line and "2 tracking writes" in line
    server.start()
    (parent,) = tracker.find_runs(role="sweep")
    assert parent.info.status == "RUNNING"  # not FINISHED: it never heard the end
