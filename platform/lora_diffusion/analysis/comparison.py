"""Baseline comparison on the sweep engine: every method at a matched budget, with its own
learning rate, x seeds x tasks.

Two grid sweeps (sweep.py running grid.py's `cells` form), each resumable and logged to
MLflow like every sweep:

1. `<name>-lr`: every (task, method) at each rate of its grid (`LR_GRIDS`), first seed only,
   `search_steps` steps, scored on a seeded `search_validation_examples`-row subset of
   validation. Skipped for a method whose grid has one rate.
2. `<name>`: every (task, method) with the rate that scored best (ties: the smaller rate) x every
   seed, `steps` steps, scored on the whole validation split and on the test split (reported;
   nothing is chosen on it). Its ablation report (axes task x method, paired differences to
   `trajectory` by seed) is the table.

Sizes: `budget.match_budget` solves each method's size knob to the target; full fine-tuning and
BitFit have no knob and keep their size (the table shows both, from the same accounting).
The rate is picked on part of validation (200 rows by default, 23% of SST-2's 861) among
two values per method; test is never used for a choice. AG News' validation and test are cuts of
its test.csv (tasks' split_note).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..core import config as config_lib
from ..core.errors import UserError
from ..core.methods import registry
from .budget import knob_of, match_budget

# The compared methods are those whose spec has a learning-rate grid (`MethodSpec.lr_grid`:
# MiniLM, AdamW, batch 32, each around the rate that trained best in single-seed calibration runs
# on SST-2 dev, the old protocol), listed in the tables in this order: the reference, its placement
# variant, the weight-LoRA family (PEFT's variants, then the adaptive-rank and frequency-domain
# ones), the representation-level Solo Connection, then the other baselines; a method not named
# here comes after them.
TABLE_ORDER = ("trajectory", "trajectory_adapter", "lora", "tlora", "dora", "adalora", "vera", "gelora",
               "selora", "foura", "solo", "adapter", "prefix", "bitfit", "full")


def _table_position(method: str) -> int:
    return TABLE_ORDER.index(method) if method in TABLE_ORDER else len(TABLE_ORDER)


ALL_METHODS = sorted((s.name for s in registry.specs() if s.lr_grid), key=_table_position)
LR_GRIDS: dict[str, list[float]] = {m: list(registry.spec_of(m).lr_grid) for m in ALL_METHODS}
REFERENCE_METHOD = "trajectory"

# Every run: what the default sweep measured to carry signal on 2 CPU cores (see rank_schedule.yaml).
# Two phases, not the default four: each phase's module sees only its share of the steps, and at
# these budgets four phases trained worse (grid_rank_schedule: 0.69 vs 0.53 dev at 200 steps;
# trajectory_adapter r8 x 2 phases 0.805 dev at 400 steps, r4 x 4 phases 0.645 at 800).
BASE_SETS = {"backbone": "minilm", "max_length": 48, "max_train_examples": 20000,
             "train_accuracy_examples": 256, "train.batch_size": 32, "train.warmup_steps": 20,
             "diffusion.eval_t_points": 2, "trajectory.num_phases": 2, "train.group_by_length": True}

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
    lr_grids: dict[str, list[float]] = field(default_factory=lambda: dict(LR_GRIDS))
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


def sized_cells(spec: ComparisonSpec) -> list[dict]:
    """One cell per (task, method): its size knob solved to the budget (methods with no knob as
    they are). The backbone is loaded once, on this machine, to count parameters."""
    import torch

    from ..core.backbone import load_backbone

    base = config_lib.from_dict({}, spec.sets)
    torch.manual_seed(0)
    backbone = load_backbone(base.backbone, trust_remote_code=base.trust_remote_code,
                             allow_hub=base.allow_hub)
    cells = []
    for task in spec.tasks:
        for method in spec.methods:
            cell = {"task": task, "method": method, **METHOD_SETS.get(method, {})}
            knob = knob_of(method)
            if spec.budget and knob:
                config = config_lib.from_dict({}, {**spec.sets, **cell})
                cell[knob] = match_budget(config, backbone, spec.budget).flat()[knob]
            cells.append(cell)
    return cells


def lr_search_grid(spec: ComparisonSpec, cells: list[dict]) -> dict | None:
    """Stage 1's grid file content, or None when no method has more than one rate to try."""
    searched = [{**c, "train.lr": lr} for c in cells if len(spec.lr_grids[c["method"]]) > 1
                for lr in spec.lr_grids[c["method"]]]
    if not searched:
        return None
    steps = spec.search_steps or max(1, spec.steps // 2)
    # one evaluation, at the end: there is no early stopping in a grid to feed
    return {"description": "baseline comparison, stage 1: learning rate per task x method",
            "fixed": {**spec.sets, "train.steps": steps, "train.eval_every": steps,
                      "max_eval_examples": spec.search_validation_examples},
            "cells": searched, "axes": ["task", "method", "train.lr"], "seeds": spec.seeds[:1]}


def choose_lrs(spec: ComparisonSpec, cells: list[dict], trials) -> dict[tuple[str, str], float]:
    """(task, method) -> the rate whose search run scored best on the validation subset (ties: smaller).
    `trials` is stage 1 read back by analysis.trials.load_trials; a method with one rate takes it."""
    from .trials import VALIDATION_METRIC

    chosen = {}
    for c in cells:
        key, grid = (c["task"], c["method"]), spec.lr_grids[c["method"]]
        if len(grid) == 1:
            chosen[key] = grid[0]
            continue
        rows = trials[(trials["task"] == c["task"]) & (trials["method"] == c["method"])
                      & (trials["status"] == "FINISHED")] if len(trials) else []
        scored = [(float(r[VALIDATION_METRIC]), -float(r["train.lr"])) for _, r in
                  (rows.iterrows() if len(rows) else []) if not math.isnan(float(r[VALIDATION_METRIC]))]
        if not scored:
            raise RuntimeError(f"lr search: no finished run of {key[1]} on {key[0]}; see stage 1's sweep")
        chosen[key] = -max(scored)[1]
    return chosen


def final_grid(spec: ComparisonSpec, cells: list[dict], lrs: dict) -> dict:
    """Stage 2's grid file content: every cell at its chosen rate x every seed."""
    grid = {"description": "baseline comparison: methods at a matched budget, own learning rate",
            "fixed": {**spec.sets, "train.steps": spec.steps, "train.eval_every": spec.steps},
            "cells": [{**c, "train.lr": lrs[(c["task"], c["method"])]} for c in cells],
            "axes": ["task", "method"], "seeds": list(spec.seeds)}
    if REFERENCE_METHOD in spec.methods:
        grid["reference"] = {"method": REFERENCE_METHOD}
    return grid


def write_grid(grid: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by jobs/baseline_comparison.py (lora_diffusion.analysis.comparison)\n"
                    + yaml.safe_dump(grid, sort_keys=False))
    return path


def run(spec: ComparisonSpec, name: str, engine_args: list[str], workdir: Path, log=print) -> int:
    """Both stages on the sweep engine. `engine_args` go to every `lora-diffusion sweep` call
    (--storage-path, --tracking-uri, --address, --max-concurrent, --smoke, ...). Run it again
    after an interruption: a finished stage is skipped, an interrupted one resumed."""
    from ..engine import options, sweep
    from ..engine.spec import SPEC_FILE
    from ..engine.storage import SweepStorage
    from .report import report_sweep
    from .trials import load_trials

    opts = options.build_parser("").parse_known_args(engine_args)[0]
    storage = SweepStorage(options.storage_location(opts.storage_path))
    uri = opts.tracking_uri or options.default_tracking_uri()

    def stage(grid: dict, sweep_name: str) -> int:
        if storage.exists(f"{sweep_name}/best.json"):
            log(f"{sweep_name}: finished earlier, skipped")
            return 0
        resume = ["--resume"] if storage.exists(f"{sweep_name}/{SPEC_FILE}") else []
        path = write_grid(grid, workdir / f"{sweep_name}.yaml")
        return sweep.main(["--grid", str(path), "--name", sweep_name, *resume, *engine_args],
                          report=report_sweep)

    cells = sized_cells(spec)
    search = lr_search_grid(spec, cells)
    trials = []
    if search is not None:
        rc = stage(search, f"{name}-lr")
        if rc != 0:
            log(f"stage 1 ({name}-lr) did not finish (exit {rc}): run the same command again to resume it")
            return rc
        trials = load_trials(uri, f"{name}-lr")
    lrs = choose_lrs(spec, cells, trials)
    for (task, method), lr in lrs.items():
        log(f"{task} {method}: lr {lr:g}")
    return stage(final_grid(spec, cells, lrs), name)
