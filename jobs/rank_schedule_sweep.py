"""The rank schedule sweep: search_spaces/rank_schedule.yaml through the sweep engine.

    python jobs/rank_schedule_sweep.py [--smoke] [--resume] [--num-samples N] [--set key=value ...]
    python jobs/rank_schedule_sweep.py --space rank_schedule_xquad   # generative (also _xsum), on the
                                                 # prepared runs/backbones/minilm-mdlm: prepare it first
    ray submit cluster.yaml jobs/rank_schedule_sweep.py          (joins the cluster; see --help)

A thin wrapper of `lora-diffusion sweep` that imports only the installed package, so
`ray submit cluster.yaml jobs/rank_schedule_sweep.py` can copy this file alone.
"""

import sys

from lora_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['sweep', *sys.argv[1:]]))
