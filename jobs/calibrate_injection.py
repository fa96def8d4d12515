"""Where trajectory modules should be injected: `lora-diffusion calibrate-injection` (see its --help).

    python jobs/calibrate_injection.py --steps 400 --out runs/calibrate_injection.md

A thin wrapper of `lora-diffusion calibrate-injection` that imports only the installed package, so
`ray submit cluster.yaml jobs/calibrate_injection.py` can copy this file alone.
"""

import sys

from lora_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['calibrate-injection', *sys.argv[1:]]))
