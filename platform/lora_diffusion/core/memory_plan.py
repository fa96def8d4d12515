"""The memory plan: what one trial needs per worker, before any weight is loaded or Ray starts.

The backbone is built from its config on the meta device (core/standin.py: shapes, no weights),
the configured method is attached as in training, and the bytes are added up:

- weights: frozen tensors in the dtype the precision keeps them in (the checkpoint's for
  bf16-mixed, bf16 for bf16, fp32 for fp32), trainable parameters in fp32 (bf16 under bf16,
  core/precision.py's "bf16-true");
- gradients: trainable only, in the trainable dtype; AdamW: two moments per trainable parameter,
  and its step's temporaries (the foreach path on a GPU: one per trainable tensor at once; on a
  CPU the largest tensor's); under bf16-mixed, autocast's cached bf16 copies of the trainable
  weights (2 bytes each);
- activations: the tensors autograd saves for backward, found by running the forward of one
  micro-batch [micro_batch, max_length] on the meta device with the method attached and counting
  every saved tensor once (storage, not view; parameters excluded; core/memory_trace.py). With
  gradient checkpointing a block keeps only its input, and the one block being recomputed keeps
  its own set. The trace runs in fp32; where the frozen weights are bf16 (a bf16 checkpoint under
  bf16-mixed, or bf16) its floating tensors count 2 bytes (an approximation, to check on a GPU),
  over fp32 weights 4 (autocast over fp32 weights saves little, measured on the CPU).
  Backward's working set adds two hidden-state gradients, the gradient of the widest tensor a
  block saves, and the fresh gradient of the largest trainable tensor;
- logits, at masked positions only, chunked: rows = micro_batch x response tokens (every
  response position masked, the worst step), at most `train.logits_chunk_rows` rows alive
  (default 2048); bytes = rows x vocab x (12 + act) where 12 is three fp32 [rows, V] tensors
  alive when backward starts (the log-softmax saved by cross-entropy, its incoming gradient,
  the gradient it returns) and act the logits in the compute dtype where that is not fp32.

The peak is the state (weights, gradients, AdamW moments) plus the larger of the working set
(activations, logits, backward, autocast copies) and the AdamW step's temporaries: activations
are freed before the optimiser steps.

GPUs: a trial fits when its peak is within USABLE_FRACTION of the GPU (the CUDA context, the
caching allocator's fragmentation and NCCL buffers take the rest). A trial that does not fit one
GPU is sharded (FSDP: weights, gradients and optimiser state split over N GPUs, activations not)
and N is the plan's GPUs per trial; one that fits packs floor(usable / peak) trials per GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import standin
from .accounting import count
from .errors import MEMORY_KNOBS, UserError
from .memory_trace import trace_activations
from .methods import build_method

PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")
LOGITS_CHUNK_ROWS = 2048  # train.logits_chunk_rows where a config has none: rows of logits alive at once
USABLE_FRACTION = 0.9
GIB = 2**30
KNOBS = MEMORY_KNOBS  # what lowers a trial's peak (named by the refusal and by out-of-memory lines)


def resolve_precision(precision: str, device_type: str = "cuda") -> str:
    """`auto` is bf16-mixed on a GPU and fp32 on a CPU (the precision policy of issue 41)."""
    if precision not in PRECISIONS:
        raise UserError(f"field train.precision: unknown value {precision!r} (valid: {', '.join(PRECISIONS)})")
    if precision == "auto":
        return "fp32" if device_type == "cpu" else "bf16-mixed"
    return precision


def train_settings(config, workers: int = 1, overrides: dict | None = None) -> dict:
    """The train fields the plan reads; fields a config does not have (yet) read as their
    defaults (precision auto, no checkpointing, micro-batch = the worker's share of the batch).
    `overrides`: precision, gradient_checkpointing, micro_batch_size given on the command line."""
    tr, given = config.train, {k: v for k, v in (overrides or {}).items() if v is not None}
    per_worker = math.ceil(tr.batch_size / workers)
    micro = given.get("micro_batch_size", getattr(tr, "micro_batch_size", None)) or per_worker
    return {"precision": given.get("precision", getattr(tr, "precision", "auto")),
            "checkpointing": bool(given.get("gradient_checkpointing", getattr(tr, "gradient_checkpointing", False))),
            "micro_batch": min(micro, per_worker), "batch": per_worker}


def logits_bytes(rows: int, vocab: int, act_bytes: int, chunk_rows: int = LOGITS_CHUNK_ROWS) -> int:
    """Logits at masked positions, chunked: see the module docstring."""
    alive = min(rows, chunk_rows)
    return alive * vocab * (12 + (act_bytes if act_bytes != 4 else 0))


@dataclass
class MemoryPlan:
    backbone: str
    family: str
    method: str
    precision: str
    checkpointing: bool
    micro_batch: int
    max_length: int
    response_tokens: int
    params_total: int
    params_trainable: int
    weights: int
    gradients: int
    optimizer: int
    autocast_cache: int
    activations: int
    logits: int
    backward: int
    gpu_memory: int
    optimizer_step: int = 0  # AdamW's temporaries during its step
    note: str = ""
    largest_block_params: int = 0
    frozen_weights: int = 0
    fit: dict = field(default_factory=dict)

    @property
    def state(self) -> int:
        """What sharding splits: weights, gradients, optimiser state."""
        return self.weights + self.gradients + self.optimizer

    @property
    def working(self) -> int:
        """What every GPU of a trial holds whole: activations, logits, backward's working set."""
        return self.activations + self.logits + self.backward + self.autocast_cache

    @property
    def peak(self) -> int:
        """The state plus the larger of backward's working set and the optimiser step's
        temporaries (activations are freed before the step)."""
        return self.state + max(self.working, self.optimizer_step)


# ----------------------------------------------------------------------------- building


def _frozen_dtype(precision: str, checkpoint: torch.dtype) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision, checkpoint)


class _DataOnCpu(torch.overrides.TorchFunctionMode):
    """Tensors made from Python data (a method's phase edges and ranks, `torch.tensor(...)`) keep
    their values on the CPU while everything else goes to the meta device: the traced forward
    looks phases up from them (a meta tensor has no values to look up)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def build_on_meta(config, source: str | None = None, precision: str = "bf16-mixed"):
    """(backbone, method) on the meta device: the backbone of `source` (a shipped config name, a
    model directory, default the configured backbone) in the precision's frozen dtype, and the
    configured method attached to it as in training."""
    name, model_config = standin.read_config(source or config.backbone)
    dtype = _frozen_dtype(precision, standin.checkpoint_dtype(model_config))
    backbone = standin.build_standin(source or config.backbone, dtype=dtype,
                                     family=getattr(config, "backbone_family", "auto"))
    torch.manual_seed(config.train.seed)
    try:
        with torch.device("meta"), _DataOnCpu():
            method = build_method(config, backbone)
    except (RuntimeError, NotImplementedError, AttributeError, TypeError) as exc:
        raise UserError(f"method: {config.method} cannot be built on the meta device for the plan "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:100]}); "
                        f"it reads the backbone's weights or tokenizer while it is built") from None
    return backbone, method


def _frozen_bytes(method) -> int:
    """Bytes of every frozen tensor (parameters and buffers, shared ones once) as built."""
    trainable = {id(p) for p in method.trainable().values()}
    tensors = {id(t): t for t in (*method.parameters(), *method.buffers())}
    return sum(t.numel() * t.element_size() for i, t in tensors.items() if i not in trainable)


def _activation_bytes(precision: str, model_config: dict) -> int:
    """Bytes of a saved floating activation: 2 where the frozen weights are bf16 (a bf16
    checkpoint under bf16-mixed, or bf16), else 4. Autocast over fp32 weights saves little: its
    norms and softmax stay fp32 and it saves the bf16 copies of the weights beside the inputs
    (MiniLM, LoRA, CPU: bf16-mixed peaks at 95% of fp32's), so the plan counts fp32 there."""
    frozen = _frozen_dtype(precision, standin.checkpoint_dtype(model_config))
    return 2 if frozen == torch.bfloat16 and precision != "fp32" else 4


def _largest_trainable(method) -> int:
    """Elements of the largest trainable tensor: its fresh gradient is made in full before
    backward adds it into `.grad` (which the recipe keeps between steps)."""
    return max((p.numel() for p in method.trainable().values()), default=0)


def _adamw_step_bytes(method, device_type: str) -> int:
    """torch's AdamW step: on a GPU the foreach path makes an fp32 temporary the size of every
    trainable tensor at once (sqrt of the second moments); on a CPU the single-tensor path one
    tensor at a time, the largest."""
    sizes = [p.numel() for p in method.trainable().values()]
    return 4 * (sum(sizes) if device_type != "cpu" else max(sizes, default=0))


def response_positions(config) -> int:
    """Response tokens per row: the generation length, or a label word's one token."""
    tokens = getattr(getattr(config, "generation", None), "response_tokens", None)
    return int(tokens) if tokens else 1


def plan(config, *, source: str | None = None, gpu_memory_gib: float = 80.0, workers: int = 1,
         device_type: str = "cuda", response_tokens: int | None = None,
         overrides: dict | None = None) -> MemoryPlan:
    """The memory plan of one trial of `config` (see the module docstring)."""
    settings = train_settings(config, workers, overrides)
    precision = resolve_precision(settings["precision"], device_type)
    backbone, method = build_on_meta(config, source, precision)
    act = _activation_bytes(precision, standin.read_config(source or config.backbone)[1])
    positions = getattr(backbone.config, "max_position_embeddings", None) or config.max_length
    if config.max_length > positions:
        raise UserError(f"field max_length: {config.max_length} exceeds the backbone's {positions} positions")
    counts = count(method)
    trained = counts["trained_params"]
    frozen = _frozen_bytes(method)
    total = sum(p.numel() for p in {id(p): p for p in method.parameters()}.values())
    block_params = max(sum(p.numel() for p in layer.parameters()) for layer in backbone.layers)
    method.float()  # the trace runs in fp32 (hooks and weights agree); bf16 counts 2 bytes
    trace = trace_activations(backbone, method, settings["micro_batch"], config.max_length, act, device_type)
    rows = settings["micro_batch"] * (response_tokens or response_positions(config))
    chunk_rows = getattr(config.train, "logits_chunk_rows", None) or LOGITS_CHUNK_ROWS
    tb = 2 if precision == "bf16" else 4  # trainable tensors, their gradients and moments (bf16-true: bf16)
    result = MemoryPlan(
        backbone=source or config.backbone, family=backbone.family.name, method=config.method,
        precision=precision, checkpointing=settings["checkpointing"], micro_batch=settings["micro_batch"],
        max_length=config.max_length, response_tokens=response_tokens or response_positions(config),
        params_total=total, params_trainable=trained,
        weights=frozen + tb * trained, gradients=tb * trained, optimizer=2 * tb * trained,
        autocast_cache=2 * trained if precision == "bf16-mixed" else 0,
        activations=trace.saved(settings["checkpointing"]),
        logits=logits_bytes(rows, backbone.vocab_size, act, chunk_rows),
        backward=trace.backward_transient() + tb * _largest_trainable(method), gpu_memory=int(gpu_memory_gib * GIB),
        note=trace.note,
        largest_block_params=block_params, frozen_weights=frozen,
        optimizer_step=_adamw_step_bytes(method, device_type) * tb // 4)
    result.fit = placement(result)
    return result



def placement(p: MemoryPlan) -> dict:
    """Whether a trial fits one GPU, GPUs per trial (sharded: the state split over N, each GPU
    holding the working set and two unsharded blocks in the compute dtype, the one computing
    and the one prefetched), trials per GPU."""
    usable = USABLE_FRACTION * p.gpu_memory
    if p.peak <= usable:
        return {"fits": True, "gpus_per_trial": 1, "trials_per_gpu": int(usable // p.peak)}
    # sharded, the blocks' parameters are all-gathered in the compute dtype (FSDP2's mixed
    # precision): two of them stand in for autocast's cached copies
    gathered = 2 * p.largest_block_params * (4 if p.precision == "fp32" else 2)
    room = usable - (p.working - p.autocast_cache) - gathered
    if room <= 0:
        return {"fits": False, "gpus_per_trial": None, "trials_per_gpu": 0}
    # each GPU holds 1/n of the state and of the step's temporaries (FSDP steps on shards)
    return {"fits": False, "gpus_per_trial": math.ceil((p.state + p.optimizer_step) / room),
            "trials_per_gpu": 0}


def knob_to_change(p: MemoryPlan) -> str:
    """The field that lowers this plan's peak the most cheaply: checkpointing when activations
    dominate, else a smaller micro-batch, else a shorter length."""
    if not p.checkpointing and p.activations > p.logits:
        return "train.gradient_checkpointing"
    if p.micro_batch > 1:
        return "train.micro_batch_size"
    return "max_length"


def refuse_unfit(config, *, gpu_memory_gib: float, gpus_per_trial: int = 1, workers: int = 1,
                 source: str | None = None) -> MemoryPlan:
    """The sweep preflight's check: a trial whose plan needs more than `gpus_per_trial` GPUs of
    `gpu_memory_gib` is one UserError naming the field to change."""
    p = plan(config, source=source, gpu_memory_gib=gpu_memory_gib, workers=workers)
    need = p.fit["gpus_per_trial"]
    if need is not None and need <= gpus_per_trial:
        return p
    knob = knob_to_change(p)
    shard = f"; sharded it needs {need} GPUs" if need else ""
    raise UserError(
        f"field {knob}: a {p.method} trial of {p.backbone} needs {p.peak / GIB:.1f} GiB per worker "
        f"(micro-batch {p.micro_batch} x {p.max_length}, {p.precision}, checkpointing "
        f"{'on' if p.checkpointing else 'off'}), more than {USABLE_FRACTION * gpu_memory_gib:.1f} GiB usable "
        f"of a {gpu_memory_gib:g} GiB GPU{shard}; lower it with {', '.join(KNOBS)}")


# ----------------------------------------------------------------------------- printing

_COLUMNS = ("backbone", "method", "params", "trainable", "weights", "grads", "AdamW", "activations",
            "logits", "peak", "fits", "GPUs/trial", "trials/GPU")


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e4 else str(n)


def describe(p: MemoryPlan) -> str:
    """One plan, a line a figure (GiB unless marked)."""
    fit = p.fit
    gpus = fit["gpus_per_trial"] if fit["gpus_per_trial"] is not None else "cannot (activations alone)"
    lines = [
        f"backbone {p.backbone} ({p.family}), method {p.method}",
        f"micro-batch {p.micro_batch} x {p.max_length} tokens, response tokens per row {p.response_tokens}, "
        f"precision {p.precision}, gradient checkpointing {'on' if p.checkpointing else 'off'}",
        f"parameters: {p.params_total:,} total, {p.params_trainable:,} trainable",
        f"weights {_gib(p.weights)} (frozen {_gib(p.frozen_weights)}, trainable fp32 {_gib(4 * p.params_trainable)})",
        f"gradients {_gib(p.gradients)}, AdamW state {_gib(p.optimizer)}, "
        f"AdamW step temporaries {_gib(p.optimizer_step)}",
        f"activations {_gib(p.activations)}, logits {_gib(p.logits)}, backward {_gib(p.backward)}, "
        f"autocast copies {_gib(p.autocast_cache)}",
        f"peak per worker {_gib(p.peak)}; GPU {p.gpu_memory / GIB:g} GiB "
        f"({USABLE_FRACTION:.0%} usable): fits one GPU {'yes' if fit['fits'] else 'no'}, "
        f"GPUs per trial {gpus}, trials per GPU {fit['trials_per_gpu']}"]
    return "\n".join(lines + ([f"note: {p.note}"] if p.note else []))


def table(plans: list[MemoryPlan]) -> str:
    """Plans as a markdown table."""
    rows = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for p in plans:
        gpus = p.fit["gpus_per_trial"]
        cells = (p.backbone, p.method, _count(p.params_total), _count(p.params_trainable), _gib(p.weights),
                 _gib(p.gradients), _gib(p.optimizer), _gib(p.activations), _gib(p.logits), _gib(p.peak),
                 "yes" if p.fit["fits"] else "no", "-" if gpus is None else str(gpus), str(p.fit["trials_per_gpu"]))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
