"""Multi-task composition: task modules trained apart, composed, interference measured.

    python jobs/composition.py                                # SST-2, AG News, XQuAD, XSum; 3 seeds
    python jobs/composition.py --set backbone=runs/backbones/minilm-mdlm --name compose-mdlm
    python jobs/composition.py --smoke                        # tiny random backbone, 2 tasks, 2 seeds

Stage 1 (`NAME-modules-TASK`, a grid sweep per task) trains a trajectory and a weight-LoRA module
per task x rate x seed and selects each rate on validation; stage 2 (`NAME-router`) trains the
router per seed on the task mixture; then every single-task module is scored on every task (the
interference matrix) and every composition (router trained / uniform / oracle / energy, PEFT's
linear / cat / TIES merge) on every task, test with std over seeds, gap to the oracle, cost in
parameters and bytes: `NAME.composition.json` beside the sweeps, the tables and heatmaps on the
MLflow run NAME. Interrupted? Run the same command again. Other arguments go to the sweep engine
(--storage-path, --tracking-uri, --max-concurrent, --set, ...). The logic lives in
lora_diffusion.experiments.composition.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_diffusion.experiments.composition import stages as composition
from lora_diffusion.core.errors import UserError

# --smoke: the tiny random backbone, short contexts and answers, a few steps (not the engine's
# --smoke, whose max_length would override each task's)
SMOKE_SETS = {"backbone": "tiny-random", "max_train_examples": 48, "train_accuracy_examples": 8,
              "train.batch_size": 8, "train.warmup_steps": 1, "trajectory.injection_layers": [0],
              "diffusion.eval_t_points": 1, "lora.rank": 2, "train.threads": 1}
SMOKE_TASK_SETS = {"sst2": {"max_length": 32}, "ag_news": {"max_length": 32},
                   "xquad": {"max_length": 48, "generation.response_tokens": 3},
                   "xsum": {"max_length": 48, "generation.response_tokens": 3}}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="composition")
    p.add_argument("--smoke", action="store_true", help="tiny random backbone, sst2 + xquad, 2 seeds, 2 steps")
    p.add_argument("--tasks", nargs="+", default=list(composition.TASK_SETS), choices=list(composition.TASK_SETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="steps of every task module")
    p.add_argument("--router-steps", type=int, default=100, help="steps of the trained router")
    p.add_argument("--eval-examples", type=int, default=64, help="fixed validation and test rows per task")
    p.add_argument("--lrs", action="append", default=[], metavar="METHOD=LR[,LR...]",
                   help="trajectory or lora rates to select from on validation (default: the method's grid)")
    p.add_argument("--energy-temperature", type=float, default=1.0)
    p.add_argument("--workdir", default="runs/composition", help="grid files, copied checkpoints, the report")
    return p.parse_known_args(argv)


def build_spec(args) -> composition.CompositionSpec:
    spec = composition.CompositionSpec(tasks=args.tasks, seeds=args.seeds, steps=args.steps,
                                       router_steps=args.router_steps, eval_examples=args.eval_examples,
                                       energy_temperature=args.energy_temperature)
    for item in args.lrs:
        method, _, rates = item.partition("=")
        if method not in composition.METHODS:
            raise UserError(f"--lrs {item!r}: method must be one of {', '.join(composition.METHODS)}")
        try:
            spec.lrs[method] = [float(r) for r in rates.split(",")]
        except ValueError:
            raise UserError(f"--lrs {item!r}: expected METHOD=LR[,LR...]") from None
    if args.smoke:
        spec.tasks = [t for t in args.tasks if t in ("sst2", "xquad")] or args.tasks[:2]
        spec.seeds, spec.steps, spec.router_steps, spec.eval_examples = args.seeds[:2], 2, 2, 4
        spec.lrs = {m: rates[:1] for m, rates in spec.lrs.items()}
        spec.sets, spec.task_sets = dict(SMOKE_SETS), {t: dict(s) for t, s in SMOKE_TASK_SETS.items()}
    if len(spec.tasks) < 2:
        raise UserError("--tasks: composition needs at least two tasks")
    return spec


def main(argv=None) -> int:
    args, engine_args = parse(argv)
    name = args.name + "-smoke" if args.smoke and args.name == "composition" else args.name
    try:
        spec = build_spec(args)
        return composition.run(spec, name, engine_args, Path(args.workdir) / name)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
