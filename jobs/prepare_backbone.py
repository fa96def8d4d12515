"""Turn an encoder (default: the packaged all-MiniLM-L6-v2) into a masked diffusion LM.

    python jobs/prepare_backbone.py --mode head --steps 1000 --out runs/backbones/minilm-mdlm
    lora-diffusion train --set backbone=runs/backbones/minilm-mdlm ...

Same options as `lora-diffusion prepare-backbone`; prints the held-out masked-token accuracy.
"""

import sys

from lora_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare-backbone", *sys.argv[1:]]))
