"""The grid table: the trials of a sweep (analysis/trials.py) aggregated per cell over seeds.

A cell is one combination of the axes' values. Per (cell, seed) the FINISHED run with the metric
counts; a seed without one is counted as failed or running, so failed cells stay in the table
(`n_failed`), they are never dropped silently. Means come with the 95% t interval over seeds and,
with a reference cell, the difference to it paired by seed.
"""

from __future__ import annotations

import math

from ..core.errors import UserError
from ..core.task_specs import metric_mode
from .trials import (
    ACCOUNTING_COLUMNS,
    PENALTY_PREFIX,
    STEP_TIME,
    final_column,
    is_missing,
    sort_key,
    task_metric,
    value_key,
)


def t_interval(values) -> tuple[float, float, float, float]:
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


def _check_axes(df, axes: list[str], reference: dict) -> None:
    missing = [a for a in axes if a not in df.columns]
    if missing:
        params = sorted(c for c in df.columns if "." in c and "/" not in c)
        raise UserError(f"axes: {', '.join(missing)} not a param of the sweep's trials "
                        f"(params: {', '.join(params[:40])})")
    if not axes:
        raise UserError("axes: give at least one axis")
    for k in reference:
        if k not in axes:
            raise UserError(f"reference: {k} is not one of the axes ({', '.join(axes)})")


def _group_by_cell(df, axes: list[str]) -> dict[tuple, dict]:
    """cell key (the axes' value texts) -> {"values": the axes' values, "seeds": seed -> rows}."""
    cells: dict[tuple, dict] = {}
    for _, row in df.iterrows():
        key = tuple(value_key(row[a]) for a in axes)
        cell = cells.setdefault(key, {"values": {a: row[a] for a in axes}, "seeds": {}})
        cell["seeds"].setdefault(value_key(row.get("seed")), []).append(row)
    return cells


def _count_seeds(cell: dict, metric: str) -> dict:
    """The row that counts per finished seed (the newest, if a seed was run twice), and how many
    seeds have none: still RUNNING, or failed (FAILED/KILLED, or finished without the metric)."""
    done, n_failed, n_running = {}, 0, 0
    for seed, rows in cell["seeds"].items():
        good = [r for r in rows if r["status"] == "FINISHED" and not is_missing(r.get(metric))]
        if good:
            done[seed] = good[-1]
        elif any(r["status"] == "RUNNING" for r in rows):
            n_running += 1
        else:
            n_failed += 1
    return {"cell": cell, "done": done, "n_failed": n_failed, "n_running": n_running}


def _cell_statistics(done: dict, metric: str, with_step_time: bool, penalties: list[str]) -> dict:
    """n, mean, std, the t interval; the metric's validation and test figures side by side
    (`validation_f1`, `test_f1`, ... named by the metric's last part); the accounting (the first,
    `accounting_consistent` False if the seeds disagree); the mean step time; the mean of each
    penalised quantity (`reg_nuclear`, ... from the `penalties` columns)."""
    vals = [float(r[metric]) for r in done.values()]
    mean, std, lo, hi = t_interval(vals)
    row = {"n": len(vals), "mean": mean, "std": std, "ci95_low": lo, "ci95_high": hi}
    base = metric.rsplit("/", 1)[-1]
    for label in ("validation", "test"):
        col = final_column(label, base)
        v = [float(r[col]) for r in done.values() if not is_missing(r.get(col))]
        m, sd, _, _ = t_interval(v)
        row[f"{label}_{base}"], row[f"{label}_{base}_std"], row[f"{label}_n"] = m, sd, len(v)
    consistent = True
    for col in ACCOUNTING_COLUMNS:
        v = [r.get(col) for r in done.values() if not is_missing(r.get(col))]
        row[col] = v[0] if v else math.nan
        consistent &= len(set(v)) <= 1
    row["accounting_consistent"] = consistent
    if with_step_time:  # the trials' own step time (seconds), mean over seeds
        v = [float(r[STEP_TIME]) for r in done.values() if not is_missing(r.get(STEP_TIME))]
        row["step_time_s"] = sum(v) / len(v) if v else math.nan
    for col in penalties:  # the last logged value of what a regulariser penalises, mean over seeds
        v = [float(r[col]) for r in done.values() if not is_missing(r.get(col))]
        row[col.rsplit("/", 1)[-1]] = sum(v) / len(v) if v else math.nan
    return row


def _reference_key(key: tuple, axes: list[str], reference: dict) -> tuple:
    """The reference cell of `key`: the reference's values on its axes, key's on the others."""
    return tuple(value_key(reference[a]) if a in reference else key[i] for i, a in enumerate(axes))


def _paired_difference(key: tuple, ref_key: tuple, summaries: dict, metric: str) -> dict:
    """Against the reference cell, paired by seed: mean difference, pairs, paired t test p-value
    (NaN with < 2 pairs, and for the reference cell itself)."""
    from scipy import stats

    done, ref = summaries[key]["done"], summaries.get(ref_key)
    pairs = sorted(set(done) & set(ref["done"]), key=sort_key) if ref else []
    a_vals = [float(done[p][metric]) for p in pairs]
    b_vals = [float(ref["done"][p][metric]) for p in pairs]
    diff_mean = (sum(a_vals) - sum(b_vals)) / len(pairs) if pairs else math.nan
    p_value = float(stats.ttest_rel(a_vals, b_vals).pvalue) if len(pairs) >= 2 and key != ref_key \
        else math.nan
    return {"is_reference": key == ref_key, "n_pairs": len(pairs), "diff_mean": diff_mean, "p_value": p_value}


def aggregate(df, axes: list[str], reference: dict | None = None, metric: str | None = None):
    """One row per cell (combination of the axes' values, as found in the trials).

    `metric` defaults to the trials' task's validation figure (`final/validation/accuracy`,
    `final/validation/f1`, `final/validation/elbo_nats_per_token` for ELBO-only generation
    trials, lower is better: `attrs["mode"]` is "min"; trials.task_metric). Columns: the axes, n,
    mean, std (ddof=1), ci95_low/high (t distribution), the metric's validation/test mean and std
    side by side, trainable_params, bytes_saved and trained_params (the first;
    `accounting_consistent` False if a cell disagrees), step_time_s (if logged), reg_nuclear,
    reg_orth, ... (the mean last logged penalty, if logged: trials.PENALTY_PREFIX), n_failed,
    n_running, seeds; with a reference, the paired (by seed) difference to the reference cell:
    is_reference, n_pairs, diff_mean, p_value (paired t test; NaN with < 2 pairs)."""
    import pandas as pd

    reference = dict(reference or {})
    metric = metric or final_column("validation", task_metric(df))
    if metric not in df.columns:  # a typo would otherwise be a KeyError deep in the grouping
        known = sorted(c for c in df.columns if c.startswith(("final/", "accounting/")))
        raise UserError(f"--metric: {metric!r} is not a metric of the sweep's trials "
                        f"(valid: {', '.join(known) or 'none logged yet'})")
    _check_axes(df, axes, reference)
    cells = _group_by_cell(df, axes)
    summaries = {key: _count_seeds(cell, metric) for key, cell in cells.items()}
    if reference and not any(_reference_key(k, axes, reference) == k for k in cells):
        raise UserError("reference: no cell with " + ", ".join(f"{k}={v}" for k, v in reference.items()))
    out = []
    for key in sorted(cells, key=lambda k: [sort_key(x) for x in k]):
        s = summaries[key]
        row = {a: s["cell"]["values"][a] for a in axes}
        row.update(_cell_statistics(s["done"], metric, with_step_time=STEP_TIME in df.columns,
                                    penalties=sorted(c for c in df.columns if c.startswith(PENALTY_PREFIX))))
        row["n_failed"], row["n_running"] = s["n_failed"], s["n_running"]
        row["seeds"] = ",".join(sorted(s["done"], key=sort_key))
        if reference:
            row.update(_paired_difference(key, _reference_key(key, axes, reference), summaries, metric))
        out.append(row)
    table = pd.DataFrame(out)
    table.attrs["metric"], table.attrs["mode"] = metric, metric_mode(metric)
    return table


def phase_gain_table(df, axes: list[str]):
    """Per-phase attribution (issue 21): per cell with K > 1, each phase module's test gain, mean
    and std over the finished seeds, `phase k` = "mean ± std". A gain is the test metric with all
    modules against the metric with phase k's module switched off (core/diagnostics.py), signed
    so that above 0 means the module helps. None when no trial logged one."""
    import pandas as pd

    cols = {int(c.rsplit("/", 1)[1]): c for c in df.columns if c.startswith("final/test/phase_gain/")}
    if not cols:
        return None
    rows = []
    for _key, cell in sorted(_group_by_cell(df, axes).items(), key=lambda kv: [sort_key(x) for x in kv[0]]):
        done = [fin[-1] for fin in ([r for r in rs if r["status"] == "FINISHED"] for rs in cell["seeds"].values())
                if fin]  # the newest finished run per seed, as the grid table counts
        row, any_gain = dict(cell["values"]), False
        for k in sorted(cols):
            vals = [float(r[cols[k]]) for r in done if not is_missing(r.get(cols[k]))]
            mean, std, _, _ = t_interval(vals)
            row[f"phase {k}"] = "—" if not vals else f"{mean:.4f}" + ("" if math.isnan(std) else f" ± {std:.4f}")
            any_gain |= bool(vals)
        if any_gain:
            rows.append(row)
    return pd.DataFrame(rows) if rows else None
