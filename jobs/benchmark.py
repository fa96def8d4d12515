"""What the methods cost, measured on a cluster node: `lora-diffusion bench` run as one Ray task
with the resources it asks for (a GPU node: --gpus 1), its JSON, plots and MLflow run written
where this driver runs; the sections that start Ray (a small sweep, the data-parallel scaling
runs) run from this driver on the cluster itself.

    python jobs/benchmark.py --size small                       # local Ray, this machine's CPUs
    ray submit cluster.yaml jobs/benchmark.py -- --size full --gpus 1 --out runs/bench/gpu.json

Imports only the installed package, so `ray submit` can copy this file alone.
"""

import argparse
import json
import sys
from pathlib import Path

from lora_diffusion.experiments.bench import report as bench_report
from lora_diffusion.experiments.bench.benchmark import RAY_SECTIONS, SECTIONS, log_to_mlflow, run_benchmark
from lora_diffusion.engine.options import default_tracking_uri
from lora_diffusion.engine.tuner import init_ray, ray_address


def measure_on_node(size: str, sections: list[str], data_dir: str | None) -> dict:
    """Runs inside the Ray task: the node's own measurement, returned to the driver."""
    return run_benchmark(size, [s for s in sections if s not in RAY_SECTIONS], data_dir, out=None, log=print)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=("smoke", "small", "full"))
    p.add_argument("--sections", default="train,memory,infer")
    p.add_argument("--cpus", type=float, default=1, help="CPUs the measuring task reserves")
    p.add_argument("--gpus", type=float, default=0, help="GPUs the measuring task reserves (1: a GPU node)")
    p.add_argument("--data-dir", help="the node's data folder (default: its $LORA_DIFFUSION_DATA_DIR)")
    p.add_argument("--address", help="Ray address (default: auto on a cluster head, else a local Ray)")
    p.add_argument("--out", default="runs/bench/cluster.json")
    p.add_argument("--tracking-uri")
    args = p.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip() in SECTIONS]
    import ray

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
    plots = bench_report.write_plots(result, out.parent)
    run_id = log_to_mlflow(result, args.tracking_uri or default_tracking_uri(), [out, *plots])
    print(bench_report.table(result))
    print(f"{out}, {len(plots)} plots; mlflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
