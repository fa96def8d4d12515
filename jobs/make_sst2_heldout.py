"""Write an external labelled SST-2 file (GLUE format) of train rows a run never trains on.

    python jobs/make_sst2_heldout.py --max-train-examples 60000 --seed 0 --out runs/sst2_heldout.tsv
    lora-diffusion eval --checkpoint runs/train --data-file runs/sst2_heldout.tsv
"""

import argparse
import json
import sys

from lora_diffusion.core.errors import UserError
from lora_diffusion.core.heldout import write_sst2_heldout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-train-examples", type=int, required=True, help="as in the run's config")
    p.add_argument("--seed", type=int, default=0, help="the run's train.seed")
    p.add_argument("--out", default="runs/sst2_heldout.tsv")
    p.add_argument("--rows", type=int, default=872)
    p.add_argument("--min-words", type=int, default=8)
    args = p.parse_args()
    try:
        info = write_sst2_heldout(args.out, args.max_train_examples, args.seed, args.rows, args.min_words)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
