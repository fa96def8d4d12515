"""The baseline comparison's tables as markdown: `lora-diffusion compare-table` (see its --help).

    python jobs/baseline_table.py --name baselines                       # to stdout
    python jobs/baseline_table.py --name base-sst2 --name base-agnews --readme README.md   # the README's tables

A thin wrapper of `lora-diffusion compare-table` that imports only the installed package, so
`ray submit cluster.yaml jobs/baseline_table.py` can copy this file alone.
"""

import sys

from lora_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['compare-table', *sys.argv[1:]]))
