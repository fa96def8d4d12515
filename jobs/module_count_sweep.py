"""The module count sweep: search_spaces/module_count.yaml through the shared sweep engine.

    python jobs/module_count_sweep.py [--smoke] [--resume] [--num-samples N] [--set key=value ...]
    ray submit cluster.yaml jobs/module_count_sweep.py          (joins the cluster; see --help)

Imports only the installed package, so `ray submit` can copy this file alone.
"""

import sys

from lora_diffusion.cli import sweep_main as main

if __name__ == "__main__":
    sys.exit(main(default_space="module_count"))
