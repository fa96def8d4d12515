"""The one-machine variant of cluster.yaml: `lora-diffusion local-cluster` (see its --help).

    python jobs/local_cluster.py --out runs/cluster.local.yaml            # your own sshd on port 22
    python jobs/local_cluster.py --out runs/cluster.local.yaml --sshd     # plus an sshd of its own, until Ctrl-C

A thin wrapper of `lora-diffusion local-cluster` that imports only the installed package, so
`ray submit cluster.yaml jobs/local_cluster.py` can copy this file alone.
"""

import sys

from lora_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['local-cluster', *sys.argv[1:]]))
