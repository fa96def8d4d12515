"""Two views of a baseline comparison's stage-2 trials beside its table (analysis/table.py):

- paired differences: method A minus method B on the same task and seed (the seed fixes the
  data order, the masks and the initialisation of whatever the two share), test and validation,
  with each seed's sign, and per bin of t the difference of their validation loss bounds
  (`final/validation/per_t/bound_bin{k}`, core/diagnostics.py): where along the trajectory A
  gains or loses against B. A question such as "does noise-awareness help?" is a pair
  (nara vs lora at equal rank; trajectory_continuous vs trajectory);
- learning curves: validation at every periodic evaluation (`compare --curve-every N`), mean ±
  std over the seeds, per method, read from the trials' MLflow metric histories, so "learns
  slower" and "ends worse" are told apart.

Everything is read back from MLflow through the comparison's record; nothing is chosen here.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..core.task_specs import metric_mode
from .trials import final_column, mlflow_client, task_metric

PER_T_BOUND = "final/validation/per_t/bound_bin"


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
    return mean, std


def _finished(df, task: str, method: str):
    if not len(df):
        return df
    return df[(df["task"] == task) & (df["method"] == method) & (df["status"] == "FINISHED")]


def _by_seed(runs, column: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[column]) for _, r in runs.iterrows()
            if column in r and not math.isnan(float(r[column]))}


def pair_rows(record: dict, trials_of, pairs: list[tuple[str, str]], stage_key: str = "matched") -> list[dict]:
    """Per (task, pair): each seed's test and validation difference A - B, and per bin of t the
    mean over seeds of A's bound minus B's with the number of seeds where A's is lower."""
    chosen = {(c["task"], c["method"]): c for c in record["stages"][stage_key]["chosen"]}
    rows = []
    for task in record["tasks"]:
        for a, b in pairs:
            if (task, a) not in chosen or (task, b) not in chosen:
                continue
            runs_a = _finished(trials_of(chosen[(task, a)]["final_sweep"]), task, a)
            runs_b = _finished(trials_of(chosen[(task, b)]["final_sweep"]), task, b)
            metric = task_metric(runs_a) if len(runs_a) else "accuracy"
            row = {"task": task, "a": a, "b": b, "metric": metric}
            for split in ("test", "validation"):
                ta, tb = (_by_seed(r, final_column(split, metric)) for r in (runs_a, runs_b))
                row[split] = {s: ta[s] - tb[s] for s in sorted(set(ta) & set(tb))}
            bins = sum(1 for c in runs_a.columns if c.startswith(PER_T_BOUND)) if len(runs_a) else 0
            row["per_t"] = []
            for k in range(bins):
                ba, bb = (_by_seed(r, f"{PER_T_BOUND}{k}") for r in (runs_a, runs_b))
                diffs = [ba[s] - bb[s] for s in sorted(set(ba) & set(bb))]
                if diffs:
                    row["per_t"].append((k, _stats(diffs)[0], sum(d < 0 for d in diffs), len(diffs)))
            rows.append(row)
    return rows


def _signed(diffs: dict[int, float]) -> str:
    if not diffs:
        return "—"
    mean, std = _stats(list(diffs.values()))
    spread = f" ± {std:.3f}" if not math.isnan(std) else ""
    seeds = ", ".join(f"{s}: {d:+.3f}" for s, d in diffs.items())
    return f"{mean:+.3f}{spread} (seeds {seeds})"


def pairs_markdown(rows: list[dict]) -> str:
    """The paired table, then one line per pair of where along t A's loss bound is lower."""
    if not rows:
        return "No pair has finished runs of both methods yet."
    better = {r["metric"]: "higher" if metric_mode(r["metric"]) == "max" else "lower" for r in rows}
    lines = ["| task | A - B | metric | test: mean ± std over seeds (each seed) | validation |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['a']} - {r['b']} | {r['metric']} ({better[r['metric']]} is better) "
                     f"| {_signed(r['test'])} | {_signed(r['validation'])} |")
    lines += ["", "Per bin of t (k = 0: t near 0, few tokens masked), A's validation loss bound minus B's, "
                  "nats per response token, mean over seeds; in brackets the seeds where A's is lower:", ""]
    for r in rows:
        if r["per_t"]:
            cells = ", ".join(f"{k}: {m:+.3f} [{low}/{n}]" for k, m, low, n in r["per_t"])
            lines.append(f"- {r['task']}, {r['a']} - {r['b']}: {cells}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- learning curves


def learning_curves(record: dict, trials_of, tracking_uri: str, stage_key: str = "matched") -> dict:
    """{task: {method: [(step, mean, std, n), ...]}}: validation of the stage's finished runs at
    every evaluation, from their MLflow histories (`validation/<metric>`)."""
    client = mlflow_client(tracking_uri)
    curves: dict[str, dict[str, list]] = {}
    for cell in record["stages"][stage_key]["chosen"]:
        task, method = cell["task"], cell["method"]
        runs = _finished(trials_of(cell["final_sweep"]), task, method)
        if not len(runs):
            continue
        key = f"validation/{task_metric(runs)}"
        by_step: dict[int, list[float]] = {}
        for run_id in runs["run_id"]:
            for m in client.get_metric_history(run_id, key):
                by_step.setdefault(int(m.step), []).append(float(m.value))
        curves.setdefault(task, {})[method] = [(s, *_stats(v), len(v)) for s, v in sorted(by_step.items())]
    return curves


def curves_markdown(curves: dict) -> str:
    """Per task, a table: one row per evaluated step, one column per method, mean ± std (n)."""
    parts = []
    for task, by_method in curves.items():
        steps = sorted({s for points in by_method.values() for s, *_ in points})
        methods = list(by_method)
        parts += [f"Validation by step, {task} (mean ± std over seeds):", "",
                  "| step | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for step in steps:
            cells = []
            for m in methods:
                point = next((p for p in by_method[m] if p[0] == step), None)
                cells.append("—" if point is None else
                             f"{point[1]:.3f}" + ("" if math.isnan(point[2]) else f" ± {point[2]:.3f}"))
            parts.append(f"| {step} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts).rstrip("\n")


def plot_curves(curves: dict, path: Path) -> Path | None:
    """One panel per task: validation against step, a line per method, its std over seeds shaded."""
    if not curves:
        return None
    from .plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(6.5 * len(curves), 4.2), squeeze=False)
    for ax, (task, by_method) in zip(axes[0], curves.items()):
        for method, points in by_method.items():
            steps = [p[0] for p in points]
            mean = [p[1] for p in points]
            std = [0.0 if math.isnan(p[2]) else p[2] for p in points]
            ax.plot(steps, mean, marker="o", markersize=3, label=method)
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
        ax.set_xlabel("training step")
        ax.set_ylabel("validation (mean over seeds, ± std shaded)")
        ax.set_title(f"{task}: learning curves", fontsize=9)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
