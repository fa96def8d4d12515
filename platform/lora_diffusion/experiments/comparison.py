"""Baseline comparison on the sweep engine: every method tuned on validation with the same number
of trials, at a matched budget, x seeds x tasks, reported on test.

Grid sweeps (sweep.py running grid.py's `cells` form), each resumable and logged to MLflow:

1. `<name>-tune`: `trials_per_method` candidates per (task, method): its learning rate and its
   own size/placement knobs (`MethodSpec.tuning`, drawn by tuning.py: the same number for every
   method), each candidate's size solved to the budget; first seed, `search_steps` steps,
   scored on a fixed `search_validation_examples`-row subset of validation only (search trials,
   `evaluation.role: search`: no test, no diagnostics).
2. `<name>`: every (task, method) at the candidate that scored best x every seed, `steps` steps,
   scored on the whole validation split and on the test split (reported; nothing is chosen on
   it). Its ablation report (axes task x method, paired differences to `trajectory` by seed) is
   the first table.
3. `<name>-unmatched-tune`, `<name>-unmatched` (unless `unmatched` is off): the same without the
   budget, the size knob tuned like the others: each method's best validated configuration,
   the second table. Candidates and final cells the matched stages already ran are read from
   them, not run again.

`<name>.comparison.json` (beside the sweeps) records the stages and every choice; table.py writes the
README's tables from it and MLflow. Sizes: `budget.match_budget` solves each method's size knob;
full fine-tuning, BitFit, DoRA (LoRA's rank) and VeRA keep their fixed size (the table shows
every count, from the same accounting). The learning-rate grids in the method specs were placed
on the old SST-2 dev split, which is today's test split; they only centre each method's range,
and stage 1 picks the rate on validation. AG News' validation and test are cuts of its test.csv
(tasks' split_note).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from ..analysis.table import record_file
from ..core import config as config_lib
from ..core.errors import UserError
from ..core.methods import registry
from ..engine.grid import check_seeds
from ..engine.spec import ROLE
from . import tuning

# The compared methods are those whose spec has a learning-rate grid (`MethodSpec.lr_grid`:
# MiniLM, AdamW, batch 32, each around the rate that trained best in single-seed calibration runs
# on SST-2 dev, the old protocol), listed in the tables in this order: the reference, its placement
# and continuous-t variants, the weight-LoRA family (the t-dependent T-LoRA and NaRA, PEFT's
# variants, then the adaptive-rank and frequency-domain ones), the representation-level Solo
# Connection, then the other baselines; a method not named here comes after them.
TABLE_ORDER = ("trajectory", "trajectory_adapter", "trajectory_continuous", "lora", "tlora", "nara", "dora",
               "adalora", "vera", "gelora", "selora", "foura", "solo", "adapter", "prefix", "bitfit", "full")


def _table_position(method: str) -> int:
    return TABLE_ORDER.index(method) if method in TABLE_ORDER else len(TABLE_ORDER)


ALL_METHODS = sorted((s.name for s in registry.specs() if s.lr_grid), key=_table_position)
LR_GRIDS: dict[str, list[float]] = {m: list(registry.spec_of(m).lr_grid) for m in ALL_METHODS}
REFERENCE_METHOD = "trajectory"

# Every run: what the default sweep measured to carry signal on 2 CPU cores (see rank_schedule.yaml).
# The phase count is not fixed here: it was chosen on the old dev split (today's test; two phases
# 0.69 vs four 0.53 dev at 200 steps), so the trajectory methods tune it on validation (their
# MethodSpec.tuning).
BASE_SETS = {"backbone": "minilm", "max_length": 48, "max_train_examples": 20000,
             "train_accuracy_examples": 256, "train.batch_size": 32, "train.warmup_steps": 20,
             "diffusion.eval_t_points": 2, "train.group_by_length": True}

# Per-method settings of the comparison (`MethodSpec.comparison_sets`, with the measurements
# that chose them in the method's file), applied before the size is solved.
METHOD_SETS: dict[str, dict[str, object]] = {
    m: dict(registry.spec_of(m).comparison_sets) for m in ALL_METHODS if registry.spec_of(m).comparison_sets}


@dataclass
class ComparisonSpec:
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    tasks: list[str] = field(default_factory=lambda: ["sst2", "ag_news"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 300
    budget: int | None = 73728  # trainable parameters (LoRA rank 4 on Q/K/V/O of MiniLM, exactly)
    search_steps: int | None = None  # steps of each lr-search run (default: steps // 2)
    search_validation_examples: int = 200
    eval_examples: int | None = None  # stage 2: fixed subsets of validation and test (None: whole splits)
    lr_grids: dict[str, list[float]] = field(default_factory=lambda: dict(LR_GRIDS))
    trials_per_method: int = 4  # stage-1 candidates of every method (tuning.py)
    tuning_seed: int = 0  # which candidates a method with more than that runs
    unmatched: bool = True  # also the second table: each method tuned and run without the budget
    curve_every: int = 0  # stage 2: validation every this many steps (a learning curve); 0: at the end only
    sets: dict[str, object] = field(default_factory=lambda: dict(BASE_SETS))  # every run


def parse_lr_grids(items: list[str]) -> dict[str, list[float]]:
    """["lora=1e-3,3e-3", "full=5e-5"] -> {"lora": [0.001, 0.003], "full": [5e-05]}."""
    grids = {}
    for item in items:
        method, _, rates = item.partition("=")
        if method not in LR_GRIDS:
            raise UserError(f"--lrs {item!r}: unknown method {method!r} (one of {', '.join(LR_GRIDS)})")
        try:
            grids[method] = sorted(float(r) for r in rates.split(","))
        except ValueError:
            raise UserError(f"--lrs {item!r}: expected METHOD=LR[,LR...], e.g. lora=1e-3,3e-3") from None
        if not grids[method] or min(grids[method]) <= 0:
            raise UserError(f"--lrs {item!r}: learning rates must be > 0")
    return grids


def stage_cells(spec: ComparisonSpec, log=print) -> list[dict]:
    """Stage 1's cells: `trials_per_method` candidates per (task, method) (tuning.py), each at the
    budget when there is one. The backbone is loaded once, on this machine, to count parameters."""
    import torch

    from ..core.backbone import load_backbone

    base = config_lib.from_dict({}, spec.sets)
    torch.manual_seed(0)
    backbone = load_backbone(base.backbone, trust_remote_code=base.trust_remote_code,
                             allow_hub=base.allow_hub, family=base.backbone_family)
    return [cell for task in spec.tasks for method in spec.methods
            for cell in tuning.sized_candidates(spec, backbone, task, method, log)]


def tuning_grid(spec: ComparisonSpec, cells: list[dict]) -> dict:
    """Stage 1's grid file content: every candidate once, first seed, `search_steps` steps,
    scored on a fixed `search_validation_examples`-row subset of validation."""
    steps = spec.search_steps or max(1, spec.steps // 2)
    budget = f"at {spec.budget} parameters" if spec.budget else "without a budget"
    # one evaluation, at the end: there is no early stopping in a grid to feed
    return {"description": f"baseline comparison, stage 1: {spec.trials_per_method} candidates per "
                           f"task x method {budget}, on validation",
            "fixed": {**spec.sets, "train.steps": steps, "train.eval_every": steps,
                      "max_eval_examples": spec.search_validation_examples, ROLE: "search"},
            "cells": cells, "seeds": spec.seeds[:1]}


def final_grid(spec: ComparisonSpec, chosen: dict[tuple[str, str], dict], budget: bool = True) -> dict:
    """Stage 2's grid file content: every (task, method) at its chosen candidate x every seed."""
    what = "at a matched budget" if budget else "each at its best validated size, no budget"
    grid = {"description": f"baseline comparison: methods {what}, tuned on validation, reported on test",
            "fixed": {**spec.sets, "train.steps": spec.steps, "train.eval_every": spec.curve_every or spec.steps,
                      "max_eval_examples": spec.eval_examples, ROLE: "result"},
            "cells": [chosen[(t, m)] for t in spec.tasks for m in spec.methods if (t, m) in chosen],
            "axes": ["task", "method"], "seeds": list(spec.seeds)}
    if any(c["method"] == REFERENCE_METHOD for c in grid["cells"]):  # not when reused from stage 2
        grid["reference"] = {"method": REFERENCE_METHOD}
    return grid


def write_grid(grid: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by jobs/baseline_comparison.py (lora_diffusion.experiments.comparison)\n"
                    + yaml.safe_dump(grid, sort_keys=False))
    return path


def run(spec: ComparisonSpec, name: str, engine_args: list[str], workdir: Path, log=print) -> int:
    """Every stage on the sweep engine. `engine_args` go to every `lora-diffusion sweep` call
    (--storage-path, --tracking-uri, --address, --max-concurrent, --smoke, ...). Run it again
    after an interruption: a finished stage is skipped, an interrupted one resumed. Writes
    `<name>.comparison.json` (the stages and every choice) beside the sweeps, which table.py reads."""
    from ..engine import options
    from ..engine.storage import SweepStorage

    opts = options.build_parser("").parse_known_args(engine_args)[0]
    storage = SweepStorage(options.storage_location(opts.storage_path))
    runner = _StageRunner(storage, opts.tracking_uri or options.default_tracking_uri(), engine_args, workdir, log)
    record = {"name": name, "budget": spec.budget, "trials_per_method": spec.trials_per_method,
              "tasks": spec.tasks, "methods": spec.methods, "seeds": spec.seeds, "stages": {}}
    budgets = [spec.budget] + ([None] if spec.budget and spec.unmatched else [])
    earlier: dict | None = None
    for budget in budgets:
        tag = "matched" if budget else "unmatched"
        sub = replace(spec, budget=budget)
        prefix = name if budget or not spec.budget else f"{name}-unmatched"
        rc, chosen = runner.tune(sub, f"{prefix}-tune", earlier)
        if rc != 0:
            return rc
        reuse = {k: earlier["sweep"] for k, c in chosen.items() if earlier and earlier["chosen"].get(k) == c}
        todo = {k: c for k, c in chosen.items() if k not in reuse}
        record["stages"][tag] = {"tune": f"{prefix}-tune", "final": prefix, "budget": budget,
                                 "chosen": [{**c, "final_sweep": reuse.get(k, prefix)} for k, c in chosen.items()]}
        # written before stage 2 runs: the tables of an unfinished comparison say what is partial
        storage.write_text(record_file(name), json.dumps(record, indent=2, default=str))
        rc = runner.stage(final_grid(sub, todo, budget=bool(budget)), prefix) if todo else 0
        if rc != 0:
            return rc
        earlier = {"sweep": prefix, "chosen": chosen, "tune": f"{prefix}-tune"}
    return 0


class _StageRunner:
    """Runs a comparison's grid stages: a finished stage is skipped, an interrupted one resumed."""

    def __init__(self, storage, uri: str, engine_args: list[str], workdir: Path, log):
        self.storage, self.uri, self.engine_args, self.workdir, self.log = storage, uri, engine_args, workdir, log

    def stage(self, grid: dict, sweep_name: str) -> int:
        from ..analysis.report import report_sweep
        from ..engine import sweep
        from ..engine.spec import SPEC_FILE

        if self.storage.exists(f"{sweep_name}/best.json"):
            self.log(f"{sweep_name}: finished earlier, skipped")
            return 0
        resume = ["--resume"] if self.storage.exists(f"{sweep_name}/{SPEC_FILE}") else []
        path = write_grid(grid, self.workdir / f"{sweep_name}.yaml")
        rc = sweep.main(["--grid", str(path), "--name", sweep_name, *resume, *self.engine_args],
                        report=report_sweep)
        if rc != 0:
            self.log(f"{sweep_name} did not finish (exit {rc}): run the same command again to resume it")
        return rc

    def tune(self, spec: ComparisonSpec, sweep_name: str, earlier: dict | None):
        """Stage 1: (exit code, (task, method) -> chosen cell). Candidates an earlier stage 1
        already ran (same cell) are read from it, not run again."""
        import pandas as pd

        from ..analysis.trials import load_trials

        cells = stage_cells(spec, self.log)
        if spec.trials_per_method == 1:  # one candidate each: nothing to choose
            return 0, {(c["task"], c["method"]): c for c in cells}
        done = load_trials(self.uri, earlier["tune"]) if earlier else pd.DataFrame()
        todo = [c for c in cells if not tuning.matching_rows(c, done)]
        if todo:
            rc = self.stage(tuning_grid(spec, todo), sweep_name)
            if rc != 0:
                return rc, {}
            done = pd.concat([done, load_trials(self.uri, sweep_name)], ignore_index=True)
        chosen = tuning.choose(cells, done)
        for (task, method), cell in chosen.items():
            self.log(f"{sweep_name}: {task} {method}: " + ", ".join(
                f"{k}={v}" for k, v in cell.items() if k not in ("task", "method")))
        return 0, chosen


# ----------------------------------------------------------------------------- the command line

USAGE = """Baselines at a matched parameter budget: task x method x seed on the sweep engine.

    lora-diffusion compare                                  # SST-2 + AG News, every compared method, 3 seeds
    lora-diffusion compare --tasks sst2 --name baselines-sst2
    lora-diffusion compare --smoke                          # tiny backbone, 2 methods, seconds per trial
    lora-diffusion compare-table --name baselines           # the tables, from the record and MLflow

Stage 1 (`NAME-tune`) tries the same number of candidates per method on validation (its rate and
its own size/placement knobs, declared in its MethodSpec), stage 2 (`NAME`) runs every seed with
the best one and reports test beside validation; `NAME-unmatched-tune` / `NAME-unmatched` repeat
both without the budget (the second table). All are grid sweeps (Ray Tune trials, each a Ray Train
run) logged to MLflow. Interrupted? Run the same command again: a finished stage is skipped and an
unfinished one resumed. Arguments not listed here go to the sweep engine (--storage-path,
--tracking-uri, --address, --max-concurrent, --workers, ...: see `lora-diffusion sweep --help`).
"""


def build_parser(prog: str | None = None):
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="baselines", help="sweep name of stage 2 (stage 1: NAME-tune)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random backbone, lora and bitfit on SST-2, a few steps (engine's --smoke)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="steps of every stage-2 run")
    p.add_argument("--search-steps", type=int, help="steps of every stage-1 run (default: steps / 2)")
    p.add_argument("--budget", type=int, default=73728,
                   help="target trainable parameters, 0 = each method's default size (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=["sst2", "ag_news"])
    p.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    p.add_argument("--search-validation-examples", type=int, default=200)
    p.add_argument("--eval-examples", type=int,
                   help="stage 2: fixed subsets of this many validation and test rows (default: whole splits)")
    p.add_argument("--lrs", action="append", default=[], metavar="METHOD=LR[,LR...]",
                   help="replace a method's learning-rate grid (repeatable); widened like every grid "
                        "to --trials-per-method candidates, and stage 1 picks the rate")
    p.add_argument("--trials-per-method", type=int, default=4,
                   help="stage-1 candidates of every method, the same for all (1: no tuning stage)")
    p.add_argument("--curve-every", type=int, default=0, metavar="N",
                   help="stage 2: score validation every N steps, a learning curve per method "
                        "(lora-diffusion compare-table --curves); test is scored once, at the end "
                        "(default: validation at the end only)")
    p.add_argument("--no-unmatched", action="store_true",
                   help="skip the second table (each method tuned and run without the budget)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of every run (repeatable); a knob stage 1 would tune, set here, "
                        "is fixed instead, and the budget is solved with it")
    p.add_argument("--workdir", default="runs/baseline_comparison",
                   help="where the generated grid files are written (default: %(default)s)")
    return p


def spec_from_args(args) -> tuple[ComparisonSpec, str, list[str]]:
    """The spec, the stage-2 sweep name and the engine options the command line asks for
    (--smoke: two methods, one task, a small budget, and the engine's --smoke)."""
    check_seeds(args.seeds, "--seeds")
    spec = ComparisonSpec(methods=args.methods, tasks=args.tasks, seeds=args.seeds, steps=args.steps,
                          budget=args.budget or None, search_steps=args.search_steps,
                          search_validation_examples=args.search_validation_examples,
                          trials_per_method=args.trials_per_method, unmatched=not args.no_unmatched,
                          eval_examples=args.eval_examples, curve_every=args.curve_every)
    if args.curve_every < 0 or (args.curve_every and args.steps % args.curve_every):
        raise UserError(f"--curve-every: must divide --steps {args.steps} (or be 0), got {args.curve_every}")
    spec.lr_grids.update(parse_lr_grids(args.lrs))
    if args.trials_per_method < 1:
        raise UserError(f"--trials-per-method: must be >= 1, got {args.trials_per_method}")
    name, engine_smoke = args.name, []
    if args.smoke:
        engine_smoke = ["--smoke"]
        spec.sets = {"backbone": "tiny-random"}
        spec.methods = [m for m in args.methods if m in ("lora", "bitfit")] or args.methods[:2]
        spec.tasks, spec.seeds, spec.budget = args.tasks[:1], args.seeds[:2], 3000
        spec.steps, spec.search_steps, spec.search_validation_examples = 4, 2, 16
        spec.trials_per_method = min(2, args.trials_per_method)
        name = args.name + "-smoke" if args.name == "baselines" else args.name
    spec.sets.update(config_lib.parse_sets(args.set))  # in every cell's `fixed`, so never tuned
    return spec, name, engine_smoke


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`lora-diffusion compare`: raises UserError on bad input (the CLI prints it, exit 2)."""
    args, engine_args = build_parser(prog).parse_known_args(argv)
    spec, name, engine_smoke = spec_from_args(args)
    return run(spec, name, [*engine_smoke, *engine_args], Path(args.workdir) / name)
