"""Turn an encoder (default: the packaged all-MiniLM-L6-v2) into a masked diffusion LM.

    python jobs/prepare_backbone.py --mode full --steps 640 --lr 3e-4 --threads 2 \\
        --out runs/backbones/minilm-mdlm
    lora-diffusion train --set backbone=runs/backbones/minilm-mdlm ...

Same options as `lora-diffusion prepare-backbone`. The result is cached by fingerprint under
$LORA_DIFFUSION_CACHE/prepared/ (default ~/.cache/lora-diffusion); `--out` is a symlink to it.
Rerunning the same command continues an interrupted run, or returns the cached result at once;
`--eval-only` scores the latest checkpoint of an unfinished run. Prints a table of held-out
masked-token accuracy and the ELBO bound at t = 0.15, 0.5, 0.85, before and after.

A thin wrapper of `lora-diffusion prepare-backbone` that imports only the installed package, so
`ray submit cluster.yaml jobs/prepare_backbone.py` can copy this file alone.
"""

import sys

from lora_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['prepare-backbone', *sys.argv[1:]]))
