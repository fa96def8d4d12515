"""The ablation report of a sweep: the trials read back from MLflow, the grid table, the plots and
summary.md, written to a folder and logged on the sweep's parent run under `ablation/`.

`report_sweep` is what the sweep jobs hand the engine (cli.sweep_main): the engine calls it when a
sweep ends, and `lora-diffusion report` rebuilds the same report later (`write_report`).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import yaml

from ..core.errors import UserError
from ..core.task_specs import ELBO_METRIC, direction, metric_mode
from ..engine.options import repo_root
from .plots import plot_heatmaps, plot_optuna, plot_pareto, plot_per_t, study_from_trials
from .statistics import aggregate, phase_gain_table
from .trials import final_column, infer_axes, load_trials, mlflow_client, task_metric

# beside every table on the ELBO bound (issue 21: a backbone that cannot produce usable answers)
ELBO_NOTE = ("**ELBO-only**: selected on the ELBO bound on the reference response (nats per token, "
             "lower is better); no generated text was scored (generation.text_scores false: for a "
             "backbone whose answers score 0 whatever the method, e.g. the prepared MiniLM on XQuAD).")


def _arrow_safe(df):
    """Object columns that mix types (e.g. 4 and 'None') become text, for parquet."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object:
            kinds = {type(v) for v in out[col] if v is not None and not _is_nan(v)}
            if len(kinds) > 1 or any(k in (list, dict, tuple) for k in kinds):
                out[col] = out[col].map(lambda v: None if v is None else str(v))
    return out


def _is_nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def markdown_table(table) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def _axes_and_reference(df, axes: list[str] | None, reference: dict | None) -> tuple[list[str], dict | None]:
    """Those given, else those a grid sweep tagged its parent run with (engine/sweep.py), else
    the axes inferred from the trials and no reference."""
    tags = df.attrs.get("parent_tags", {})
    if not axes and tags.get("ablation.axes"):
        axes = tags["ablation.axes"].split(",")
    if reference is None and tags.get("ablation.reference"):
        reference = json.loads(tags["ablation.reference"]) or None
    return (list(axes) if axes else infer_axes(df)), reference


def _write_tables_and_plots(df, table, axes: list[str], metric: str, out: Path,
                            optuna_study) -> tuple[dict[str, Path], list[str]]:
    """trials.parquet, grid.parquet, the heatmaps, pareto.png and, for Optuna sweeps, Optuna's
    plots; with the notes on plots that were skipped."""
    files: dict[str, Path] = {"trials": out / "trials.parquet", "grid": out / "grid.parquet"}
    _arrow_safe(df).to_parquet(files["trials"], engine="pyarrow", index=False)
    _arrow_safe(table).to_parquet(files["grid"], engine="pyarrow", index=False)
    for p in plot_heatmaps(df, axes, metric, out) if len(axes) >= 2 else []:
        files[p.stem] = p
    files["pareto"] = plot_pareto(table, axes, out)
    per_t = plot_per_t(df, axes, out)  # trials that logged the per-t diagnostic
    if per_t is not None:
        files["per_t"] = per_t
    notes = []
    if optuna_study is not None or any(c.startswith("sampled.") for c in df.columns):
        study = optuna_study if optuna_study is not None else study_from_trials(df, axes, metric)
        paths, notes = plot_optuna(study, out)
        files.update({p.stem: p for p in paths})
    return files, notes


def _summary(sweep: str, df, table, axes: list[str], reference: dict | None, metric: str,
             notes: list[str]) -> str:
    """summary.md: what was aggregated and how, warnings, the table, the skipped plots."""
    n_status = df["status"].value_counts().to_dict()
    lines = [f"# Ablation of sweep `{sweep}`", "",
             f"metric: `{metric}` ({direction(metric)}); axes: {', '.join(f'`{a}`' for a in axes)}; "
             f"trials: {len(df)} ({', '.join(f'{k} {v}' for k, v in sorted(n_status.items()))})",
             "mean, std (ddof=1) and the 95% t interval are over seeds; "
             "a seed without a finished run counts in n_failed (or n_running)."]
    if metric.endswith(ELBO_METRIC):
        lines.append(ELBO_NOTE)
    if reference:
        lines.append("diff_mean / p_value: paired by seed against the reference cell "
                     + ", ".join(f"`{k}={v}`" for k, v in reference.items()) + " (paired t test); "
                     f"diff_mean is cell - reference in the metric's units: {_better_side(metric)} "
                     "is better than the reference.")
    if any(c.startswith("reg_") for c in table.columns):
        lines.append("reg_*: what each regulariser penalises, as last logged in training (mean over seeds), "
                     "logged whatever the regulariser's weight: did a weight move what it penalises.")
    if not table["accounting_consistent"].all():
        lines.append("**warning**: some cells report different trainable_params / bytes_saved across seeds.")
    if int(table["n_failed"].sum()):
        lines.append(f"**{int(table['n_failed'].sum())} failed cell-seed(s)**: see n_failed.")
    lines += ["", markdown_table(table), ""] + [f"- {n}" for n in notes] + _phase_gain_section(df, axes)
    return "\n".join(lines) + "\n"


def _phase_gain_section(df, axes: list[str]) -> list[str]:
    """The per-phase attribution of the cells with K > 1 (test), when the trials logged it."""
    gains = phase_gain_table(df, axes)
    if gains is None:
        return []
    return ["", "## Per-phase attribution (test)", "",
            "Each phase module's gain: the test metric with every module against the metric with that "
            "phase's module switched off at evaluation (the others kept); above 0, the module helps "
            "(ELBO: nats per token saved). Mean ± std over seeds.", "", markdown_table(gains), ""]


def _better_side(metric: str) -> str:
    return "above 0" if metric_mode(metric) == "max" else "below 0"


def _log_on_parent(tracking_uri: str, parent_id: str, files: dict[str, Path], table, axes: list[str]) -> None:
    client = mlflow_client(tracking_uri)
    for path in files.values():
        client.log_artifact(parent_id, str(path), "ablation")
    client.log_table(parent_id, _arrow_safe(table), "ablation/grid.json")
    client.set_tag(parent_id, "ablation.axes", ",".join(axes))


def write_report(tracking_uri: str, sweep: str, axes: list[str] | None, reference: dict | None,
                 out_dir: str | Path, metric: str | None = None, optuna_study=None,
                 log_to_mlflow: bool = True) -> dict[str, Path]:
    """Aggregate the sweep's trials from MLflow and write, under out_dir: trials.parquet (raw
    rows), grid.parquet (the table), heatmap_A__B.png per pair of axes, pareto.png, per_t.png
    (trials that logged the per-t diagnostic), summary.md,
    and for Optuna sweeps (sampled.* params, or `optuna_study` given) the Optuna importance and
    parallel-coordinate plots. All are logged on the sweep's parent run under `ablation/`, the
    table also with `log_table` as ablation/grid.json."""
    df = load_trials(tracking_uri, sweep)
    if df.empty:
        raise UserError(f"sweep: {sweep!r} has no trial runs in {tracking_uri}")
    axes, reference = _axes_and_reference(df, axes, reference)
    metric = metric or final_column("validation", task_metric(df))  # the task's own figure
    table = aggregate(df, axes, reference, metric)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, notes = _write_tables_and_plots(df, table, axes, metric, out, optuna_study)
    files["summary"] = out / "summary.md"
    files["summary"].write_text(_summary(sweep, df, table, axes, reference, metric, notes))
    if log_to_mlflow:
        _log_on_parent(tracking_uri, df.attrs["parent_run_id"], files, table, axes)
    return files


def parse_reference(text: str | None) -> dict:
    """`key=value,key=value` (values parsed as YAML) -> dict."""
    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise UserError(f"reference: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v.strip() else None
    return out


def report_sweep(spec: dict) -> None:
    """The ablation report on the parent run (grid: its axes and reference; Optuna: the sampled
    params, plus Optuna's plots). A failure here does not undo the sweep: say how to redo it."""
    grid = spec.get("grid") or {}
    out = repo_root() / "runs" / "reports" / spec["name"]
    try:
        files = write_report(spec["tracking_uri"], spec["name"], grid.get("axes") and list(grid["axes"]),
                             grid.get("reference") or None, out)
    except Exception as exc:  # noqa: BLE001 - reporting must not turn a finished sweep into a failed one
        print(f"warning: the ablation report failed ({type(exc).__name__}: {exc}); rebuild it with "
              f"`lora-diffusion report --sweep {spec['name']}`", file=sys.stderr)
        return
    print(f"\nablation report ({len(files)} files in {out}, logged on the parent run under ablation/):\n")
    print(files["summary"].read_text())
