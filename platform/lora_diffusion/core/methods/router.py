"""Router composition: several trained task modules mixed by softmax weights from the prompt.

    h' = h + sum_m w_m(c) * Delta_m(h, t),   w(c) = softmax(W pool(h_prompt) + b)

Each expert is the trajectory modules of one trained checkpoint (`router.checkpoints`), loaded
and frozen; only the router (W, b) trains. The router reads the prompt, mean-pooled at the first
injection layer, so it can tell tasks apart without being told which task a sample is.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbone import Backbone
from ..checkpoint import read as read_checkpoint
from ..config import Config
from ..errors import UserError
from .base import Method
from .trajectory import _replace_hidden, build_injection


class TrajectoryRouter(Method):
    name = "router"

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__(config, backbone)
        paths = config.router.checkpoints
        if len(paths) < 2:
            raise UserError("field router.checkpoints: needs at least two trained trajectory checkpoints")
        self.experts = nn.ModuleList()
        self.edges: list[torch.Tensor] = []
        layer_sets = set()
        for path in paths:
            ck_config, tensors, _ = read_checkpoint(path)
            if ck_config.method != "trajectory":
                raise UserError(f"field router.checkpoints: {path} holds method '{ck_config.method}', "
                                f"not trajectory")
            layers, bounds, _, modules = build_injection(ck_config.trajectory,
                                                         ck_config.diffusion.sampler_steps, backbone)
            prefix = "injection."
            modules.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()})
            modules.requires_grad_(False)  # experts stay frozen; only the router trains
            self.experts.append(modules)
            self.edges.append(torch.tensor(bounds[1:-1]))
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
                for m, (expert, edges) in enumerate(zip(self.experts, self.edges)):
                    phase = torch.bucketize(self.context.t, edges.to(h.device), right=False)
                    delta = delta + self._weights[:, m, None, None] * expert[key].delta(h, phase, None)
                return h + delta
            return _replace_hidden(output, apply)
        return hook
