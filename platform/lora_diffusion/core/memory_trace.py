"""What autograd keeps for backward, found without weights: one forward of a micro-batch on the
meta device with the method attached (core/memory_plan.py adds it up), and the peak tensor memory
of real training steps on the CPU, measured to check the plan against.

Saved tensors are counted once per storage (views share it), parameters and buffers excluded, by
`torch.autograd.graph.saved_tensors_hooks`; each is attributed to the block running when it is
saved (the blocks' forward pre-hooks), so checkpointing can be costed per block. sdpa is traced
as the target device runs it in training (`_sdpa_as_on`). The measurement reads torch's profiler
memory timeline (allocations and frees of tensors by the CPU allocator, `profile_memory`): only
tensors, not Python objects or the process's libraries, which the plan does not model either;
the process's peak RSS would add those and the allocator's caching, and tracemalloc sees no
tensor memory at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError
from .methods import Context


@dataclass
class ActivationTrace:
    per_block: list[int]  # bytes autograd saves inside each block (0: no backward through it)
    block_inputs: list[int]  # bytes of each block's input hidden state
    outside: int  # bytes saved outside the blocks (embeddings, the method's own modules)
    widest: int = 0  # the largest single tensor saved inside a block
    note: str = ""

    def saved(self, checkpointing: bool) -> int:
        if not checkpointing:
            return sum(self.per_block) + self.outside
        kept = sum(b for b, s in zip(self.block_inputs, self.per_block) if s)
        return kept + max(self.per_block, default=0) + self.outside

    def backward_transient(self) -> int:
        """Backward's working set beyond the saved tensors: the gradient arriving at a block and
        the one it returns (hidden-state sized) and the gradient of its widest saved tensor."""
        return 2 * max(self.block_inputs, default=0) + self.widest


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash / memory-efficient on a GPU, flash on a CPU) saves
    for backward: q, k, v, the output and a fp32 log-sum-exp per query, no [S, S] matrix. The
    meta device would otherwise run sdpa's math path, which saves the attention weights."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace stops before backward
        raise NotImplementedError


def _sdpa_as_on(device_type: str, sdpa):
    """sdpa as the target device runs it in training: fused kernels on a GPU; on a CPU the fused
    kernel without dropout, the math path (which saves the [S, S] weights and their dropout)
    with it, as the meta device's own sdpa does."""
    def attention(query, key, value, attn_mask=None, dropout_p=0.0, *args, **kwargs):
        if device_type == "cpu" and dropout_p > 0:
            return sdpa(query, key, value, None, dropout_p, *args, **kwargs)
        if query.shape[-3] != key.shape[-3] and kwargs.get("enable_gqa"):  # grouped-query, repeated
            key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
            value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
        return _FusedAttention.apply(query, key, value)
    return attention


class _Stop(Exception):
    """Raised after the last block: the head is counted by the logits formula."""


def trace_activations(backbone, method, batch: int, length: int, act_bytes: int,
                      device_type: str = "cuda") -> ActivationTrace:
    """Saved-for-backward bytes of one forward of `batch` x `length` tokens on the meta device.
    The method's context is a CPU tensor (its phase lookups need values); the attention mask is
    left out (the meta device cannot evaluate HF's mask checks; sdpa saves the same without it)."""
    model, layers = backbone.model, backbone.layers
    params = {t.untyped_storage()._cdata for t in (*model.parameters(), *method.parameters(),
                                                  *model.buffers(), *method.buffers())}
    seen, keep = set(), []
    state = {"block": -1, "per_block": [0] * len(layers), "inputs": [0] * len(layers), "outside": 0,
             "widest": 0}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params and key not in seen:
            seen.add(key)
            keep.append(t)  # alive until the trace ends, so no storage address is reused
            size = t.untyped_storage().nbytes()
            size = size * act_bytes // 4 if t.dtype == torch.float32 else size
            if state["block"] >= 0:
                state["per_block"][state["block"]] += size
                state["widest"] = max(state["widest"], size)
            else:
                state["outside"] += size
        return t

    def enter(index):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else next(iter(kwargs.values()))
            state["block"] = index
            state["inputs"][index] = hidden.numel() * act_bytes
        return hook

    def leave(_module, _inputs, _output):
        state["block"] = -1

    hooks = [layer.register_forward_pre_hook(enter(i), with_kwargs=True) for i, layer in enumerate(layers)]
    hooks += [layer.register_forward_hook(leave) for layer in layers]
    hooks.append(layers[-1].register_forward_hook(_raise_stop))
    note = _run_trace(backbone, method, batch, length, pack, device_type)
    for h in hooks:
        h.remove()
    return ActivationTrace(state["per_block"], state["inputs"], state["outside"], state["widest"], note)


def _raise_stop(_module, _inputs, _output):
    raise _Stop


def _run_trace(backbone, method, batch: int, length: int, pack, device_type: str) -> str:
    """Run the traced forward; a method whose forward cannot run on the meta device is traced
    without its context (its hooks pass the hidden states through): the note says so."""
    device = torch.device("meta")
    ids = torch.zeros(batch, length, dtype=torch.long, device=device)
    t = torch.full((batch,), 0.5)
    inputs = backbone.family.forward_inputs(ids, torch.ones_like(ids), t.to(device))
    inputs.pop("attention_mask", None)
    context = Context(t=t, prompt_mask=torch.zeros(batch, length, dtype=torch.bool),
                      task_ids=torch.zeros(batch, dtype=torch.long))
    method.train()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _sdpa_as_on(device_type, sdpa)
    try:
        return _forward_to_stop(backbone, method, inputs, context, pack)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def _forward_to_stop(backbone, method, inputs: dict, context, pack) -> str:
    """The forward with the method's context; where that cannot run on the meta device (a method
    that reads values: FouRA's gate, Solo Connection's logged ratio), without it (hooks that read
    the context pass the hidden states through), then without the method's hooks at all."""
    note = ""
    for attempt in ("context", "no context", "no hooks"):
        if attempt == "no hooks":
            for handle in method._hooks:  # the plan's model is thrown away after the trace
                handle.remove()
        method.set_context(context if attempt == "context" else None)
        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                backbone.model(**inputs)
        except _Stop:
            return note
        except (RuntimeError, NotImplementedError) as exc:
            without = "no hooks" if attempt != "context" else "no context"
            note = (f"the {method.name} forward does not run on the meta device "
                    f"({str(exc).splitlines()[0][:80]}): traced with {without}, "
                    f"its own activations are not counted")
        finally:
            method.set_context(None)
    raise UserError(f"method: the {method.name} forward on {backbone.family.name} cannot be traced on the "
                    f"meta device: {note}")


def measured_peak(recipe, steps: int = 3) -> int:
    """Peak tensor bytes of `steps` training steps of `recipe` on the CPU: the bytes of the
    method's (and backbone's) parameters and buffers when the steps start, plus the highest
    level the allocations minus the frees reach during them (the first step creates the
    gradients and AdamW's moments, later steps hold them through the whole step)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action  # the timeline export_memory_timeline reads

    tensors = {t.untyped_storage()._cdata: t for t in (*recipe.method.parameters(), *recipe.method.buffers())}
    resident = sum(t.untyped_storage().nbytes() for t in tensors.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        for _ in range(steps):
            recipe.train_step()
    level = peak = 0
    for _time, action, _key, size in sorted(prof._memory_profile().timeline, key=lambda e: e[0]):
        if action in (Action.CREATE, Action.DESTROY):
            level += size if action == Action.CREATE else -size
            peak = max(peak, level)
    return resident + peak
