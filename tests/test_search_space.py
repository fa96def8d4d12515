"""Search spaces: the shipped files load; bad files fail with file, key and problem, before Ray."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from lora_diffusion.core.errors import UserError
from lora_diffusion.engine import search_space as ss

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["rank_schedule", "regularizers", "module_count", "baselines"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spaces_load_and_sample(name):
    space = ss.load(REPO / "search_spaces" / f"{name}.yaml")
    assert space.params
    rng = random.Random(1)
    for _ in range(10):
        ss.resolve(space, space.sample(rng))  # every sample is a valid Config


def _write(tmp_path, text) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, key, problem", [
    ("params:\n  train.lr: {type: normal, low: 1, high: 2}\n", "train.lr", "bad type 'normal'"),
    ("params:\n  train.lrr: {type: float, low: 0.1, high: 0.2}\n", "train.lrr", "unknown config field"),
    ("params:\n  train.lr: {type: loguniform, low: 0.1, high: 0.01}\n", "train.lr", "low (0.1) > high (0.01)"),
    ("params:\n  trajectory.rank: {type: categorical, choices: [4, 0]}\n", "trajectory.rank", "must be >= 1"),
    ("params:\n  trajectory.rank_schedule: {type: categorical, choices: [constant, zigzag]}\n",
     "trajectory.rank_schedule", "unknown value 'zigzag'"),
    ("params:\n  trajectory.rank: {type: int, low: 1.5, high: 4}\n", "trajectory.rank", "integer 'low'"),
    ("params:\n  trajectory.min_rank: {type: int, low: 1, high: 4, when: {trajectory.rank_schedule: linear}}\n",
     "trajectory.min_rank", "not a parameter listed before it"),
    ("fixed:\n  train.stepz: 3\nparams:\n  train.lr: {type: float, low: 0.1, high: 0.2}\n", "fixed",
     "train.stepz"),
    ("params:\n  trajectory.rank: {type: categorical, choices: [2, 4]}\n"
     "  trajectory.min_rank: {type: int, low: 1, high: 8}\n", "combination", "trajectory.min_rank"),
    ("params:\n  train.lr: {type: float, low: 0.1, high: 0.2, choices: [1]}\n", "train.lr", "not 'choices'"),
    ("params:\n  train.lr: {type: float, low: 0.1, high: 0.2, scale: log}\n", "train.lr", "unknown option"),
    ("params: {}\n", "params", "non-empty"),
    ("sweep: {num_samples: 0}\nparams:\n  train.lr: {type: float, low: 0.1, high: 0.2}\n",
     "sweep.num_samples", "positive integer"),
])
def test_bad_space_names_file_key_and_problem(tmp_path, text, key, problem):
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as exc:
        ss.load(path)
    msg = str(exc.value)
    assert str(path) in msg and key in msg and problem in msg, msg


def test_conditional_parameters_define_by_run():
    import optuna

    space = ss.load(REPO / "search_spaces" / "rank_schedule.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(30):
        trial = study.ask()
        space.define_by_run()(trial)
        sched = trial.params["trajectory.rank_schedule"]
        seen.setdefault(sched, set()).update(trial.params)
        assert ("trajectory.min_rank" in trial.params) == (sched != "constant")
        assert ("trajectory.step_threshold" in trial.params) == (sched == "step")
        study.tell(trial, 0.5)
    assert len(seen) >= 3


def test_switch_and_labelled_keys():
    space = ss.load(REPO / "search_spaces" / "baselines.yaml")
    assert ss.resolve(space, {"method": "full", "train.lr@full": 1e-4}).train.lr == 1e-4
    reg = ss.load(REPO / "search_spaces" / "regularizers.yaml")
    cfg = ss.resolve(reg, {"switch.regularizer": "nuclear", "trajectory.nuclear_weight": 1e-3})
    assert cfg.trajectory.nuclear_weight == 1e-3 and cfg.trajectory.orth_weight == 0.0


@pytest.mark.parametrize("text, key", [
    ("params:\n  train.lr: {type: loguniform, low: 0.1, high: 0.01}\n", "train.lr"),
    ("params:\n  trajectory.bogus: {type: int, low: 1, high: 2}\n", "trajectory.bogus"),
    ("params:\n  train.lr: {type: gaussian, low: 1, high: 2}\n", "train.lr"),
])
def test_sweep_rejects_bad_space_before_ray_starts(tmp_path, capsys, text, key):
    import ray

    from lora_diffusion.engine import sweep

    path = _write(tmp_path, text)
    code = sweep.main(["--space", str(path), "--storage-path", str(tmp_path / "sweeps"),
                       "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--address", "local"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err and key in err
    assert not ray.is_initialized()
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()


def test_bad_set_key_and_existing_sweep(tmp_path, capsys):
    from lora_diffusion.engine import sweep

    args = ["--storage-path", str(tmp_path / "sweeps"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    assert sweep.main(args + ["--set", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err
    (tmp_path / "sweeps" / "rank_schedule").mkdir(parents=True)
    (tmp_path / "sweeps" / "rank_schedule" / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    assert sweep.main(args) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--resume" in err
    assert sweep.main(args + ["--resume", "--name", "other"]) == 2
    assert "no sweep named 'other'" in capsys.readouterr().err


# Measured (issue 45, the space's comments): at 100 steps most trajectory trials were still at the
# majority class; two-phase trials had left it by 200 (0.69), four-phase ones had not (0.53).
LEAVES_CHANCE_BY_STEP = 200


def test_the_main_sweeps_asha_rungs_fall_where_its_trials_have_left_chance():
    """The default job's ASHA stops no trial before it can leave chance: every rung below max_t
    (train.steps + 1, engine/tuner.py) is at or past the step where two-phase trials left the
    majority class, and is an evaluation step (a rung between evaluations would compare trials
    at different steps); the phase count whose trials had not left it by then is not searched."""
    from lora_diffusion.core import config as config_lib

    space = ss.load(REPO / "search_spaces" / "rank_schedule.yaml")
    config = config_lib.from_dict({}, space.fixed)
    steps, every = config.train.steps, config.train.eval_every
    grace, factor = space.sweep["grace_period"], space.sweep["reduction_factor"]
    rungs = [grace * factor ** k for k in range(8) if grace * factor ** k < steps + 1]
    assert rungs and rungs[0] >= LEAVES_CHANCE_BY_STEP and rungs[-1] < steps  # a rung that stops some
    assert all(r % every == 0 for r in rungs) and steps % every == 0
    assert config.trajectory.num_phases == 2 and "trajectory.num_phases" not in {p.field for p in space.params}
    [lr] = [p for p in space.params if p.field == "train.lr"]
    assert lr.low >= config_lib.TrainConfig.lr  # no rate below the default's, which needs ~600 steps


def test_a_search_spaces_trials_are_search_trials_and_a_grids_are_results(tmp_path, monkeypatch,
                                                                          synthetic_data_dir):
    """The engine marks a search space's trials evaluation.role search (validation only: test is
    the retrain's); a grid's cells are results; the user's own setting wins."""
    from lora_diffusion.engine.options import build_parser
    from lora_diffusion.engine.spec import ROLE, prepare

    monkeypatch.setenv("LORA_DIFFUSION_DATA_DIR", str(synthetic_data_dir))
    where = ["--storage-path", str(tmp_path / "sweeps"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--smoke"]
    parse = build_parser("rank_schedule").parse_args
    assert prepare(parse(where)).fixed[ROLE] == "search"
    assert prepare(parse([*where, "--set", f"{ROLE}=result"])).fixed[ROLE] == "result"
    assert ROLE not in prepare(parse([*where, "--grid", "grid_rank_schedule"])).fixed
