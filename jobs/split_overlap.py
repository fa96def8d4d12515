"""Sizes of every task's splits and each evaluation set's overlap with its training rows, timed:
`lora-diffusion overlap` (see its --help).

    python jobs/split_overlap.py                                   # all four tasks
    python jobs/split_overlap.py --task ag_news --data-file ../shared/data/ag_news/test.csv

A thin wrapper of `lora-diffusion overlap` that imports only the installed package, so
`ray submit cluster.yaml jobs/split_overlap.py` can copy this file alone.
"""

import sys

from lora_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['overlap', *sys.argv[1:]]))
