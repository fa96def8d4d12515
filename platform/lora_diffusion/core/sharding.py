"""Several ranks training one trial: FSDP2-sharded models, gradients averaged in one flat
buffer, and sharded checkpoints through torch.distributed.checkpoint (DCP).

- `shard_backbone`: `fully_shard` on every block of the backbone, then on the whole model (the
  root unit holds embeddings, head and anything tied between them). The recipe reaches the model
  through `Backbone.hidden_at` / `logits` / `block_states`, which call submodules (the encoder,
  the head) rather than the root's `forward`; these entry points are therefore run inside the
  root's pre/post-forward hooks, as `register_fsdp_forward_method` does for a method of the
  module itself. Parameters become DTensors; FSDP reduce-scatters (and averages) their
  gradients in backward.
- `average_gradients`: the data-parallel path (adapters on a replicated backbone). Every rank's
  gradients go into one flat buffer, one all_reduce, back out averaged: one collective per step
  instead of one per parameter. A parameter the batch did not reach (a per-phase module whose
  phase no sampled t fell in) contributes zeros, so every rank sends the same layout. Sharded
  (DTensor) parameters are skipped: FSDP has reduced them.
- `save_sharded` / `load_sharded`: every rank writes its shard of the trainable state and of
  the optimiser state into one directory (DCP's files plus `.metadata`); loading reshards to the
  ranks present. Frozen parameters are not written (the backbone's weights are on disk already).

torch.distributed is imported here only; callers decide whether a run is sharded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

DCP_METADATA = ".metadata"  # written by DCP's coordinator: marks a sharded checkpoint


def is_sharded_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / DCP_METADATA).is_file()


def shard_backbone(backbone) -> torch.nn.Module:
    """FSDP2 over the backbone's blocks and its model; returns the root (an FSDPModule)."""
    from torch.distributed.fsdp import fully_shard

    for block in backbone.layers:
        fully_shard(block)
    root = fully_shard(backbone.model)
    _route_through_root(backbone, root)
    return root


def _route_through_root(backbone, root) -> None:
    """Run the Backbone's model entry points inside the root unit's forward hooks (they call
    submodules, whose calls FSDP's root hooks would otherwise not see)."""
    for name in ("hidden_at", "logits", "block_states"):
        original = getattr(backbone, name)

        def entry(*args, _original=original, **kwargs):
            state = root._get_fsdp_state()
            args, kwargs = state._pre_forward(root, args, kwargs)
            return state._post_forward(root, args, _original(*args, **kwargs))

        object.__setattr__(backbone, name, entry)


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """The mean of every rank's gradients, through one flat all_reduce (see the module docstring)."""
    replicated = [p for p in params if not is_dtensor(p)]
    if world_size == 1 or not replicated or not dist.is_initialized():
        return
    for p in replicated:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in replicated]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():  # fp32 trainables by policy; a bf16 run has its own buffer
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _state(method, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_state, optim_state = get_state_dict(method, optimizer, options=options)
    return {"model": model_state, "optim": optim_state}, options


def save_sharded(directory: str | Path, method, optimizer) -> None:
    """Collective: every rank calls it with the same directory (or its own, merged afterwards
    as Ray Train merges the files of a checkpoint reported by every worker)."""
    import torch.distributed.checkpoint as dcp

    state, _ = _state(method, optimizer)
    dcp.save(state, checkpoint_id=str(directory))


def load_sharded(directory: str | Path, method, optimizer) -> None:
    """Collective: the trainable state and optimiser state of `save_sharded`, resharded to the
    ranks present, loaded in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state, options = _state(method, optimizer)
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(method, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)
