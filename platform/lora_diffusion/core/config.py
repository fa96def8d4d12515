"""The run configuration: one dataclass tree you can read top to bottom.

A config comes from a YAML/JSON file plus `--set section.key=value` overrides. Every field is
validated here, before any model or data is touched, and every error names the field.
Method-specific knobs live in their own section (`trajectory`, `lora`, ...) so that a flattened
config (`trajectory.rank`) is a natural search-space key and MLflow parameter name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError

NOISE_SCHEDULES = ("linear", "loglinear", "cosine")
RANK_SCHEDULES = ("constant", "linear", "cosine", "step", "reversed")
SHARING_MODES = ("per_phase", "shared", "per_step")
REMASKING = ("low_confidence", "random")


@dataclass
class TrajectoryConfig:
    """LoRA-Diffusion: h' = h + (alpha / r_k) B_k A_k h at the injection layers, k = phase(t)."""

    rank: int = 8  # r_max: the largest rank any phase gets
    min_rank: int = 1  # r_min for the non-constant schedules (0 = that phase owns no module)
    alpha: float = 16.0
    num_phases: int = 4  # uniform phases over (0, 1] unless phase_boundaries is given
    phase_boundaries: list[float] | None = None  # e.g. [0, 0.3, 1.0]; must cover (0, 1]
    rank_schedule: str = "constant"  # how r_k varies with t; "reversed" = less rank at high noise
    step_threshold: float = 0.5  # "step" schedule: r_min below this t, r_max above
    sharing: str = "per_phase"  # per_phase | shared (one module, rank masked by t) | per_step
    # Layers whose output is perturbed (0-based; -1 = last hidden state). The default, one
    # residual after the middle layer, is chosen by measurement: see README "Default injection".
    injection_layers: list[int] = field(default_factory=lambda: [2])
    num_tasks: int = 0  # > 0 enables task conditioning A(c) with that many task ids
    nuclear_weight: float = 0.0  # weight of sum_k ||B_k A_k||_*
    orth_weight: float = 0.0  # weight of sum_k ||A_k A_k^T - I||_F^2
    init_std: float | None = None  # std of A's init; default 1/sqrt(hidden)


@dataclass
class LoraConfig:
    """Weight LoRA through HF PEFT (also DoRA / rsLoRA flags)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "attention"  # attention | attention_mlp
    use_dora: bool = False
    use_rslora: bool = False


@dataclass
class PrefixConfig:
    """Prefix tuning: learned key/value vectors prepended to every self-attention layer."""

    length: int = 16  # prefix vectors per layer (the size knob)
    init: str = "tokens"  # tokens: keys/values of random words read by the backbone | random
    init_std: float = 0.02  # std of the "random" init
    projection: int = 0  # > 0: Li & Liang's reparameterisation MLP of this width (init ignored)
    # With a projection, what is saved and counted: "prefix" = the key/values the MLP computes
    # (Li & Liang drop the MLP after training; PEFT saves the prefix), "mlp" = the seeds and MLP
    save: str = "prefix"


@dataclass
class AdapterConfig:
    """Bottleneck adapters: h + up(act(down(h))) on a sublayer's output, up initialised to zero."""

    bottleneck: int = 16  # width of the bottleneck (the size knob)
    placement: str = "pfeiffer"  # pfeiffer: after the FFN | houlsby: after attention and FFN
    activation: str = "relu"  # relu | gelu | tanh


@dataclass
class TLoraConfig:
    """T-LoRA: weight LoRA whose active rank is masked by t, r(t) = floor((r_max-r_min)(1-t)) + r_min."""

    rank: int = 8  # r_max (the size knob)
    min_rank: int = 1  # r_min, the rank at t = 1 (pure noise)
    alpha: float = 16.0  # scale alpha / r_max, fixed for every t
    targets: str = "attention"  # attention | attention_mlp


@dataclass
class RouterConfig:
    """Router composition of trained trajectory checkpoints (method: router)."""

    checkpoints: list[str] = field(default_factory=list)  # two or more trajectory checkpoint dirs


@dataclass
class DiffusionConfig:
    noise_schedule: str = "linear"  # masking probability as a function of t
    t_min: float = 1e-3  # t is drawn from [t_min, 1] so the 1/t weight stays bounded
    sampler_steps: int = 4  # reverse steps of the sampler (and the number of per_step modules)
    remasking: str = "low_confidence"
    eval_t_points: int = 4  # t values for ELBO scoring, stratified over the method's phases


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    eval_every: int = 200
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None = torch's default
    group_by_length: bool = False  # batches of similar length (less padding); see Recipe._grouped


@dataclass
class Config:
    task: str = "sst2"
    data_dir: str | None = None  # else $LORA_DIFFUSION_DATA_DIR
    allow_hub: bool = False  # fall back to hub datasets / models (needs internet)
    max_length: int = 64  # tokens per example, prompt + response
    max_train_examples: int | None = None
    max_eval_examples: int | None = None  # seeded subset of dev/test; None = all
    train_accuracy_examples: int = 512  # seeded train subset on which train accuracy is measured
    test_file: str | None = None  # labelled file in the task's format, reported as "test"

    backbone: str = "minilm"  # "minilm" (packaged), a local HF directory, or a hub id
    trust_remote_code: bool = False
    # Seed of backbone parts the checkpoint lacks (all-MiniLM-L6-v2 has no MLM head). Kept apart
    # from train.seed so that seeds vary the method, not the backbone, and checkpoints trained
    # with different seeds share one backbone (routers compose them).
    backbone_seed: int = 0

    method: str = "trajectory"
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    tlora: TLoraConfig = field(default_factory=TLoraConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    output_dir: str = "runs/train"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, object]:
        """`section.key -> value`, the form used for search spaces and MLflow params."""
        return flatten(self.to_dict())


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------------------- building


def from_dict(data: dict, overrides: dict[str, object] | None = None) -> Config:
    """Build and validate a Config; unknown keys and bad values raise UserError naming the field."""
    merged = json.loads(json.dumps(data or {}))  # deep copy of plain data
    for dotted, value in (overrides or {}).items():
        _set_dotted(merged, dotted, value)
    config = _build(Config, merged, prefix="")
    validate(config)
    return config


def load(path: str | None, sets: list[str] | None = None) -> Config:
    """Config from an optional YAML/JSON file plus `key=value` strings (values parsed as YAML)."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold a mapping at the top level")
    return from_dict(data, parse_sets(sets or []))


def parse_sets(sets: list[str]) -> dict[str, object]:
    out = {}
    for item in sets:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def _set_dotted(tree: dict, dotted: str, value: object) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"field {dotted}: {part} is not a section")
    node[parts[-1]] = value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise UserError(f"field {prefix.rstrip('.') or 'config'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise UserError(f"field {prefix}{key}: unknown field (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, data[f.name], prefix=f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(data[f.name], hint, f"{prefix}{f.name}")
    return cls(**kwargs)


def _coerce(value, hint, name: str):
    """Check a value against a simple type hint (int, float, str, bool, list[...], X | None)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, name)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"field {name}: expected a list, got {value!r}")
        return [_coerce(v, args[0], name) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"field {name}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"field {name}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"field {name}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"field {name}: expected a string, got {value!r}")
        return value
    return value


# ----------------------------------------------------------------------------- validation


def _check(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise UserError(f"field {name}: {problem}")


def _one_of(value: str, choices: tuple[str, ...], name: str) -> None:
    _check(value in choices, name, f"unknown value {value!r} (valid: {', '.join(choices)})")


def phase_boundaries(tc: TrajectoryConfig, sampler_steps: int) -> list[float]:
    """Edges of the phases over (0, 1]: given, uniform, or one per sampler step."""
    if tc.sharing == "per_step":
        n = sampler_steps
        return [i / n for i in range(n + 1)]
    if tc.phase_boundaries is not None:
        return list(tc.phase_boundaries)
    return [i / tc.num_phases for i in range(tc.num_phases + 1)]


def validate(config: Config) -> None:
    from .methods import METHODS  # late import: methods import this module

    _one_of(config.method, tuple(METHODS), "method")
    _check(config.max_length >= 8, "max_length", "must be at least 8")
    d, tc, tr = config.diffusion, config.trajectory, config.train
    _one_of(d.noise_schedule, NOISE_SCHEDULES, "diffusion.noise_schedule")
    _one_of(d.remasking, REMASKING, "diffusion.remasking")
    _check(0 < d.t_min < 1, "diffusion.t_min", "must lie in (0, 1)")
    _check(d.sampler_steps >= 1, "diffusion.sampler_steps", "must be >= 1")
    _check(d.eval_t_points >= 1, "diffusion.eval_t_points", "must be >= 1")
    for name in ("steps", "batch_size", "eval_every"):
        _check(getattr(tr, name) >= 1, f"train.{name}", "must be >= 1")
    _check(tr.lr > 0, "train.lr", "must be > 0")

    _one_of(tc.rank_schedule, RANK_SCHEDULES, "trajectory.rank_schedule")
    _one_of(tc.sharing, SHARING_MODES, "trajectory.sharing")
    _check(tc.rank >= 1, "trajectory.rank", f"must be >= 1, got {tc.rank}")
    _check(0 <= tc.min_rank <= tc.rank, "trajectory.min_rank", "must lie in [0, rank]")
    _check(tc.num_phases >= 1, "trajectory.num_phases", "must be >= 1")
    _check(tc.alpha > 0, "trajectory.alpha", "must be > 0")
    _check(0 < tc.step_threshold < 1, "trajectory.step_threshold", "must lie in (0, 1)")
    _check(tc.num_tasks >= 0, "trajectory.num_tasks", "must be >= 0")
    _check(tc.nuclear_weight >= 0, "trajectory.nuclear_weight", "must be >= 0")
    _check(tc.orth_weight >= 0, "trajectory.orth_weight", "must be >= 0")
    _check(len(tc.injection_layers) >= 1, "trajectory.injection_layers", "needs at least one layer")
    if tc.phase_boundaries is not None:
        b = tc.phase_boundaries
        covers = len(b) >= 2 and math.isclose(b[0], 0.0) and math.isclose(b[-1], 1.0)
        increasing = all(x < y for x, y in zip(b, b[1:]))
        _check(covers and increasing, "trajectory.phase_boundaries",
               f"must start at 0, end at 1 and increase strictly to cover (0, 1]; got {b}")

    lc = config.lora
    _check(lc.rank >= 1, "lora.rank", f"must be >= 1, got {lc.rank}")
    _one_of(lc.targets, ("attention", "attention_mlp"), "lora.targets")
    _check(0 <= lc.dropout < 1, "lora.dropout", "must lie in [0, 1)")

    pc, ac, tl = config.prefix, config.adapter, config.tlora
    _check(pc.length >= 1, "prefix.length", f"must be >= 1, got {pc.length}")
    _one_of(pc.init, ("tokens", "random"), "prefix.init")
    _check(pc.init_std > 0, "prefix.init_std", "must be > 0")
    _check(pc.projection >= 0, "prefix.projection", f"must be >= 0 (0 = no MLP), got {pc.projection}")
    _one_of(pc.save, ("prefix", "mlp"), "prefix.save")
    _check(ac.bottleneck >= 1, "adapter.bottleneck", f"must be >= 1, got {ac.bottleneck}")
    _one_of(ac.placement, ("pfeiffer", "houlsby"), "adapter.placement")
    _one_of(ac.activation, ("relu", "gelu", "tanh"), "adapter.activation")
    _check(tl.rank >= 1, "tlora.rank", f"must be >= 1, got {tl.rank}")
    _check(1 <= tl.min_rank <= tl.rank, "tlora.min_rank", "must lie in [1, rank]")
    _check(tl.alpha > 0, "tlora.alpha", "must be > 0")
    _one_of(tl.targets, ("attention", "attention_mlp"), "tlora.targets")
