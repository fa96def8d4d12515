"""The module count sweep: search_spaces/module_count.yaml through the sweep engine.

    python jobs/module_count_sweep.py [--smoke] [--resume] [--num-samples N] [--set key=value ...]
    ray submit cluster.yaml jobs/module_count_sweep.py          (joins the cluster; see --help)

A thin wrapper of `lora-diffusion sweep --space module_count` that imports only the installed package, so
`ray submit cluster.yaml jobs/module_count_sweep.py` can copy this file alone.
"""

import sys

from lora_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['sweep', '--space', 'module_count', *sys.argv[1:]]))
