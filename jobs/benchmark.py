"""What the methods cost, measured on a cluster node: `lora-diffusion bench-cluster` (see its --help).

    python jobs/benchmark.py --size small                       # local Ray, this machine's CPUs
    ray submit cluster.yaml jobs/benchmark.py -- --size full --gpus 1 --out runs/bench/gpu.json

A thin wrapper of `lora-diffusion bench-cluster` that imports only the installed package, so
`ray submit cluster.yaml jobs/benchmark.py` can copy this file alone.
"""

import sys

from lora_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['bench-cluster', *sys.argv[1:]]))
