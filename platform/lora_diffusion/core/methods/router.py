"""Router composition: several trained task modules superposed with per-sample weights.

    h' = h + sum_m w_m(x, t) * Delta_m(h, t)

Each expert is the trajectory modules of one trained checkpoint (`router.checkpoints`), loaded
and frozen. A task-conditioned expert is run with the task id it was trained with (its
`trajectory.task_id`): the router is there because a sample's task is not given, and each
expert's gains are its own task's. An expert applies only to the backbone it was trained on:
its backbone.json fingerprint must be this backbone's. Where the weights w come from is
`router.mode` (routing.py computes them, at the first injection layer, from its input h):

  trained  softmax(W pool(h_prompt) + b): only (W, b) train, on the task mixture of
           `router.train_tasks` (the recipe mixes those tasks' training rows); no task id is read
  uniform  1 / M for every expert: nothing trains
  oracle   one-hot on the expert trained on the sample's true task (Context.task_ids against
           each expert's saved `trajectory.task_id`): the upper bound of routing; nothing trains
  energy   softmax over each expert's output energy on the prompt (routing.energy_weights),
           after EST-LoRA's training-free fusion; nothing trains

Training-free modes have no trainable tensors: the recipe evaluates them as built and runs no
steps (Recipe.run). Each forward with task ids counts whether the largest weight sits on the
expert of the sample's task (`routing_counts`): the routing accuracy composition reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backbone import Backbone, backbone_fingerprint
from ..checkpoint_files import read_files
from ..errors import UserError, check, check_one_of
from ..task_specs import TASKS
from .base import Method
from .registry import MethodSpec
from .routing import MODES, energy_weights, oracle_weights, routed_correctly
from .trajectory import TrajectoryConfig, _replace_hidden, build_injection, validate as validate_trajectory

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config


@dataclass
class RouterConfig:
    """Router composition of trained trajectory checkpoints (method: router)."""

    checkpoints: list[str] = field(default_factory=list)  # two or more trajectory checkpoint dirs
    mode: str = "trained"  # trained | uniform | oracle | energy: where the weights come from
    # trained: tasks whose training rows are mixed to train the router (empty: the run's task)
    train_tasks: list[str] = field(default_factory=list)
    energy_temperature: float = 1.0  # energy: w = softmax(E / temperature)


def validate(rc: RouterConfig) -> None:
    check_one_of(rc.mode, MODES, "router.mode")
    check(rc.energy_temperature > 0, "router.energy_temperature", "must be > 0")
    for task in rc.train_tasks:
        check_one_of(task, tuple(TASKS), "router.train_tasks")
    check(not rc.train_tasks or rc.mode == "trained", "router.train_tasks",
          f"only the trained router trains; mode {rc.mode!r} runs no steps")


def read_expert(path: str, fingerprint: str) -> tuple[TrajectoryConfig, int, str, dict[str, torch.Tensor]]:
    """(trajectory settings, sampler steps, task, tensors) of a trained trajectory checkpoint made on
    the backbone with this `fingerprint`. Its config.json is a resolved, validated Config, read
    here section by section: the router sits below config, which builds its sections from the
    methods."""
    data, tensors, meta = read_files(path)
    method = data.get("method")
    if method != "trajectory":
        raise UserError(f"field router.checkpoints: {path} holds method '{method}', not trajectory")
    if meta.get("backbone_fingerprint") != fingerprint:
        raise UserError(f"field router.checkpoints: {path} was trained on another backbone "
                        f"(fingerprint {meta.get('backbone_fingerprint')}, this backbone {fingerprint})")
    try:
        tc = TrajectoryConfig(**data["trajectory"])
        sampler_steps = int(data["diffusion"]["sampler_steps"])
        task = str(data["task"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"field router.checkpoints: {path}/config.json is not a resolved config: {exc}") from None
    validate_trajectory(tc)
    if tc.t_conditioning != "phase":  # its gates' hypernetwork is no part of the injection modules
        raise UserError(f"field router.checkpoints: {path} is a continuous-t trajectory module "
                        f"(trajectory.t_conditioning={tc.t_conditioning}); the router composes phase modules")
    return tc, sampler_steps, task, tensors


class TrajectoryRouter(Method):
    name = "router"

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__(config, backbone)
        rc = config.router
        if len(rc.checkpoints) < 2:
            raise UserError("field router.checkpoints: needs at least two trained trajectory checkpoints")
        self.mode, self.temperature = rc.mode, rc.energy_temperature
        self.experts = nn.ModuleList()
        self.edges: list[torch.Tensor] = []
        self.boundaries: list[float] = [0.0, 1.0]  # every expert's phase edges (phase_boundaries)
        self.task_ids: list[int | None] = []  # the id each expert runs with (None: not conditioned)
        self.expert_task_ids: list[int] = []  # each expert's saved trajectory.task_id: its task
        self.task_id_by_task: dict[str, int] = {}  # rows of an expert's task carry its id (recipe)
        self._load_experts(rc.checkpoints, backbone)
        self.distinct_tasks = len(set(self.expert_task_ids)) == len(self.expert_task_ids)
        check(self.distinct_tasks or self.mode != "oracle", "router.checkpoints",
              f"the oracle needs one expert per task, but their trajectory.task_id are {self.expert_task_ids}")
        # only the trained mode has a router to train; the others have no trainable tensor
        self.router = nn.Linear(backbone.hidden_size, len(self.experts)) if self.mode == "trained" else None
        if self.router is not None:
            nn.init.zeros_(self.router.weight)  # start from the uniform mixture
            nn.init.zeros_(self.router.bias)
        self._weights: torch.Tensor | None = None
        self.routing_counts = [0, 0]  # (forwards x rows) routed to their task's expert, of all counted
        self._hooks = [backbone.layers[i].register_forward_hook(self._hook(i)) for i in self.layers]

    def _load_experts(self, paths: list[str], backbone: Backbone) -> None:
        layer_sets, fingerprint = set(), backbone_fingerprint(backbone)
        for path in paths:
            tc, sampler_steps, task, tensors = read_expert(path, fingerprint)
            layers, bounds, _, modules = build_injection(tc, sampler_steps, backbone)
            prefix = "injection."
            modules.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()})
            modules.requires_grad_(False)  # experts stay frozen; only the router trains
            self.experts.append(modules)
            self.edges.append(torch.tensor(bounds[1:-1]))
            self.boundaries = sorted(set(self.boundaries) | {float(b) for b in bounds})
            self.task_ids.append(tc.task_id if tc.num_tasks else None)
            self.expert_task_ids.append(tc.task_id)
            self.task_id_by_task.setdefault(task, tc.task_id)
            layer_sets.add(tuple(layers))
        if len(layer_sets) != 1:
            raise UserError("field router.checkpoints: the experts inject at different layers")
        self.layers = list(layer_sets.pop())

    def phase_boundaries(self) -> list[float]:
        """The union of the experts' phase edges: evaluation stratifies t over them, so each expert
        is scored at the t its own evaluation uses (experts of equal phases: exactly those t, and
        the oracle's figures are its expert's)."""
        return list(self.boundaries)

    def _prompt_mask(self, h: torch.Tensor) -> torch.Tensor:
        mask = self.context.prompt_mask
        return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if mask is None else mask

    def mixture(self, h: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
        """Weights [B, M], rows summing to one, by `router.mode` (module docstring), from the
        first injection layer's input h and each expert's perturbation `deltas` of it."""
        mask = self._prompt_mask(h)
        if self.mode == "uniform":
            return torch.full((h.shape[0], len(self.experts)), 1.0 / len(self.experts), device=h.device)
        if self.mode == "oracle":
            return oracle_weights(self.context.task_ids, self.expert_task_ids).to(h.device)
        if self.mode == "energy":
            return energy_weights(deltas, mask, self.temperature)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return torch.softmax(self.router(pooled), dim=-1)

    def _count_routing(self, weights: torch.Tensor) -> None:
        ids = self.context.task_ids
        if ids is None or not self.distinct_tasks:
            return
        correct = routed_correctly(weights, ids, self.expert_task_ids)
        self.routing_counts[0] += int(correct.sum())
        self.routing_counts[1] += int(correct.numel())

    def routing_accuracy(self) -> float:
        """Share of counted (forward, row) pairs whose largest weight is on their task's expert."""
        right, total = self.routing_counts
        return right / total if total else float("nan")

    def _deltas(self, key: str, h: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for expert, edges, c in zip(self.experts, self.edges, self.task_ids):
            phase = torch.bucketize(self.context.t, edges.to(h.device), right=False)
            ids = None if c is None else torch.full_like(phase, c)
            out.append(expert[key].delta(h, phase, ids))
        return out

    def _hook(self, index: int):
        key = f"layer{index}"

        def hook(_module, _inputs, output):
            if self.context is None:
                return output

            def apply(h):
                deltas = self._deltas(key, h)
                if index == self.layers[0]:  # weights come from the first injection layer
                    self._weights = self.mixture(h, deltas)
                    self._count_routing(self._weights)
                w = self._weights
                return h + sum(w[:, m, None, None] * d for m, d in enumerate(deltas))
            return _replace_hidden(output, apply)
        return hook


# Composes trained experts, so it is not in the baseline comparison (no learning-rate grid).
SPEC = MethodSpec(name="router", method=TrajectoryRouter, order=8, section=RouterConfig, validate=validate)
