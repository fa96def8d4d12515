"""The trajectory modules placed as adapters: same phases, rank schedule, sharing and modules as
`trajectory`, but inside every transformer block at the FFN output (Pfeiffer's placement: on the
output of the family's FFN output projection, BERT's `layer.output.dense`, before dropout,
residual and LayerNorm) instead of on the residual stream after chosen blocks.

    a_i(h) = h + (alpha / r_k) B_{i,k} A_{i,k} h,   k = phase(t), in every block i

Comparing it with `trajectory` (same `trajectory.*` knobs) separates the effect of the timestep
schedule from the effect of placement. `trajectory.injection_layers` is ignored: every block gets
a module. Everything else (phase routing, regularisers, saved names `injection.layer{i}...`)
is `TrajectoryMethod`'s own code.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from torch import nn

from ..backbone import Backbone
from ..errors import UserError
from .registry import MethodSpec
from .trajectory import TrajectoryMethod

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config


class TrajectoryAdapterMethod(TrajectoryMethod):
    name = "trajectory_adapter"

    def __init__(self, config: Config, backbone: Backbone):
        n_layers = len(backbone.layers)
        every = dataclasses.replace(config.trajectory, injection_layers=list(range(n_layers)))
        super().__init__(dataclasses.replace(config, trajectory=every), backbone)
        self.remove()  # drop the block-output hooks the parent registered ...
        for i in range(n_layers):  # ... and hook the FFN output projections (the family's names)
            target = backbone.block_module(i, backbone.family.ffn_output)
            if not isinstance(target, nn.Linear):
                raise UserError(f"method: trajectory_adapter: {backbone.family.ffn_output} in the "
                                f"{backbone.family.name} blocks is no nn.Linear")
            self._hooks.append(target.register_forward_hook(self._hook(f"layer{i}")))

    def context_free_blocks(self) -> int:
        return 0  # a module inside every block, the first included


# Reads the `trajectory.*` section, so it has no section of its own.
SPEC = MethodSpec(name="trajectory_adapter", method=TrajectoryAdapterMethod, order=7,
                  size_knob="trajectory.rank", clamped_to_knob=("trajectory.min_rank",),
                  lr_grid=(1e-3, 3e-3), tuning={"trajectory.num_phases": (2, 4), "trajectory.rank": (8, 16)})
