"""Grid files: the ablation grid a sweep runs, validated before Ray starts.

A grid file (search_spaces/grid_*.yaml) holds

    description: one line
    fixed:                      # config overrides applied to every cell (dotted Config keys)
      method: trajectory
    grid:                       # the axes: every combination of their values is one cell
      trajectory.rank_schedule: [constant, linear, reversed]
      trajectory.num_phases: [1, 2, 4]
    seeds: [0, 1, 2]            # train.seed of the repeated runs of every cell
    reference: {trajectory.rank_schedule: constant}   # the cell the others are compared to
    sweep: {max_concurrent: 2}  # optional: options of the sweep engine (workers, max_concurrent)

Instead of `grid`, `cells` lists the cells one by one (when they are not a product, e.g. each
method with its own learning rate), and `axes` names the keys that identify a cell in the
table (default: every key of the cells):

    cells:
      - {method: lora, train.lr: 3.0e-3, lora.rank: 4}
      - {method: full, train.lr: 5.0e-5}
    axes: [method]

A grid that differs from another in a few settings (the same grid on another task) states only
those, under `extends` (a grid file's name in the same folder, or a path relative to it):

    extends: grid_xquad_methods
    description: ... on XSum
    fixed: {task: xsum}         # `fixed` and `sweep` merge key by key over the parent's

Any other key it states replaces the parent's (`grid` and `cells` replace each other). The
parent may extend another; a missing or circular parent is one UserError naming the file.

`load_grid` validates it (every cell x seed must give a valid config) and raises `UserError`
naming the file and the key. The sweep engine runs one Tune trial per cell x seed (grid search,
no early stopping); `analysis.ablation` turns the logged trials into the report.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..core import config as config_lib
from ..core.errors import UserError
from .search_space import check_config, check_sweep_options

GRID_KEYS = ("description", "fixed", "grid", "cells", "axes", "seeds", "reference", "sweep")
GRID_SWEEP_KEYS = ("max_concurrent", "workers", "max_trial_retries")
SEED_FIELD = "train.seed"


@dataclass
class Grid:
    name: str
    path: str
    description: str = ""
    fixed: dict = field(default_factory=dict)
    axes: dict[str, list] = field(default_factory=dict)  # axis -> its values, in order
    seeds: list[int] = field(default_factory=lambda: [0])
    reference: dict = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)
    explicit_cells: list[dict] | None = None  # the `cells` form; None: the product of the axes

    def cells(self) -> list[dict]:
        """The listed cells, or every combination of the axes' values, in file order."""
        if self.explicit_cells is not None:
            return [dict(c) for c in self.explicit_cells]
        keys = list(self.axes)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.axes[k] for k in keys))]

    def runs(self) -> list[dict]:
        """The overrides of every run: fixed + cell + train.seed, cell-major."""
        return [{**self.fixed, **cell, SEED_FIELD: seed} for cell in self.cells() for seed in self.seeds]


def load_grid(path: str | Path) -> Grid:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"grid file not found: {path}")
    return parse_grid(read_with_extends(p), str(path))


def read_with_extends(path: str | Path, what: str = "grid file", _chain: tuple = ()):
    """A grid file's content with its `extends` resolved (module docstring); a file without
    one is returned as read."""
    path = Path(path)
    data = config_lib.read_yaml(path, what)
    if not isinstance(data, dict) or "extends" not in data:
        return data
    ref = data["extends"]
    if not isinstance(ref, str) or not ref.strip():
        raise UserError(f"{path}: extends: expected the name of a grid file, got {ref!r}")
    parent = path.parent / (ref if Path(ref).suffix in (".yaml", ".yml") else f"{ref}.yaml")
    if not parent.is_file():
        raise UserError(f"{path}: extends: no grid file {parent}")
    chain = (*_chain, path.resolve())
    if parent.resolve() in chain:
        raise UserError(f"{path}: extends: circular ({' -> '.join(p.name for p in chain)} -> {parent.name})")
    base = read_with_extends(parent, what, chain)
    if not isinstance(base, dict):
        raise UserError(f"{parent}: (top level): expected a mapping (extended by {path})")
    return merge_extended(base, data)


def merge_extended(parent: dict, child: dict) -> dict:
    """The child's keys over the parent's: `fixed` and `sweep` merged key by key, `grid` and
    `cells` replacing each other, any other key replaced."""
    out = dict(parent)
    for key, value in child.items():
        if key == "extends":
            continue
        if key in ("grid", "cells"):
            out.pop("cells" if key == "grid" else "grid", None)
        if key in ("fixed", "sweep") and isinstance(value, dict) and isinstance(out.get(key), dict):
            value = {**out[key], **value}
        out[key] = value
    return out


def parse_grid(data, source: str, base_overrides: dict | None = None) -> Grid:
    """Validate a grid file's content; `base_overrides` (the sweep's --set, --smoke) apply under
    `fixed` and may not set an axis."""
    def err(key: str, problem: str):
        raise UserError(f"{source}: {key}: {problem}")

    if not isinstance(data, dict):
        err("(top level)", "expected a mapping")
    for key in data:
        if key not in GRID_KEYS:
            err(key, f"unknown key (valid: {', '.join(GRID_KEYS)})")
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        err("fixed", "expected a mapping of dotted config keys")
    cells = data.get("cells")
    axes = _axes(data, fixed, err)
    seeds = _seeds(data.get("seeds", [0]), err)
    reference = _reference(data.get("reference") or {}, axes, err)
    sweep = check_sweep_options(data.get("sweep"), GRID_SWEEP_KEYS, err)
    # every key must be a config field and every cell a valid config
    _check_fixed(fixed, source)
    for key in base_overrides or {}:
        if key in axes or key == SEED_FIELD:
            err(f"--set {key}", "is an axis of the grid (or its seeds): edit the grid file instead")
    fixed = {**fixed, **(base_overrides or {})}
    grid = Grid(name=Path(source).stem, path=source, description=str(data.get("description", "")),
                fixed=dict(fixed), axes={k: list(v) for k, v in axes.items()}, seeds=list(seeds),
                reference=dict(reference), sweep=dict(sweep),
                explicit_cells=[dict(c) for c in cells] if cells is not None else None)
    if not any(all(c.get(k) == v for k, v in grid.reference.items()) for c in grid.cells()):
        err("reference", f"{grid.reference} is not a cell of the grid (its paired differences "
                         "would be to no run)")
    _check_cells(grid, source)
    return grid


def only_cells(grid: Grid, where: dict[str, list], source: str) -> Grid:
    """The slice of a grid whose cells take one of the given values on each named axis (--only):
    a grid too long for one sitting runs as slices, each its own sweep and report. Every slice
    keeps the reference cell, since its paired differences are to it (on one machine and code a
    run is determined by its config and seed: the reference repeated in each slice is the same run)."""
    for key, values in where.items():
        if key not in grid.axes:
            raise UserError(f"--only {key}: not an axis of {source} (axes: {', '.join(grid.axes)})")
        unknown = [v for v in values if v not in grid.axes[key]]
        if unknown:
            raise UserError(f"--only {key}: {unknown[0]!r} is not one of its values {grid.axes[key]}")
    cells = [c for c in grid.cells() if all(c.get(k) in values for k, values in where.items())]
    if not cells:
        raise UserError(f"--only: no cell of {source} has these values {where}")
    if not any(all(c.get(k) == v for k, v in grid.reference.items()) for c in cells):
        raise UserError(f"--only: the slice leaves out the reference cell {grid.reference} of {source}; "
                        "keep its values (the paired differences are to it)")
    axes = {k: [v for v in values if any(c.get(k) == v for c in cells)] for k, values in grid.axes.items()}
    return replace(grid, axes=axes, explicit_cells=cells)


def parse_only(items: list[str]) -> dict[str, list]:
    """--only KEY=V1,V2 (repeatable) as {key: [values]}; values are read as YAML, like --set's."""
    where = {}
    for item in items:
        key, _, raw = item.partition("=")
        if not key.strip() or not raw.strip():
            raise UserError(f"--only expects axis=value[,value...], got {item!r}")
        where[key.strip()] = [config_lib.parse_sets([f"v={v}"])["v"] for v in raw.split(",")]
    return where


def _check_fixed(fixed: dict, source: str) -> None:
    """`fixed` must give a valid config as a whole (rank 38 with min_rank 10 is valid, min_rank 10
    alone is not); when it does not, the key that is bad on its own is named, if there is one."""
    try:
        check_config(fixed, f"{source}: fixed")
    except UserError:
        for key, value in fixed.items():
            check_config({key: value}, f"{source}: fixed.{key}")
        raise


def _axes(data: dict, fixed: dict, err) -> dict[str, list]:
    """The axes and their values: `grid`'s, or those of the listed `cells`."""
    cells = data.get("cells")
    if cells is not None:
        if "grid" in data:
            err("cells", "give either `grid` (a product of axes) or `cells` (a list), not both")
        axes = _axes_of_cells(cells, data.get("axes"), err)
    else:
        if "axes" in data:
            err("axes", "only with `cells` (the axes of `grid` are its keys)")
        axes = data.get("grid")
    if not isinstance(axes, dict) or not axes:
        err("grid", "expected a non-empty mapping {config.key: [values]}")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            err(f"grid.{key}", "expected a non-empty list of values")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            err(f"grid.{key}", f"repeated value in {values}")
        if key in fixed:
            err(f"grid.{key}", "also set in fixed")
        if key == SEED_FIELD:
            err(f"grid.{key}", "seeds are given by the top-level `seeds` list")
    return axes


def _seeds(seeds, err) -> list[int]:
    try:
        return check_seeds(seeds, "seeds")
    except UserError as exc:
        err("seeds", str(exc).removeprefix("seeds: "))


def check_seeds(seeds, name: str) -> list[int]:
    """A seed list, wherever it is parsed (a grid's `seeds`, a job's --seeds): non-empty, integers,
    no seed twice (two runs of one seed are one run counted twice in every std and p-value)."""
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise UserError(f"{name}: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{name}: repeated seed in {seeds}")
    return seeds


def _reference(reference, axes: dict, err) -> dict:
    if not isinstance(reference, dict):
        err("reference", "expected a mapping {axis: value}")
    for key, value in reference.items():
        if key not in axes:
            err(f"reference.{key}", f"not an axis of the grid (axes: {', '.join(axes)})")
        if value not in axes[key]:
            err(f"reference.{key}", f"{value!r} is not one of the axis values {axes[key]}")
    return reference


def _check_cells(grid: Grid, source: str) -> None:
    """Every axis value, then every cell x seed, must give a valid config."""
    for key, values in ({} if grid.explicit_cells is not None else grid.axes).items():
        for v in values:
            check_config({**grid.fixed, key: v}, f"{source}: grid.{key}")
    for cell in grid.cells():
        for seed in grid.seeds:
            check_config({**grid.fixed, **cell, SEED_FIELD: seed},
                         f"{source}: grid (" + ", ".join(f"{k}={v}" for k, v in cell.items()) + ")")


def _axes_of_cells(cells, axes, err) -> dict[str, list]:
    """The axes of a `cells` grid (the keys that name a cell) with their values, in order."""
    if not isinstance(cells, list) or not cells or not all(isinstance(c, dict) and c for c in cells):
        err("cells", "expected a non-empty list of non-empty mappings {config.key: value}")
    keys = list(dict.fromkeys(k for c in cells for k in c))
    if SEED_FIELD in keys:
        err("cells", "seeds are given by the top-level `seeds` list")
    if axes is None:
        axes = keys
    if not isinstance(axes, list) or not axes or not all(a in keys for a in axes):
        err("axes", f"expected a non-empty list of keys of the cells ({', '.join(keys)})")
    names = [json.dumps({a: c.get(a) for a in axes}, sort_keys=True, default=str) for c in cells]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        err("cells", f"two cells share the axes values {dup[0]}: the table could not tell them apart")
    values: dict[str, list] = {}
    for a in axes:
        seen: dict[str, object] = {}
        for c in cells:
            seen.setdefault(json.dumps(c.get(a), sort_keys=True, default=str), c.get(a))
        values[a] = list(seen.values())
    return values
