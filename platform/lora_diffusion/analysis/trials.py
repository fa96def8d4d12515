"""A sweep's trials read back from MLflow, one row per trial.

A grid (engine/grid.py) or an Optuna sweep runs on the sweep engine and logs every trial to MLflow
with tags (see engine/tracking.py). The statistics never come from memory: `load_trials` reads the
trial runs back by those tags, so a resumed or partly failed sweep is aggregated from what was
really logged. Also here: how a logged value is compared and sorted (`value_key`, `sort_key`).
"""

from __future__ import annotations

import math

from ..core.errors import UserError
from ..core.task_specs import TEXT_SCORES

# A trial's final figures are `final/<split>/<metric>`, where the metric is its task's
# (TaskSpec.metric: accuracy for classification, f1 for XQuAD, rougeL for XSum), or the ELBO bound
# elbo_nats_per_token (lower is better) for a generation run with generation.text_scores false.
VALIDATION_METRIC = "final/validation/accuracy"  # the classification tasks' columns
TEST_METRIC = "final/test/accuracy"
SEED_FIELD = "train.seed"
STEP_TIME = "final/step_time_s"
ACCOUNTING_COLUMNS = ("trainable_params", "bytes_saved", "trained_params")
# What the regularisers penalise (trajectory's nuclear norm and orthogonality, AdaLoRA's
# orthogonality), as last logged in training, whatever their weights: a regulariser grid shows
# whether a weight moved the quantity it penalises, beside whether it moved the metric.
PENALTY_PREFIX = "train/reg_"


# ----------------------------------------------------------------------------- the task's metric


def final_column(split: str, metric: str) -> str:
    """The trial column of a split's final figure: `final/validation/f1`."""
    return f"final/{split}/{metric}"


def metric_of_task(task, text_scores=True) -> str:
    """The figure a run of `task` is selected on (task_specs.run_metric); "accuracy" for none."""
    from ..core.task_specs import TASKS, run_metric

    return run_metric(task, str(text_scores) != "False") if task in TASKS else "accuracy"


def text_scores_of(row) -> bool:
    """A trial row's generation.text_scores: True unless it says false (False, numpy's, the
    param's text); older runs have no such param (NaN, None): they scored text."""
    return str(row.get(TEXT_SCORES)) != "False"


def task_metric(df) -> str:
    """The metric the frame's trials are scored by: their task's (TaskSpec.metric), the ELBO bound
    for generation trials run with generation.text_scores false. Trials selected on different
    metrics have no column in common, so that is refused naming them."""
    rows = [r for _, r in df.iterrows() if isinstance(r.get("task"), str)] if len(df) else []
    tasks = sorted({r["task"] for r in rows})
    metrics = sorted({metric_of_task(r["task"], text_scores_of(r)) for r in rows})
    if len(metrics) > 1:
        raise UserError(f"--metric: the trials' tasks {', '.join(tasks)} (and their {TEXT_SCORES}) are "
                        f"scored by different metrics ({', '.join(metrics)}); name one with --metric")
    return metrics[0] if metrics else "accuracy"


# ----------------------------------------------------------------------------- values of a row


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


def value_key(value) -> str:
    """Cells are matched on the text of a value: 4 == '4', and NaN/None read as 'None'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "None"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def sort_key(text: str):
    """Value texts in order: numbers by value first, then the rest alphabetically."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def is_missing(value) -> bool:
    """None or NaN (a metric a failed trial never logged); text is not missing."""
    if value is None:
        return True
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- MLflow -> rows


def mlflow_client(tracking_uri: str):
    """A client of the store (a sqlite URI checked and its folder made, as the engine does)."""
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
    client = mlflow_client(tracking_uri)
    name = sweep.replace("'", "\\'")
    parents = _search_all(client, _experiment_ids(client), f"tags.sweep = '{name}' and tags.role = 'sweep'")
    if not parents:
        raise UserError(f"sweep: no MLflow parent run with tag sweep={sweep!r} in {tracking_uri}")
    return parents[-1]


def _runs_by_trial(runs) -> dict[str, list]:
    by_trial: dict[str, list] = {}
    for run in runs:
        by_trial.setdefault(run.data.tags.get("trial_id", run.info.run_id), []).append(run)
    return by_trial


def _trial_row(trial_id: str, group: list) -> dict:
    """The row of one trial: its FINISHED run, else its newest (a trial logged twice by a resume
    outside the tracker has two runs; `n_runs` says)."""
    finished = [r for r in group if r.info.status == "FINISHED"]
    run = (finished or group)[-1]
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    seed = tags.get("seed", params.get(SEED_FIELD))
    row = {"trial_id": trial_id, "run_id": run.info.run_id, "status": run.info.status,
           "seed": parse_param(seed) if seed is not None else None,
           "method": tags.get("method"), "task": tags.get("task"),
           "stopped_early": tags.get("stopped_early") == "true", "n_runs": len(group),
           "start_time": run.info.start_time, "end_time": run.info.end_time}
    row.update({k: parse_param(v) for k, v in params.items() if not k.startswith("accounting.")})
    row.update({k: v for k, v in metrics.items() if k.startswith(("final/", "accounting/", PENALTY_PREFIX))})
    # the accounting was logged as params by older trials, as metrics since
    for col in ("trainable_params", "bytes_saved"):
        row[col] = metrics.get(f"accounting/{col}", parse_param(params.get(f"accounting.{col}", "")))
    row["trained_params"] = metrics.get("accounting/trained_params", math.nan)  # older runs: none
    metric = metric_of_task(tags.get("task"), parse_param(params.get(TEXT_SCORES, "True")))
    for k in (final_column("validation", metric), final_column("test", metric)):
        row.setdefault(k, math.nan)
    return row


def load_trials(tracking_uri: str, sweep: str):
    """One row per trial of the sweep, read from MLflow by tag: trial_id, status, seed, every
    param (config.flat() keys, sampled.*), every final/* and accounting/* metric, the last
    train/reg_* (PENALTY_PREFIX), and the
    convenience columns trainable_params / bytes_saved / trained_params. The parent run's id and
    tags and the sweep_id are in the frame's `attrs`."""
    import pandas as pd

    parent = find_parent(tracking_uri, sweep)
    sweep_id = parent.data.tags.get("sweep_id", sweep)
    runs = _search_all(mlflow_client(tracking_uri), [parent.info.experiment_id],
                       f"tags.sweep_id = '{sweep_id}' and tags.role = 'trial'")
    df = pd.DataFrame([_trial_row(tid, group) for tid, group in _runs_by_trial(runs).items()])
    if df.empty:
        df = pd.DataFrame(columns=["trial_id", "run_id", "status", "seed", VALIDATION_METRIC, TEST_METRIC,
                                   *ACCOUNTING_COLUMNS])
    df.attrs["parent_run_id"] = parent.info.run_id
    df.attrs["parent_tags"] = dict(parent.data.tags)
    df.attrs["sweep_id"] = sweep_id
    return df.sort_values(["start_time", "trial_id"], kind="stable").reset_index(drop=True) \
        if "start_time" in df else df


def infer_axes(df) -> list[str]:
    """Axes of a sweep with none given: the sampled params (`sampled.X` -> X) that vary, else any
    config param that varies across trials with at most 12 values (train.seed excluded)."""
    sampled = [c[len("sampled."):] for c in df.columns if c.startswith("sampled.")]
    candidates = [c for c in sampled if c in df.columns] or \
        [c for c in df.columns if "." in c and "/" not in c and not c.startswith("sampled.")]
    axes = [c for c in candidates if c != SEED_FIELD and 1 < df[c].map(value_key).nunique() <= 12]
    if not axes:
        raise UserError("axes: none given and no param varies across the sweep's trials (pass --axes)")
    return axes
