"""MLflow tracking of sweeps: one parent run per sweep, one nested child run per trial.

Ray's stock `MLflowLoggerCallback` keeps its trial -> run map in memory: after `Tuner.restore`
every resumed trial gets a second run, the first stays RUNNING, and steps restart. Here every
run is found again by its tags (`sweep` + `role`, plus `trial_id` for trials), so a resumed sweep
re-attaches to the runs it already has:

- the parent run (tags sweep, sweep_id, role=sweep) is created once and re-opened on resume;
- a trial's run (tags sweep, sweep_id, trial_id, role=trial, mlflow.parentRunId) is created once; on
  re-attach its last logged step is read back and only later steps are logged, so every metric
  is one increasing sequence of the recipe's own step counter;
- a run is ended FINISHED / FAILED once: ending an already-ended run with the same status is a
  no-op.

What the MLflow UI shows (MLflow 3.17): the experiment is tagged a model-training experiment
(`mlflow.experimentKind`); trials are named by the values they tried (unique within the sweep,
the Tune trial id stays a tag); params are the configuration, results are metrics; the parent
run's description (`mlflow.note.content`) is the sweep's summary. MLflow 3.17 opens an
experiment on its GenAI pages unless the URL or the browser's stored choice says "Model
training", whatever the experiment's tag: `save_runs_view` stores a view of the sweep (its
runs, best first, its knobs and accuracies as columns) on the experiment, and the link that
opens it on the parent run (`RUNS_VIEW_TAG`).

`SweepTracker` is plain MLflow, no Ray (unit-tested against a sqlite store);
`callbacks.MlflowSweepCallback` is the Tune callback that drives it from the sweep's driver.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

from ..core.errors import UserError
from ..core.task_specs import metric_mode

TERMINAL = ("FINISHED", "FAILED", "KILLED")
STEP_METRIC = "train/loss"  # logged with every report: its history tells the last logged step
DEFAULT_EXPERIMENT = "lora-diffusion-sweeps"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI's "Machine learning"
DESCRIPTION_TAG = "mlflow.note.content"  # a run's description in the UI (markdown)
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # the UI's saved views of an experiment's runs table
RUNS_VIEW_TAG = "ui.runs_view"  # on the parent run: the UI link (after the server's address)


def default_tracking_uri(run_dir: Path) -> str:
    """$MLFLOW_TRACKING_URI if set, else a SQLite store in the project's run directory."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def compare_line(tracking_uri: str, link: str) -> str:
    """The line a sweep prints at its end to compare its trials in the MLflow UI. A server
    (http/https) is its own UI: its address plus the link. A local store (sqlite, a folder,
    file:) needs a UI started on it, which listens on mlflow's default 127.0.0.1:5000."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"compare its trials: open {tracking_uri.rstrip('/')}/{link}"
    return (f"compare its trials: mlflow ui --backend-store-uri {tracking_uri}, then open "
            f"http://127.0.0.1:5000/{link}")


def prepare_uri(uri: str) -> str:
    """Create the directory of a sqlite store (MLflow does not); reject a malformed sqlite URI."""
    if uri.startswith("sqlite:"):
        if not uri.startswith("sqlite:///"):
            raise UserError(f"tracking-uri: {uri}: a SQLite store is sqlite:///ABSOLUTE/PATH.db")
        path = Path(uri[len("sqlite:///"):])
        if not path.is_absolute():
            path = Path("/" + str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
    return uri


def code_version(repo: Path | None = None) -> str:
    """The git sha of the working tree (suffix -dirty with local changes), else the package version."""
    from .. import __version__

    cwd = str(repo) if repo else None
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode == 0 and sha.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                   capture_output=True, text=True, timeout=10)
            return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"lora-diffusion-{__version__}"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


class SweepTracker:
    """Find-or-create MLflow runs for one sweep, by tags; safe to use again after a crash."""

    def __init__(self, tracking_uri: str, sweep: str, experiment: str = DEFAULT_EXPERIMENT,
                 tags: dict | None = None, sweep_id: str | None = None):
        self.tracking_uri = tracking_uri
        self.sweep = sweep
        # runs are found by the sweep's id (made when the sweep is created), so a new sweep that
        # reuses a deleted sweep's name never adopts the old sweep's runs
        self.sweep_id = sweep_id or sweep
        self.experiment = experiment
        self.tags = dict(tags or {})
        self._client = None
        self._experiment_id: str | None = None
        self._last_step: dict[str, int] = {}  # run_id -> last step logged

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(prepare_uri(self.tracking_uri))
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                location = None
                if self.tracking_uri.startswith("sqlite:///"):
                    db = Path(self.tracking_uri[len("sqlite:///"):])
                    location = (db.parent / "mlartifacts").resolve().as_uri()
                self._experiment_id = self.client.create_experiment(self.experiment,
                                                                    artifact_location=location)
            else:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                self._experiment_id = exp.experiment_id
            if exp is None or EXPERIMENT_KIND[0] not in exp.tags:  # a kind the user set is kept
                self.client.set_experiment_tag(self._experiment_id, *EXPERIMENT_KIND)
        return self._experiment_id

    # ------------------------------------------------------------------------- lookup
    def find_runs(self, **tags) -> list:
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in {"sweep_id": self.sweep_id, **tags}.items())
        return self.client.search_runs([self.experiment_id], filter_string=flt, max_results=1000,
                                       order_by=["attributes.start_time ASC"])

    def _find_one(self, **tags):
        runs = self.find_runs(**tags)
        return runs[0] if runs else None

    def trial_runs(self) -> list:
        return self.find_runs(role="trial")

    # ------------------------------------------------------------------------- parent
    def parent_run(self, params: dict | None = None) -> str:
        """The sweep's run: re-opened if it exists (a resumed sweep), else created."""
        run = self._find_one(role="sweep")
        if run is not None:
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=self.sweep,
                                     tags={**self.tags, "sweep": self.sweep, "sweep_id": self.sweep_id,
                                           "role": "sweep"})
        if params:
            self._log_params(run.info.run_id, params)
        return run.info.run_id

    # ------------------------------------------------------------------------- trials
    def trial_run(self, trial_id: str, params: dict | None = None, tags: dict | None = None,
                  run_name: str | None = None) -> str:
        """The trial's run: re-attached (status back to RUNNING unless it already finished,
        steps continuing after the last logged one) or created nested under the parent."""
        run = self._find_one(role="trial", trial_id=trial_id)
        if run is not None:
            run_id = run.info.run_id
            if run.info.status not in ("RUNNING", "FINISHED"):
                self.client.update_run(run_id, status="RUNNING")
            if run_id not in self._last_step:
                history = self.client.get_metric_history(run_id, STEP_METRIC)
                self._last_step[run_id] = max((m.step for m in history), default=-1)
            return run_id
        parent = self.parent_run()
        run_name = self._unique_name(run_name or trial_id)
        all_tags = {**self.tags, **(tags or {}), "sweep": self.sweep, "sweep_id": self.sweep_id, "role": "trial",
                    "trial_id": trial_id, "mlflow.parentRunId": parent}
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={k: str(v) for k, v in all_tags.items()})
        run_id = run.info.run_id
        self._last_step[run_id] = -1
        if params:
            self._log_params(run_id, params)
        return run_id

    def _unique_name(self, name: str) -> str:
        """`name`, or `name (2)`, `name (3)`...: run names are unique within the sweep."""
        taken = {r.info.run_name for r in self.trial_runs()}
        n, unique = 1, name
        while unique in taken:
            n += 1
            unique = f"{name} ({n})"
        return unique

    def last_step(self, run_id: str) -> int:
        if run_id not in self._last_step:
            history = self.client.get_metric_history(run_id, STEP_METRIC)
            self._last_step[run_id] = max((m.step for m in history), default=-1)
        return self._last_step[run_id]

    def log_step(self, run_id: str, metrics: dict, step: int) -> bool:
        """Log the numeric metrics at `step`; a step not after the last logged one is skipped
        (a resumed worker repeats the evaluations after its last checkpoint). True if logged."""
        from mlflow.entities import Metric

        if step <= self.last_step(run_id):
            return False
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if _is_number(v)]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])
        self._last_step[run_id] = int(step)
        return True

    def log_final(self, run_id: str, result: dict, step: int) -> None:
        """The final result of a trial: split-labelled metrics as `final/<key>`, the accounting as
        `accounting/<key>` metrics (results, not configuration: never params), and the whole
        result as `result.json`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"final/{k}", float(v), now, int(step)) for k, v in result.items() if _is_number(v)]
        acc = result.get("accounting") or {}
        metrics += [Metric(f"accounting/{k}", float(v), now, int(step)) for k, v in acc.items() if _is_number(v)]
        self.client.log_batch(run_id, metrics=metrics)
        self.client.log_text(run_id, json.dumps(result, indent=2, default=str), "result.json")

    def end_run(self, run_id: str, status: str = "FINISHED") -> bool:
        """End a run once: an already-ended run is left as it is. True if this call ended it."""
        if self.client.get_run(run_id).info.status in TERMINAL:
            return False
        self.client.set_terminated(run_id, status)
        return True

    # ------------------------------------------------------------------------- the UI
    def describe(self, run_id: str, markdown: str) -> None:
        """The run's description, as the UI shows it above the run's params and metrics."""
        self.client.set_tag(run_id, DESCRIPTION_TAG, markdown)

    def save_runs_view(self, parent_id: str, knobs: list[str], metrics: list[str]) -> str:
        """Store a view of the sweep's runs table on the experiment (the UI's saved views): this
        sweep's runs only, sorted by `metrics[0]` (best first: ascending for the ELBO bound,
        metric_mode), with the knobs and `metrics` as columns. Returns the link that opens it
        (after `http://HOST:PORT/`), also kept on the parent run as `RUNS_VIEW_TAG`."""
        state = {"searchFilter": f"tags.sweep_id = '{self.sweep_id}'",
                 "orderByKey": f"metrics.`{metrics[0]}`", "orderByAsc": metric_mode(metrics[0]) == "min",
                 "selectedColumns": [f"params.`{k}`" for k in knobs] + [f"metrics.`{m}`" for m in metrics]}
        now = int(time.time() * 1000)
        envelope = {"name": f"sweep {self.sweep}", "createdAt": now, "updatedAt": now,
                    "state": json.dumps(state)}
        self.client.set_experiment_tag(self.experiment_id, VIEW_TAG_PREFIX + self.sweep_id, json.dumps(envelope))
        link = (f"#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"
                f"&viewStateShareKey={self.sweep_id}")
        self.client.set_tag(parent_id, RUNS_VIEW_TAG, link)
        return link

    def _log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])


# How long a sweep's end waits for an unreachable MLflow server to come back before it gives up
# on the writes it holds (LORA_DIFFUSION_TRACKING_WAIT_S overrides it)
TRACKING_WAIT_S = 600.0


class HeldWrites:
    """The driver's tracking writes, held in order while the MLflow server is unreachable for
    longer than the client's own retries, and written when it answers again: a trial's metrics
    are never lost to an outage, and Tune's loop is not stalled by it (during an outage only a
    3 s health check is tried, not the client's minutes of retries). Only an http(s) server
    that does not answer counts as down; any other tracking error is raised as it is."""

    def __init__(self, uri: str, log=print):
        self.uri, self.log = uri, log
        self.held: list = []  # zero-argument callables, oldest first
        self.down_since: float | None = None

    def run(self, write) -> None:
        self.held.append(write)
        self.flush()

    def flush(self) -> bool:
        """Write what is held, oldest first; False (the rest still held) while the server is down."""
        if self.down_since is not None and not self._answers():
            return False
        while self.held:
            try:
                self.held[0]()
            except Exception:
                if self._answers():  # a real error, not an outage
                    raise
                if self.down_since is None:
                    self.down_since = time.time()
                    self.log(f"warning: MLflow server {self.uri} unreachable: holding its writes "
                             "until it answers again", flush=True)
                return False
            self.held.pop(0)
        if self.down_since is not None:
            self.log(f"MLflow server {self.uri} answers again after {time.time() - self.down_since:.0f} s: "
                     "the writes held meanwhile are logged", flush=True)
            self.down_since = None
        return True

    def drain(self, wait_s: float | None = None) -> None:
        """Wait (up to `wait_s`) until every held write is written; UserError naming the server if not."""
        wait_s = float(os.environ.get("LORA_DIFFUSION_TRACKING_WAIT_S", TRACKING_WAIT_S)) if wait_s is None else wait_s
        deadline = time.time() + wait_s
        while not self.flush():
            if time.time() >= deadline:
                raise UserError(f"--tracking-uri: the MLflow server {self.uri} did not answer for "
                                f"{time.time() - self.down_since:.0f} s; {len(self.held)} tracking writes "
                                "(metrics, run ends) were not logged, the sweep's run was not ended "
                                "(each trial's Tune record in the sweep directory keeps its metrics)")
            time.sleep(2)

    def _answers(self) -> bool:
        if not self.uri.startswith(("http://", "https://")):
            return True  # a local store: its errors are errors
        from .preflight import check_tracking_uri

        try:
            check_tracking_uri(self.uri)
        except UserError:
            return False
        return True
