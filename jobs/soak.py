"""The soak: one sweep's driver SIGKILLed at seeded random moments, resumed each time; its fault matrix.

    python jobs/soak.py --kills 10                              # a smoke grid (tiny backbone, 8 trials)
    python jobs/soak.py --kills 3 --runs-dir /tmp/soak -- jobs/rank_schedule_sweep.py --smoke --retrain-seeds 0

Prints the fault matrix (fault, times injected, trials lost, runs duplicated, runs left RUNNING,
metrics lost) as markdown and writes it as JSON; exit 0 when every fault was injected and nothing
was lost, duplicated or left RUNNING. `lora-diffusion soak` (lora_diffusion/experiments/soak.py).

A thin wrapper of `lora-diffusion soak` that imports only the installed package, so
`ray submit cluster.yaml jobs/soak.py` can copy this file alone.
"""

import sys

from lora_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['soak', *sys.argv[1:]]))
