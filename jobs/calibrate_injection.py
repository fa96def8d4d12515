"""Measure where trajectory modules should be injected: accuracy and step-time ratios side by side.

    python jobs/calibrate_injection.py --steps 400 --out runs/calibrate_injection.md

Variants: last hidden state only, after the 3rd of 6 layers, after every layer; one phase so the
comparison isolates depth (add --set trajectory.num_phases=4 to repeat it with phases).
"""

import argparse
import sys

from lora_diffusion.experiments.bench.benchmark import compare_variants, markdown, write_markdown
from lora_diffusion.core.config import parse_sets

VARIANTS = {
    "after layer 3 of 6": {"trajectory.injection_layers": [2]},
    "last hidden state": {"trajectory.injection_layers": [-1]},
    "after every layer": {"trajectory.injection_layers": [0, 1, 2, 3, 4, 5]},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-examples", type=int, default=None, help="validation subset (default: all 861)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/calibrate_injection.md")
    args = p.parse_args()
    base = {"trajectory.num_phases": 1, "train.steps": args.steps, "train.eval_every": args.steps,
            "max_eval_examples": args.eval_examples, **parse_sets(args.set)}
    rows = compare_variants(base, VARIANTS)
    print(markdown(rows))
    write_markdown(args.out, base, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
