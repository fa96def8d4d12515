"""Baselines at a matched parameter budget: method x seed x task, through the shared Recipe.

    python jobs/baseline_comparison.py --budget 100000 --steps 600 --seeds 0 1 2
    python jobs/baseline_comparison.py --smoke          # tiny random model, seconds

Writes results.json and results.md (the table) to --output. The logic lives in
lora_diffusion.comparison; this script only parses arguments. Runs without Ray for now.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from lora_diffusion import comparison
from lora_diffusion.backbone import build_tiny_backbone
from lora_diffusion.errors import UserError


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny random backbone, a handful of steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--budget", type=int, default=None,
                   help="target trainable parameters (default: each method's default size)")
    p.add_argument("--tasks", nargs="+", default=["sst2", "ag_news"])
    p.add_argument("--methods", nargs="+", default=comparison.ALL_METHODS,
                   choices=comparison.ALL_METHODS)
    p.add_argument("--search-dev-examples", type=int, default=200)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, e.g. backbone=DIR")
    p.add_argument("--output", default="runs/baseline_comparison")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from lora_diffusion import config as config_lib

    args = parse(argv)
    sets = config_lib.parse_sets(args.set)
    spec = comparison.ComparisonSpec(methods=args.methods, tasks=args.tasks, seeds=args.seeds,
                                     steps=args.steps, budget=args.budget,
                                     search_dev_examples=args.search_dev_examples, sets=sets)
    if args.smoke:
        tiny = build_tiny_backbone(tempfile.mkdtemp(prefix="tiny-bert-"))
        spec.sets = {"backbone": str(tiny), "max_length": 32, "max_train_examples": 64,
                     "max_eval_examples": 24, "train_accuracy_examples": 8,
                     "train.batch_size": 8, "train.warmup_steps": 1, "train.eval_every": 1000,
                     "diffusion.eval_t_points": 2, "trajectory.injection_layers": [1],
                     "train.threads": 1, **sets}
        spec.steps, spec.search_steps, spec.seeds = min(args.steps, 3), 1, args.seeds[:1]
        spec.search_dev_examples = 8
        spec.budget = args.budget or 3000
        spec.lr_grids = {m: grid[-1:] for m, grid in spec.lr_grids.items()}  # no search
    t0 = time.perf_counter()
    try:
        result = comparison.run_comparison(spec)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json_path, md_path = comparison.write_outputs(result, args.output)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
