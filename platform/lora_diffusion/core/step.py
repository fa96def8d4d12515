"""One training step's forward and backward, on any device and in any precision policy.

Shared by `Recipe` and by what runs a method without a task's data (the GPU check,
experiments/bench/gpu.py). `model` is anything with `method`, `backbone`, `precision` (a resolved
policy, core/precision.py) and `device`: the Recipe itself, or `StepModel`.

- `denoise`: the backbone run with the method told t (the Context), under the policy's autocast;
  logits at the selected positions, or the hidden states the head reads.
- `loss_backward`: the step's loss over the masked tokens, backpropagated one micro-batch at a
  time; the draws and weights are the whole batch's, so the accumulated gradient is the whole
  batch's (`train.micro_batch_size`). The head runs in chunks where it is separable
  (core/activations.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import activations, diffusion, precision
from .methods import Context, build_method


@dataclass
class StepModel:
    """A method on its backbone, with the policy and device a step runs in."""

    method: torch.nn.Module
    backbone: object  # core.backbone.Backbone
    precision: str
    device: torch.device


def attach(config, backbone, policy: str, device: torch.device) -> torch.nn.Module:
    """The run's method on its backbone, as every run builds it: the frozen weights cast by the
    policy and moved to `device`, the method built there under the run's autocast (its set-up may
    run the backbone: GeLoRA, prefix tuning's init from words), its trainable tensors in the
    policy's dtype, the blocks checkpointed if `train.gradient_checkpointing`."""
    precision.cast_backbone(backbone.model, policy)
    backbone.model.to(device)
    with precision.autocast(policy, device):
        method = build_method(config, backbone).to(device)
    precision.cast_trainable(method, policy)  # fp32 (bf16: bf16); the optimizer's state follows
    if config.train.gradient_checkpointing:
        activations.checkpoint_blocks(backbone.layers, method)
    return method


def denoise(model, input_ids, attention_mask, select, t, prompt_mask=None, task_ids=None,
            hidden: bool = False) -> torch.Tensor:
    """Logits [N, V] at the `select` positions, the method told t (and the rows' prompt positions
    and task ids); with `hidden`, the hidden states the head reads ([N, H], a separable head only),
    for the loss to apply the head in chunks."""
    t = t.to(model.device)
    model.method.set_context(Context(t=t, prompt_mask=prompt_mask, task_ids=task_ids))
    try:
        with precision.autocast(model.precision, model.device):
            run = model.backbone.hidden_at if hidden else model.backbone.logits
            return run(input_ids, attention_mask, select, t)
    finally:
        model.method.set_context(None)


def masked_cross_entropy(model, batch: diffusion.Batch, noise: diffusion.Noise,
                         chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token CE at the masked positions and the count predicted right."""
    targets = batch.input_ids[noise.masked]
    args = (noise.noisy, batch.attention_mask, noise.masked, noise.t, batch.prompt_mask, batch.task_ids)
    if not model.backbone.head_separable:  # MDLM: the output layer needs the time embedding
        logits = denoise(model, *args).float()
        return F.cross_entropy(logits, targets, reduction="none"), (logits.argmax(-1) == targets).sum()
    hidden = denoise(model, *args, hidden=True)
    with precision.autocast(model.precision, model.device):
        return activations.cross_entropy_at(model.backbone.head, hidden, targets, chunk_rows)


def loss_backward(model, batch: diffusion.Batch, noise: diffusion.Noise, weights: torch.Tensor,
                  micro_batch_size: int | None, chunk_rows: int) -> tuple[torch.Tensor, float]:
    """The loss sum(weight * CE) / B over the masked tokens, backpropagated by micro-batches of
    `micro_batch_size` rows (None: one); returns it and the masked-token accuracy."""
    B = batch.input_ids.shape[0]
    size = micro_batch_size or B
    ends = [0, *noise.masked.sum(1).cumsum(0).tolist()]  # masked tokens before each row
    loss, right = torch.zeros((), device=model.device), 0
    for lo in range(0, B, size):
        hi = min(lo + size, B)
        part, part_noise = diffusion.micro_batch(batch, noise, lo, hi)
        ce, ok = masked_cross_entropy(model, part, part_noise, chunk_rows)
        part_loss = (weights[ends[lo]:ends[hi]] * ce).sum() / B
        part_loss.backward()
        loss, right = loss + part_loss.detach(), right + ok
    return loss, float(right) / max(ends[-1], 1)
