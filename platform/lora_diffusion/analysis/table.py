"""The baseline comparison's tables as markdown, generated from its record and MLflow.

`comparison.run` writes `comparison.json` (storage `<name>/`): the stages, and for each (task,
method) the candidate stage 1 chose on validation and the sweep its seeds ran in. Here every
figure is read back from those sweeps' trial runs: test mean ± std over the seeds (the report),
validation beside it, the counted parameters, the chosen configuration. Nothing is chosen here.
"""

from __future__ import annotations

import json
import math

from ..core.errors import UserError
from .trials import TEST_METRIC, VALIDATION_METRIC, load_trials

TASK_LABELS = {"sst2": "SST-2", "ag_news": "AG News"}
HIDDEN_KEYS = ("task", "method", "final_sweep")


def read_record(storage, name: str) -> dict:
    if not storage.exists(f"{name}/comparison.json"):
        raise UserError(f"comparison {name!r}: no {storage.join(name, 'comparison.json')} (run "
                        "jobs/baseline_comparison.py with this --name first)")
    return json.loads(storage.read_text(f"{name}/comparison.json"))


def _mean_std(values) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "—"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f} (n=1)"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.3f} ± {std:.3f}"


def _knobs(cell: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]} {v:g}" if isinstance(v, float) else f"{k.split('.')[-1]} {v}"
                     for k, v in cell.items() if k not in HIDDEN_KEYS)


def stage_rows(stage: dict, trials_of, n_seeds: int) -> list[dict]:
    """One row per (task, method) of a stage: its chosen cell and its seeds' figures."""
    rows = []
    for cell in stage["chosen"]:
        df = trials_of(cell["final_sweep"])
        runs = df[(df["task"] == cell["task"]) & (df["method"] == cell["method"])
                  & (df["status"] == "FINISHED")] if len(df) else df
        rows.append({"task": cell["task"], "method": cell["method"], "config": _knobs(cell),
                     "n": len(runs), "partial": len(runs) < n_seeds,
                     "test": _mean_std([float(v) for v in runs.get(TEST_METRIC, [])]),
                     "validation": _mean_std([float(v) for v in runs.get(VALIDATION_METRIC, [])]),
                     "params": int(runs["trainable_params"].iloc[0]) if len(runs) else None})
    return rows


def markdown(record: dict, stage_key: str, trials_of) -> str:
    """A stage's table: one line per method, test (± std over seeds) and validation per task."""
    stage = record["stages"][stage_key]
    rows = stage_rows(stage, trials_of, len(record["seeds"]))
    tasks = [t for t in record["tasks"] if any(r["task"] == t for r in rows)]
    head = ["method"]
    for t in tasks:
        label = TASK_LABELS.get(t, t)
        head += [f"{label} test (± std)", f"{label} validation", f"{label} params", f"{label} tuned on validation"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in record["methods"]:
        cells = [method]
        for t in tasks:
            r = next((r for r in rows if r["task"] == t and r["method"] == method), None)
            if r is None:
                cells += ["—"] * 4
                continue
            mark = f" (partial: {r['n']} of {len(record['seeds'])} seeds)" if r["partial"] else ""
            cells += [r["test"] + mark, r["validation"], f"{r['params']:,}" if r["params"] else "—", r["config"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(storage, tracking_uri: str, name: str) -> str:
    """Both tables (matched budget; each method's best validated configuration without it)."""
    record = read_record(storage, name)
    cache: dict[str, object] = {}

    def trials_of(sweep: str):
        if sweep not in cache:
            try:
                cache[sweep] = load_trials(tracking_uri, sweep)
            except UserError:  # a stage that has not started yet
                import pandas as pd
                cache[sweep] = pd.DataFrame(columns=["task", "method", "status"])
        return cache[sweep]

    parts = []
    titles = {"matched": f"At a matched budget of {record['budget']:,} trainable parameters"
              if record.get("budget") else "Each method at its default size",
              "unmatched": "Each method's best validated configuration, no budget match"}
    for key in ("matched", "unmatched"):
        if key in record["stages"]:
            parts += [f"#### {titles[key]}", "", markdown(record, key, trials_of), ""]
    return "\n".join(parts)
