"""The regularizer sweep: search_spaces/regularizers.yaml through the sweep engine.

    python jobs/regularizer_sweep.py [--smoke] [--resume] [--num-samples N] [--set key=value ...]
    ray submit cluster.yaml jobs/regularizer_sweep.py          (joins the cluster; see --help)

A thin wrapper of `lora-diffusion sweep --space regularizers` that imports only the installed package, so
`ray submit cluster.yaml jobs/regularizer_sweep.py` can copy this file alone.
"""

import sys

from lora_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['sweep', '--space', 'regularizers', *sys.argv[1:]]))
