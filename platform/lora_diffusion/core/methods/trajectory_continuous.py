"""The continuous-t trajectory module as a method of its own: `trajectory` with
`t_conditioning=continuous`, one module for every t whose per-rank gates are a function of t,

    h' = h + (alpha / r) B (g(t) * A h),   g(t) = 1 + H(e(t)),  H's output zero at init

at the injection layers (noise_core.py: the hypernetwork and the choices it makes). A name of its
own so that the comparison and the grids have a row for it beside `trajectory` (rows are methods).
Its noise-agnostic twin is `trajectory` with one phase (`trajectory.num_phases: 1`), the single
module shared by every t: the same A and B, without the gates.

Per-rank gates, not NaRA's full r x r core: the trajectory module's rank is large (96 at the
comparison's budget on MiniLM), where an r x r output layer would cost 295k parameters, 4 times
the budget; gates cost r outputs (4,224 parameters at r = 96, 1,056 + 33 r).

It reads the `trajectory.*` section and builds the continuous form whatever the phase settings
say: `t_conditioning` continuous, one phase, sharing per_phase, constant rank (trajectory.rank)
are what it runs, and what its checkpoint's config records (`saved_settings`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..backbone import Backbone
from .registry import MethodSpec
from .trajectory import TrajectoryMethod

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config

# The settings the continuous form runs with: the `trajectory.*` values it replaces.
CONTINUOUS = {"t_conditioning": "continuous", "num_phases": 1, "phase_boundaries": None,
              "sharing": "per_phase", "rank_schedule": "constant"}


class TrajectoryContinuousMethod(TrajectoryMethod):
    name = "trajectory_continuous"

    def __init__(self, config: Config, backbone: Backbone):
        continuous = dataclasses.replace(config.trajectory, **CONTINUOUS)
        super().__init__(dataclasses.replace(config, trajectory=continuous), backbone)

    def saved_settings(self) -> dict[str, object]:
        return {f"trajectory.{k}": v for k, v in CONTINUOUS.items()}


# Reads the `trajectory.*` section, so it has no section of its own. Rates and knobs: the
# trajectory method's (the same module, plus the gates), without the phase count it does not have.
SPEC = MethodSpec(name="trajectory_continuous", method=TrajectoryContinuousMethod, order=19,
                  size_knob="trajectory.rank", clamped_to_knob=("trajectory.min_rank",), lr_grid=(5e-3, 1e-2),
                  comparison_sets={"trajectory.t_conditioning": "continuous", "trajectory.num_phases": 1},
                  tuning={"trajectory.injection_layers": ([2], [-1]), "trajectory.rank": (16, 48)})
