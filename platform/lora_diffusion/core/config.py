"""The run configuration: one dataclass tree you can read top to bottom.

A config comes from a YAML/JSON file plus `--set section.key=value` overrides. Every field is
validated here, before any model or data is touched, and every error names the field.
Method-specific knobs live in their own section (`trajectory`, `lora`, ...) so that a flattened
config (`trajectory.rank`) is a natural search-space key and MLflow parameter name. Each method
declares its section and its checks in its own file (its `SPEC`, methods/registry.py); `Config`
below lists the run settings, one field per method section (its dataclass imported from the
method's file), then `diffusion`, `generation`, `train` and `diagnostics`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import families
from .errors import UserError, check, check_one_of
from .methods import registry
from .methods.adalora import AdaLoraConfig
from .methods.adapter import AdapterConfig
from .methods.foura import FouraConfig
from .methods.gelora import GeloraConfig
from .methods.lora import LoraConfig
from .methods.lora_merge import LoraMergeConfig
from .methods.nara import NaraConfig
from .methods.prefix import PrefixConfig
from .methods.router import RouterConfig
from .methods.selora import SeloraConfig
from .methods.solo import SoloConfig
from .methods.tlora import TLoraConfig
from .methods.trajectory import TrajectoryConfig
from .methods.vera import VeraConfig
from .precision import PRECISIONS
from .task_specs import TASKS

NOISE_SCHEDULES = ("linear", "loglinear", "cosine")
REMASKING = ("low_confidence", "random")
ROLES = ("result", "search")  # evaluation.role


@dataclass
class DiffusionConfig:
    noise_schedule: str = "linear"  # masking probability as a function of t
    t_min: float = 1e-3  # t is drawn from [t_min, 1] so the 1/t weight stays bounded
    # reverse steps of the sampler (and the number of per_step modules); None: 4 for
    # classification, generation.response_tokens (one token per step) for generation tasks
    sampler_steps: int | None = None
    remasking: str = "low_confidence"
    # generation decoding in blocks of this many response tokens, left to right (LLaDA's
    # semi-autoregressive sampler; the last block shorter); sampler_steps must be a multiple of
    # the number of blocks. None: one block, the whole response (diffusion.sample)
    block_length: int | None = None
    eval_t_points: int = 4  # t values for ELBO scoring, stratified over the method's phases


@dataclass
class GenerationConfig:
    """Generation tasks (xquad, xsum; core/generation.py): responses are the answer, cut to
    `response_tokens`, then end tokens up to it; decoding cuts at the first end token."""

    response_tokens: int | None = None  # None: the task's (xquad 16, xsum 32); unused by classification
    # loss weight in [0, 1] of each training response's end tokens after the first (the padding;
    # the first end token, where the answer stops, keeps weight 1); 1: LLaDA's SFT loss, 0: the
    # padding is not counted (generation.token_weights)
    end_token_weight: float = 1.0
    # false: evaluation runs no sampler, a split reports the ELBO bound only (no exact_match, f1,
    # rouge*, samples) and sweeps select on validation/elbo_nats_per_token, lower is better
    # (task_specs.run_metric); for a backbone whose answers score 0 whatever the method, where
    # the sampler's 1-3 CPU s per example buy nothing. Classification ignores it.
    text_scores: bool = True


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
    # Precision policy (core/precision.py): auto | fp32 | bf16-mixed | bf16. auto is bf16-mixed
    # on a GPU that supports bf16, fp32 on a CPU.
    precision: str = "auto"
    # Memory controls (core/activations.py): recompute each backbone block in backward instead of
    # keeping its activations; run the batch in micro-batches of this many rows, accumulating
    # gradients to the same update (None: the whole batch at once); apply the output head to at
    # most this many masked positions at a time.
    gradient_checkpointing: bool = False
    micro_batch_size: int | None = None
    logits_chunk_rows: int = 2048


@dataclass
class EvaluationConfig:
    """How splits are scored (core/evaluation.py, generation.py, diagnostics.py)."""

    # Rows per forward when a split is scored or sampled. The masks of multi-token scoring are
    # drawn per batch, so figures compare across runs at the same batch size.
    batch_size: int = 64
    # result (train, grids, retrains, compare's stage 2): the final result scores a train subset,
    # validation, test, diagnostics. search (search trials, compare's stage 1; set by the engine):
    # validation only, diagnostics where set; test is scored once, by the selection's retrain.
    role: str = "result"


@dataclass
class DiagnosticsConfig:
    """Views beside the task's metrics (core/diagnostics.py)."""

    # The loss bound (nats per response token at one t, the ELBO's integrand) at the midpoint of
    # each of this many equal bins of t over (0, 1], for the method and for the backbone alone,
    # on the first `per_t_rows` validation rows; 0 = off; a number: at every periodic evaluation;
    # None: 10 bins at the final evaluation of a result run (evaluation.role), none in a search.
    # Cost per evaluation: bins x ceil(rows / 64) forwards of the method; the backbone's once per
    # run (MiniLM, 32 rows, one thread: about 5 s on SST-2, 65-78 s on XSum at max_length 384).
    per_t_bins: int | None = None
    per_t_rows: int = 32
    # At the final evaluation, K > 1 phase modules: the test metric (validation's in a search)
    # with each one switched off (`test/phase_gain/{k}`), one more ELBO scoring per phase.
    # None: on in a result run only (evaluation.role).
    phase_gains: bool | None = None


@dataclass
class RunSettings:
    """The settings of a run outside any section; `Config` adds the sections after them."""

    task: str = "sst2"
    data_dir: str | None = None  # else $LORA_DIFFUSION_DATA_DIR
    allow_hub: bool = False  # fall back to hub datasets / models (needs internet)
    max_length: int = 64  # tokens per example, prompt + response
    max_train_examples: int | None = None
    max_eval_examples: int | None = None  # seeded subset of validation/test; None = all
    train_accuracy_examples: int = 512  # seeded train subset on which train accuracy is measured
    test_file: str | None = None  # labelled file in the task's format, reported as "test"
    # evaluate validation/test sets of which more than 1% overlaps the training rows (core/overlap.py)
    allow_overlap: bool = False

    backbone: str = "minilm"  # "minilm" (packaged), a local HF directory, or a hub id
    trust_remote_code: bool = False  # needed by families whose code ships with the weights
    # auto (from the model config's model_type) | bert | roberta | modernbert | llada | dream | mdlm
    backbone_family: str = "auto"
    # Seed of backbone parts the checkpoint lacks (all-MiniLM-L6-v2 has no MLM head). Kept apart
    # from train.seed so that seeds vary the method, not the backbone, and checkpoints trained
    # with different seeds share one backbone (routers compose them).
    backbone_seed: int = 0

    method: str = "trajectory"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, object]:
        """`section.key -> value`, the form used for search spaces and MLflow params."""
        return flatten(self.to_dict())


@dataclass
class Config(RunSettings):
    """A run's whole configuration: the settings above, then one section per method that has
    one (a new method's section is one more line here; tests/test_config.py checks them against
    the registry), then the diffusion, generation, training and diagnostics sections."""

    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    tlora: TLoraConfig = field(default_factory=TLoraConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    adalora: AdaLoraConfig = field(default_factory=AdaLoraConfig)
    vera: VeraConfig = field(default_factory=VeraConfig)
    foura: FouraConfig = field(default_factory=FouraConfig)
    selora: SeloraConfig = field(default_factory=SeloraConfig)
    gelora: GeloraConfig = field(default_factory=GeloraConfig)
    solo: SoloConfig = field(default_factory=SoloConfig)
    lora_merge: LoraMergeConfig = field(default_factory=LoraMergeConfig)
    nara: NaraConfig = field(default_factory=NaraConfig)

    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    output_dir: str = "runs/train"


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
    check_one_of(config.task, tuple(TASKS), "task")
    resolve_task_defaults(config)
    validate(config)
    return config


def resolve_task_defaults(config: Config) -> None:
    """Fill the settings whose default depends on the task, so a saved config holds the values
    the run used: the response length of generation tasks and the sampler's step count."""
    spec = TASKS[config.task]
    if spec.kind == "generation" and config.generation.response_tokens is None:
        config.generation.response_tokens = spec.response_tokens
    if config.diffusion.sampler_steps is None:
        config.diffusion.sampler_steps = (config.generation.response_tokens
                                          if spec.kind == "generation" else 4)


def load(path: str | None, sets: list[str] | None = None) -> Config:
    """Config from an optional YAML/JSON file plus `key=value` strings (values parsed as YAML)."""
    data: dict = {}
    if path:
        if not Path(path).is_file():
            raise UserError(f"config file not found: {path}")
        data = read_yaml(path, "config file") or {}
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold a mapping at the top level")
    return from_dict(data, parse_sets(sets or []))


def read_yaml(path: str | Path, what: str):
    """A YAML (or JSON) file's content; a binary file or a syntax error is one UserError naming
    `what` and the file (the YAML error's position, not its multi-line excerpt)."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{what} {path}: not a text file (not UTF-8)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{what} {path}: not valid YAML{where}: {problem}") from None


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


def validate(config: Config) -> None:
    check_one_of(config.method, tuple(registry.names()), "method")
    check_one_of(config.backbone_family, families.NAMES, "backbone_family")
    check(config.max_length >= 8, "max_length", "must be at least 8")
    d, tr = config.diffusion, config.train
    check_one_of(d.noise_schedule, NOISE_SCHEDULES, "diffusion.noise_schedule")
    check_one_of(d.remasking, REMASKING, "diffusion.remasking")
    check(0 < d.t_min < 1, "diffusion.t_min", "must lie in (0, 1)")
    check(d.sampler_steps >= 1, "diffusion.sampler_steps", "must be >= 1")
    validate_generation(config)
    check(d.eval_t_points >= 1, "diffusion.eval_t_points", "must be >= 1")
    for name in ("steps", "batch_size", "eval_every"):
        check(getattr(tr, name) >= 1, f"train.{name}", "must be >= 1")
    # a rate above 1 (or inf/nan) only produces garbage: refuse it rather than train uphill
    check(math.isfinite(tr.lr) and 0 < tr.lr <= 1, "train.lr", f"must be a number in (0, 1], got {tr.lr}")
    check(math.isfinite(tr.weight_decay) and tr.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    check(tr.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    check(math.isfinite(tr.grad_clip) and tr.grad_clip >= 0, "train.grad_clip",
          f"must be >= 0 (0 turns clipping off), got {tr.grad_clip}")
    check(tr.threads is None or tr.threads >= 1, "train.threads", "must be >= 1 (or null: torch's default)")
    validate_memory(config)
    check_one_of(config.task, tuple(sorted(TASKS)), "task")
    for name in ("max_train_examples", "max_eval_examples"):
        check(getattr(config, name) is None or getattr(config, name) >= 1, name, "must be >= 1 (or null: all)")
    check(config.train_accuracy_examples >= 1, "train_accuracy_examples", "must be >= 1")
    check((config.diagnostics.per_t_bins or 0) >= 0, "diagnostics.per_t_bins", "must be >= 0 (0 turns it off)")
    check(config.diagnostics.per_t_rows >= 1, "diagnostics.per_t_rows", "must be >= 1")
    for spec in registry.specs():  # every section, whichever method runs: a bad value is an error
        if spec.validate is not None:
            spec.validate(getattr(config, spec.name))


def validate_memory(config: Config) -> None:
    """The precision policy, micro-batches, logits chunks and the evaluation batch."""
    tr = config.train
    check_one_of(tr.precision, PRECISIONS, "train.precision")
    check(tr.micro_batch_size is None or 1 <= tr.micro_batch_size <= tr.batch_size, "train.micro_batch_size",
          f"must lie in [1, train.batch_size = {tr.batch_size}] (or null: the whole batch), "
          f"got {tr.micro_batch_size}")
    check(tr.logits_chunk_rows >= 1, "train.logits_chunk_rows", "must be >= 1")
    check(config.evaluation.batch_size >= 1, "evaluation.batch_size", "must be >= 1")
    check_one_of(config.evaluation.role, ROLES, "evaluation.role")


def validate_generation(config: Config) -> None:
    """The response length, the end tokens' loss weight and the decoding blocks."""
    d, g, n = config.diffusion, config.generation, config.generation.response_tokens
    if TASKS[config.task].kind == "generation":  # [CLS], at least one prompt token, [SEP]
        check(1 <= n <= config.max_length - 3, "generation.response_tokens",
              f"must lie in [1, max_length - 3 = {config.max_length - 3}] for {config.task}")
    check(0 <= g.end_token_weight <= 1, "generation.end_token_weight",
          f"must be a number in [0, 1], got {g.end_token_weight}")  # NaN fails both comparisons
    if d.block_length is None:
        return
    check(d.block_length >= 1, "diffusion.block_length", "must be >= 1 (or null: one block)")
    if n is not None:
        blocks = math.ceil(n / d.block_length)
        check(d.sampler_steps % blocks == 0, "diffusion.block_length",
              f"{n} response tokens make {blocks} blocks of {d.block_length}: diffusion.sampler_steps "
              f"({d.sampler_steps}) must be a multiple of {blocks}")
