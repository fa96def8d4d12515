"""End to end: `ray up` / `ray submit` / `ray down` on the one-machine variant of cluster.yaml.

An sshd on 127.0.0.1 (port 22, else a free port) accepts a key made in tmp_path for root. It runs in
its own PID and mount namespaces (tests/support/loopback.py): the cluster's `ray stop`
cannot touch other Ray instances on this machine, HOME is a tmp dir whose ~/lora-diffusion links to
this checkout (so setup finds this .venv current and installs nothing). The object store is an S3
server on loopback (moto) holding the bucket cluster.yaml names; the node's .bashrc points AWS_* at
it, as an instance profile would. Killing the namespace's first process ends every process of
the cluster.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_diffusion.engine import cluster
from support import loopback

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NAME = "lora-diffusion-e2e"  # --cluster-name: the launcher's local state never mixes with a user's cluster


def _skip_reason() -> str | None:
    missing = loopback.missing_tools(isolate=True)
    if missing:
        return (f"not installed: {', '.join(missing)} "
                "(apt-get install -y openssh-server rsync; .ci/run does this)")
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (sshd for root on loopback, PID/mount namespaces)"
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--mount", "true"], capture_output=True)
    if r.returncode != 0:
        return f"cannot make PID/mount namespaces here: {r.stderr.decode().strip()}"
    if not loopback.port_free(cluster.MLFLOW_PORT, _private_ip()):
        return f"port {cluster.MLFLOW_PORT} on {_private_ip()} is in use (the head's MLflow server needs it)"
    # another Ray on this machine (a local sweep) holds Ray's fixed default ports: the head's
    # raylet then times out at `ray up` (seen here), which says nothing about cluster.yaml
    for port, what in ((6379, "Ray GCS"), (8265, "Ray dashboard"), (52365, "Ray dashboard agent")):
        if not loopback.port_free(port, "0.0.0.0"):
            return f"port {port} is in use (the head's {what} needs it): is another Ray running here?"
    return None


def _private_ip() -> str:
    return subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()[0]


def _run(cmd, log: Path, timeout: float, env) -> float:
    t0 = time.monotonic()
    with open(log, "w") as f:
        r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env,
                           cwd=REPO, stdin=subprocess.DEVNULL)
    took = time.monotonic() - t0
    if r.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise AssertionError(f"{' '.join(map(str, cmd[:3]))} exited {r.returncode} after {took:.0f} s:\n{tail}")
    return took


def test_ray_up_submit_smoke_sweep_down(tmp_path, missing_real_data):
    for src in cluster.load(REPO / "cluster.yaml")["file_mounts"].values():
        if not (REPO / src).exists():
            missing_real_data(f"file_mounts source {src} is missing (the datasets belong in ../shared/data)")
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    bucket = cluster.bucket_of(REPO / "cluster.yaml")
    s3 = loopback.LoopbackS3(bucket, log=tmp_path / "s3.log")
    sshd = loopback.LoopbackSshd(tmp_path / "sshd", isolate=True, env=s3.env,
                                project_link=("lora-diffusion", REPO))
    times = {}
    up = False
    in_namespace = []
    try:
        s3.start()
        sshd.start()
        yaml_path = cluster.write_yaml(cluster.local_variant(REPO / "cluster.yaml", sshd.key, "root",
                                                             ssh_port=sshd.port), tmp_path / "cluster.local.yaml")
        up = True
        times["ray up"] = _run(["ray", "up", "-y", "-n", NAME, yaml_path], tmp_path / "up.log", 300, env)
        times["ray submit (smoke sweep)"] = _run(
            ["ray", "submit", "-n", NAME, yaml_path, REPO / "jobs" / "rank_schedule_sweep.py", "--",
             "--smoke"], tmp_path / "submit.log", 600, env)

        # the sweep lives in the bucket ($LORA_DIFFUSION_STORAGE that setup_commands gave the head)
        objects = {o["Key"] for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
                   for o in page.get("Contents", [])}
        exp = "sweeps/rank_schedule-smoke"
        for name in ("sweep.json", "best.json", "tuner.pkl"):
            assert f"{exp}/{name}" in objects, sorted(objects)[:50]
        assert any(k.startswith(f"{exp}/train/") and "checkpoint" in k for k in objects), "no Train checkpoint"
        spec = json.loads(s3.client().get_object(Bucket=bucket, Key=f"{exp}/sweep.json")["Body"].read())
        assert spec["storage"] == f"s3://{bucket}/sweeps", spec["storage"]
        uri = spec["tracking_uri"]  # from $MLFLOW_TRACKING_URI that setup_commands gave the head
        assert uri == f"http://{_private_ip()}:{cluster.MLFLOW_PORT}", uri
        # MLflow: runs on the head's disk, artifacts (the sweep's ablation report) in the bucket
        assert any(k.startswith("mlflow-artifacts/") and k.endswith("summary.md") for k in objects)

        from mlflow.tracking import MlflowClient

        for client in (MlflowClient(uri), MlflowClient(f"sqlite:///{sshd.home / 'mlflow' / 'mlflow.db'}")):
            exp_ = client.get_experiment_by_name("lora-diffusion-sweeps")
            runs = client.search_runs([exp_.experiment_id], max_results=100)
            sweeps = [r for r in runs if r.data.tags.get("role") == "sweep"]
            # the search, and its retrain stage (the selection with one fresh seed under --smoke)
            parents = [r for r in sweeps if r.data.tags.get("stage") != "retrain"]
            retrains = [r for r in sweeps if r.data.tags.get("stage") == "retrain"]
            assert len(parents) == 1 and parents[0].info.status == "FINISHED"
            assert len(retrains) == 1 and retrains[0].info.status == "FINISHED"
            assert retrains[0].data.tags["retrain.of"] == "rank_schedule-smoke"
            children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
            assert len(children) == spec["sweep"]["num_samples"] == 4
            assert len({r.data.tags["trial_id"] for r in children}) == 4
            assert all(r.info.status == "FINISHED" and "validation/accuracy" in r.data.metrics for r in children)
            retrained = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == retrains[0].info.run_id]
            assert len(retrained) == 1 and "final/test/accuracy" in retrained[0].data.metrics
            assert "test/accuracy_mean" in parents[0].data.metrics  # the retrain's test, on the search

        # a new head finds the sweep in the bucket: down, up, resume; nothing rerun or duplicated
        t0 = time.monotonic()
        _run(["ray", "down", "-y", "-n", NAME, yaml_path], tmp_path / "down1.log", 120, env)
        _run(["ray", "up", "-y", "-n", NAME, yaml_path], tmp_path / "up2.log", 300, env)
        _run(["ray", "submit", "-n", NAME, yaml_path, REPO / "jobs" / "rank_schedule_sweep.py", "--",
              "--smoke", "--resume"], tmp_path / "resume.log", 300, env)
        times["down, up, resume"] = time.monotonic() - t0
        assert "4 trials (0 failed)" in (tmp_path / "resume.log").read_text(errors="replace")
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("lora-diffusion-sweeps").experiment_id])
        # the search's 4 trials and the retrain's 1, none run twice (a finished retrain is re-read)
        assert len([r for r in runs if r.data.tags.get("role") == "trial"]) == 5
    finally:
        try:
            if up:
                t0 = time.monotonic()
                try:
                    _run(["ray", "down", "-y", "-n", NAME, str(tmp_path / "cluster.local.yaml")],
                         tmp_path / "down.log", 120, env)
                except (AssertionError, subprocess.TimeoutExpired):
                    # fallback: `ray stop --force` inside the cluster's namespace only
                    subprocess.run(sshd.ssh_command("bash -lc 'ray stop --force'"), timeout=60,
                                   capture_output=True)
                times["ray down"] = time.monotonic() - t0
        finally:
            in_namespace = sshd.namespace_pids()
            for suffix in (".lock", ".state"):  # the launcher's record of this test cluster
                Path(f"/tmp/ray/cluster-{NAME}{suffix}").unlink(missing_ok=True)
            sshd.stop()  # kills the namespace: sshd, and any Ray or MLflow process left in it
            s3.stop()
        print("\n" + "  ".join(f"{k} {v:.0f} s" for k, v in times.items()), flush=True)
    deadline = time.monotonic() + 20  # ssh control masters (ControlPersist) close with the server
    while True:
        left = [p for p in in_namespace if Path(f"/proc/{p}").exists()]
        left += subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not left, f"processes left behind: {left}"
