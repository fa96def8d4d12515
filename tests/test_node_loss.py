"""A node lost mid-trial on a multi-node cluster (a spot instance reclaimed), end to end on a
`ray.cluster_utils.Cluster` on loopback: a head node (the sweep's driver, Tune, the trial's own
actor and its Train controller) and a worker node with the custom resource `lost_node`, which the
sweep's Train worker reserves (`--worker-resources lost_node=1`), so the worker runs there and only
there. The worker pauses before it reports step PAUSE_AT (tests/support/faults), after its
checkpoint of step EVERY is registered; the test kills that node's processes at once (no graceful
shutdown) and adds a replacement node with the same resource, as an autoscaler would.

Promised, with the default --max-failures (2) and no --retry-failed: the trial ends TERMINATED
and its MLflow run FINISHED; its Train run restarted its worker on the new node from the step-EVERY
checkpoint (`resumed_from_step`), not from step 0; the Tune trial never failed (one MLflow run,
`attempts` 1, no failure reason), and the run's step axis holds every evaluation step once, in
order, with no gap. Node loss is carried by Train's worker-group restart (engine/trial.py says why),
and the trial's own actor sits on the head (engine/tuner.py trial_resources), so losing a worker
node never fails the trial itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_diffusion.analysis import fault_matrix as fm
from lora_diffusion.core.errors import UserError
from lora_diffusion.engine import tuner
from lora_diffusion.engine.callbacks import ATTEMPTS_TAG, FAILURE_TAG
from lora_diffusion.engine.options import worker_resources
from lora_diffusion.engine.trial import TrialPlan, make_trainer
from support.procs import REPO, kill_session

STEPS, EVERY, PAUSE_AT = 6, 2, 4
NAME, RESOURCE = "node-loss", "lost_node"
# the head notices a dead node within seconds (Ray's defaults: up to ~30 s of missed health checks)
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                   "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"the worker never paused (rc {proc.poll()}):\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


@pytest.fixture
def cluster(monkeypatch, tmp_path):
    """Head and worker node; their raylets (so every Ray worker) import tests/support/faults and
    pause at PAUSE_AT, writing the marker the test waits for."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(REPO / "tests" / "support" / "faults"), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("LORA_DIFFUSION_TEST_PAUSE_AT", f"{PAUSE_AT}:{tmp_path / 'paused'}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    made = _started(lambda: Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "_system_config": FAST_NODE_DEATH}))
    try:
        yield made
    finally:
        made.shutdown()


def _started(start, attempts: int = tuner.LOCAL_START_ATTEMPTS):
    """`start()`, again after Ray's 30 s raylet timeout (a slow start on a loaded machine, as
    engine/tuner.py init_ray treats it), with the half-started node's processes killed first:
    this process's children that run Ray and were started by the failed attempt."""
    import psutil

    for attempt in range(1, attempts + 1):
        began = time.time() - 1
        try:
            return start()
        except Exception as exc:  # Ray raises a bare Exception for it
            if tuner.RAY_START_TIMEOUT not in str(exc) or attempt == attempts:
                raise
        half = [c for c in psutil.Process().children() if c.create_time() >= began and tuner._runs_ray(c)]
        for child in half:
            child.kill()
        psutil.wait_procs(half, timeout=10)


@pytest.mark.slow
def test_a_trial_whose_node_is_lost_continues_from_its_checkpoint_on_another_node(
        cluster, tiny_backbone_dir, synthetic_data_dir, tmp_path):
    spot = _started(lambda: cluster.add_node(num_cpus=1, resources={RESOURCE: 1}))
    cmd = [sys.executable, "jobs/rank_schedule_sweep.py", "--smoke", "--name", NAME, "--num-samples", "1",
           "--max-concurrent", "1", "--address", cluster.address, "--worker-resources", f"{RESOURCE}=1",
           "--cpus-per-worker", "1", "--storage-path", str(tmp_path / "sweeps"),
           "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--verbose", "0", "--retrain-seeds", "0",
           "--set", f"backbone={tiny_backbone_dir}", "--set", f"train.steps={STEPS}",
           "--set", f"train.eval_every={EVERY}"]
    env = {**os.environ, "LORA_DIFFUSION_DATA_DIR": str(synthetic_data_dir)}
    log = tmp_path / "sweep.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(tmp_path / "paused", proc, log)
        cluster.remove_node(spot, allow_graceful=False)  # its raylet and the worker with it, SIGKILLed
        _started(lambda: cluster.add_node(num_cpus=1, resources={RESOURCE: 1}))  # as an autoscaler would
        rc = proc.wait(timeout=300)
    finally:
        kill_session(proc.pid)
    text = log.read_text()
    assert rc == 0, text[-5000:]
    assert "paused at step" in (tmp_path / "paused.done").read_text()  # the fault happened mid-trial
    status = fm.trial_status(tmp_path / "sweeps" / NAME)
    assert list(status.values()) == ["TERMINATED"], status
    _check_one_continuous_run(tmp_path)


def _check_one_continuous_run(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("lora-diffusion-sweeps")
    runs = client.search_runs([exp.experiment_id], f"tags.sweep = '{NAME}'")
    (run,) = [r for r in runs if r.data.tags["role"] == "trial"]  # one run: not one per worker start
    assert run.info.status == "FINISHED"
    assert run.data.tags[ATTEMPTS_TAG] == "1" and FAILURE_TAG not in run.data.tags, run.data.tags
    resumed = [m.value for m in client.get_metric_history(run.info.run_id, "resumed_from_step")]
    assert max(resumed) == EVERY, resumed  # the restarted worker loaded the step-EVERY checkpoint
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(EVERY, STEPS + 1, EVERY)), steps  # every evaluation once, in order


# ----------------------------------------------------------------------------- without Ray


@pytest.mark.parametrize("items, resources", [
    ([], {}), (["spot=1"], {"spot": 1.0}), (["spot=1", "accelerator_type:A100=0.5"],
                                            {"spot": 1.0, "accelerator_type:A100": 0.5})])
def test_worker_resources_are_names_with_positive_amounts(items, resources):
    assert worker_resources(items) == resources


@pytest.mark.parametrize("item, says", [("spot", "NAME=AMOUNT"), ("spot=0", "AMOUNT > 0"), ("=1", "NAME=AMOUNT"),
                                        ("spot=many", "AMOUNT > 0"), ("GPU=1", "--gpus-per-worker"),
                                        ("cpu=2", "--cpus-per-worker")])
def test_a_bad_worker_resource_is_one_line_naming_the_option(item, says):
    with pytest.raises(UserError, match="^--worker-resources: ") as err:
        worker_resources([item])
    assert says in str(err.value)


def test_every_train_worker_reserves_the_worker_resources(tmp_path):
    plan = TrialPlan(fixed={}, workers=2, cpus_per_worker=0.5, gpus_per_worker=0.0, train_storage=str(tmp_path),
                     max_failures=2, extra_resources={RESOURCE: 1.0})
    trainer = make_trainer({}, plan, "t", 0.0, [])
    assert trainer.scaling_config.resources_per_worker == {"CPU": 0.5, RESOURCE: 1.0}
    assert trainer.run_config.failure_config.max_failures == 2  # node loss is carried by this knob


@pytest.mark.parametrize("head_cpus, pinned", [(8.0, True), (0.0, False)])
def test_a_trial_actor_sits_on_the_head_when_the_head_has_cpus(monkeypatch, head_cpus, pinned):
    import ray

    nodes = [{"Alive": True, "Resources": {"CPU": 96.0, RESOURCE: 1.0}},
             {"Alive": True, "Resources": {"CPU": head_cpus, tuner.HEAD_NODE: 1.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    resources = tuner.trial_resources(max_concurrent=4)
    assert resources["CPU"] == tuner.TRIAL_CPUS
    assert (tuner.HEAD_NODE in resources) is pinned
