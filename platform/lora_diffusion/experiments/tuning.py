"""The comparison's stage-1 candidates: the same number of tuning trials for every method.

A method's candidates are its learning rates (`MethodSpec.lr_grid`) crossed with its own size
and placement knobs (`MethodSpec.tuning`). Every method gets exactly `n` of them: a grid with
fewer is widened on the rate axis (geometrically, by the grid's own ratio, alternately below
and above), one with more gives a seeded random subset, so that no method wins by being tuned
harder. With a parameter budget the size knob is solved for each candidate (budget.py), not
tuned, and a method without a size knob tunes only its rate. The rates in the specs were
placed on the old SST-2 dev split, today's test split: they set where the range lies; which rate
a method runs with is chosen here, on validation, by stage 1.
"""

from __future__ import annotations

import itertools
import math
import random

from ..analysis.trials import final_column, metric_of_task, text_scores_of, value_key
from ..core import config as config_lib
from ..core.errors import UserError
from ..core.methods import registry
from ..core.task_specs import oriented
from .budget import knob_of, match_budget

# LoRA on attention + MLP of MiniLM moves in steps of 41,472 parameters per rank: rank 2 is
# 82,944 (+12.5% over the 73,728 budget), rank 1 is 56% under. The tables show every count.
BUDGET_TOLERANCE = 0.15
LR = "train.lr"


def widen(rates, count: int) -> list[float]:
    """At least `count` rates: the grid, extended alternately below and above by its ratio."""
    rates = sorted(float(r) for r in rates)
    ratio = rates[-1] / rates[0] if len(rates) > 1 and rates[-1] > rates[0] else 3.0
    ratio = ratio ** (1 / max(1, len(rates) - 1))
    below = True
    while len(rates) < count:
        rates = [rates[0] / ratio, *rates] if below else [*rates, rates[-1] * ratio]
        below = not below
    return [float(f"{r:.3g}") for r in rates]


def tuned_knobs(method: str, budget: int | None, fixed: dict) -> dict[str, list]:
    """The knobs stage 1 tries for `method` besides the rate (those `fixed` sets are not tuned)."""
    knob = knob_of(method)
    if budget and knob is None:
        return {}
    return {k: list(v) for k, v in registry.spec_of(method).tuning.items()
            if k not in fixed and not (budget and k == knob)}


def candidates(method: str, n: int, budget: int | None, lr_grid, fixed: dict, seed: int = 0) -> list[dict]:
    """Exactly `n` candidates {train.lr, knob: value, ...} of `method`, in grid order."""
    knobs = tuned_knobs(method, budget, fixed)
    others = math.prod(len(v) for v in knobs.values())
    rates = widen(lr_grid, math.ceil(n / others))
    keys = [LR, *knobs]
    grid = [dict(zip(keys, combo)) for combo in itertools.product(rates, *knobs.values())]
    if len(grid) > n:  # a seeded subset, the same for every task and every rerun
        keep = sorted(random.Random(f"{method}:{seed}").sample(range(len(grid)), n))
        grid = [grid[i] for i in keep]
    return grid


def sized_candidates(spec, backbone, task: str, method: str, log=print) -> list[dict]:
    """The stage-1 cells of (task, method): each candidate with the method's settings and, under
    a budget, its size knob solved. A candidate that cannot meet the budget is dropped, said."""
    cells = []
    for cand in candidates(method, spec.trials_per_method, spec.budget, spec.lr_grids[method],
                           spec.sets, spec.tuning_seed):
        cell = {"task": task, "method": method, **registry.spec_of(method).comparison_sets, **cand}
        knob = knob_of(method)
        if spec.budget and knob:
            config = config_lib.from_dict({}, {**spec.sets, **cell})
            try:
                cell[knob] = match_budget(config, backbone, spec.budget, tolerance=BUDGET_TOLERANCE).flat()[knob]
            except UserError as exc:
                log(f"{task} {method} {cand}: dropped ({exc})")
                continue
        cells.append(cell)
    if not cells:
        raise UserError(f"comparison: no candidate of {method} meets the budget of {spec.budget} parameters")
    return cells


def matching_rows(cell: dict, trials) -> list:
    """The FINISHED trial rows of `trials` whose params equal every key of `cell`."""
    rows = [r for _, r in trials.iterrows()] if len(trials) else []
    return [r for r in rows if r.get("status") == "FINISHED"
            and all(value_key(r.get(k)) == value_key(v) for k, v in cell.items())]


def choose(cells: list[dict], trials) -> dict[tuple[str, str], dict]:
    """(task, method) -> the stage-1 cell that scored best on validation (the task's metric, or
    the lowest ELBO bound for ELBO-only generation trials: metric_mode) among FINISHED trials
    (ties: the smaller rate, then the earlier cell). Trials are matched to cells on every key."""
    best: dict[tuple[str, str], tuple] = {}
    for i, cell in enumerate(cells):
        key = (cell["task"], cell["method"])
        for r in matching_rows(cell, trials):
            metric = metric_of_task(cell["task"], text_scores_of(r))
            score = float(r[final_column("validation", metric)])
            rank = (oriented(metric, score), -float(cell[LR]), -i)
            if not math.isnan(score) and (key not in best or rank > best[key][0]):
                best[key] = (rank, cell)
    missing = sorted({(c["task"], c["method"]) for c in cells} - set(best))
    if missing:
        raise RuntimeError(f"tuning: no finished run of {missing[0][1]} on {missing[0][0]}; see stage 1's sweep")
    return {key: cell for key, (_, cell) in best.items()}
