"""Search spaces: YAML files in search_spaces/, validated on load, sampled define-by-run by Optuna.

A space file holds

    description: one line shown in the sweep's banner
    fixed:                       # config overrides applied to every trial (dotted Config keys)
      method: trajectory
      train.steps: 200
    params:                      # what Optuna samples, in this order
      trajectory.rank_schedule: {type: categorical, choices: [constant, linear, reversed]}
      trajectory.min_rank:
        type: int
        low: 1
        high: 4
        when: {trajectory.rank_schedule: [linear, reversed]}   # only sampled for these values
      train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
    sweep:                       # optional defaults of the sweep's options
      num_samples: 8
      max_concurrent: 2

Parameter types: categorical (choices), int (low, high, optional step), float (low, high,
optional step), loguniform (low > 0, high). `when` maps earlier parameters to a value or a list
of values; a parameter whose condition does not hold is not sampled (the config default, or the
`fixed` value, applies). Two more key forms: `switch.NAME` is a categorical that sets no config
field and only steers `when` (e.g. which regulariser is on); `field@label` samples the same
config field as `field` with its own range under its own condition (e.g. `train.lr@full`), the
conditions must make them exclusive. Every key must be a Config field and every value it can take must give a
valid config: `load` checks that (and a seeded set of sampled combinations) and raises a
`UserError` naming the file, the key and the problem, before anything starts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..core import config as config_lib
from ..core.errors import UserError

TYPES = ("categorical", "int", "float", "loguniform")
TOP_KEYS = ("description", "fixed", "params", "sweep")
SWEEP_KEYS = {"num_samples": int, "max_concurrent": int, "workers": int, "seed": int,
              "grace_period": int, "reduction_factor": int, "max_trial_retries": int}
NON_NEGATIVE_SWEEP_KEYS = ("max_trial_retries",)  # 0 is a value (no retry), not a missing one
PARAM_KEYS = {"type", "choices", "low", "high", "step", "when"}
SPACES_DIR = "search_spaces"
SWITCH = "switch."


@dataclass
class Param:
    key: str  # the Optuna parameter name
    type: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    when: dict[str, list] = field(default_factory=dict)

    @property
    def field(self) -> str | None:
        """The Config field this parameter sets (None for a switch)."""
        return None if self.key.startswith(SWITCH) else self.key.split("@", 1)[0]

    def active(self, values: dict) -> bool:
        return all(values.get(k, _MISSING) in allowed for k, allowed in self.when.items())

    def suggest(self, trial):
        """Ask an Optuna trial (or Ray's captor of one) for this parameter."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1))
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, step=self.step)
        return trial.suggest_float(self.key, self.low, self.high, log=True)

    def sample(self, rng: random.Random):
        """A random value without Optuna (used to validate combinations)."""
        if self.type == "categorical":
            return rng.choice(self.choices)
        if self.type == "int":
            step = int(self.step or 1)
            return rng.randrange(int(self.low), int(self.high) + 1, step)
        if self.type == "float":
            return rng.uniform(self.low, self.high)
        return self.low * (self.high / self.low) ** rng.random()

    def extremes(self) -> list:
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]


_MISSING = object()


@dataclass
class SearchSpace:
    name: str
    path: str
    description: str = ""
    fixed: dict = field(default_factory=dict)
    params: list[Param] = field(default_factory=list)
    sweep: dict = field(default_factory=dict)

    def define_by_run(self) -> DefineByRun:
        return DefineByRun(self.params)

    def sample(self, rng: random.Random) -> dict:
        values: dict = {}
        for p in self.params:
            if p.active(values):
                values[p.key] = p.sample(rng)
        return values


class DefineByRun:
    """The define-by-run function OptunaSearch calls per trial: conditional parameters are only
    asked for when their `when` holds. A class (not a closure) so the searcher can pickle it."""

    def __init__(self, params: list[Param]):
        self.params = params

    def __call__(self, trial):
        values: dict = {}
        for p in self.params:
            if p.active(values):
                values[p.key] = p.suggest(trial)
        return None  # everything sampled is captured by Ray's captor


# ----------------------------------------------------------------------------- loading


def resolve_path(spec: str, repo: Path | None = None) -> Path:
    """A file path, or a bare name looked up in search_spaces/ (cwd, then the repository)."""
    p = Path(spec)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    name = p.name if p.suffix in (".yaml", ".yml") else f"{spec}.yaml"
    for base in (Path.cwd(), repo):
        if base is not None and (base / SPACES_DIR / name).is_file():
            return base / SPACES_DIR / name
    raise UserError(f"search space {spec}: file not found (looked in ./{SPACES_DIR}/"
                    + (f" and {repo / SPACES_DIR}/" if repo else "") + ")")


def load(path: str | Path, base_overrides: dict | None = None) -> SearchSpace:
    """Read and validate a search space file; `base_overrides` (--set) apply under `fixed`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"search space {path}: file not found")
    return parse(config_lib.read_yaml(path, "search space"), str(path), base_overrides)


def parse(data, source: str, base_overrides: dict | None = None) -> SearchSpace:
    def fail(key: str, problem: str):
        raise UserError(f"search space {source}: {key}: {problem}")

    fixed, raw_params, sweep = _sections(data, fail)
    # the fixed part alone must be a valid config
    check_config(fixed, f"search space {source}: fixed: invalid config")
    if base_overrides:
        fixed = {**fixed, **base_overrides}
        shown = " ".join(f"{k}={v}" for k, v in base_overrides.items() if k not in ("data_dir", "backbone"))
        check_config(fixed, f"search space {source}: fixed with the command line's --set {shown}: invalid config")
    valid_keys = set(config_lib.Config().flat())
    params: list[Param] = []
    for key, spec in raw_params.items():
        p = _param(key, spec, valid_keys, fail)
        p.when = _when(key, spec.get("when") or {}, {q.key: q for q in params}, fail)
        # every value alone (with the fixed part) must give a valid config
        if p.field is not None:
            for value in p.extremes():
                check_config({**fixed, p.field: value}, f"search space {source}: {key}: invalid config")
        params.append(p)
    space = SearchSpace(name=Path(source).stem, path=source, description=str(data.get("description", "")),
                        fixed=fixed, params=params, sweep=dict(sweep))
    _check_combinations(space, fail)
    return space


def _sections(data, fail) -> tuple[dict, dict, dict]:
    """(fixed, params, sweep) of a space file, each of the right shape."""
    if not isinstance(data, dict):
        fail("(top level)", "must be a mapping with 'params' (and optionally 'fixed', 'sweep')")
    for key in data:
        if key not in TOP_KEYS:
            fail(key, f"unknown section (valid: {', '.join(TOP_KEYS)})")
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        fail("fixed", "must be a mapping of config keys to values")
    raw_params = data.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        fail("params", "must be a non-empty mapping of config keys to parameter specs")
    return fixed, raw_params, check_sweep_options(data.get("sweep"), SWEEP_KEYS, fail)


def _param(key, spec, valid_keys: set[str], fail) -> Param:
    """One parameter's name, type and range (its `when` comes from `_when`)."""
    if not isinstance(key, str):
        fail(str(key), "parameter names must be strings")
    field_name = key.split("@", 1)[0]
    if key.startswith(SWITCH):
        if not key[len(SWITCH):] or not isinstance(spec, dict) or spec.get("type") != "categorical":
            fail(key, "a switch must be a categorical with a name, e.g. switch.regularizer")
    elif field_name not in valid_keys:
        fail(key, "unknown config field" + _suggest(field_name, valid_keys))
    if not isinstance(spec, dict):
        fail(key, "must be a mapping with 'type' and its bounds or choices")
    extra = set(spec) - PARAM_KEYS
    if extra:
        fail(key, f"unknown option(s) {', '.join(sorted(extra))} (valid: {', '.join(sorted(PARAM_KEYS))})")
    ptype = spec.get("type")
    if ptype not in TYPES:
        fail(key, f"bad type {ptype!r} (valid: {', '.join(TYPES)})")
    p = Param(key=key, type=ptype)
    if ptype == "categorical":
        p.choices = _choices(key, spec, fail)
    else:
        p.low, p.high, p.step = _range(key, ptype, spec, fail)
    return p


def _choices(key: str, spec: dict, fail) -> list:
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        fail(key, "categorical needs a non-empty list 'choices'")
    for c in choices:
        if not (c is None or isinstance(c, (bool, int, float, str))):
            fail(key, f"choice {c!r} is not a scalar (Optuna stores None, bool, int, float, str)")
    if any(k in spec for k in ("low", "high", "step")):
        fail(key, "categorical takes 'choices', not low/high/step")
    return choices


def _range(key: str, ptype: str, spec: dict, fail) -> tuple:
    """(low, high, step) of a numeric parameter."""
    if "choices" in spec:
        fail(key, f"{ptype} takes low/high, not 'choices'")
    for bound in ("low", "high"):
        v = spec.get(bound)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            fail(key, f"{ptype} needs a number '{bound}', got {v!r}")
        if ptype == "int" and not float(v).is_integer():
            fail(key, f"int needs an integer '{bound}', got {v!r}")
    low, high = spec["low"], spec["high"]
    if low > high:
        fail(key, f"low ({low}) > high ({high})")
    if ptype == "loguniform" and low <= 0:
        fail(key, f"loguniform needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        if ptype == "loguniform":
            fail(key, "loguniform takes no 'step'")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            fail(key, f"step must be a positive number, got {step!r}")
    return low, high, step


def _when(key: str, when, earlier: dict[str, Param], fail) -> dict[str, list]:
    """A parameter's condition: earlier parameters -> the values (of their choices) it needs."""
    if not isinstance(when, dict):
        fail(key, "'when' must map earlier parameters to a value or a list of values")
    out = {}
    for other, allowed in when.items():
        if other not in earlier:
            fail(key, f"'when' refers to {other!r}, which is not a parameter listed before it")
        allowed = allowed if isinstance(allowed, list) else [allowed]
        q = earlier[other]
        if q.type == "categorical":
            bad = [a for a in allowed if a not in q.choices]
            if bad:
                fail(key, f"'when' value(s) {bad} are not choices of {other}")
        out[other] = allowed
    return out


def _check_combinations(space: SearchSpace, fail) -> None:
    """A seeded set of sampled combinations, so that cross-field constraints (min_rank <= rank)
    and labelled variants that are not exclusive surface now."""
    rng = random.Random(0)
    for _ in range(32):
        values = space.sample(rng)
        what = "combination " + ", ".join(f"{k}={v!r}" for k, v in values.items())
        fields = [p.field for p in space.params if p.key in values and p.field is not None]
        dup = sorted({f for f in fields if fields.count(f) > 1})
        if dup:
            fail(what, f"sets {', '.join(dup)} twice: make the 'when' conditions of its labelled "
                       "variants exclusive")
        check_config({**space.fixed, **overrides(values)}, f"search space {space.path}: {what}: invalid config")


CELL = "cell"  # a grid trial's listed cell (sweep.grid_param_space): a mapping of config keys


def flatten(params: dict) -> dict:
    """A trial's config with a listed grid cell spread out: {"cell": {a: 1}, "train.seed": 0} ->
    {a: 1, "train.seed": 0}; other trial configs pass through."""
    if not isinstance(params.get(CELL), dict):
        return dict(params)
    return {**params[CELL], **{k: v for k, v in params.items() if k != CELL}}


def check_sweep_options(sweep, valid, fail) -> dict:
    """A file's `sweep:` section (options of the engine): a mapping of known keys to positive ints."""
    sweep = sweep or {}
    if not isinstance(sweep, dict):
        fail("sweep", "must be a mapping")
    for key, value in sweep.items():
        if key not in valid:
            fail(f"sweep.{key}", f"unknown option (valid: {', '.join(valid)})")
        least = 0 if key in NON_NEGATIVE_SWEEP_KEYS else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            fail(f"sweep.{key}", ("must be a positive integer" if least else "must be an integer >= 0")
                 + f", got {value!r}")
    return sweep


def overrides(params: dict) -> dict:
    """Sampled parameters (Optuna names) -> config overrides: switches dropped, labels stripped."""
    out = {}
    for key, value in flatten(params).items():
        if key.startswith(SWITCH):
            continue
        out[key.split("@", 1)[0]] = value
    return out


def resolve(space: SearchSpace, params: dict) -> config_lib.Config:
    """The trial's Config: defaults < fixed < sampled params."""
    return config_lib.from_dict({}, {**space.fixed, **overrides(params)})


def check_config(overrides: dict, where: str) -> None:
    """Overrides must build a valid config; the error starts with `where` (file and key)."""
    try:
        config_lib.from_dict({}, overrides)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def _suggest(key: str, valid: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(valid), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""
