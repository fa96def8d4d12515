"""The report's figures: a heatmap per pair of axes, accuracy vs trainable parameters with its
Pareto front, the per-t bound against the backbone's (core/diagnostics.py), and Optuna's
importance and parallel-coordinate plots (for any sweep or grid, through an in-memory study built
from the trials). PNG files, matplotlib's Agg backend."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

from ..core.task_specs import direction, metric_mode
from .trials import VALIDATION_METRIC, is_missing, sort_key, value_key


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cell_label(row, axes) -> str:
    return ", ".join(f"{a.split('.')[-1]}={value_key(row[a])}" for a in axes)


def _pair_grid(df, done, a: str, b: str):
    """Values of a (rows) and b (columns), and per grid square the mean of the metric over the
    finished trials, their count, and the count of FAILED/KILLED trials."""
    ya = sorted({value_key(v) for v in df[a]}, key=sort_key)
    xb = sorted({value_key(v) for v in df[b]}, key=sort_key)
    sums = [[0.0] * len(xb) for _ in ya]
    counts = [[0] * len(xb) for _ in ya]
    failed = [[0] * len(xb) for _ in ya]
    for metric_value, r in done:
        i, j = ya.index(value_key(r[a])), xb.index(value_key(r[b]))
        counts[i][j] += 1
        sums[i][j] += metric_value
    for _, r in df[df["status"].isin(["FAILED", "KILLED"])].iterrows():
        failed[ya.index(value_key(r[a]))][xb.index(value_key(r[b]))] += 1
    means = [[s / c if c else math.nan for s, c in zip(sr, cr)] for sr, cr in zip(sums, counts)]
    return ya, xb, means, counts, failed


def plot_heatmaps(df, axes: list[str], metric: str, out_dir: Path) -> list[Path]:
    """One heatmap per pair of axes: mean of the metric over finished trials (other axes pooled)."""
    plt = _pyplot()
    finished = df[(df["status"] == "FINISHED") & df[metric].notna()]
    done = [(float(r[metric]), r) for _, r in finished.iterrows()]
    paths = []
    for a, b in itertools.combinations(axes, 2):
        ya, xb, means, counts, failed = _pair_grid(df, done, a, b)
        fig, ax = plt.subplots(figsize=(1.2 * len(xb) + 2.5, 0.8 * len(ya) + 2))
        im = ax.imshow(means, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(xb)), xb, rotation=30, ha="right")
        ax.set_yticks(range(len(ya)), ya)
        ax.set_xlabel(b)
        ax.set_ylabel(a)
        for i in range(len(ya)):
            for j in range(len(xb)):
                text = "no result" if counts[i][j] == 0 else f"{means[i][j]:.3f}\nn={counts[i][j]}"
                if failed[i][j]:
                    text += f"\n{failed[i][j]} failed"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="w")
        fig.colorbar(im, ax=ax, label=f"{metric} ({direction(metric)})")
        ax.set_title(f"{metric}\n{a} x {b} (other axes pooled)", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"heatmap_{a}__{b}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _pareto_front(t, mode: str = "max") -> list[tuple[float, float]]:
    """The cells no other cell beats with as few or fewer trainable parameters, left to right
    (beats: a higher mean, a lower one for a metric of mode "min", the ELBO bound)."""
    sign = -1.0 if mode == "min" else 1.0
    front, best = [], -math.inf
    for _, r in t.assign(_score=sign * t["mean"]).sort_values(["trainable_params", "_score"],
                                                               ascending=[True, False]).iterrows():
        if r["_score"] > best:
            front.append((r["trainable_params"], r["mean"]))
            best = r["_score"]
    return front


def plot_pareto(table, axes: list[str], out_dir: Path) -> Path:
    """Trainable params (log x) vs the metric's mean with its 95% CI; the Pareto front joined."""
    plt = _pyplot()
    metric = table.attrs.get("metric", VALIDATION_METRIC)
    t = table[table["n"] > 0].dropna(subset=["trainable_params", "mean"])
    fig, ax = plt.subplots(figsize=(7, 5))
    if not t.empty:
        yerr = [(t["mean"] - t["ci95_low"]).fillna(0), (t["ci95_high"] - t["mean"]).fillna(0)]
        ax.errorbar(t["trainable_params"], t["mean"], yerr=yerr, fmt="o", capsize=3)
        for _, r in t.iterrows():
            ax.annotate(_cell_label(r, axes), (r["trainable_params"], r["mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.plot(*zip(*_pareto_front(t, metric_mode(metric))), "--", color="grey", label="Pareto front")
        ax.legend()
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(f"{metric} (mean, 95% CI; {direction(metric)})")
    ax.set_title(f"{metric.rsplit('/', 1)[-1]} vs trainable parameters")
    fig.tight_layout()
    path = out_dir / "pareto.png"
    fig.savefig(path, dpi=90, bbox_inches="tight")  # point labels may run past the axes
    plt.close(fig)
    return path


PER_T = "final/validation/per_t/"  # the final result's per-t figures (the last validation's)


def per_t_gaps(df, axes: list[str]) -> tuple[int, dict[str, list[float]]]:
    """(bins, cell label -> per bin the mean over its finished trials of the method's bound minus
    the backbone's); (0, {}) when the trials logged no per-t figures."""
    n = sum(1 for c in df.columns if c.startswith(PER_T + "bound_bin"))
    gaps: dict[str, list[list[float]]] = {}
    for _, r in df[df["status"] == "FINISHED"].iterrows() if n else ():
        diff = [float(r.get(f"{PER_T}bound_bin{k}", math.nan))
                - float(r.get(f"{PER_T}backbone_bound_bin{k}", math.nan)) for k in range(n)]
        if not any(is_missing(d) for d in diff):
            gaps.setdefault(_cell_label(r, axes), []).append(diff)
    return n, {cell: [sum(col) / len(col) for col in zip(*rows)] for cell, rows in gaps.items()}


def plot_per_t(df, axes: list[str], out_dir: Path) -> Path | None:
    """per_t.png: per bin of t, the method's bound minus the backbone's (nats per response token,
    below 0: the method lowers the loss there), one line per grid cell; None without figures."""
    n, gaps = per_t_gaps(df, axes)
    if not gaps:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    mids = [(k + 0.5) / n for k in range(n)]
    for cell, gap in sorted(gaps.items()):
        ax.plot(mids, gap, marker="o", markersize=3, label=cell)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"t (midpoints of {n} bins; low t: few tokens masked)")
    ax.set_ylabel("bound - backbone's (nats / response token)")
    ax.set_title("where along the trajectory the method changes the loss (validation, mean over seeds)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out_dir / "per_t.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _distribution(values: list):
    """Int / float range for numeric values that vary, else categorical over the value texts."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    vals = [v for v in values if not is_missing(v)]
    if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals) \
            and len(set(vals)) > 1:
        if all(float(v).is_integer() for v in vals):
            return IntDistribution(int(min(vals)), int(max(vals)))
        return FloatDistribution(float(min(vals)), float(max(vals)))
    return CategoricalDistribution(sorted({value_key(v) for v in values}, key=sort_key) or ["None"])


def study_from_trials(df, axes: list[str], metric: str):
    """An in-memory Optuna study holding the finished trials (axes as params, metric as value),
    so the Optuna importance and parallel-coordinate plots work for any sweep or grid."""
    import optuna
    from optuna.distributions import CategoricalDistribution, IntDistribution

    done = df[(df["status"] == "FINISHED") & df[metric].notna()]
    dists = {a: _distribution(list(done[a])) for a in axes}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize" if metric_mode(metric) == "min" else "maximize")
    for _, r in done.iterrows():
        params = {}
        for a, d in dists.items():
            v = r[a]
            params[a] = value_key(v) if isinstance(d, CategoricalDistribution) else \
                (int(v) if isinstance(d, IntDistribution) else float(v))
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(r[metric])))
    return study


def plot_optuna(study, out_dir: Path) -> tuple[list[Path], list[str]]:
    """Parameter importances and parallel coordinates (optuna.visualization.matplotlib)."""
    import warnings

    plt = _pyplot()
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
