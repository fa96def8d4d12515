"""The sweep spec: everything a sweep is, settled before Ray starts and saved as sweep.json.

`prepare(args)` builds a new sweep's spec from the command line and its space or grid file, or
reads a saved one back for --resume. Everything the user can get wrong (the file, --set keys,
--name, an existing sweep, missing data) raises a `UserError` here, naming the YAML field or
the command-line option. sweep.json keeps the keys and layout it had when the spec was an
untyped dict.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..core import config as config_lib, tasks
from ..core.errors import UserError
from ..core.task_specs import TEXT_SCORES, metric_mode, run_metric
from . import preflight, search_space as space_lib
from .grid import only_cells, parse_grid, parse_only, read_with_extends
from .options import default_tracking_uri, repo_root, storage_location, worker_resources
from .storage import SweepStorage
from .tracking import DEFAULT_EXPERIMENT

METRIC = "validation/accuracy"  # classification's; every run's: selection_metric, its mode: metric_mode
SPEC_FILE = "sweep.json"
ROLE = "evaluation.role"  # search for a search space's trials (core/config.py EvaluationConfig)
TINY_BACKBONE = "tiny-random"  # --smoke's backbone (backbone.py builds it locally on first use)


def selection_metric(task: str, text_scores: bool = True) -> str:
    """What a sweep on `task` selects on (Tune, ASHA, the best trial): validation/accuracy for
    classification, validation/f1 for xquad, validation/rougeL for xsum, and for a generation
    task run with generation.text_scores false validation/elbo_nats_per_token, lower is better
    (task_specs.run_metric, metric_mode)."""
    return f"validation/{run_metric(task, text_scores)}"


# --smoke: the tiny random backbone (built in the sweep directory) and a few steps per trial
SMOKE_OVERRIDES = {
    "max_length": 32, "max_train_examples": 64, "max_eval_examples": 16, "train_accuracy_examples": 16,
    "train.steps": 6, "train.batch_size": 8, "train.eval_every": 2, "train.warmup_steps": 1,
    "trajectory.injection_layers": [0], "diffusion.eval_t_points": 2, "diffusion.sampler_steps": 2,
    # generation tasks' responses must fit the 32-token window (XSum's own 32 cannot); unused by
    # classification
    "generation.response_tokens": 4,
}
SMOKE_SWEEP = {"num_samples": 4, "max_concurrent": 2, "workers": 1, "grace_period": 2, "reduction_factor": 2}
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


@dataclass
class SweepOptions:
    """The engine's options: defaults < the file's `sweep:` section < --smoke < the command line."""
    num_samples: int = 8
    max_concurrent: int = 2
    workers: int = 1
    seed: int = 0  # Optuna's sampler
    grace_period: int = 50  # ASHA's first rung (steps)
    reduction_factor: int = 3
    max_trial_retries: int = 0  # a failed trial run again from its last checkpoint (Tune's FailureConfig)
    # custom Ray resources each Train worker reserves besides CPU / GPU (--worker-resources): a node type
    worker_resources: dict = field(default_factory=dict)


@dataclass
class GridSpec:
    axes: dict  # axis -> its values
    seeds: list
    reference: dict
    cells: list | None  # the listed cells of a `cells` grid; None: the product of the axes
    only: dict | None = None  # --only: the slice of the grid file this sweep runs (its cells above)


@dataclass
class SweepSpec:
    name: str
    storage: str  # where sweeps live (Ray's storage_path)
    exp_dir: str  # this sweep's directory in it
    space_path: str
    space_yaml: object  # the file's content, validated again on resume
    base_overrides: dict  # --smoke, $LORA_DIFFUSION_DATA_DIR and --set, under the file's `fixed`
    fixed: dict  # every trial's config overrides
    sweep: SweepOptions
    kind: str  # "optuna" (a search space) or "grid"
    grid: GridSpec | None
    smoke: bool
    tracking_uri: str
    experiment: str
    max_failures: int  # worker-group restarts per trial
    steps: int
    created: str
    sweep_id: str  # MLflow runs are found by this, not the name

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_json(cls, text: str, where: str) -> SweepSpec:
        data = json.loads(text)
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)} (not a sweep.json of this engine)")
        spec = cls(**{n: data[n] for n in names})
        spec.sweep = SweepOptions(**spec.sweep)
        spec.grid = GridSpec(**spec.grid) if spec.grid else None
        return spec

    @property
    def metric(self) -> str:
        fixed_task = self.fixed.get("task", config_lib.RunSettings.task)
        # one metric (_check_data); a sweep.json of older code has no text_scores: true
        return min(selection_metrics(fixed_task, self.fixed.get(TEXT_SCORES, True), self.grid))

    @property
    def mode(self) -> str:
        """Tune's, Optuna's and ASHA's mode: "max", or "min" for the ELBO bound."""
        return metric_mode(self.metric)

    def parse_space(self):
        """The space (or grid) file's content, validated with the sweep's overrides."""
        if self.kind == "grid":
            return _parse_grid(self.space_yaml, self.space_path, self.base_overrides)
        return space_lib.parse(self.space_yaml, self.space_path, self.base_overrides)


# ----------------------------------------------------------------------------- prepare


def prepare(args) -> SweepSpec:
    """Everything checked before Ray starts: the spec of a new sweep, or the saved one to resume."""
    storage = SweepStorage(storage_location(args.storage_path))
    for name in ("num_samples", "workers", "max_concurrent"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    if getattr(args, "retry_failed", None) is not None and args.retry_failed < 0:
        raise UserError(f"--retry-failed: must be >= 0 (retries of a failed trial), got {args.retry_failed}")
    if args.max_failures < 0:
        raise UserError(f"--max-failures: must be >= 0 (worker-group restarts per trial), got {args.max_failures}")
    return _resume(args, storage) if args.resume else _new(args, storage)


def sweep_name(args) -> str:
    """The sweep's name: --name, else the space's file name, plus each --only axis and its values
    (grid_x-num_phases-1-4), plus -smoke with --smoke."""
    only = "".join(f"-{key.rsplit('.', 1)[-1]}-" + "-".join(map(str, values))
                   for key, values in parse_only(getattr(args, "only", None) or []).items())
    return args.name or (Path(space_lib.resolve_path(args.space, repo_root())).stem + only
                         + ("-smoke" if args.smoke else ""))


def started(storage: SweepStorage, name: str) -> bool:
    """Whether Tune saved the sweep's experiment state: a sweep that failed before that (bad
    cluster, MLflow down) has no trial to resume and starts afresh under its name."""
    return any(n.startswith("experiment_state-") for n in storage.names(name))


def _resume(args, storage: SweepStorage) -> SweepSpec:
    name = sweep_name(args)
    if not storage.exists(f"{name}/{SPEC_FILE}"):
        raise UserError(f"--resume: no sweep named {name!r} in {storage.join()} (expected "
                        f"{storage.join(name, SPEC_FILE)}); start it without --resume")
    try:
        spec = SweepSpec.from_json(storage.read_kept(f"{name}/{SPEC_FILE}"), storage.join(name, SPEC_FILE))
    except (ValueError, TypeError) as exc:  # truncated or edited by hand
        raise UserError(f"--resume: {storage.join(name, SPEC_FILE)} is not a readable sweep spec "
                        f"({exc})".splitlines()[0]) from None
    spec.parse_space()  # validated again: the code may have changed since
    if args.set or args.num_samples or args.workers:
        print("note: --resume continues the saved sweep; --set, --num-samples and --workers are ignored",
              file=sys.stderr)
    spec.tracking_uri = args.tracking_uri or spec.tracking_uri
    return spec


def _new(args, storage: SweepStorage) -> SweepSpec:
    path = space_lib.resolve_path(args.space, repo_root())
    raw = read_with_extends(path, "search space") if path.is_file() else None  # a grid's `extends` resolved
    base = _base_overrides(args, raw)
    name = _sweep_name(args, path)
    if storage.is_nonempty_dir(name) and started(storage, name):
        raise UserError(f"sweep {name!r} already exists in {storage.join(name)}: pass --resume to "
                        f"continue it, --name to start another, or delete it")
    if isinstance(raw, dict) and ("grid" in raw or "cells" in raw):
        kind, (fixed, base, options, grid) = "grid", _grid_part(args, raw, path, base)
    else:
        space = space_lib.load(path, base)  # validates file, keys, values: UserError names file and key
        _refuse_sampled_sets(args, space, path)
        # its trials serve selection: validation only, unless the space or --set says otherwise
        kind, fixed, options, grid = "optuna", {ROLE: "search", **space.fixed}, _options(args, space.sweep), None
        if args.only:
            raise UserError(f"--only: slices a grid file's cells; {path} is a search space")
    fixed_cfg = config_lib.from_dict({}, fixed)
    _check_data(fixed_cfg, grid)
    if not (grid and ("backbone" in grid.axes or any("backbone" in c for c in grid.cells or []))):
        fixed, base = _local_backbone(fixed, base, fixed_cfg)
    _check_positions(fixed_cfg)
    preflight.check_backbone_fit(fixed, grid, cells_too=not (args.smoke and fixed_cfg.backbone == TINY_BACKBONE))
    _fit_grace_period(options, fixed_cfg, args.smoke)
    return SweepSpec(
        name=name, storage=storage.join(), exp_dir=storage.join(name), space_path=str(path),
        space_yaml=raw, base_overrides=base, fixed=fixed, sweep=options, kind=kind, grid=grid,
        smoke=bool(args.smoke), tracking_uri=args.tracking_uri or default_tracking_uri(),
        experiment=args.experiment or DEFAULT_EXPERIMENT, max_failures=args.max_failures,
        steps=fixed_cfg.train.steps, created=time.strftime("%Y-%m-%d %H:%M:%S"),
        sweep_id=f"{name}-{uuid.uuid4().hex[:8]}")


def _refuse_sampled_sets(args, space, path: Path) -> None:
    """A --set of a knob the space samples would be overridden in every trial while the parent
    run records the user's value: refuse it."""
    sampled = {p.field for p in space.params if p.field}
    if TEXT_SCORES in sampled:  # its trials would be selected on two metrics, of opposite modes
        raise UserError(f"{path}: {TEXT_SCORES}: a search space may not sample it (text scores and the "
                        "ELBO bound are different selection metrics); fix it in the space's fixed section")
    clash = [k for k in config_lib.parse_sets(args.set) if k in sampled]
    if clash:
        raise UserError(f"--set {clash[0]}: the search space {path} samples this knob; drop the --set, "
                        "or move the knob from the space's params to its fixed section")


def _local_backbone(fixed: dict, base: dict, fixed_cfg) -> tuple[dict, dict]:
    """A backbone directory must exist before Ray starts; the trials get its absolute path (in
    `fixed`, and in `base` so that --resume validates the same file with the same path)."""
    backbone = preflight.check_backbone(fixed_cfg.backbone, fixed_cfg.allow_hub)
    if backbone == fixed_cfg.backbone:
        return fixed, base
    fixed_cfg.backbone = backbone
    return {**fixed, "backbone": backbone}, {**base, "backbone": backbone}


def _check_positions(fixed_cfg) -> None:
    """max_length within a local backbone's positions (read from its config.json, no model load)."""
    from ..core.backbone import resolve_backbone

    try:
        source = Path(resolve_backbone(fixed_cfg.backbone)) / "config.json"
        positions = json.loads(source.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, UserError):
        return  # a hub id or the tiny backbone built later: the recipe checks it on the worker
    if isinstance(positions, int) and fixed_cfg.max_length > positions:
        raise UserError(f"field max_length: {fixed_cfg.max_length} exceeds the {positions} positions of "
                        f"the backbone '{fixed_cfg.backbone}'")


def _sweep_name(args, path: Path) -> str:
    name = sweep_name(args)
    if not re.fullmatch(NAME_PATTERN, name):
        raise UserError(f"--name: {name!r} must be letters, digits, '_', '.', '-' (it names a directory "
                        "and an MLflow tag)")
    return name


def _base_overrides(args, raw) -> dict:
    """--smoke's overrides, the data directory of $LORA_DIFFUSION_DATA_DIR, then --set. The
    variable is a default, as in `lora-diffusion train`: a `data_dir` in the file's `fixed`
    (`raw`) wins over it, --set over both. It is resolved here, on the driver, so workers on
    other nodes need not have it."""
    base = dict(SMOKE_OVERRIDES) if args.smoke else {}
    data_env = os.environ.get("LORA_DIFFUSION_DATA_DIR")
    in_file = isinstance(raw, dict) and isinstance(raw.get("fixed"), dict) and "data_dir" in raw["fixed"]
    if data_env and not in_file:
        base["data_dir"] = str(Path(data_env).resolve())
    sets = config_lib.parse_sets(args.set)
    base.update(sets)
    if args.smoke and "backbone" not in sets:
        base["backbone"] = TINY_BACKBONE  # built on each node on first use: no shared path needed
    return base


def _options(args, from_file: dict) -> SweepOptions:
    options = {**asdict(SweepOptions()), **from_file, **(SMOKE_SWEEP if args.smoke else {})}
    for key in ("num_samples", "workers", "max_concurrent", "seed"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if getattr(args, "retry_failed", None) is not None:
        options["max_trial_retries"] = args.retry_failed
    options["worker_resources"] = worker_resources(getattr(args, "worker_resources", None) or [])
    return SweepOptions(**options)


def _grid_part(args, raw, path: Path, base: dict):
    """(fixed, base overrides, options, GridSpec) of a grid file; every cell x seed validated."""
    if args.smoke:
        raw = smoke_grid(raw)
    # validates file, keys, every cell x seed; UserError names file and key
    grid = _parse_grid(raw, str(path), base, sets=config_lib.parse_sets(args.set))
    only = parse_only(args.only or [])
    if only:
        grid = only_cells(grid, only, str(path))
    if args.num_samples is not None:
        raise UserError("--num-samples: a grid runs every cell x seed once; edit the grid file's "
                        "axes or seeds instead")
    base = {k: v for k, v in base.items() if k not in grid.axes}
    options = _options(args, grid.sweep)
    options.num_samples = len(grid.runs())
    spec = GridSpec(axes=grid.axes, seeds=grid.seeds, reference=grid.reference, cells=grid.explicit_cells,
                    only=only or None)
    return grid.fixed, base, options, spec


def _check_data(fixed_cfg, grid: GridSpec | None) -> None:
    """Every task's data files, before Ray: not one failure per trial."""
    names = run_tasks(fixed_cfg.task, grid)
    for task in names:
        tasks.check_local_data(task, fixed_cfg.data_dir, fixed_cfg.allow_hub)
    if len({selection_metric(t) for t in names}) > 1:
        raise UserError(f"cells: tasks {', '.join(sorted(names))} are selected "
                        "on different metrics; run one sweep per task")
    metrics = selection_metrics(fixed_cfg.task, fixed_cfg.generation.text_scores, grid)
    if len(metrics) > 1:
        raise UserError(f"{TEXT_SCORES}: the sweep's runs mix text scores and ELBO-only evaluation, "
                        f"selected on different metrics ({', '.join(sorted(metrics))}); give every "
                        "run the same value")


def selection_metrics(fixed_task: str, fixed_text_scores: bool, grid: GridSpec | None) -> set[str]:
    """The selection metrics of a sweep's runs: each run's task with its generation.text_scores
    (a grid's axes or cells, else the fixed value)."""
    if grid is not None and grid.cells:
        return {selection_metric(c.get("task", fixed_task), c.get(TEXT_SCORES, fixed_text_scores))
                for c in grid.cells}
    axes = grid.axes if grid is not None else {}
    return {selection_metric(t, s) for t in run_tasks(fixed_task, grid)
            for s in axes.get(TEXT_SCORES, [fixed_text_scores])}


def run_tasks(fixed_task: str, grid: GridSpec | None) -> set[str]:
    """The tasks a sweep's runs train: a grid's task axis or cells' tasks, and the fixed task
    when some run names none (a comparison's cells all name theirs, fixed's default is sst2)."""
    if grid is None:
        return {fixed_task}
    if "task" in grid.axes:
        return set(grid.axes["task"])
    cells = grid.cells or []
    names = {c["task"] for c in cells if "task" in c}
    if not cells or any("task" not in c for c in cells):
        names.add(fixed_task)
    return names


def _fit_grace_period(options: SweepOptions, fixed_cfg, smoke: bool) -> None:
    steps, every = fixed_cfg.train.steps, fixed_cfg.train.eval_every
    if smoke:  # ASHA's first rung halfway, whatever --set made of the steps
        options.grace_period = max(every, steps // 2)
    options.grace_period = min(options.grace_period, steps)


def _parse_grid(raw, source: str, base: dict, sets: dict | None = None):
    """A grid file's content, validated with the sweep's overrides. --smoke's own overrides
    give way to the grid's axes; a --set of an axis is an error."""
    axes = {}
    if isinstance(raw, dict):
        axes = raw.get("grid") if isinstance(raw.get("grid"), dict) else \
            {k: None for k in (raw.get("axes") or []) if isinstance(k, str)}
    sets = sets or {}
    base = {k: v for k, v in base.items() if k not in axes or k in sets}
    return parse_grid(raw, source, base_overrides=base)


def smoke_grid(raw: dict) -> dict:
    """--smoke on a grid: two values per axis (the reference value first) and two seeds."""
    raw = dict(raw)
    axes, ref = raw.get("grid"), raw.get("reference") or {}
    if isinstance(axes, dict) and isinstance(ref, dict):
        # a reference value that is not one of its axis's values stays out: parse_grid refuses it
        raw["grid"] = {k: ([ref[k]] + [v for v in vals if v != ref[k]] if k in ref and ref[k] in vals
                           else list(vals))[:2]
                       if isinstance(vals, list) else vals for k, vals in axes.items()}
    if isinstance(raw.get("seeds"), list):
        raw["seeds"] = raw["seeds"][:2]
    return raw


def smoke_note(spec: SweepSpec) -> str | None:
    """What --smoke changed of a grid file (axes and seeds cut, fixed settings replaced), said
    once the spec is valid: a smoke run checks that the grid runs; its results are not the grid's."""
    raw = spec.space_yaml
    if not (spec.smoke and spec.kind == "grid" and isinstance(raw, dict)):
        return None
    axes = raw.get("grid") if isinstance(raw.get("grid"), dict) else {}
    cuts = [f"{k} {len(v)}->2 values" for k, v in axes.items() if isinstance(v, list) and len(v) > 2]
    if isinstance(raw.get("seeds"), list) and len(raw["seeds"]) > 2:
        cuts.append(f"seeds {len(raw['seeds'])}->2")
    fixed = raw.get("fixed") if isinstance(raw.get("fixed"), dict) else {}
    replaced = [f"{k} {fixed[k]}->{v}" for k, v in SMOKE_OVERRIDES.items() if k in fixed and fixed[k] != v]
    return ("--smoke runs a cut-down grid on a tiny random backbone: "
            + "; ".join([", ".join(cuts) or "axes and seeds kept",
                         "fixed " + ", ".join(replaced) if replaced else "no fixed setting replaced"]))
