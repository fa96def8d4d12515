"""The sweep's command line (`lora-diffusion sweep`, jobs/*_sweep.py) and the defaults of its
locations: the repository, the sweeps' storage, the MLflow store."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..core.errors import UserError
from . import tracking


def repo_root() -> Path:
    """The checkout the package is installed from (editable install), else the current directory."""
    here = Path(__file__).resolve().parents[3]
    if (here / "pyproject.toml").is_file() and (here / "platform" / "lora_diffusion").is_dir():
        return here
    return Path.cwd()


def storage_location(arg: str | None) -> str:
    """--storage-path, else $LORA_DIFFUSION_STORAGE, else <repo>/runs/sweeps."""
    return arg or os.environ.get("LORA_DIFFUSION_STORAGE") or str(repo_root() / "runs" / "sweeps")


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the sqlite store in <repo>/runs."""
    return tracking.default_tracking_uri(repo_root() / "runs")


def worker_resources(items: list[str]) -> dict[str, float]:
    """--worker-resources NAME=AMOUNT, each a custom Ray resource with a positive amount (CPUs and
    GPUs have their own options: the sweep shares them out)."""
    out = {}
    for item in items:
        name, sep, amount = item.partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = float("nan")
        if not sep or not name.strip() or not value > 0 or value == float("inf"):
            raise UserError(f"--worker-resources: {item!r} must be NAME=AMOUNT with AMOUNT > 0, e.g. spot=1")
        if name.strip().upper() in ("CPU", "GPU"):
            raise UserError(f"--worker-resources: {name.strip()} has its own option "
                            f"(--{name.strip().lower()}s-per-worker)")
        out[name.strip()] = value
    return out


def build_parser(default_space: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"Ray Tune + Optuna + ASHA sweep (default space: {default_space})")
    p.add_argument("--space", "--grid", dest="space", default=default_space,
                   help="search space or ablation grid: a YAML file or a name in search_spaces/ "
                        "(default: %(default)s)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random backbone built on the fly and a few steps per trial (about a minute)")
    p.add_argument("--num-samples", type=int, help="trials (default: the space's sweep.num_samples)")
    p.add_argument("--storage-path", help="where sweeps live: a directory or an object-store URI such as "
                   "s3://bucket/sweeps (default: $LORA_DIFFUSION_STORAGE, else <repo>/runs/sweeps)")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/runs/mlflow.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: lora-diffusion-sweeps)")
    p.add_argument("--only", action="append", metavar="AXIS=V1,V2",
                   help="run the slice of a grid whose cells take these values on this axis (repeatable); "
                        "it must keep the reference cell. Named after the slice: grid_x-num_phases-1-4")
    p.add_argument("--resume", action="store_true", help="continue the sweep of this name where it stopped")
    p.add_argument("--name", help="sweep name (default: the space's name, plus the --only slice, "
                                  "plus -smoke with --smoke)")
    p.add_argument("--workers", type=int, help="Ray Train workers per trial")
    p.add_argument("--max-concurrent", type=int, help="trials running at once")
    p.add_argument("--seed", type=int, help="Optuna sampler seed (trials' train.seed comes from --set)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="base config override for every trial, e.g. train.steps=300")
    p.add_argument("--address", help="Ray address: 'auto' joins the running cluster, 'local' starts a "
                   "private one (default: $RAY_ADDRESS, else auto on a `ray up` head node, else local)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs each Train worker reserves "
                   "(default: the cluster's CPUs shared among workers x concurrent trials, at most 1)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs each worker reserves (default: on a cluster "
                   "with GPUs, packed by the memory plan: a share of a GPU for trials that fit several to a "
                   "GPU, one GPU per rank otherwise, the ranks the plan needs for a sharded trial; else 0)")
    p.add_argument("--gpu-memory-gib", type=float, help="memory of the cluster's GPUs the plan packs trials "
                   "into (default 80: cluster.yaml's GPU node type)")
    p.add_argument("--worker-resources", action="append", default=[], metavar="NAME=AMOUNT",
                   help="a custom Ray resource each Train worker reserves besides its CPUs and GPUs "
                        "(repeatable), e.g. spot=1 to run the workers only on nodes started with "
                        "--resources '{\"spot\": N}'")
    p.add_argument("--max-failures", type=int, default=2,
                   help="worker-group restarts per trial: a Train worker that died, or was lost with its "
                        "node, restarts the trial's workers from its last checkpoint (default 2)")
    p.add_argument("--retry-failed", type=int, metavar="N",
                   help="run a failed trial again, up to N times, from its last checkpoint, on the same "
                        "MLflow run (default: the file's sweep.max_trial_retries, else 0)")
    p.add_argument("--verbose", type=int, default=1, help="Tune's verbosity (0 quiet, 1 status tables)")
    p.add_argument("--retrain-seeds", type=int, default=None,
                   help="when the sweep ends, retrain its selected configuration with this many fresh seeds "
                        "(never used by the search) and report test (default 3, 1 with --smoke; 0 skips)")
    p.add_argument("--register", action="store_true",
                   help="register the retrain stage's logged model (its best seed on validation) in the "
                        "MLflow Model Registry under the sweep's name")
    return p
