"""The router's training-free weights and its routing check (router.py), as plain functions of
tensors so each can be checked against its definition.

Energy routing follows EST-LoRA (Zhang & Xiong, "Subject or Style: Adaptive and Training-Free
Mixture of LoRAs", arXiv:2508.02165, 2025), which weighs LoRA modules at inference by their
energy, with no training. Their energy is the norm of a module's weight update; a trajectory
module's update acts on hidden states, so here the energy of expert m on sample b is the mean
L2 norm of its perturbation over the prompt's positions P_b, at the first injection layer:

    E_bm = (1 / |P_b|) sum_{i in P_b} || Delta_m(h_bi, t_b) ||_2      w_b = softmax(E_b / tau)

The prompt, not the response, because the response is (partly) masked noise while sampling and
the prompt is what says which task a sample is; tau is `router.energy_temperature`. Larger
energy, more weight: a module that moves the hidden states of this input more is taken to be
the one trained on inputs like it. The scale of E depends on the experts' norms, so tau matters
(small tau approaches argmax, large tau uniform).
"""

from __future__ import annotations

import torch

from ..errors import UserError

MODES = ("trained", "uniform", "oracle", "energy")


def expert_energies(deltas: list[torch.Tensor], prompt_mask: torch.Tensor) -> torch.Tensor:
    """E [B, M]: each expert's mean perturbation norm over the prompt positions (all positions
    of a row without any)."""
    mask = prompt_mask.float()
    count = mask.sum(1).clamp(min=1)
    norms = torch.stack([d.norm(dim=-1) for d in deltas], dim=-1)  # [B, S, M]
    return (norms * mask[..., None]).sum(1) / count[:, None]


def energy_weights(deltas: list[torch.Tensor], prompt_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(expert_energies(deltas, prompt_mask) / temperature, dim=-1)


def oracle_weights(task_ids: torch.Tensor | None, expert_task_ids: list[int]) -> torch.Tensor:
    """One-hot [B, M] on the expert whose task id is the row's true task id."""
    if task_ids is None:
        raise ValueError("the oracle router needs Context.task_ids (each row's true task)")
    experts = torch.tensor(expert_task_ids, device=task_ids.device)
    hits = task_ids[:, None] == experts[None, :]  # [B, M]
    missing = sorted(set(task_ids[~hits.any(1)].tolist()))
    if missing:
        raise UserError(f"field router.mode: oracle: no expert was trained on task id {missing[0]} "
                        f"(the experts' trajectory.task_id: {expert_task_ids})")
    return hits.float()


def routed_correctly(weights: torch.Tensor, task_ids: torch.Tensor, expert_task_ids: list[int]) -> torch.Tensor:
    """[B] bool: the largest weight is on the expert of the row's task."""
    experts = torch.tensor(expert_task_ids, device=weights.device)
    return experts[weights.argmax(-1)] == task_ids.to(weights.device)
