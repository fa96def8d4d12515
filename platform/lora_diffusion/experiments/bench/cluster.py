"""The benchmark on a cluster node (`lora-diffusion bench-cluster`): `run_benchmark` as one Ray
task with the resources it asks for (a GPU node: --gpus 1), its JSON, plots and MLflow run
written where the driver runs; the sections that start Ray themselves (a small sweep, the
data-parallel scaling runs) run from the driver, on the cluster it joined."""

from __future__ import annotations

import json
from pathlib import Path

from .benchmark import RAY_SECTIONS, SECTIONS, log_to_mlflow, run_benchmark

USAGE = __doc__ + """

    lora-diffusion bench-cluster --size small                  # local Ray, this machine's CPUs
    ray submit cluster.yaml jobs/benchmark.py -- --size full --gpus 1 --out runs/bench/gpu.json
"""


def measure_on_node(size: str, sections: list[str], data_dir: str | None) -> dict:
    """Runs inside the Ray task: the node's own measurement, returned to the driver."""
    return run_benchmark(size, [s for s in sections if s not in RAY_SECTIONS], data_dir, out=None, log=print)


def build_parser(prog: str | None = None):
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=("smoke", "small", "full"))
    p.add_argument("--sections", default="train,memory,infer", help="comma-separated: " + ",".join(SECTIONS))
    p.add_argument("--cpus", type=float, default=1, help="CPUs the measuring task reserves")
    p.add_argument("--gpus", type=float, default=0, help="GPUs the measuring task reserves (1: a GPU node)")
    p.add_argument("--data-dir", help="the node's data folder (default: its $LORA_DIFFUSION_DATA_DIR)")
    p.add_argument("--address", help="Ray address (default: auto on a cluster head, else a local Ray)")
    p.add_argument("--out", default="runs/bench/cluster.json")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    import ray

    from ...core.errors import UserError
    from ...engine.options import default_tracking_uri
    from ...engine.tuner import init_ray, ray_address
    from . import report

    args = build_parser(prog).parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise UserError(f"sections: {bad[0]} is not one of {', '.join(SECTIONS)}")
    init_ray(ray_address(args.address))
    task = ray.remote(num_cpus=args.cpus, num_gpus=args.gpus)(measure_on_node)
    result = ray.get(task.remote(args.size, sections, args.data_dir))
    ray.shutdown()
    on_cluster = [s for s in sections if s in RAY_SECTIONS]
    if on_cluster:  # a sweep and Train runs go to the cluster from here, as a user's would
        result = run_benchmark(args.size, on_cluster, args.data_dir, args.out, previous=result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plots = report.write_plots(result, out.parent)
    run_id = log_to_mlflow(result, args.tracking_uri or default_tracking_uri(), [out, *plots])
    print(report.table(result))
    print(f"{out}, {len(plots)} plots; mlflow run {run_id}")
    return 0
