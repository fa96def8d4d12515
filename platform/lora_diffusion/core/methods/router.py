"""Router composition: several trained task modules mixed by softmax weights from the prompt.

    h' = h + sum_m w_m(c) * Delta_m(h, t),   w(c) = softmax(W pool(h_prompt) + b)

Each expert is the trajectory modules of one trained checkpoint (`router.checkpoints`), loaded
and frozen; only the router (W, b) trains. A task-conditioned expert is run with the task id it
was trained with (its `trajectory.task_id`): the router is there because a sample's task is not
given, and each expert's gains are its own task's. An expert applies only to the backbone it was trained
on: its backbone.json fingerprint must be this backbone's. The router reads the prompt, mean-pooled at the first
injection layer, so it can tell tasks apart without being told which task a sample is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backbone import Backbone, backbone_fingerprint
from ..checkpoint_files import read_files
from ..errors import UserError
from .base import Method
from .registry import MethodSpec
from .trajectory import TrajectoryConfig, _replace_hidden, build_injection
from .trajectory import validate as validate_trajectory

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config


@dataclass
class RouterConfig:
    """Router composition of trained trajectory checkpoints (method: router)."""

    checkpoints: list[str] = field(default_factory=list)  # two or more trajectory checkpoint dirs


def read_expert(path: str, fingerprint: str) -> tuple[TrajectoryConfig, int, dict[str, torch.Tensor]]:
    """(trajectory settings, sampler steps, tensors) of a trained trajectory checkpoint made on
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
    except (KeyError, TypeError) as exc:
        raise UserError(f"field router.checkpoints: {path}/config.json is not a resolved config: {exc}") from None
    validate_trajectory(tc)
    return tc, sampler_steps, tensors


class TrajectoryRouter(Method):
    name = "router"

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__(config, backbone)
        paths = config.router.checkpoints
        if len(paths) < 2:
            raise UserError("field router.checkpoints: needs at least two trained trajectory checkpoints")
        self.experts = nn.ModuleList()
        self.edges: list[torch.Tensor] = []
        self.task_ids: list[int | None] = []  # each expert's own task id (None: not conditioned)
        layer_sets, fingerprint = set(), backbone_fingerprint(backbone)
        for path in paths:
            tc, sampler_steps, tensors = read_expert(path, fingerprint)
            layers, bounds, _, modules = build_injection(tc, sampler_steps, backbone)
            prefix = "injection."
            modules.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()})
            modules.requires_grad_(False)  # experts stay frozen; only the router trains
            self.experts.append(modules)
            self.edges.append(torch.tensor(bounds[1:-1]))
            self.task_ids.append(tc.task_id if tc.num_tasks else None)
            layer_sets.add(tuple(layers))
        if len(layer_sets) != 1:
            raise UserError("field router.checkpoints: the experts inject at different layers")
        self.layers = list(layer_sets.pop())
        self.router = nn.Linear(backbone.hidden_size, len(paths))
        nn.init.zeros_(self.router.weight)  # start from the uniform mixture
        nn.init.zeros_(self.router.bias)
        self._weights: torch.Tensor | None = None
        self._hooks = [backbone.layers[i].register_forward_hook(self._hook(i)) for i in self.layers]

    def mixture(self, h: torch.Tensor) -> torch.Tensor:
        """Softmax weights [B, M] from the prompt, mean-pooled (all tokens if no prompt mask)."""
        mask = self.context.prompt_mask
        mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if mask is None else mask
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return torch.softmax(self.router(pooled), dim=-1)

    def _hook(self, index: int):
        key = f"layer{index}"

        def hook(_module, _inputs, output):
            if self.context is None:
                return output

            def apply(h):
                if index == self.layers[0]:  # weights come from the first injection layer
                    self._weights = self.mixture(h)
                delta = torch.zeros_like(h)
                for m, (expert, edges, c) in enumerate(zip(self.experts, self.edges, self.task_ids)):
                    phase = torch.bucketize(self.context.t, edges.to(h.device), right=False)
                    ids = None if c is None else torch.full_like(phase, c)
                    delta = delta + self._weights[:, m, None, None] * expert[key].delta(h, phase, ids)
                return h + delta
            return _replace_hidden(output, apply)
        return hook


# Composes trained experts, so it is not in the baseline comparison (no learning-rate grid).
SPEC = MethodSpec(name="router", method=TrajectoryRouter, order=8, section=RouterConfig)
