"""MLflow re-attachment against a real SQLite store: a resumed sweep finds its runs by tag."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lora_diffusion.engine.callbacks import MlflowSweepCallback
from lora_diffusion.engine.tracking import SweepTracker


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # one store for the module (creating the schema takes seconds); each test uses its own sweeps
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/store/mlflow.db"  # the directory is created


@pytest.fixture
def uri(store, request):
    return store


@pytest.fixture(autouse=True)
def _unique_sweeps(monkeypatch, request):
    """Prefix every sweep name with the test's name so the tests share one store independently."""
    original = SweepTracker.__init__

    def init(self, tracking_uri, sweep, *args, **kwargs):
        original(self, tracking_uri, f"{request.node.name}:{sweep}", *args, **kwargs)

    monkeypatch.setattr(SweepTracker, "__init__", init)


def _steps(tracker, run_id, key="train/loss"):
    return [m.step for m in sorted(tracker.client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_parent_run_is_reattached_not_duplicated(uri):
    a = SweepTracker(uri, "s1")
    pid = a.parent_run(params={"space": "rank_schedule"})
    assert a.parent_run() == pid
    b = SweepTracker(uri, "s1")  # a new driver after a crash: the run is still RUNNING
    assert b.parent_run() == pid
    b.end_run(pid)
    c = SweepTracker(uri, "s1")  # resumed after it ended: re-opened
    assert c.parent_run() == pid
    assert c.client.get_run(pid).info.status == "RUNNING"
    assert len(c.find_runs(role="sweep")) == 1
    assert SweepTracker(uri, "s2").parent_run() != pid  # another sweep, another parent


def test_trial_run_reattached_and_steps_continue(uri):
    a = SweepTracker(uri, "s1", tags={"code_version": "abc"})
    rid = a.trial_run("t1", params={"train.lr": 0.01, "method": "trajectory"}, tags={"method": "trajectory"})
    for step in (10, 20, 30):
        assert a.log_step(rid, {"train/loss": 1.0 / step, "validation/accuracy": 0.5, "note": "x"}, step)
    # driver killed here: the run stays RUNNING; the resumed Train run restarts from step 20
    b = SweepTracker(uri, "s1")
    assert b.trial_run("t1", params={"train.lr": 0.01}) == rid
    assert b.last_step(rid) == 30
    assert not b.log_step(rid, {"train/loss": 0.05}, 20)
    assert not b.log_step(rid, {"train/loss": 0.05}, 30)
    assert b.log_step(rid, {"train/loss": 0.02}, 40)
    assert _steps(b, rid) == [10, 20, 30, 40]
    run = b.client.get_run(rid)
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == b.parent_run()
    assert tags["trial_id"] == "t1" and tags["sweep"].endswith(":s1") and tags["code_version"] == "abc"
    assert run.data.params["train.lr"] == "0.01"
    assert len(b.trial_runs()) == 1


def test_end_run_exactly_once(uri):
    t = SweepTracker(uri, "s1")
    rid = t.trial_run("t1")
    assert t.end_run(rid, "FINISHED")
    assert not t.end_run(rid, "FINISHED")
    assert not t.end_run(rid, "FAILED")
    assert t.client.get_run(rid).info.status == "FINISHED"
    # a FAILED trial that Tune resumes (resume_errored) is re-opened and can finish
    r2 = t.trial_run("t2")
    t.end_run(r2, "FAILED")
    assert SweepTracker(uri, "s1").trial_run("t2") == r2
    assert t.client.get_run(r2).info.status == "RUNNING"


def test_same_trial_id_in_two_sweeps(uri):
    a, b = SweepTracker(uri, "s1"), SweepTracker(uri, "s2")
    assert a.trial_run("t1") != b.trial_run("t1")


def test_final_result_logged(uri):
    t = SweepTracker(uri, "s1")
    rid = t.trial_run("t1")
    result = {"validation/accuracy": 0.7, "train/accuracy": 0.9, "task": "sst2",
              "accounting": {"trainable_params": 1234, "bytes_saved": 5000, "per_module": {"a": 1}}}
    t.log_final(rid, result, 100)
    run = t.client.get_run(rid)
    assert run.data.metrics["final/validation/accuracy"] == 0.7
    assert run.data.metrics["accounting/trainable_params"] == 1234
    assert run.data.metrics["accounting/bytes_saved"] == 5000
    assert not run.data.params  # results are metrics: params are the configuration only
    assert [a.path for a in t.client.list_artifacts(rid)] == ["result.json"]


def _trial(tid, **config):
    return SimpleNamespace(trial_id=tid, config=config, last_result={}, local_path="/nowhere")


def _resolve(params):
    return {"method": "trajectory", **params}, {"method": "trajectory", "seed": 0}


def test_callback_resume_cycle(uri):
    import json

    cb = MlflowSweepCallback(SweepTracker(uri, "sw"), _resolve)
    cb.setup()
    t1, t2 = _trial("t1", **{"train.lr": 0.01}), _trial("t2", **{"train.lr": 0.02})
    for t in (t1, t2):
        cb.on_trial_start(0, [], t)
    cb.on_trial_result(0, [], t1, {"step": 2, "train/loss": 3.0, "validation/accuracy": 0.5,
                                   "accounting_json": json.dumps({"trainable_params": 10})})
    cb.on_trial_result(0, [], t1, {"step": 4, "train/loss": 2.0, "validation/accuracy": 0.6})
    cb.on_trial_result(0, [], t1, {"step": 4, "result_json": json.dumps({"validation/accuracy": 0.6, "steps": 4})})
    cb.on_trial_complete(0, [], t1)
    cb.on_trial_result(0, [], t2, {"step": 2, "train/loss": 3.0, "validation/accuracy": 0.5})
    # -- the driver dies; a new driver restores the sweep (the callback is rebuilt) --
    cb2 = MlflowSweepCallback(SweepTracker(uri, "sw"), _resolve)
    cb2.setup()
    cb2.on_trial_start(0, [], t2)
    cb2.on_trial_result(0, [], t2, {"step": 2, "train/loss": 3.0, "validation/accuracy": 0.5, "resumed_from_step": 2})
    cb2.on_trial_result(0, [], t2, {"step": 4, "train/loss": 2.5, "validation/accuracy": 0.55, "resumed_from_step": 2})
    cb2.on_trial_complete(0, [], t2)  # stopped by the scheduler: no result_json
    cb2.describe_parent(["train.lr"], "python jobs/x.py --name sw --resume")
    cb2.finish({"trial_id": "t1", "selection": {"score": 0.6}})
    tr = cb2.tracker
    runs = tr.trial_runs()
    assert sorted(r.data.tags["trial_id"] for r in runs) == ["t1", "t2"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    by = {r.data.tags["trial_id"]: r.info.run_id for r in runs}
    assert _steps(tr, by["t1"]) == [2, 4] and _steps(tr, by["t2"]) == [2, 4]
    t2run = tr.client.get_run(by["t2"])
    assert t2run.data.tags.get("stopped_early") == "true"
    assert t2run.data.metrics["resumed_from_step"] == 2
    assert tr.client.get_run(by["t1"]).data.metrics["final/validation/accuracy"] == 0.6
    parent = tr.find_runs(role="sweep")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.metrics["selection/validation_accuracy"] == 0.6
    # the trials are named by what they tried; the parent lists the knobs and sums the sweep up
    assert {r.info.run_name for r in runs} == {"lr0.01", "lr0.02"}
    assert tr.client.get_run(by["t1"]).data.tags["best_trial"] == "true"
    assert "best_trial" not in tr.client.get_run(by["t2"]).data.tags
    tags = parent[0].data.tags
    assert tags["sweep.knobs"] == "train.lr"
    note = tags["mlflow.note.content"]
    assert "2 trials, 1 finished, 1 stopped early, 0 failed" in note
    assert "**lr0.01** (trial `t1`" in note and "selection score (validation/accuracy) 0.6000" in note
    assert "`python jobs/x.py --name sw --resume`" in note


def test_run_config_callbacks_pickle_to_the_sweep_id(uri):
    """Tune pickles the run config's callbacks into tuner.pkl: they hold only the sweep's id (no
    MLflow client, no URI) and, unpickled by a resumed driver, drive that driver's callbacks."""
    import pickle

    from lora_diffusion.engine import callbacks

    cb = MlflowSweepCallback(SweepTracker(uri, "sw"), _resolve)
    [saved] = callbacks.for_this_driver("sw-1", [cb])
    blob = pickle.dumps(saved)
    assert uri.encode() not in blob and b"SweepTracker" not in blob
    callbacks.release("sw-1")
    cb2 = MlflowSweepCallback(SweepTracker(uri, "sw"), _resolve)  # the resumed driver's
    restored = pickle.loads(blob)
    callbacks.for_this_driver("sw-1", [cb2])
    try:
        restored.setup()
        restored.on_trial_start(iteration=0, trials=[], trial=_trial("t1"))
        assert cb2.tracker.trial_runs() and cb2.parent_id == cb2.tracker.parent_run()
    finally:
        callbacks.release("sw-1")
    with pytest.raises(RuntimeError, match="no callbacks registered for sweep sw-1"):
        restored.on_trial_start(iteration=0, trials=[], trial=_trial("t2"))


def test_new_sweep_with_a_reused_name_gets_new_runs(uri):
    old = SweepTracker(uri, "same-name", sweep_id="same-name-aaaa")
    old_parent, old_trial = old.parent_run(), old.trial_run("t1")
    new = SweepTracker(uri, "same-name", sweep_id="same-name-bbbb")
    assert new.parent_run() != old_parent and new.trial_run("t1") != old_trial


def test_experiment_is_a_model_training_experiment_with_a_view_of_each_sweep(uri):
    import json

    t = SweepTracker(uri, "s1", experiment="ui-kind")
    pid = t.parent_run()
    exp = t.client.get_experiment(t.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    link = t.save_runs_view(pid, ["trajectory.rank", "train.seed"], ["final/validation/accuracy"])
    assert link == (f"#/experiments/{t.experiment_id}/runs?workflowType=machine_learning"
                    f"&viewStateShareKey={t.sweep_id}")
    assert t.client.get_run(pid).data.tags["ui.runs_view"] == link
    saved = json.loads(t.client.get_experiment(t.experiment_id).tags[f"mlflow.sharedViewState.{t.sweep_id}"])
    state = json.loads(saved["state"])
    assert state["selectedColumns"][:2] == ["params.`trajectory.rank`", "params.`train.seed`"]
    assert state["orderByKey"] == "metrics.`final/validation/accuracy`" and saved["name"] == f"sweep {t.sweep}"


def test_trial_names_say_what_was_tried_and_are_unique_in_the_sweep(uri):
    from lora_diffusion.engine.callbacks import trial_name

    assert trial_name({"trajectory.rank_schedule": "linear", "trajectory.rank": 16,
                       "trajectory.num_phases": 2, "train.lr": 0.0034}) == "linear r16 K2 lr3.4e-3"
    assert trial_name({"train.seed": 1, "method": "lora"}) == "lora seed1"
    assert trial_name({"cell": {"method": "lora"}, "train.seed": 0}) == "lora seed0"
    t = SweepTracker(uri, "s1")
    a, b = t.trial_run("t1", run_name="lora seed1"), t.trial_run("t2", run_name="lora seed1")
    assert t.client.get_run(a).info.run_name == "lora seed1"
    assert t.client.get_run(b).info.run_name == "lora seed1 (2)"
    assert t.client.get_run(b).data.tags["trial_id"] == "t2"
    assert SweepTracker(uri, "s1").trial_run("t2", run_name="other") == b  # re-attached, name kept


def test_a_trials_final_line_shows_only_figures_its_task_has(capsys):
    """A generation run has no sampler accuracy or train accuracy: no `nan` columns for them."""
    import json
    from types import SimpleNamespace

    from lora_diffusion.engine.callbacks import ProgressLines

    trial = SimpleNamespace(trial_id="t1", config={})
    generation = {"steps": 4, "validation/f1": 0.25, "test/f1": 0.5, "accounting": {"trainable_params": 8}}
    ProgressLines("validation/f1").on_trial_result(0, [], trial, {"step": 4, "result_json": json.dumps(generation)})
    final = capsys.readouterr().out.splitlines()[-1]
    assert "validation/f1 0.2500" in final and "nan" not in final and "test/" not in final
    classification = {"steps": 4, "validation/accuracy": 0.75, "validation/accuracy_sampler": 0.5,
                      "train/accuracy": 1.0, "accounting": {"trainable_params": 8}}
    ProgressLines().on_trial_result(0, [], trial, {"step": 4, "result_json": json.dumps(classification)})
    final = capsys.readouterr().out.splitlines()[-1]
    assert "validation/accuracy_sampler 0.5000" in final and "train/accuracy 1.0000" in final


def test_the_compare_line_opens_a_server_itself_and_starts_a_ui_on_a_local_store():
    from lora_diffusion.engine.tracking import compare_line

    link = "#/experiments/3/runs?viewStateShareKey=abc"
    assert compare_line("http://127.0.0.1:5077", link) == (
        "compare its trials: open http://127.0.0.1:5077/#/experiments/3/runs?viewStateShareKey=abc")
    assert compare_line("https://mlflow.example.org/", link).startswith(
        "compare its trials: open https://mlflow.example.org/#/experiments/3/")
    assert compare_line("sqlite:////tmp/runs/mlflow.db", link) == (
        "compare its trials: mlflow ui --backend-store-uri sqlite:////tmp/runs/mlflow.db, then open "
        "http://127.0.0.1:5000/#/experiments/3/runs?viewStateShareKey=abc")
    assert compare_line("file:///tmp/mlruns", link).startswith(
        "compare its trials: mlflow ui --backend-store-uri file:///tmp/mlruns, then open http://127.0.0.1:5000/#")
