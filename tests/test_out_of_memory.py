"""Out of device memory is an answer, not a crash (issue 41): a training step that raises
torch.OutOfMemoryError ends the run with one line naming the step and the knobs that lower the
peak; the CLI prints that line and exits 3; a sweep records it as the trial's failure_reason and
its other trials finish (the slow test, on a local Ray, with the fault injected from outside
the package by tests/support/faults)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_diffusion.cli import main
from lora_diffusion.core.errors import OutOfDeviceMemory
from lora_diffusion.engine.callbacks import FAILURE_TAG, failure_reason
from support.procs import kill_session

KNOBS = ("train.micro_batch_size", "train.gradient_checkpointing", "max_length")


def _oom_from_the_step(monkeypatch):
    """Every training step runs out of memory, as a step too large for its GPU does."""
    from lora_diffusion.core.recipe import Recipe

    def step(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(Recipe, "train_step", step)


def test_a_step_out_of_memory_ends_the_run_with_one_line_naming_the_knobs(tiny_config, monkeypatch):
    from lora_diffusion.core.recipe import Recipe

    recipe = Recipe(tiny_config())
    _oom_from_the_step(monkeypatch)
    with pytest.raises(OutOfDeviceMemory) as caught:
        recipe.run(log=None)
    line = str(caught.value)
    assert line.startswith("out of device memory at step 1: ") and "\n" not in line
    assert all(knob in line for knob in KNOBS) and "Tried to allocate 20.00 GiB" in line
    assert recipe.step == 0


def test_the_train_verb_prints_the_line_and_exits_3(tiny_backbone_dir, synthetic_data_dir, tmp_path,
                                                     monkeypatch, capsys):
    _oom_from_the_step(monkeypatch)
    args = ["train", "--output-dir", str(tmp_path / "out")]
    for s in (f"backbone={tiny_backbone_dir}", f"data_dir={synthetic_data_dir}", "trajectory.injection_layers=[0]",
              "train.steps=1", "max_train_examples=16", "max_eval_examples=8"):
        args += ["--set", s]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert len(err) == 1 and err[0].startswith("error: out of device memory at step 1: ")
    assert not (tmp_path / "out" / "result.json").exists()


def test_the_sweep_reads_the_line_out_of_a_workers_traceback():
    text = ("Traceback (most recent call last):\nray.train.v2.api.exceptions.WorkerGroupError: Training failed\n"
            "[Rank 0 Error Snippet]:\n  File \"platform/lora_diffusion/core/recipe.py\", line 330, in run\n"
            "lora_diffusion.core.errors.OutOfDeviceMemory: out of device memory at step 3: lower "
            "train.micro_batch_size, set train.gradient_checkpointing: true, or lower max_length\n")
    assert failure_reason(text) == ("out of device memory at step 3: lower train.micro_batch_size, set "
                                    "train.gradient_checkpointing: true, or lower max_length")


@pytest.mark.slow
def test_a_trial_out_of_memory_fails_with_the_line_and_the_sweep_goes_on(tiny_backbone_dir, synthetic_data_dir,
                                                                        tmp_path):
    """A grid of two trials on a local Ray; the trial with trajectory.rank=4 runs out of memory at
    its first step: it ends FAILED with the line as its failure_reason, the other one finishes."""
    from mlflow.tracking import MlflowClient

    repo = Path(__file__).resolve().parents[1]
    storage, uri = tmp_path / "sweeps", f"sqlite:///{tmp_path}/mlflow.db"
    grid = tmp_path / "grid_oom.yaml"
    grid.write_text("grid:\n  trajectory.rank: [2, 4]\nseeds: [0]\n")
    env = {**os.environ, "LORA_DIFFUSION_DATA_DIR": str(synthetic_data_dir),
           "LORA_DIFFUSION_TEST_OOM_WHEN": "trajectory.rank=4",
           "PYTHONPATH": os.pathsep.join(p for p in (str(repo / "tests" / "support" / "faults"),
                                                     os.environ.get("PYTHONPATH")) if p)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "jobs/rank_schedule_sweep.py", "--space", str(grid), "--name", "oom",
           "--max-concurrent", "2", "--max-failures", "0", "--address", "local", "--storage-path", str(storage),
           "--tracking-uri", uri, "--verbose", "0", "--retrain-seeds", "0", "--set", f"backbone={tiny_backbone_dir}",
           "--set", "trajectory.injection_layers=[0]", "--set", "train.steps=2", "--set", "train.eval_every=1",
           "--set", "max_train_examples=16", "--set", "max_eval_examples=8", "--set", "train.batch_size=4"]
    with open(tmp_path / "sweep.log", "w") as f:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=400)
    finally:
        kill_session(proc.pid)
    log = (tmp_path / "sweep.log").read_text()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lora-diffusion-sweeps").experiment_id],
                              "tags.sweep = 'oom' and tags.role = 'trial'")
    by_rank = {r.data.params["trajectory.rank"]: r for r in runs}
    assert set(by_rank) == {"2", "4"}, log[-4000:]
    assert by_rank["2"].info.status == "FINISHED", log[-4000:]
    failed = by_rank["4"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags[FAILURE_TAG].startswith("out of device memory at step 1: lower train.micro_batch_size")
