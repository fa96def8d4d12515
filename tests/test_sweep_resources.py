"""A sweep whose trials ASHA stops frees their resources for the next trials: Ray Train's
PlacementGroupCleaner (which removes a killed trial's worker-group placement group) can reach
the State API of the sweep's own local Ray, even with another Ray instance on the machine, so no
trial waits for a worker group a stopped trial still holds (`WorkerGroupStartupTimeoutError`).
The same Optuna sweep also carries the kill-and-resume check of the Optuna study (the grid's
kills and Ctrl-C are in test_sweep_resume.py)."""

from __future__ import annotations

import glob
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from lora_diffusion.analysis import fault_matrix as fm
from lora_diffusion.experiments.soak import SoakPlan, run_soak


@pytest.fixture
def other_ray(tmp_path):
    """Another Ray instance on the machine, as beside other users' sweeps."""
    code = ("import ray, time; ray.init(address='local', include_dashboard=False); print('up', flush=True); "
            "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    yield
    proc.terminate()
    proc.wait(timeout=60)


@pytest.mark.slow
def test_asha_stopped_trials_free_their_workers_and_the_study_survives_a_kill(other_ray, tiny_backbone_dir,
                                                                            synthetic_data_dir, tmp_path):
    """The Optuna sweep (two Train workers a trial), its driver SIGKILLed once while a trial has ended
    and another is midway, then resumed (experiments/soak.py): nothing lost or duplicated, and the
    study keeps the trials it had and knows all four at the end."""
    studies = []
    plan = SoakPlan(job=["jobs/rank_schedule_sweep.py", "--smoke", "--num-samples", "4", "--max-concurrent", "2",
                         "--workers", "2",  # the one sweep test of two-worker trials (gradients all-reduced)
                         "--verbose", "0", "--retrain-seeds", "0", "--set", f"backbone={tiny_backbone_dir}",
                         "--set", f"data_dir={synthetic_data_dir}", "--set", "train.steps=40",
                         "--set", "train.eval_every=5"],
                    env={"LORA_DIFFUSION_DATA_DIR": str(synthetic_data_dir)},
                    name="asha-free", storage=tmp_path / "sweeps", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                    kills=1, kill_when=lambda state: state["ended"] and state["midway"], start_timeout=300,
                    after_fault=lambda inj: studies.append(_study(tmp_path / "sweeps" / "asha-free")),
                    log_dir=tmp_path / "logs")
    result = run_soak(plan)
    logs = "".join(p.read_text(errors="replace") for p in sorted((tmp_path / "logs").glob("*.log")))
    assert len(result["injections"]) == 1 and result["final_rc"] == 0, logs[-5000:]
    assert "Exception in thread PlacementGroupCleanerMonitor" not in logs  # the cleaner kept watching
    assert "WorkerGroupStartupTimeoutError" not in logs
    assert fm.clean(result["matrix"]), fm.markdown(result["matrix"])

    # Optuna: the study kept the trials it had (one complete at least) and knows all four now
    (before,) = studies
    after = _study(plan.exp_dir)
    assert sum(t.state.name == "COMPLETE" for t in before.trials) >= 1
    assert len(after.trials) == 4
    for old in before.trials:
        assert after.trials[old.number].params == old.params


def _study(exp_dir: Path):
    """The Optuna study in the sweep's latest saved searcher state."""
    files = sorted(glob.glob(str(exp_dir / "searcher-state-*.pkl")))
    assert files, "no searcher state saved"
    with open(files[-1], "rb") as f:
        state = pickle.load(f)
    searcher = state["searcher"] if isinstance(state, dict) and "searcher" in state else state
    if isinstance(searcher, dict) and "_ot_study" in searcher:
        return searcher["_ot_study"]
    return _find_study(searcher)


def _find_study(obj, depth=0):
    import optuna

    if isinstance(obj, optuna.Study):
        return obj
    if depth > 4:
        return None
    items = obj.values() if isinstance(obj, dict) else getattr(obj, "__dict__", {}).values()
    for v in items:
        found = _find_study(v, depth + 1)
        if found is not None:
            return found
    return None
