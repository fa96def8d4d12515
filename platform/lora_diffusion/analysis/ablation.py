"""Ablation reports: trial rows read back from MLflow, statistics, plots and the report.

A grid (engine/grid.py) or an Optuna sweep runs on the sweep engine; when it ends,
`report_sweep` writes this report on the sweep's parent run. The statistics never come from
memory: `load_trials` reads the trial runs of a sweep back from MLflow by their tags (see
engine/tracking.py), so a resumed or partly failed sweep is aggregated from what was really
logged; failed cells stay in the table (`n_failed`), they are never dropped silently.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import yaml

from ..core.errors import UserError
from ..engine.options import repo_root

DEV_METRIC = "final/dev/accuracy"
TEST_METRIC = "final/test/accuracy"
SEED_FIELD = "train.seed"
STEP_TIME = "final/step_time_s"


# ----------------------------------------------------------------------------- MLflow -> rows


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    from ..engine.tracking import prepare_uri

    return MlflowClient(prepare_uri(tracking_uri))


def _search_all(client, experiment_ids: list[str], flt: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=flt, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment_ids(client) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def find_parent(tracking_uri: str, sweep: str):
    """The sweep's parent run (tags sweep=NAME, role=sweep); the newest if the name was reused."""
    client = _client(tracking_uri)
    name = sweep.replace("'", "\\'")
    parents = _search_all(client, _experiment_ids(client), f"tags.sweep = '{name}' and tags.role = 'sweep'")
    if not parents:
        raise UserError(f"sweep: no MLflow parent run with tag sweep={sweep!r} in {tracking_uri}")
    return parents[-1]


def parse_param(value: str):
    """An MLflow param (a string) back to int / float / bool / None where it reads as one."""
    if value in ("None", ""):
        return None
    if value in ("True", "False"):
        return value == "True"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def load_trials(tracking_uri: str, sweep: str):
    """One row per trial of the sweep, read from MLflow by tag: trial_id, status, seed, every
    param (config.flat() keys, sampled.*), every final/* and accounting/* metric, and the
    convenience columns trainable_params / bytes_saved / trained_params. A trial whose run exists twice (a
    resume outside the tracker) keeps its FINISHED run, else its newest (`n_runs` says)."""
    import pandas as pd

    parent = find_parent(tracking_uri, sweep)
    client = _client(tracking_uri)
    sweep_id = parent.data.tags.get("sweep_id", sweep)
    runs = _search_all(client, [parent.info.experiment_id],
                       f"tags.sweep_id = '{sweep_id}' and tags.role = 'trial'")
    by_trial: dict[str, list] = {}
    for run in runs:
        tid = run.data.tags.get("trial_id", run.info.run_id)
        by_trial.setdefault(tid, []).append(run)
    rows = []
    for tid, group in by_trial.items():
        finished = [r for r in group if r.info.status == "FINISHED"]
        run = (finished or group)[-1]
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        seed = tags.get("seed", params.get(SEED_FIELD))
        row = {"trial_id": tid, "run_id": run.info.run_id, "status": run.info.status,
               "seed": parse_param(seed) if seed is not None else None,
               "method": tags.get("method"), "task": tags.get("task"),
               "stopped_early": tags.get("stopped_early") == "true", "n_runs": len(group),
               "start_time": run.info.start_time, "end_time": run.info.end_time}
        for k, v in params.items():
            if not k.startswith("accounting."):
                row[k] = parse_param(v)
        for k, v in metrics.items():
            if k.startswith(("final/", "accounting/")):
                row[k] = v
        row["trainable_params"] = metrics.get("accounting/trainable_params",
                                              parse_param(params.get("accounting.trainable_params", "")))
        row["bytes_saved"] = metrics.get("accounting/bytes_saved",
                                         parse_param(params.get("accounting.bytes_saved", "")))
        row["trained_params"] = metrics.get("accounting/trained_params", math.nan)  # older runs: none
        for k in (DEV_METRIC, TEST_METRIC):
            row.setdefault(k, math.nan)
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["trial_id", "run_id", "status", "seed", DEV_METRIC, TEST_METRIC,
                                   "trainable_params", "bytes_saved", "trained_params"])
    df.attrs["parent_run_id"] = parent.info.run_id
    df.attrs["parent_tags"] = dict(parent.data.tags)
    df.attrs["sweep_id"] = sweep_id
    return df.sort_values(["start_time", "trial_id"], kind="stable").reset_index(drop=True) \
        if "start_time" in df else df


# ----------------------------------------------------------------------------- statistics


def _key(value) -> str:
    """Cells are matched on the text of a value: 4 == '4', and NaN/None read as 'None'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "None"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _ci(values) -> tuple[float, float, float, float]:
    """mean, std (ddof=1), and the two ends of the 95% t interval of the mean."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return (math.nan,) * 4
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def aggregate(df, axes: list[str], reference: dict | None = None, metric: str = DEV_METRIC):
    """One row per cell (combination of the axes' values, as found in the trials).

    Per (cell, seed) the FINISHED run with the metric counts (the newest, if a seed was run
    twice); a seed with no such run is `failed` (FAILED/KILLED) or `running`. Columns: the axes,
    n, mean, std (ddof=1), ci95_low/high (t distribution), dev/test accuracy mean and std side by
    side, trainable_params, bytes_saved and trained_params (the first; `accounting_consistent`
    False if a cell disagrees), n_failed, n_running, seeds; with a reference, the paired (by seed) difference to
    the reference cell: diff_mean, n_pairs, p_value (paired t test; NaN with < 2 pairs)."""
    import pandas as pd
    from scipy import stats

    missing = [a for a in axes if a not in df.columns]
    if missing:
        params = sorted(c for c in df.columns if "." in c and "/" not in c)
        raise UserError(f"axes: {', '.join(missing)} not a param of the sweep's trials "
                        f"(params: {', '.join(params[:40])})")
    if not axes:
        raise UserError("axes: give at least one axis")
    reference = dict(reference or {})
    for k in reference:
        if k not in axes:
            raise UserError(f"reference: {k} is not one of the axes ({', '.join(axes)})")

    cells: dict[tuple, dict] = {}
    for _, row in df.iterrows():
        key = tuple(_key(row[a]) for a in axes)
        cell = cells.setdefault(key, {"values": {a: row[a] for a in axes}, "seeds": {}})
        cell["seeds"].setdefault(_key(row.get("seed")), []).append(row)

    def ok(r):
        return r["status"] == "FINISHED" and not _isnan(r.get(metric))

    summaries: dict[tuple, dict] = {}
    for key, cell in cells.items():
        done, n_failed, n_running = {}, 0, 0
        for seed, rows in cell["seeds"].items():
            good = [r for r in rows if ok(r)]
            if good:
                done[seed] = good[-1]
            elif any(r["status"] == "RUNNING" for r in rows):
                n_running += 1
            else:
                n_failed += 1
        summaries[key] = {"cell": cell, "done": done, "n_failed": n_failed, "n_running": n_running}

    ref_cells = {k for k in cells if all(k[axes.index(a)] == _key(v) for a, v in reference.items())}
    if reference and not ref_cells:
        raise UserError("reference: no cell with " + ", ".join(f"{k}={v}" for k, v in reference.items()))

    out = []
    for key in sorted(cells, key=lambda k: [_sortable(x) for x in k]):
        s = summaries[key]
        done = s["done"]
        row = {a: s["cell"]["values"][a] for a in axes}
        vals = [float(r[metric]) for r in done.values()]
        mean, std, lo, hi = _ci(vals)
        row.update({"n": len(vals), "mean": mean, "std": std, "ci95_low": lo, "ci95_high": hi})
        for label, col in (("dev", DEV_METRIC), ("test", TEST_METRIC)):
            v = [float(r[col]) for r in done.values() if not _isnan(r.get(col))]
            m, sd, _, _ = _ci(v)
            row[f"{label}_accuracy"], row[f"{label}_accuracy_std"], row[f"{label}_n"] = m, sd, len(v)
        consistent = True
        for col in ("trainable_params", "bytes_saved", "trained_params"):
            v = [r.get(col) for r in done.values() if not _isnan(r.get(col))]
            row[col] = v[0] if v else math.nan
            consistent &= len(set(v)) <= 1
        row["accounting_consistent"] = consistent
        if STEP_TIME in df.columns:  # the trials' own step time (seconds), mean over seeds
            v = [float(r[STEP_TIME]) for r in done.values() if not _isnan(r.get(STEP_TIME))]
            row["step_time_s"] = sum(v) / len(v) if v else math.nan
        row["n_failed"], row["n_running"] = s["n_failed"], s["n_running"]
        row["seeds"] = ",".join(sorted(done, key=_sortable))
        if reference:
            ref_key = tuple(_key(reference[a]) if a in reference else key[i] for i, a in enumerate(axes))
            ref = summaries.get(ref_key)
            row["is_reference"] = key == ref_key
            pairs = sorted(set(done) & set(ref["done"]), key=_sortable) if ref else []
            a_vals = [float(done[p][metric]) for p in pairs]
            b_vals = [float(ref["done"][p][metric]) for p in pairs]
            row["n_pairs"] = len(pairs)
            row["diff_mean"] = (sum(a_vals) - sum(b_vals)) / len(pairs) if pairs else math.nan
            if len(pairs) >= 2 and key != ref_key:
                row["p_value"] = float(stats.ttest_rel(a_vals, b_vals).pvalue)
            else:
                row["p_value"] = math.nan
        out.append(row)
    table = pd.DataFrame(out)
    table.attrs["metric"] = metric
    return table


def _isnan(v) -> bool:
    if v is None:
        return True
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return False


def _sortable(text: str):
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


# ----------------------------------------------------------------------------- report


def infer_axes(df) -> list[str]:
    """Axes of a sweep with none given: the sampled params (`sampled.X` -> X) that vary, else any
    config param that varies across trials with at most 12 values (train.seed excluded)."""
    sampled = [c[len("sampled."):] for c in df.columns if c.startswith("sampled.")]
    candidates = [c for c in sampled if c in df.columns] or \
        [c for c in df.columns if "." in c and "/" not in c and not c.startswith("sampled.")]
    axes = [c for c in candidates if c != SEED_FIELD and 1 < df[c].map(_key).nunique() <= 12]
    if not axes:
        raise UserError("axes: none given and no param varies across the sweep's trials (pass --axes)")
    return axes


def _arrow_safe(df):
    """Object columns that mix types (e.g. 4 and 'None') become text, for parquet."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object:
            kinds = {type(v) for v in out[col] if v is not None and not _isnan_safe(v)}
            if len(kinds) > 1 or any(k in (list, dict, tuple) for k in kinds):
                out[col] = out[col].map(lambda v: None if v is None else str(v))
    return out


def _isnan_safe(v) -> bool:
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


def _cell_label(row, axes) -> str:
    return ", ".join(f"{a.split('.')[-1]}={_key(row[a])}" for a in axes)


def plot_heatmaps(df, axes: list[str], metric: str, out_dir: Path) -> list[Path]:
    """One heatmap per pair of axes: mean of the metric over finished trials (other axes pooled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = df[(df["status"] == "FINISHED") & df[metric].notna()]
    paths = []
    for a, b in itertools.combinations(axes, 2):
        ya = sorted({_key(v) for v in df[a]}, key=_sortable)
        xb = sorted({_key(v) for v in df[b]}, key=_sortable)
        grid = [[math.nan] * len(xb) for _ in ya]
        counts = [[0] * len(xb) for _ in ya]
        for _, r in done.iterrows():
            i, j = ya.index(_key(r[a])), xb.index(_key(r[b]))
            counts[i][j] += 1
            grid[i][j] = (0 if counts[i][j] == 1 else grid[i][j]) + float(r[metric])
        grid = [[g / c if c else math.nan for g, c in zip(gr, cr)] for gr, cr in zip(grid, counts)]
        fig, ax = plt.subplots(figsize=(1.2 * len(xb) + 2.5, 0.8 * len(ya) + 2))
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(xb)), xb, rotation=30, ha="right")
        ax.set_yticks(range(len(ya)), ya)
        ax.set_xlabel(b)
        ax.set_ylabel(a)
        failed = [[0] * len(xb) for _ in ya]
        for _, r in df[df["status"].isin(["FAILED", "KILLED"])].iterrows():
            failed[ya.index(_key(r[a]))][xb.index(_key(r[b]))] += 1
        for i in range(len(ya)):
            for j in range(len(xb)):
                text = "no result" if counts[i][j] == 0 else f"{grid[i][j]:.3f}\nn={counts[i][j]}"
                if failed[i][j]:
                    text += f"\n{failed[i][j]} failed"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="w")
        fig.colorbar(im, ax=ax, label=metric)
        ax.set_title(f"{metric}\n{a} x {b} (other axes pooled)", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"heatmap_{a}__{b}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_pareto(table, axes: list[str], out_dir: Path) -> Path:
    """Trainable params (log x) vs the metric's mean with its 95% CI; the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = table.attrs.get("metric", DEV_METRIC)
    t = table[table["n"] > 0].dropna(subset=["trainable_params", "mean"])
    fig, ax = plt.subplots(figsize=(7, 5))
    if not t.empty:
        yerr = [(t["mean"] - t["ci95_low"]).fillna(0), (t["ci95_high"] - t["mean"]).fillna(0)]
        ax.errorbar(t["trainable_params"], t["mean"], yerr=yerr, fmt="o", capsize=3)
        for _, r in t.iterrows():
            ax.annotate(_cell_label(r, axes), (r["trainable_params"], r["mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        front, best = [], -math.inf
        for _, r in t.sort_values(["trainable_params", "mean"], ascending=[True, False]).iterrows():
            if r["mean"] > best:
                front.append((r["trainable_params"], r["mean"]))
                best = r["mean"]
        ax.plot(*zip(*front), "--", color="grey", label="Pareto front")
        ax.legend()
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(f"{metric} (mean, 95% CI)")
    ax.set_title("accuracy vs trainable parameters")
    fig.tight_layout()
    path = out_dir / "pareto.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")  # point labels may run past the axes
    plt.close(fig)
    return path


def study_from_trials(df, axes: list[str], metric: str):
    """An in-memory Optuna study holding the finished trials (axes as params, metric as value),
    so the Optuna importance and parallel-coordinate plots work for any sweep or grid."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    done = df[(df["status"] == "FINISHED") & df[metric].notna()]
    dists = {}
    for a in axes:
        vals = [v for v in done[a] if not _isnan(v)]
        if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) \
                and len(set(vals)) > 1:
            if all(float(v).is_integer() for v in vals):
                dists[a] = IntDistribution(int(min(vals)), int(max(vals)))
            else:
                dists[a] = FloatDistribution(float(min(vals)), float(max(vals)))
        else:
            dists[a] = CategoricalDistribution(sorted({_key(v) for v in done[a]}, key=_sortable) or ["None"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for _, r in done.iterrows():
        params = {}
        for a, d in dists.items():
            v = r[a]
            params[a] = _key(v) if isinstance(d, CategoricalDistribution) else \
                (int(v) if isinstance(d, IntDistribution) else float(v))
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(r[metric])))
    return study


def plot_optuna(study, out_dir: Path) -> tuple[list[Path], list[str]]:
    """Parameter importances and parallel coordinates (optuna.visualization.matplotlib)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    paths, notes = [], []
    for name, fn in (("optuna_param_importances.png", ovm.plot_param_importances),
                     ("optuna_parallel_coordinate.png", ovm.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=90)
            plt.close(fig)
            paths.append(out_dir / name)
        except Exception as exc:  # too few trials, a single value per param, ...
            notes.append(f"{name}: skipped ({type(exc).__name__}: {exc})")
    return paths, notes


def write_report(tracking_uri: str, sweep: str, axes: list[str] | None, reference: dict | None,
                 out_dir: str | Path, metric: str = DEV_METRIC, optuna_study=None,
                 log_to_mlflow: bool = True) -> dict[str, Path]:
    """Aggregate the sweep's trials from MLflow and write, under out_dir: trials.parquet (raw
    rows), grid.parquet (the table), heatmap_A__B.png per pair of axes, pareto.png, summary.md,
    and for Optuna sweeps (sampled.* params, or `optuna_study` given) the Optuna importance and
    parallel-coordinate plots. All are logged on the sweep's parent run under `ablation/`, the
    table also with `log_table` as ablation/grid.json."""
    df = load_trials(tracking_uri, sweep)
    parent_id = df.attrs["parent_run_id"]
    if df.empty:
        raise UserError(f"sweep: {sweep!r} has no trial runs in {tracking_uri}")
    # a grid sweep tags its parent run with its axes and reference cell (sweep.py)
    tags = df.attrs.get("parent_tags", {})
    if not axes and tags.get("ablation.axes"):
        axes = tags["ablation.axes"].split(",")
    if reference is None and tags.get("ablation.reference"):
        reference = json.loads(tags["ablation.reference"]) or None
    axes = list(axes) if axes else infer_axes(df)
    table = aggregate(df, axes, reference, metric)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files["trials"] = out / "trials.parquet"
    _arrow_safe(df).to_parquet(files["trials"], engine="pyarrow", index=False)
    files["grid"] = out / "grid.parquet"
    _arrow_safe(table).to_parquet(files["grid"], engine="pyarrow", index=False)
    for p in plot_heatmaps(df, axes, metric, out) if len(axes) >= 2 else []:
        files[p.stem] = p
    files["pareto"] = plot_pareto(table, axes, out)
    notes = []
    is_optuna = optuna_study is not None or any(c.startswith("sampled.") for c in df.columns)
    if is_optuna:
        study = optuna_study if optuna_study is not None else study_from_trials(df, axes, metric)
        paths, notes = plot_optuna(study, out)
        files.update({p.stem: p for p in paths})

    n_status = df["status"].value_counts().to_dict()
    lines = [f"# Ablation of sweep `{sweep}`", "",
             f"metric: `{metric}`; axes: {', '.join(f'`{a}`' for a in axes)}; "
             f"trials: {len(df)} ({', '.join(f'{k} {v}' for k, v in sorted(n_status.items()))})",
             "mean, std (ddof=1) and the 95% t interval are over seeds; "
             "a seed without a finished run counts in n_failed (or n_running)."]
    if reference:
        lines.append("diff_mean / p_value: paired by seed against the reference cell "
                     + ", ".join(f"`{k}={v}`" for k, v in reference.items()) + " (paired t test).")
    if not table["accounting_consistent"].all():
        lines.append("**warning**: some cells report different trainable_params / bytes_saved across seeds.")
    if int(table["n_failed"].sum()):
        lines.append(f"**{int(table['n_failed'].sum())} failed cell-seed(s)**: see n_failed.")
    lines += ["", markdown_table(table), ""] + [f"- {n}" for n in notes]
    files["summary"] = out / "summary.md"
    files["summary"].write_text("\n".join(lines) + "\n")

    if log_to_mlflow:
        client = _client(tracking_uri)
        for path in files.values():
            client.log_artifact(parent_id, str(path), "ablation")
        client.log_table(parent_id, _arrow_safe(table), "ablation/grid.json")
        client.set_tag(parent_id, "ablation.axes", ",".join(axes))
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
