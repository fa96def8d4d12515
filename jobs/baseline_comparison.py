"""Baselines at a matched parameter budget: `lora-diffusion compare` (see its --help).

    python jobs/baseline_comparison.py                       # SST-2 + AG News, every compared method, 3 seeds
    python jobs/baseline_comparison.py --tasks sst2 --name baselines-sst2
    python jobs/baseline_comparison.py --smoke                          # tiny backbone, 2 methods, seconds per trial

Stage 1 is the sweep NAME-tune, stage 2 the sweep NAME (lora_diffusion/experiments/comparison.py).

A thin wrapper of `lora-diffusion compare` that imports only the installed package, so
`ray submit cluster.yaml jobs/baseline_comparison.py` can copy this file alone.
"""

import sys

from lora_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['compare', *sys.argv[1:]]))
