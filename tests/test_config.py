"""Configs: defaults validate, files and --set overrides merge, the resolved config round-trips."""

import json

import pytest

from lora_diffusion.core import config as config_lib
from lora_diffusion.core.errors import UserError


def test_defaults_validate_and_flatten_to_dotted_keys():
    config = config_lib.from_dict({})
    flat = config.flat()
    assert flat["trajectory.rank"] == 8 and flat["train.seed"] == 0 and flat["task"] == "sst2"


def test_file_then_sets_with_yaml_values(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("trajectory:\n  rank: 4\n  rank_schedule: linear\ntrain:\n  steps: 10\n")
    config = config_lib.load(str(f), ["trajectory.rank=6", "trajectory.phase_boundaries=[0, 0.3, 1]",
                                      "train.lr=1e-3"])
    assert config.trajectory.rank == 6 and config.trajectory.rank_schedule == "linear"
    assert config.trajectory.phase_boundaries == [0.0, 0.3, 1.0] and config.train.lr == 1e-3


def test_resolved_config_round_trips_through_json():
    config = config_lib.from_dict({}, {"method": "trajectory", "trajectory.sharing": "shared"})
    again = config_lib.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


@pytest.mark.parametrize("sets, field", [
    ({"trajectory.min_rank": 9}, "trajectory.min_rank"),
    ({"trajectory.sharing": "sometimes"}, "trajectory.sharing"),
    ({"trajectory.phase_boundaries": [0, 0.6, 0.5, 1]}, "trajectory.phase_boundaries"),
    ({"train.steps": 0}, "train.steps"),
    ({"method": "magic"}, "method"),
    ({"train": 3}, "train"),
    ({"trajectory.rank": 2.5}, "trajectory.rank"),
])
def test_invalid_fields_are_named(sets, field):
    with pytest.raises(UserError, match=f"field {field}"):
        config_lib.from_dict({}, sets)
