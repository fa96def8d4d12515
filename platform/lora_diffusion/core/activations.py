"""The memory of a training step's activations: block checkpointing and chunked logits.

Activation checkpointing (`train.gradient_checkpointing`). Each of the backbone's blocks (the
family's declared ModuleList) runs under `torch.utils.checkpoint` (non-reentrant): its inner
activations are dropped after the forward and recomputed in backward. Why not transformers'
`gradient_checkpointing_enable`: it is opt-in per model class (LLaDA's remote code has its own
strategies, MDLM none), and it recomputes a block without our method's Context: `Recipe.denoise`
clears the Context when the forward returns, so a hook inside the block (PEFT-free weight methods:
T-LoRA, FouRA, NaRA) would recompute as if no t were given and silently produce other gradients.
Here the wrapper captures the Context of the forward and restores it for the recomputation. A
method hook on the block's own output (trajectory modules) runs outside the checkpointed call,
as any forward hook does, and keeps its activations.

Chunked logits. The loss needs the logits only at masked response positions; a separable head
(`Backbone.head_separable`) is applied to those hidden states in chunks of
`train.logits_chunk_rows`, and with more than one chunk each chunk's logits are recomputed in
backward, so at most one chunk of [rows, vocabulary] logits is alive (LLaDA: 126,464 words; its
full-batch logits at 32 x 2048 would be 15.4 GiB in bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHECKPOINTED = "_lora_diffusion_checkpointed"  # marks a block whose forward is wrapped here


def checkpoint_blocks(blocks, method) -> None:
    """Wrap each block's forward in a checkpoint that recomputes it under the forward's Context."""
    for block in blocks:
        if getattr(block, CHECKPOINTED, False):
            continue
        block.forward = _checkpointed(block.forward, method)  # an instance attribute: hooks run around it
        setattr(block, CHECKPOINTED, True)


def _checkpointed(forward, method):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing is kept for a backward anyway
            return forward(*args, **kwargs)
        context = method.context

        def recompute(*a, **kw):
            outer = method.context
            method.set_context(context)  # the forward's t and task ids, also in backward
            try:
                return forward(*a, **kw)
            finally:
                method.set_context(outer)
        return checkpoint(recompute, *args, use_reentrant=False, **kwargs)
    return run


def _chunk_loss(head, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    ce = F.cross_entropy(logits, targets, reduction="none")
    return ce, (logits.argmax(-1) == targets).sum()


def cross_entropy_at(head, hidden: torch.Tensor, targets: torch.Tensor,
                     rows_per_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy [N] of `head(hidden)` against `targets`, and how many argmax
    predictions are right, the head run on at most `rows_per_chunk` rows at a time."""
    if hidden.shape[0] <= rows_per_chunk:
        return _chunk_loss(head, hidden, targets)
    ces, right = [], 0
    for i in range(0, hidden.shape[0], rows_per_chunk):
        h, y = hidden[i:i + rows_per_chunk], targets[i:i + rows_per_chunk]
        if torch.is_grad_enabled():
            ce, ok = checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
        else:
            ce, ok = _chunk_loss(head, h, y)
        ces.append(ce)
        right = right + ok
    return torch.cat(ces), right
