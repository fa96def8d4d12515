"""The selected model in MLflow (engine/model_registry.py, experiments/retrain.py) and out of a sweep
(`lora-diffusion export --sweep`): a logged model linked to its run and metrics, registered by
name, loaded back from a local sqlite store with the platform's logits (a merged model in a
process that never imports lora_diffusion; a native one through lora_diffusion.load); the retrain
stage logs its best seed on validation once; --sweep exports the seed named.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from test_export import T, inputs, platform_logits, trained  # noqa: F401 - fixtures shared

LOAD_REGISTERED = r"""
import sys, numpy as np, mlflow
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
inputs = {"input_ids": np.load(sys.argv[3]), "attention_mask": np.load(sys.argv[4]), "t": [float(sys.argv[5])]}
out = model.predict(inputs)
np.save(sys.argv[6], out)
assert not [m for m in sys.modules if m.startswith("lora_diffusion")], "imported lora_diffusion"
"""


def _finished_run(uri: str, sweep: str, trial_id: str, seed: int, validation: float) -> str:
    from lora_diffusion.engine.tracking import SweepTracker

    tracker = SweepTracker(uri, sweep)
    run = tracker.trial_run(trial_id, params={"train.seed": seed}, tags={"seed": seed})
    tracker.log_final(run, {"test/accuracy": 0.5, "validation/accuracy": validation}, step=3)
    tracker.end_run(run)
    return run


def test_registered_model_loads_from_a_local_store_and_gives_the_platform_logits(trained, inputs, tmp_path):  # noqa: F811
    import mlflow
    from mlflow.tracking import MlflowClient

    from lora_diffusion.engine.model_registry import log_checkpoint_model

    uri, (ids, attn) = f"sqlite:///{tmp_path}/mlflow.db", inputs
    np.save(tmp_path / "ids.npy", ids.numpy())
    np.save(tmp_path / "attn.npy", attn.numpy())
    real = attn.bool().numpy()
    for method, name in (("lora", "sweep-lora"), ("trajectory", "sweep-trajectory")):
        run = _finished_run(uri, name, f"{name}-t0", 0, 0.8)
        info = log_checkpoint_model(uri, run, trained(method), step=3, register_as=name)
        assert info["registered_version"] == 1 and info["format"] == ("merged" if method == "lora" else "native")
        logged = MlflowClient(uri).get_logged_model(info["model_id"])
        assert logged.source_run_id == run  # linked to the run, and to its final metrics at step 3
        assert "final/validation/accuracy" in {m.key for m in logged.metrics or []}
        want = platform_logits(trained(method), ids, attn)[real]
        if method == "lora":  # loads without the package
            proc = subprocess.run([sys.executable, "-c", LOAD_REGISTERED, uri, f"models:/{name}/1",
                                   str(tmp_path / "ids.npy"), str(tmp_path / "attn.npy"), str(T),
                                   str(tmp_path / "got.npy")], capture_output=True, text=True, timeout=600,
                                  env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
            assert proc.returncode == 0, proc.stderr[-3000:]
            got = np.load(tmp_path / "got.npy")[real]
        else:
            previous = mlflow.get_tracking_uri()
            mlflow.set_tracking_uri(uri)
            try:
                got = mlflow.pyfunc.load_model(f"models:/{name}/1").predict(
                    {"input_ids": ids.numpy(), "attention_mask": attn.numpy(), "t": [T]})[real]
            finally:
                mlflow.set_tracking_uri(previous)
        assert np.abs(got - want).max() <= 1e-5, (method, np.abs(got - want).max())


@pytest.fixture
def retrained_sweep(trained, tmp_path):  # noqa: F811
    """Sweep `s` and its retrain stage `s-retrain`: seeds 3 (validation 0.6) and 4 (0.9) in MLflow,
    each trial's Train checkpoints in the storage as engine/trial.py leaves them (an earlier one too)."""
    from lora_diffusion.engine.storage import SweepStorage
    from lora_diffusion.engine.tracking import SweepTracker

    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", SweepStorage(str(tmp_path / "sweeps"))
    SweepTracker(uri, "s").parent_run()
    for seed, validation, method in ((3, 0.6, "gelora"), (4, 0.9, "lora")):
        _finished_run(uri, "s-retrain", f"trial{seed}", seed, validation)
        for step, name in ((2, "checkpoint_2026-12-07_10-00-00.000000"), (3, "checkpoint_2026-12-07_10-00-09.000000")):
            target = tmp_path / "sweeps" / "s-retrain" / "train" / f"trial{seed}" / name
            shutil.copytree(trained(method), target)
            (target / "trainer_state.json").write_text(json.dumps({"step": step}))
    storage.write_text("s/sweep.json", json.dumps({"tracking_uri": uri}))
    return uri, storage


def test_retrain_stage_logs_its_best_seed_once_and_registers_it_on_request(retrained_sweep):
    from mlflow.tracking import MlflowClient

    from lora_diffusion.analysis.trials import find_parent
    from lora_diffusion.experiments import retrain

    uri, storage = retrained_sweep
    lines = []
    retrain.log_selected_model(storage, uri, "s", "s-retrain", False, lines.append)
    assert any("seed 4 (best on validation) logged as merged model" in x for x in lines), lines
    client = MlflowClient(uri)
    assert not client.search_registered_models()
    retrain.log_selected_model(storage, uri, "s", "s-retrain", True, lines.append)  # a rerun with --register
    [model] = client.search_registered_models()
    assert model.name == "s" and lines[-1] == "s-retrain: registered as models:/s/1"
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert len(client.search_logged_models(experiments)) == 1  # logged once
    stage_tags = find_parent(uri, "s-retrain").data.tags
    assert stage_tags[retrain.REGISTERED_TAG] == "s/1"
    assert find_parent(uri, "s").data.tags["retrain.model_uri"] == stage_tags[retrain.MODEL_TAG]


def test_export_sweep_takes_the_seed_named_else_the_best_on_validation(retrained_sweep, tmp_path, capsys):
    from lora_diffusion import cli

    uri, storage = retrained_sweep
    base = ["export", "--sweep", "s", "--storage-path", str(tmp_path / "sweeps"), "--format", "native"]
    assert cli.main(base + ["--out", str(tmp_path / "best")]) == 0
    assert cli.main(base + ["--seed", "3", "--out", str(tmp_path / "seed3")]) == 0
    assert json.loads((tmp_path / "best" / "export.json").read_text())["method"] == "lora"  # seed 4
    assert json.loads((tmp_path / "seed3" / "export.json").read_text())["method"] == "gelora"
    assert "step 3" in capsys.readouterr().out  # the trial's last checkpoint
    assert cli.main(base + ["--seed", "9", "--out", str(tmp_path / "none")]) == 2
    assert "--seed: 9 is not a finished seed of s-retrain (seeds [3, 4])" in capsys.readouterr().err
