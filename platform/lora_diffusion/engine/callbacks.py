"""The sweep driver's Tune callbacks: MLflow tracking, progress lines, and the count of trials
that ended (which tells a finished sweep from an interrupted one).

Tune pickles the run config, callbacks included, into the sweep's tuner.pkl, and
`Tuner.restore` gives that pickled run config back: there is no public way to hand a restored
tuner this invocation's callbacks (ray-project/ray#41364 asks for access to the restored
run_config; `Tuner.restore` takes none). So the run config holds only a `DriverCallbacks` that
names the sweep, and every driver, new or resumed, registers its own callbacks for it
(`for_this_driver`): a resumed sweep logs to this invocation's tracking URI, and the driver
reads the counts of the callbacks it made.
"""

from __future__ import annotations

import functools
import json
import re
import time
from pathlib import Path

from ray.tune import Callback

from ..core import config as config_lib
from ..core.task_specs import metric_mode
from . import search_space as space_lib
from .grid import SEED_FIELD
from .spec import METRIC
from .tracking import HeldWrites, SweepTracker

HOOKS = ("setup", "on_step_begin", "on_step_end", "on_trial_start", "on_trial_restore", "on_trial_save",
         "on_trial_result", "on_trial_complete", "on_trial_recover", "on_trial_error", "on_checkpoint",
         "on_experiment_end")
_LIVE: dict[str, list[Callback]] = {}  # sweep id -> this driver's callbacks


class DriverCallbacks(Callback):
    """What tuner.pkl keeps of the callbacks: the sweep's id. Every Tune event goes to the
    callbacks this driver registered for that sweep."""

    def __init__(self, sweep_id: str):
        self.sweep_id = sweep_id

    def live(self) -> list[Callback]:
        if self.sweep_id not in _LIVE:
            raise RuntimeError(f"no callbacks registered for sweep {self.sweep_id} in this driver")
        return _LIVE[self.sweep_id]


def _forward(hook: str):
    def forward(self, **info):  # Tune calls every hook with keyword arguments
        for callback in self.live():
            getattr(callback, hook)(**info)
    forward.__name__ = hook
    return forward


for _hook in HOOKS:
    setattr(DriverCallbacks, _hook, _forward(_hook))


def for_this_driver(sweep_id: str, callbacks: list[Callback]) -> list[Callback]:
    """The run config's callbacks: a `DriverCallbacks` for `callbacks`, registered until `release`."""
    _LIVE[sweep_id] = list(callbacks)
    return [DriverCallbacks(sweep_id)]


def release(sweep_id: str) -> None:
    _LIVE.pop(sweep_id, None)


# ----------------------------------------------------------------------------- callbacks


class TrialResolver:
    """trial config (sampled params) -> (flat resolved config for MLflow params, tags)."""

    def __init__(self, fixed: dict, code_version: str):
        self.fixed, self.code_version = fixed, code_version

    def __call__(self, params: dict):
        params = space_lib.flatten(params)
        config = config_lib.from_dict({}, {**self.fixed, **space_lib.overrides(params)})
        flat = config.flat()
        flat.update({f"sampled.{k}": v for k, v in params.items() if k != SEED_FIELD})
        tags = {"method": config.method, "seed": config.train.seed, "code_version": self.code_version,
                "task": config.task}
        return flat, tags


# short labels of the knobs in trial names ("linear r16 K2 lr3.4e-3"); others print as key=value
LABELS = {"rank": "r", "num_phases": "K", "lr": "lr", "seed": "seed", "min_rank": "rmin",
          "step_threshold": "thr"}


def _label_value(key: str, value) -> str:
    label = LABELS.get(key.split("@")[0].split(".")[-1])
    if isinstance(value, str):
        return value  # a choice names itself: "linear", "lora", "per_phase"
    if isinstance(value, bool):
        return f"{key.split('.')[-1]}={'on' if value else 'off'}"
    if isinstance(value, float):
        text = f"{value:.1e}".replace("e-0", "e-").replace("e+0", "e") \
            if value and not 0.01 <= abs(value) < 1e4 else f"{value:.3g}"
    else:
        text = str(value)
    return f"{label}{text}" if label else f"{key.split('.')[-1]}={text}"


def trial_name(params: dict) -> str:
    """A trial's run name: the values it tried, in the order they were drawn (seed last)."""
    flat = space_lib.flatten(params)
    keys = [k for k in flat if k != SEED_FIELD] + ([SEED_FIELD] if SEED_FIELD in flat else [])
    values = [_label_value(k, flat[k]) for k in keys if not isinstance(flat[k], (dict, list))]
    return " ".join(values) or "trial"


def _short(params: dict) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return " ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in space_lib.flatten(params).items())


class ProgressLines(Callback):
    """One readable line per trial report, and one when a trial ends."""

    def __init__(self, metric: str = METRIC):
        self.metric = metric  # the sweep's selection metric (spec.selection_metric)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._step_line(trial, result)
        if result.get("result_json"):
            r = json.loads(result["result_json"])
            acc = r.get("accounting", {})
            # beside the selection metric, the figures a classification run has (a generation run
            # has neither); never test, which no choice may see
            extra = [k for k in ("validation/accuracy_sampler", "train/accuracy") if k in r]
            print(f"[trial {trial.trial_id}] final  step {r.get('steps')}  "
                  f"{self.metric} {r.get(self.metric, float('nan')):.4f}  "
                  + (f"(se {r[self.metric + '_se']:.4f})  " if f"{self.metric}_se" in r else "")
                  + "".join(f"{k} {r[k]:.4f}  " for k in extra if isinstance(r[k], float))
                  + f"params {acc.get('trainable_params')}", flush=True)

    def _step_line(self, trial, result):
        print(f"[trial {trial.trial_id}] step {int(result.get('step', 0)):5d}  "
              f"loss {result.get('train/loss', float('nan')):.4f}  "
              f"{self.metric} {result.get(self.metric, float('nan')):.4f}"
              + (f"  (resumed from step {result['resumed_from_step']})" if result.get("resumed_from_step") else "")
              + f"  | {_short(trial.config)}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        print(f"[trial {trial.trial_id}] done at step {trial.last_result.get('step')}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[trial {trial.trial_id}] FAILED (see {trial.local_path})", flush=True)


class TrialEnds(Callback):
    """Counts the trials that ended: ran out or were stopped by the scheduler (ASHA), in this
    driver or before a resume. On Ctrl-C Tune stops the running trials and marks them
    TERMINATED too, but without `on_trial_complete`: status alone would let a sweep interrupted
    while its last trials ran pass for a finished one."""

    def __init__(self):
        self.started, self.ended, self.trials = set(), set(), []

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)

    def on_experiment_end(self, trials, **info):
        self.trials = list(trials)

    def finished(self) -> int:
        return sum(1 for t in self.trials if t.status == "TERMINATED"
                   and (t.trial_id in self.ended or t.trial_id not in self.started))


def _held(hook):
    """A tracking hook whose writes wait, in order, while the MLflow server is down (HeldWrites)."""
    @functools.wraps(hook)
    def hold(self, *args, **info):
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)  # a result, as it was reported
        info = {k: dict(v) if k == "result" else v for k, v in info.items()}
        self.writes.run(lambda: hook(self, *args, **info))
    return hold


class MlflowSweepCallback(Callback):
    """Drives a `SweepTracker` from Tune events on the driver.

    `resolve(trial_config) -> (flat params, tags)` turns a trial's sampled parameters into the
    resolved config (its MLflow params) and tags (method, seed). Workers report their recipe's
    own step as `step`; the first report of every (re)started Train run carries the accounting
    (`accounting_json`), the report of the last step the final result (`result_json`)."""

    def __init__(self, tracker: SweepTracker, resolve, metric: str = METRIC):
        self.tracker = tracker
        self.resolve = resolve
        self.metric = metric  # the sweep's selection metric (spec.selection_metric)
        self._runs: dict[str, str] = {}
        self._accounting: dict[str, dict] = {}
        self._final_logged: set[str] = set()
        self._last_result: dict[str, dict] = {}
        self.writes = HeldWrites(tracker.tracking_uri)

    def setup(self, **info):
        self.parent_id = self.tracker.parent_run()

    def _run_for(self, trial) -> str:
        tid = trial.trial_id
        if tid not in self._runs:
            params, tags = self.resolve(trial.config)
            self._runs[tid] = self.tracker.trial_run(tid, params=params, tags=tags,
                                                     run_name=trial_name(trial.config))
            if "result.json" in {f.path for f in self.tracker.client.list_artifacts(self._runs[tid])}:
                self._final_logged.add(tid)  # finished before the driver was interrupted
        return self._runs[tid]

    @_held
    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        if getattr(trial, "num_failures", 0) == 0:  # a retried trial's count is set when it is recovered
            self.tracker.client.set_tag(run_id, ATTEMPTS_TAG, "1")

    def on_trial_recover(self, iteration, trials, trial, **info):
        """A failed trial that Tune runs again (--retry-failed): the same run counts the attempt
        and keeps the reason the one before it failed (`attempt.N.failure_reason`)."""
        failed = trial.num_failures  # attempts so far, each of them failed: counted now, written when it can be
        self.writes.run(lambda: self._recovered(trial, failed))

    def _recovered(self, trial, failed: int) -> None:
        run_id = self._run_for(trial)
        self.tracker.client.set_tag(run_id, f"attempt.{failed}.{FAILURE_TAG}", failure_reason(_error_text(trial)))
        self.tracker.client.set_tag(run_id, ATTEMPTS_TAG, str(failed + 1))

    @_held
    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_for(trial)
        tid = trial.trial_id
        if result.get("accounting_json"):
            self._accounting[tid] = json.loads(result["accounting_json"])
        step = int(result.get("step", 0))
        self._last_result[tid] = dict(result)
        metrics = {k: v for k, v in result.items() if "/" in k or k == "resumed_from_step"}
        if self.metric in metrics:  # the UI offers a run's metrics in the order first logged
            metrics = {self.metric: metrics.pop(self.metric), **metrics}
        self.tracker.log_step(run_id, metrics, step)
        if result.get("result_json") and tid not in self._final_logged:
            self.tracker.log_final(run_id, json.loads(result["result_json"]), step)
            self._final_logged.add(tid)

    def _end(self, trial, status: str):
        run_id = self._run_for(trial)
        tid = trial.trial_id
        if status == "FINISHED" and tid not in self._final_logged:
            # stopped early by the scheduler: no final evaluation ran; keep what is known
            last = self._last_result.get(tid) or trial.last_result or {}
            result = {k: v for k, v in last.items() if "/" in k or k == "step"}
            result["stopped_early_at_step"] = last.get("step")
            if tid in self._accounting:
                result["accounting"] = self._accounting[tid]
            self.tracker.client.set_tag(run_id, "stopped_early", "true")
            self.tracker.log_final(run_id, result, int(last.get("step", 0) or 0))
            self._final_logged.add(tid)
        self.tracker.end_run(run_id, status)

    @_held
    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "FINISHED")

    @_held
    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_for(trial)
        self.tracker.client.set_tag(run_id, FAILURE_TAG, failure_reason(_error_text(trial)))
        self.tracker.client.set_tag(run_id, ATTEMPTS_TAG, str(max(1, getattr(trial, "num_failures", 0))))
        self._end(trial, "FAILED")

    def describe_parent(self, knobs: list[str], resume: str) -> str:
        """The parent run lists the swept knobs (tag `sweep.knobs`), holds the sweep's view of
        the runs table, and describes the sweep (updated when it ends). Returns the UI link."""
        parent = self.tracker.parent_run()
        self.knobs, self.resume = list(knobs), resume
        self.tracker.client.set_tag(parent, "sweep.knobs", ",".join(self.knobs))
        link = self.tracker.save_runs_view(parent, self.knobs, view_metrics(self.metric))
        self.tracker.describe(parent, sweep_summary(self.tracker, self.knobs, resume, None, ended=False,
                                                    metric=self.metric))
        return link

    def finish(self, best: dict | None, status: str = "FINISHED", reason: str | None = None) -> None:
        """End the parent run, with the best trial's configuration and score, the best trial
        tagged `best_trial`, and the sweep's summary as the parent's description; `reason`
        (why there is no best trial, or why the sweep failed) as its `failure_reason` tag."""
        self.writes.drain()  # every trial's metrics logged before the sweep's run ends
        parent = self.tracker.parent_run()
        if reason:
            self.tracker.client.set_tag(parent, FAILURE_TAG, reason)
        elif FAILURE_TAG in self.tracker.client.get_run(parent).data.tags:  # an earlier run's, resumed
            self.tracker.client.delete_tag(parent, FAILURE_TAG)
        if best:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.tracker.client.log_batch(parent, metrics=[
                Metric("selection/" + self.metric.replace("/", "_"), float(best["selection"]["score"]), now, 0)])
            self.tracker.client.set_tag(parent, "best_trial_id", best["trial_id"])
            self.tracker.client.log_text(parent, json.dumps(best, indent=2, default=str), "best.json")
            for run in self.tracker.trial_runs():
                if run.data.tags.get("trial_id") == best["trial_id"]:
                    self.tracker.client.set_tag(run.info.run_id, BEST_TAG, "true")
                elif BEST_TAG in run.data.tags:
                    self.tracker.client.delete_tag(run.info.run_id, BEST_TAG)
        self.tracker.describe(parent, sweep_summary(self.tracker, getattr(self, "knobs", []),
                                                    getattr(self, "resume", ""), best, ended=True,
                                                    metric=self.metric))
        self.tracker.end_run(parent, status)


BEST_TAG = "best_trial"
FAILURE_TAG = "failure_reason"  # on a failed trial's run (and a failed sweep's parent): one line
ATTEMPTS_TAG = "attempts"  # how many times the trial ran: 1, plus one per retry (--retry-failed)


def view_metrics(metric: str = METRIC) -> list[str]:
    """The runs view's columns after the knobs; the first sorts it (stopped trials have final/*
    too): the selection metric on validation, then on test."""
    return [f"final/{metric}", "final/" + metric.replace("validation/", "test/", 1),
            "accounting/trainable_params", "final/step_time_s"]


def _counts(runs) -> dict[str, int]:
    counts = {"finished": 0, "stopped early": 0, "failed": 0, "running or interrupted": 0}
    for run in runs:
        status = run.info.status
        key = ("stopped early" if run.data.tags.get("stopped_early") == "true" else "finished") \
            if status == "FINISHED" else "failed" if status == "FAILED" else "running or interrupted"
        counts[key] += 1
    return counts


def sweep_summary(tracker: SweepTracker, knobs: list[str], resume: str, best: dict | None,
                  ended: bool, metric: str = METRIC) -> str:
    """The parent run's description (markdown): what ran, the best trial on validation with its
    test figure where there is one, and the command that resumes the sweep."""
    runs = tracker.trial_runs()
    counts = _counts(runs)
    lines = [f"**Sweep `{tracker.sweep}`**: {len(runs)} trials, "
             + ", ".join(f"{n} {what}" for what, n in counts.items() if n or what != "running or interrupted")
             + ".", ""]
    if knobs:
        lines += ["Swept: " + ", ".join(f"`{k}`" for k in knobs) + " (params of every trial).", ""]
    run = next((r for r in runs if best and r.data.tags.get("trial_id") == best["trial_id"]), None)
    if run is not None:
        m = run.data.metrics
        score = m.get(f"final/{metric}", best["selection"]["score"])
        lower = ", lower is better" if metric_mode(metric) == "min" else ""
        lines += [f"Selected on validation: **{run.info.run_name}** (trial `{best['trial_id']}`, tagged "
                  f"`{BEST_TAG}`): selection score ({metric}{lower}) {score:.4f}, the best "
                  "of the search, so optimistic; its test figure is the retrain's (fresh seeds), below "
                  "when it has run.", ""]
    else:
        why = "no trial reported " + metric if ended else "the sweep is running, or was interrupted"
        lines += [f"Best trial: none ({why}).", ""]
    if resume:
        lines += [f"Resume it after an interruption: `{resume}`"]
    return "\n".join(lines).strip() + "\n"


def _error_text(trial) -> str:
    """The traceback of a failed trial, as Tune saved it (its error file); "" if unreadable. Tune
    writes the file in the driver's staging directory (`error_file`) and syncs it to storage only
    later, after `on_trial_error`: `get_error` (storage) finds nothing yet, so read the local file first."""
    try:
        local = getattr(trial, "error_file", None)
        if local and Path(local).is_file():
            return Path(local).read_text(errors="replace")
        return str(trial.get_error() or "")
    except Exception:  # storage gone: the tag says so rather than hiding the trial's failure
        return ""


def failure_reason(text: str) -> str:
    """One line out of a failed trial's traceback (Tune wraps the Train worker's, which wraps
    the recipe's): the divergence guard's or the out-of-memory line (core/errors.py) if there is
    one, else the last `XError: message` line, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for pattern in (r"(?:TrainingDiverged|OutOfDeviceMemory): (.*)",
                    r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)\b.*)$"):
        found = [m.group(1) for m in map(re.compile(pattern).search, lines) if m]
        if found:
            return found[-1][:500]
    return (lines[-1] if lines else "unknown error (no error text)")[:500]
