"""Baselines at a matched parameter budget: task x method x seed on the sweep engine.

    python jobs/baseline_comparison.py                                  # SST-2 + AG News, 8 methods, 3 seeds
    python jobs/baseline_comparison.py --tasks sst2 --name baselines-sst2
    python jobs/baseline_comparison.py --smoke                          # tiny backbone, 2 methods, seconds per trial
    lora-diffusion report --sweep baselines                             # the table again, from MLflow

Stage 1 (`NAME-tune`) tries the same number of candidates per method on validation (its rate and
its own size/placement knobs, declared in its MethodSpec), stage 2 (`NAME`) runs every seed with
the best one and reports test beside validation; `NAME-unmatched-tune` / `NAME-unmatched` repeat
both without the budget (the second table). All are grid sweeps (Ray Tune trials, each a Ray Train
run) logged to MLflow; `python jobs/baseline_table.py --name NAME` writes the tables.
Interrupted? Run the same command again: a finished stage is skipped and an unfinished one resumed. Arguments not listed here go to the sweep engine
(--storage-path, --tracking-uri, --address, --max-concurrent, --workers, ...: see
`lora-diffusion sweep --help`). The logic lives in lora_diffusion.experiments.comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_diffusion.experiments import comparison
from lora_diffusion.core import config as config_lib
from lora_diffusion.core.errors import UserError


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="baselines", help="sweep name of stage 2 (stage 1: NAME-lr)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random backbone, lora and bitfit on SST-2, a few steps (engine's --smoke)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="steps of every stage-2 run")
    p.add_argument("--search-steps", type=int, help="steps of every stage-1 run (default: steps / 2)")
    p.add_argument("--budget", type=int, default=73728,
                   help="target trainable parameters, 0 = each method's default size (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=["sst2", "ag_news"])
    p.add_argument("--methods", nargs="+", default=comparison.ALL_METHODS, choices=comparison.ALL_METHODS)
    p.add_argument("--search-validation-examples", type=int, default=200)
    p.add_argument("--eval-examples", type=int,
                   help="stage 2: fixed subsets of this many validation and test rows (default: whole splits)")
    p.add_argument("--lrs", action="append", default=[], metavar="METHOD=LR[,LR...]",
                   help="replace a method's learning-rate grid (repeatable); widened like every grid "
                        "to --trials-per-method candidates, and stage 1 picks the rate")
    p.add_argument("--trials-per-method", type=int, default=4,
                   help="stage-1 candidates of every method, the same for all (1: no tuning stage)")
    p.add_argument("--no-unmatched", action="store_true",
                   help="skip the second table (each method tuned and run without the budget)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of every run (repeatable); a knob stage 1 would tune, set here, "
                        "is fixed instead, and the budget is solved with it")
    p.add_argument("--workdir", default="runs/baseline_comparison",
                   help="where the generated grid files are written (default: %(default)s)")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    args, engine_args = parse(argv)
    spec = comparison.ComparisonSpec(methods=args.methods, tasks=args.tasks, seeds=args.seeds,
                                     steps=args.steps, budget=args.budget or None,
                                     search_steps=args.search_steps,
                                     search_validation_examples=args.search_validation_examples,
                                     trials_per_method=args.trials_per_method, unmatched=not args.no_unmatched,
                                     eval_examples=args.eval_examples)
    name = args.name
    try:
        spec.lr_grids.update(comparison.parse_lr_grids(args.lrs))
        if args.trials_per_method < 1:
            raise UserError(f"--trials-per-method: must be >= 1, got {args.trials_per_method}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.smoke:
        # the engine's --smoke shrinks data and steps; here: two methods, one task, a small budget
        engine_args = ["--smoke", *engine_args]
        spec.sets = {"backbone": "tiny-random"}
        spec.methods = [m for m in args.methods if m in ("lora", "bitfit")] or args.methods[:2]
        spec.tasks, spec.seeds, spec.budget = args.tasks[:1], args.seeds[:2], 3000
        spec.steps, spec.search_steps, spec.search_validation_examples = 4, 2, 16
        spec.trials_per_method = min(2, args.trials_per_method)
        name = args.name + "-smoke" if args.name == "baselines" else args.name
    try:
        spec.sets.update(config_lib.parse_sets(args.set))  # in every cell's `fixed`, so never tuned
        return comparison.run(spec, name, engine_args, Path(args.workdir) / name)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
