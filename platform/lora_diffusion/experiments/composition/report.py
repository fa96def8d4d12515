"""The composition job's report, from its record (evaluate.py): two tables, two
heatmaps and a summary, on the job's MLflow parent run (tags sweep=<name>, role=sweep,
stage=composition) under `composition/`.

- matrix: each seed's trajectory module of task A scored on task B's test rows (mean ± std over
  seeds); the off-diagonal is the interference a module brings to a task it was not trained on.
- compositions: every composition (and, as references, the single-task modules on their own
  task) on every task, test mean ± std over seeds; the gap to the oracle router, paired by seed;
  the routing accuracy (argmax weight on the sample's task's expert, trained and energy modes);
  and what each costs: parameters and bytes it adds beyond the task modules, and what it keeps
  at inference beyond the backbone (the router keeps every module; a PEFT merge only the merged
  adapter), both from core/accounting.py's `account`, per task too; and the time it takes, as
  its evaluation seconds over the task's own module's (same rows, same process).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ...analysis.plots import plot_heatmaps
from ...analysis.report import _arrow_safe, markdown_table
from ...core.task_specs import direction

ORACLE = "router-oracle"


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan, 0
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std, len(values)


def _cell(values: list[float]) -> str:
    mean, std, n = _mean_std(values)
    if not n:
        return "—"
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f} (n=1)"


def _entries(data: dict, kind: str, name: str, task: str) -> dict[int, dict]:
    return {e["seed"]: e for e in data["evaluations"].values()
            if e["kind"] == kind and e["name"] == name and e["task"] == task}


def matrix_table(data: dict):
    import pandas as pd

    rows = []
    for a in data["tasks"]:
        row = {"module (trained on)": a}
        for b in data["tasks"]:
            entries = _entries(data, "module", f"trajectory:{a}", b)
            row[f"{b} {data['metrics'][b]}"] = _cell([e["value"] for e in entries.values()])
        rows.append(row)
    return pd.DataFrame(rows)


def _cost(data: dict, name: str, seed: int) -> tuple[int, int, int, int]:
    """(params added, bytes added, params kept at inference, bytes kept) of a composition's seed."""
    tasks = data["tasks"]
    first = _entries(data, "composition", name, tasks[0]).get(seed)
    entry = first["accounting"] if first else {}
    added = (entry.get("trainable_params", 0), entry.get("bytes_saved", 0))
    if name.startswith("lora-"):  # the merged adapter replaces the task adapters
        return (*added, *added)
    modules = [_entries(data, "module", f"trajectory:{t}", t).get(seed, {}).get("accounting", {}) for t in tasks]
    kept = (added[0] + sum(m.get("trainable_params", 0) for m in modules),
            added[1] + sum(m.get("bytes_saved", 0) for m in modules))
    return (*added, *kept)


def _names(data: dict) -> list[str]:
    seen = dict.fromkeys(e["name"] for e in data["evaluations"].values() if e["kind"] == "composition")
    return sorted(seen, key=lambda n: (not n.startswith("router"), n))


def _gap(data: dict, name: str, task: str) -> str:
    mine, oracle = _entries(data, "composition", name, task), _entries(data, "composition", ORACLE, task)
    diffs = [mine[s]["value"] - oracle[s]["value"] for s in mine if s in oracle]
    mean, std, n = _mean_std(diffs)
    return "—" if not n else f"{mean:+.3f}"


def _time_ratio(data: dict, kind: str, name_of: str) -> str:
    """Mean over (seed, task) of a row's evaluation seconds over its task's own trajectory module's
    on the same test rows, both timed in the job's one process: a ratio, as the machine is shared."""
    ratios = []
    for t in data["tasks"]:
        own = _entries(data, "module", f"trajectory:{t}", t)
        for seed, e in _entries(data, kind, name_of.format(t=t), t).items():
            if e.get("eval_s") and own.get(seed, {}).get("eval_s"):
                ratios.append(e["eval_s"] / own[seed]["eval_s"])
    return f"{statistics.fmean(ratios):.2f}x" if ratios else "—"


def composition_table(data: dict):
    """One row per composition and per single-task reference; columns per task."""
    import pandas as pd

    tasks, rows = data["tasks"], []
    for label, name_of in (("own trajectory module", "trajectory:{t}"), ("own lora module", "lora:{t}")):
        row = {"composition": label}
        own = {t: _entries(data, "module", name_of.format(t=t), t) for t in tasks}
        row.update({t: _cell([e["value"] for e in own[t].values()]) for t in tasks})
        sizes = [e["accounting"] for by_seed in own.values() for e in by_seed.values() if "accounting" in e]
        per_task = (max((a["trainable_params"] for a in sizes), default=0),
                    max((a["bytes_saved"] for a in sizes), default=0))
        row.update({"params added": 0, "bytes added": 0, "params at inference": per_task[0],  # one task's module
                    "bytes at inference": per_task[1], "params per task": per_task[0],
                    "eval time vs own module": _time_ratio(data, "module", name_of)})
        rows.append(row)
    for name in _names(data):
        row = {"composition": name}
        for t in tasks:
            values = [e["value"] for e in _entries(data, "composition", name, t).values()]
            row[t] = _cell(values)
            row[f"{t} gap to oracle"] = _gap(data, name, t)
        routing = [e.get("routing_accuracy") for t in tasks for e in _entries(data, "composition", name, t).values()]
        row["routing accuracy"] = (f"{_mean_std(routing)[0]:.3f}" if name in ("router-trained", "router-energy")
                                   and _mean_std(routing)[2] else "—")
        costs = [_cost(data, name, s) for s in data["seeds"]]
        added_p, added_b, kept_p, kept_b = (max(c[i] for c in costs) for i in range(4))
        row.update({"params added": added_p, "bytes added": added_b, "params at inference": kept_p,
                    "bytes at inference": kept_b, "params per task": kept_p // max(1, len(tasks)),
                    "eval time vs own module": _time_ratio(data, "composition", name)})
        rows.append(row)
    return pd.DataFrame(rows)


def _heatmap_frame(data: dict, kind: str, label: str):
    import pandas as pd

    rows = [{"status": "FINISHED", label: e["name"], "task": e["task"], "test": e["value"]}
            for e in data["evaluations"].values() if e["kind"] == kind and e["value"] is not None
            and (kind == "composition" or e["name"].startswith("trajectory:"))]
    return pd.DataFrame(rows, columns=["status", label, "task", "test"])


def write_files(data: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    matrix, comps = matrix_table(data), composition_table(data)
    files = {"matrix": out / "matrix.parquet", "compositions": out / "compositions.parquet",
             "summary": out / "summary.md"}
    _arrow_safe(matrix).to_parquet(files["matrix"])
    _arrow_safe(comps).to_parquet(files["compositions"])
    for kind, label in (("module", "module"), ("composition", "composition")):
        frame = _heatmap_frame(data, kind, label)
        if len(frame):
            for path in plot_heatmaps(frame, [label, "task"], "test", out):
                files[path.stem] = path
    files["summary"].write_text(summary(data, matrix, comps))
    return files


def summary(data: dict, matrix, comps) -> str:
    metrics = ", ".join(f"{t} {m} ({direction(m)})" for t, m in data["metrics"].items())
    selected = ", ".join(f"{s['task']} {s['method']} lr {s['lr']}" for s in data.get("selected", []))
    lines = [f"# Composition `{data['name']}`", "",
             f"Tasks {', '.join(data['tasks'])}; seeds {data['seeds']}; test metric per task: {metrics}; "
             f"rates selected on validation: {selected}. A gap is the composition minus the oracle: "
             "read it in its metric's direction.", "",
             "## Interference matrix (test, mean ± std over seeds)", "", markdown_table(matrix), "",
             "## Compositions (test, mean ± std; gap to the oracle router paired by seed)", "",
             markdown_table(comps), "",
             "Params/bytes added: beyond the task modules (the trained router's W and b, a merged "
             "adapter); at inference: everything kept beyond the backbone (every trajectory module "
             "for a router; only the merged adapter for a PEFT merge; one task's module for the "
             "`own` rows, which are told the task). Eval time: seconds of each test evaluation over "
             "those of the task's own trajectory module on the same rows and seed, both timed in the "
             "job's one process, averaged over tasks and seeds."]
    return "\n".join(lines) + "\n"


def report(spec, data: dict, name: str, tracking_uri: str, out_dir: Path, log=print) -> dict[str, Path]:
    """Write the files and log them, the tables and headline metrics on the job's parent run."""
    from ...engine.tracking import SweepTracker

    files = write_files(data, Path(out_dir))
    tracker = SweepTracker(tracking_uri, name, tags={"stage": "composition"})
    parent = tracker.parent_run(params={"tasks": ",".join(data["tasks"]), "seeds": str(data["seeds"])})
    client = tracker.client
    for path in files.values():
        client.log_artifact(parent, str(path), "composition")
    client.log_table(parent, _arrow_safe(matrix_table(data)), "composition/matrix.json")
    client.log_table(parent, _arrow_safe(composition_table(data)), "composition/compositions.json")
    for e in data["evaluations"].values():
        if e["kind"] == "composition" and e["value"] is not None:
            client.log_metric(parent, f"composition/{e['name']}/{e['task']}/test_{e['metric']}", e["value"],
                              step=e["seed"])
    tracker.describe(parent, files["summary"].read_text())
    tracker.end_run(parent)
    log(f"composition report: {files['summary']} (and on MLflow run {parent})")
    return files
