"""Parameter accounting: one function for every method, agreeing with the saved file to the byte."""

from __future__ import annotations

from collections import defaultdict

from .checkpoint_files import serialize
from .sharding import is_dtensor


def count(method) -> dict:
    """`account`'s counts without writing the file: what a method on the meta device (the memory
    plan, core/memory_plan.py) or an 8B full fine-tuning (a 32 GB serialisation) can afford."""
    tensors = method.state_to_save()
    per_module: dict[str, int] = defaultdict(int)
    for name, tensor in tensors.items():
        per_module[name.rsplit(".", 1)[0]] += tensor.numel()
    params = sum(t.numel() for t in tensors.values())
    return {
        "trainable_params": params,
        "trained_params": sum(p.numel() for p in method.trainable().values()),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "percent_of_backbone": 100.0 * params / method.backbone_params,
        "backbone_params": method.backbone_params,
        "per_module": dict(per_module),
        **method.accounting_extras(),
    }


def account(method) -> dict:
    """Trainable parameters, bytes as saved, percent of the backbone, per-module breakdown.

    Counts come from `state_to_save()`, the same tensors the checkpoint holds, and the byte
    count is the length of the serialized file itself. `trained_params` counts what the
    optimiser updates: the same number, except for a method that trains through a
    reparameterisation it does not save (prefix tuning's MLP, `prefix.save: prefix`). A method
    may add figures of its own (`Method.accounting_extras`, e.g. SeLoRA's active size)."""
    counts = count(method)
    # an FSDP-sharded method (core/sharding.py) is saved as DCP shards, not one file: its bytes
    sharded = any(is_dtensor(t) for t in method.state_to_save().values())
    saved = counts["tensor_bytes"] if sharded else len(serialize(method))
    return {"trainable_params": counts.pop("trainable_params"), "bytes_saved": saved, **counts}
