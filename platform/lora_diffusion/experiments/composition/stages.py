"""Multi-task composition on the sweep engine: task modules trained apart, then composed.

1. `<name>-modules-<task>` (a grid sweep per task: the engine selects one metric per sweep):
   one module per method (trajectory; lora for PEFT's merge) x learning rate x seed, task i's
   modules with `trajectory.task_id` i. Per (task, method) the rate with the best mean final
   validation score over the seeds (the lowest bound, ELBO-only: metric_mode) is selected; its
   trials (one per seed) are the task modules.
2. `<name>-router` (grid sweep): the trained router per seed, over that seed's trajectory
   modules, on the mixture of every task's training rows (`router.train_tasks`). A grid cell
   cannot set `train.seed`, so each seed's router is a cell with the grid's one seed 0: the
   variation over seeds is the experts' (and the router's rows are drawn in one order).
3. Evaluations, in this process (evaluate.py): the interference matrix (each seed's
   trajectory module of task A on task B's test split) and every composition on every task
   (router trained / uniform / oracle / energy; lora_merge linear / cat / ties). The training-free
   ones have no steps to run, so they are not trials: each is a Recipe built and evaluated.
   Every finished evaluation is written to `<name>.composition.json` beside the sweeps at once,
   so a rerun skips it.
4. The report (report.py): tables and heatmaps on the job's own MLflow parent run
   (tags sweep=<name>, role=sweep, stage=composition).

Run the same command again after an interruption: a finished sweep is skipped, an unfinished
one resumed, finished evaluations are read back.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ...analysis.trials import final_column, load_trials, metric_of_task
from ...core.methods import registry
from ...core.task_specs import oriented

METHODS = ("trajectory", "lora")  # the router's experts; PEFT merge's experts
ROUTER_MODES = ("trained", "uniform", "oracle", "energy")
MERGES = ("linear", "cat", "ties")
# Every run; per task the context its prompts need (README "Generative tasks": XQuAD median
# prompt 167 WordPieces, XSum 308); the router's mixture runs at the longest of them.
BASE_SETS = {"backbone": "minilm", "max_train_examples": 20000, "train_accuracy_examples": 64,
             "train.batch_size": 16, "train.warmup_steps": 20, "diffusion.eval_t_points": 2,
             "train.group_by_length": True, "lora.rank": 8}
TASK_SETS = {"sst2": {"max_length": 64}, "ag_news": {"max_length": 128},
             "xquad": {"max_length": 256}, "xsum": {"max_length": 384}}


@dataclass
class CompositionSpec:
    tasks: list[str] = field(default_factory=lambda: list(TASK_SETS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 300  # each task module
    router_steps: int = 100
    lrs: dict[str, list[float]] = field(default_factory=lambda: {
        m: list(registry.spec_of(m).lr_grid) for m in METHODS})
    eval_examples: int | None = 64  # fixed subsets of validation and test (generation is slow)
    sets: dict[str, object] = field(default_factory=lambda: dict(BASE_SETS))
    task_sets: dict[str, dict] = field(default_factory=lambda: {t: dict(s) for t, s in TASK_SETS.items()})
    energy_temperature: float = 1.0

    def task_id(self, task: str) -> int:
        return self.tasks.index(task)

    def metric(self, task: str) -> str:
        sets = {**self.sets, **self.task_sets.get(task, {})}
        return metric_of_task(task, sets.get("generation.text_scores", True))


def apply_engine_sets(spec: CompositionSpec, sets: list[str]) -> None:
    """The engine's --set wins over the grid's fixed settings in every trial, so the spec must
    see it too: `--set generation.text_scores=false` makes the generation tasks ELBO-only, and
    their modules must then be selected (and reported) on the bound, not on a score never made."""
    from ...core import config as config_lib

    spec.sets.update(config_lib.parse_sets(sets))


def record_file(name: str) -> str:
    return f"{name}.composition.json"


def modules_grid(spec: CompositionSpec, task: str) -> dict:
    cells = [{"method": method, "train.lr": lr} for method in METHODS for lr in spec.lrs[method]]
    return {"description": f"composition, stage 1: {task} modules, method x rate x seed, the rate "
                           "selected on validation",
            "fixed": {**spec.sets, **spec.task_sets.get(task, {}), "task": task,
                      "trajectory.task_id": spec.task_id(task), "train.steps": spec.steps,
                      "train.eval_every": spec.steps, "max_eval_examples": spec.eval_examples},
            "cells": cells, "axes": ["method", "train.lr"], "seeds": list(spec.seeds)}


def select_modules(spec: CompositionSpec, df) -> dict[tuple[str, str], dict]:
    """(task, method) -> {"lr", "validation", "trials": {seed: trial_id}}: the rate whose finished
    trials have the best mean final validation score; a rate missing a seed is not eligible."""
    chosen = {}
    for task in spec.tasks:
        column = final_column("validation", spec.metric(task))
        for method in METHODS:
            best = None
            for lr in spec.lrs[method]:
                rows = df[(df["task"] == task) & (df["method"] == method) & (df["train.lr"] == lr)
                          & (df["status"] == "FINISHED")]
                scores = [float(v) for v in rows[column]] if column in rows else []
                if len(rows) < len(spec.seeds) or any(math.isnan(v) for v in scores):
                    continue
                mean = sum(scores) / len(scores)
                if best is None or oriented(column, mean) > oriented(column, best["validation"]):
                    best = {"lr": lr, "validation": mean,
                            "trials": {int(r["seed"]): r["trial_id"] for _, r in rows.iterrows()}}
            if best is not None:
                chosen[(task, method)] = best
    return chosen


def router_grid(spec: CompositionSpec, experts: dict[int, list[str]]) -> dict:
    longest = max(spec.task_sets.get(t, {}).get("max_length", 64) for t in spec.tasks)
    return {"description": "composition, stage 2: the trained router per seed's task modules, on the "
                           "task mixture",
            "fixed": {**spec.sets, "method": "router", "task": spec.tasks[0], "max_length": longest,
                      "router.mode": "trained", "router.train_tasks": list(spec.tasks),
                      "train.steps": spec.router_steps, "train.eval_every": spec.router_steps,
                      "max_eval_examples": spec.eval_examples},
            "cells": [{"router.checkpoints": experts[s]} for s in sorted(experts)],
            "axes": ["router.checkpoints"], "seeds": [0]}


def trial_checkpoint(storage, sweep: str, trial_id: str, workdir: Path) -> str:
    """The local directory of a trial's last checkpoint (the method as `eval --checkpoint` reads
    it): Ray Train keeps it under `<sweep>/train/<trial_id>/checkpoint_*`; from an object store
    it is copied to `workdir` first."""
    rel = f"{sweep}/train/{trial_id}"
    names = [n for n in storage.names(rel)  # beside them Ray keeps checkpoint_manager_snapshot.json
             if n.startswith("checkpoint_") and storage.exists(f"{rel}/{n}/trainer_state.json")]
    if not names:
        raise FileNotFoundError(f"no checkpoint of trial {trial_id} under {storage.join(rel)}")
    last = max(names, key=lambda n: json.loads(storage.read_text(f"{rel}/{n}/trainer_state.json"))["step"])
    if storage.is_local:
        return f"{storage.root}/{rel}/{last}"
    import pyarrow.fs as pafs

    local = workdir / "checkpoints" / trial_id
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(f"{storage.root}/{rel}/{last}", str(local), source_filesystem=storage.fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return str(local)


def module_paths(chosen, storage, name: str, workdir: Path) -> dict[int, dict[tuple[str, str], str]]:
    """seed -> (task, method) -> checkpoint directory of the selected modules."""
    out: dict[int, dict] = {}
    for (task, method), choice in chosen.items():
        for seed, trial_id in choice["trials"].items():
            path = trial_checkpoint(storage, f"{name}-modules-{task}", trial_id, workdir)
            out.setdefault(seed, {})[(task, method)] = path
    return out


def router_paths(df, experts: dict[int, list[str]], storage, sweep: str, workdir) -> dict[int, str]:
    """seed -> checkpoint of the trained router over that seed's modules (its trial's
    `router.checkpoints` param names them)."""
    out = {}
    for _, row in df[df["status"] == "FINISHED"].iterrows():
        named = str(row.get("router.checkpoints"))
        for seed, paths in experts.items():
            if all(p in named for p in paths):
                out[seed] = trial_checkpoint(storage, sweep, row["trial_id"], workdir)
    return out


def train_modules(spec: CompositionSpec, name: str, runner, log) -> dict | None:
    """Stage 1, one sweep per task; the selection, or None if a sweep did not finish or a
    (task, method) has no rate that finished every seed."""
    import pandas as pd

    frames = []
    for task in spec.tasks:
        if runner.stage(modules_grid(spec, task), f"{name}-modules-{task}") != 0:
            return None
        frames.append(load_trials(runner.uri, f"{name}-modules-{task}"))
    chosen = select_modules(spec, pd.concat(frames, ignore_index=True))
    missing = [f"{t} {m}" for t in spec.tasks for m in METHODS if (t, m) not in chosen]
    if missing:
        log(f"{name}-modules: no rate finished every seed for {', '.join(missing)}: nothing to compose")
        return None
    for (task, method), c in chosen.items():
        log(f"{name}-modules-{task}: {method} lr {c['lr']} (validation {c['validation']:.4f})")
    return chosen


def run(spec: CompositionSpec, name: str, engine_args: list[str], workdir: Path, log=print) -> int:
    """Every stage (module docstring); `engine_args` go to every sweep (--storage-path,
    --tracking-uri, --smoke, --max-concurrent, ...)."""
    from ...engine import options
    from ...engine.storage import SweepStorage
    from ..comparison import _StageRunner
    from . import evaluate, report

    opts = options.build_parser("").parse_known_args(engine_args)[0]
    apply_engine_sets(spec, opts.set)
    storage = SweepStorage(options.storage_location(opts.storage_path))
    uri = opts.tracking_uri or options.default_tracking_uri()
    runner = _StageRunner(storage, uri, engine_args, workdir, log)
    chosen = train_modules(spec, name, runner, log)
    if chosen is None:
        return 1
    paths = module_paths(chosen, storage, name, workdir)
    experts = {s: [paths[s][(t, "trajectory")] for t in spec.tasks] for s in spec.seeds}
    rc = runner.stage(router_grid(spec, experts), f"{name}-router")
    if rc != 0:
        return rc
    routers = router_paths(load_trials(uri, f"{name}-router"), experts, storage,
                                            f"{name}-router", workdir)
    record = evaluate.Record(storage, record_file(name), name, spec, chosen)
    evaluate.evaluate_all(spec, record, paths, routers, log)
    report.report(spec, record.data, name, uri, workdir / "report", log)
    return 0


# ----------------------------------------------------------------------------- the command line

USAGE = """Multi-task composition: task modules trained apart, composed, interference measured.

    lora-diffusion compose                                # SST-2, AG News, XQuAD, XSum; 3 seeds
    lora-diffusion compose --set backbone=runs/backbones/minilm-mdlm --name compose-mdlm
    lora-diffusion compose --smoke                        # tiny random backbone, 2 tasks, 2 seeds

Stage 1 (`NAME-modules-TASK`, a grid sweep per task) trains a trajectory and a weight-LoRA module
per task x rate x seed and selects each rate on validation; stage 2 (`NAME-router`) trains the
router per seed on the task mixture; then every single-task module is scored on every task (the
interference matrix) and every composition (router trained / uniform / oracle / energy, PEFT's
linear / cat / TIES merge) on every task, test with std over seeds, gap to the oracle, cost in
parameters and bytes: `NAME.composition.json` beside the sweeps, the tables and heatmaps on the
MLflow run NAME. Interrupted? Run the same command again. Other arguments go to the sweep engine
(--storage-path, --tracking-uri, --max-concurrent, --set, ...).
"""
# --smoke: the tiny random backbone, short contexts and answers, a few steps (not the engine's
# --smoke, whose max_length would override each task's)
SMOKE_SETS = {"backbone": "tiny-random", "max_train_examples": 48, "train_accuracy_examples": 8,
              "train.batch_size": 8, "train.warmup_steps": 1, "trajectory.injection_layers": [0],
              "diffusion.eval_t_points": 1, "lora.rank": 2, "train.threads": 1}
SMOKE_TASK_SETS = {"sst2": {"max_length": 32}, "ag_news": {"max_length": 32},
                   "xquad": {"max_length": 48, "generation.response_tokens": 3},
                   "xsum": {"max_length": 48, "generation.response_tokens": 3}}


def build_parser(prog: str | None = None):
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="composition")
    p.add_argument("--smoke", action="store_true", help="tiny random backbone, sst2 + xquad, 2 seeds, 2 steps")
    p.add_argument("--tasks", nargs="+", default=list(TASK_SETS), choices=list(TASK_SETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="steps of every task module")
    p.add_argument("--router-steps", type=int, default=100, help="steps of the trained router")
    p.add_argument("--eval-examples", type=int, default=64, help="fixed validation and test rows per task")
    p.add_argument("--lrs", action="append", default=[], metavar="METHOD=LR[,LR...]",
                   help="trajectory or lora rates to select from on validation (default: the method's grid)")
    p.add_argument("--energy-temperature", type=float, default=1.0)
    p.add_argument("--workdir", default="runs/composition", help="grid files, copied checkpoints, the report")
    return p


def spec_from_args(args) -> CompositionSpec:
    from ...core.errors import UserError
    from ...engine.grid import check_seeds

    check_seeds(args.seeds, "--seeds")
    spec = CompositionSpec(tasks=args.tasks, seeds=args.seeds, steps=args.steps,
                           router_steps=args.router_steps, eval_examples=args.eval_examples,
                           energy_temperature=args.energy_temperature)
    for item in args.lrs:
        method, _, rates = item.partition("=")
        if method not in METHODS:
            raise UserError(f"--lrs {item!r}: method must be one of {', '.join(METHODS)}")
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


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`lora-diffusion compose`: raises UserError on bad input (the CLI prints it, exit 2)."""
    args, engine_args = build_parser(prog).parse_known_args(argv)
    name = args.name + "-smoke" if args.smoke and args.name == "composition" else args.name
    return run(spec_from_args(args), name, engine_args, Path(args.workdir) / name)
