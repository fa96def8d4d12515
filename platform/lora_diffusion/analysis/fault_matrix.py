"""The fault matrix of an interrupted sweep: what its faults cost, from its Tune state and MLflow.

A sweep that was killed and resumed must end with every trial finished exactly once, one MLflow
child run per trial, none left RUNNING, and every metric a trial reported in its run's history.
The figures come from what was recorded, never from the driver's memory:

- Tune's side, read as files (no Ray): the latest `experiment_state-*.json` (trial -> status) and
  each trial's `result.json` (every report, across restarts: what the trial reported);
- MLflow's side: the sweep's parent and child runs (by tag), each child's metric histories.

One row per fault kind; its figures count the trials the fault touched (those not yet ended when
it was injected), and a last row counts the whole sweep.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

COLUMNS = ("fault", "injected", "trials_lost", "runs_duplicated", "runs_left_running", "metrics_lost")
ENDED = ("TERMINATED", "ERROR")


# ----------------------------------------------------------------------------- Tune's state


def trial_results(exp_dir: Path) -> dict[str, list[dict]]:
    """trial id -> its Tune results (result.json lines, across restarts; a line being written is skipped)."""
    out = {}
    for f in glob.glob(str(Path(exp_dir) / "run_trial_*" / "result.json")):
        rows = []
        for line in Path(f).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        if rows:  # Optuna's trial ids are "86590df9", grid search's "3c563_00001": read, don't parse
            out[rows[0]["trial_id"]] = rows
    return out


def trial_status(exp_dir: Path) -> dict[str, str]:
    """trial id -> status in the latest saved experiment state ({} before the first save)."""
    files = sorted(glob.glob(str(Path(exp_dir) / "experiment_state-*.json")))
    if not files:
        return {}
    try:
        state = json.loads(Path(files[-1]).read_text())
    except (json.JSONDecodeError, OSError):
        return {}
    return {t["trial_id"]: t["status"] for t in (json.loads(item[0]) for item in state.get("trial_data", []))}


def finals(rows: list[dict]) -> int:
    """How many times a trial's last step was reported (its final result): once when nothing ran twice."""
    return sum(1 for r in rows if "result_json" in r)


def reported(rows: list[dict]) -> set[tuple[str, int]]:
    """(metric, step) pairs a trial reported: the metrics the MLflow callback logs (keys with "/")."""
    return {(k, int(r["step"])) for r in rows if "step" in r for k, v in r.items()
            if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


# ----------------------------------------------------------------------------- MLflow's side


def sweep_runs(tracking_uri: str, sweep: str) -> tuple[list, list, dict]:
    """(parent runs, child runs, run id -> {metric: [steps]}) of the sweep named `sweep`."""
    from .trials import _experiment_ids, _search_all, mlflow_client

    client = mlflow_client(tracking_uri)
    runs = _search_all(client, _experiment_ids(client), f"tags.sweep = '{sweep}'")
    parents = [r for r in runs if r.data.tags.get("role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("role") == "trial"]
    steps = {r.info.run_id: {k: [m.step for m in client.get_metric_history(r.info.run_id, k)]
                             for k in r.data.metrics if "/" in k and not k.startswith(("final/", "accounting/"))}
             for r in children}
    return parents, children, steps


def step_gaps(run, history: dict) -> int:
    """Evaluation steps missing from a run's step axis (every train.eval_every steps up to its last):
    a report the driver never saw (killed before Tune wrote it) is lost to MLflow too."""
    every = run.data.params.get("train.eval_every")
    logged = set(history.get("train/loss", []))
    if not every or not str(every).isdigit() or not logged:
        return 0
    return len(set(range(int(every), max(logged) + 1, int(every))) - logged)


# ----------------------------------------------------------------------------- the matrix


def trial_faults(exp_dir: Path, tracking_uri: str, sweep: str, expected_trials: int | None = None,
                 seen: dict | None = None) -> dict:
    """Per trial: lost, duplicated runs, runs left RUNNING, metrics lost; and the sweep's own.
    `seen` (trial id -> {"reported": (metric, step) pairs, "finals": final reports}) adds what was
    read while the sweep ran: a resume rewrites a restarted trial's result.json."""
    seen = seen or {}
    status, results = trial_status(exp_dir), trial_results(exp_dir)
    parents, children, steps = sweep_runs(tracking_uri, sweep)
    by_trial: dict[str, list] = {}
    for run in children:
        by_trial.setdefault(run.data.tags.get("trial_id"), []).append(run)
    out = {}
    for tid in sorted(set(status) | set(by_trial)):
        runs, rows, before = by_trial.get(tid, []), results.get(tid, []), seen.get(tid, {})
        n_finals = max(finals(rows), len(before.get("finals", ())))
        logged = {(k, s) for run in runs for k, ss in steps[run.info.run_id].items() for s in ss}
        points = sum(len(ss) - len(set(ss)) for run in runs for ss in steps[run.info.run_id].values())
        finished = any(r.info.status == "FINISHED" for r in runs)  # ASHA's stopped trials too
        out[tid] = {"lost": int(status.get(tid) != "TERMINATED" or not finished),
                    "duplicated": max(0, len(runs) - 1) + max(0, n_finals - 1) + points
                    + int(tid not in status),
                    "running": sum(r.info.status == "RUNNING" for r in runs),
                    "metrics_lost": len((reported(rows) | before.get("reported", set())) - logged)
                    + sum(step_gaps(run, steps[run.info.run_id]) for run in runs)}
    expected = expected_trials if expected_trials is not None else len(status)
    return {"trials": out, "never_started": max(0, expected - len(status)), "extra": max(0, len(status) - expected),
            "parents": len(parents),
            "parents_running": sum(p.info.status == "RUNNING" for p in parents)}


def fault_matrix(faults: dict, injections: list[dict]) -> list[dict]:
    """One row per fault kind (the trials it touched), then the whole sweep. `injections`: one
    dict per fault injected, {"fault": kind, "touched": [trial ids not ended at that moment]}."""
    trials = faults["trials"]
    kinds: dict[str, list] = {}
    for inj in injections:
        kinds.setdefault(inj["fault"], []).append(inj)
    rows = []
    for kind, injs in kinds.items():
        touched = {t for inj in injs for t in inj["touched"] if t in trials}
        rows.append({"fault": kind, "injected": len(injs), **_sums(trials[t] for t in touched)})
    total = _sums(trials.values())
    total["trials_lost"] += faults["never_started"]
    total["runs_duplicated"] += max(0, faults["parents"] - 1) + faults["extra"]
    total["runs_left_running"] += faults["parents_running"]
    rows.append({"fault": "whole sweep", "injected": len(injections), **total})
    return rows


def _sums(per_trial) -> dict:
    per_trial = list(per_trial)
    return {"trials_lost": sum(t["lost"] for t in per_trial),
            "runs_duplicated": sum(t["duplicated"] for t in per_trial),
            "runs_left_running": sum(t["running"] for t in per_trial),
            "metrics_lost": sum(t["metrics_lost"] for t in per_trial)}


def markdown(rows: list[dict]) -> str:
    """The matrix as a markdown table."""
    lines = ["| " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def clean(rows: list[dict]) -> bool:
    """Nothing lost, duplicated or left RUNNING."""
    return all(row[c] == 0 for row in rows for c in COLUMNS[2:])
