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


def _method_section_fields(cls) -> dict[str, type]:
    """The fields of a Config class whose type is a dataclass defined in a method's file."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if hints[f.name].__module__.startswith("lora_diffusion.core.methods.")}


def _section_mismatches(config_cls, specs) -> list[str]:
    """Registered sections without their Config field, and method fields no method registers."""
    fields = _method_section_fields(config_cls)
    wanted = {s.name: s.section for s in specs if s.section is not None}
    return sorted([f"{name}: no Config field of type {cls.__name__}" for name, cls in wanted.items()
                   if fields.get(name) is not cls]
                  + [f"{name}: a Config field no registered method declares" for name in fields
                     if name not in wanted])


def test_every_registered_method_section_is_a_config_field_and_vice_versa():
    """config.py lists each method's section by hand (readable there); the registry is the truth."""
    from lora_diffusion.core.methods import registry

    assert _section_mismatches(config_lib.Config, registry.specs()) == []
    assert len(_method_section_fields(config_lib.Config)) >= 10  # the check saw the sections


def test_section_check_fails_on_a_missing_field_and_on_an_unregistered_one():
    import dataclasses

    from lora_diffusion.core.methods import registry

    specs = registry.specs()
    lora = registry.spec_of("lora")
    # a method registered with a section that Config lacks
    extra = dataclasses.replace(lora, name="lora2")
    assert _section_mismatches(config_lib.Config, [*specs, extra]) == [
        "lora2: no Config field of type LoraConfig"]
    # a Config field whose method is not registered
    assert _section_mismatches(config_lib.Config, [s for s in specs if s.name != "vera"]) == [
        "vera: a Config field no registered method declares"]


def test_the_registry_imports_no_method_until_asked(tmp_path):
    """Importing the methods package or its registry loads no method module; the first question
    to the registry loads them all. Config pickles by name (Ray ships configs to workers)."""
    import pickle
    import subprocess
    import sys

    script = ("import sys\n"
              "from lora_diffusion.core.methods import registry\n"
              "loaded = lambda: sorted(m.rsplit('.', 1)[1] for m in sys.modules\n"
              "                        if m.startswith('lora_diffusion.core.methods.'))\n"
              "print(loaded())\n"
              "registry.names()\n"
              "print(len(loaded()) > 10)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["['base', 'registry']", "True"]
    config = config_lib.from_dict({}, {"method": "lora", "lora.rank": 4})
    assert type(config).__qualname__ == "Config" and pickle.loads(pickle.dumps(config)) == config
