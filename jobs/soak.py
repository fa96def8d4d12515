"""The soak: one sweep's driver SIGKILLed at seeded random moments, resumed each time; its fault matrix.

    python jobs/soak.py --kills 10                              # a smoke grid (tiny backbone, 8 trials)
    python jobs/soak.py --kills 3 --runs-dir /tmp/soak -- jobs/rank_schedule_sweep.py --smoke --retrain-seeds 0

Prints the fault matrix (fault, times injected, trials lost, runs duplicated, runs left RUNNING,
metrics lost) as markdown and writes it as JSON; exit 0 when every fault was injected and nothing
was lost, duplicated or left RUNNING. See lora_diffusion/experiments/soak.py.
"""

import sys

from lora_diffusion.experiments.soak import main

if __name__ == "__main__":
    sys.exit(main())
