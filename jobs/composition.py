"""Multi-task composition: `lora-diffusion compose` (see its --help).

    python jobs/composition.py                                # SST-2, AG News, XQuAD, XSum; 3 seeds
    python jobs/composition.py --set backbone=runs/backbones/minilm-mdlm --name compose-mdlm
    python jobs/composition.py --smoke                        # tiny random backbone, 2 tasks, 2 seeds

A thin wrapper of `lora-diffusion compose` that imports only the installed package, so
`ray submit cluster.yaml jobs/composition.py` can copy this file alone.
"""

import sys

from lora_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['compose', *sys.argv[1:]]))
