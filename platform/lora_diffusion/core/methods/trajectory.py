"""LoRA-Diffusion trajectory modules: low-rank perturbations of the hidden states, by timestep.

    h' = h + (alpha / r_k) * B_k A_k h        k = phase(t), B_k initialised to zero

at each injection layer (a forward hook on that transformer block). Sharing modes:
  per_phase  one (A_k, B_k) per phase, rank r_k from the rank schedule
  shared     one (A, B) of rank r_max whose active rank is masked to r_k = schedule(phase(t))
  per_step   one module per sampler step (per_phase with one uniform phase per step)
`t_conditioning: continuous` instead makes one module for every t whose per-rank gates are a
small function of an embedding of t, h' = h + (alpha / r) B (g(t) * A h), g(t) = 1 at init, one
hypernetwork for every injection layer (noise_core.py): NaRA's question asked of hidden states.
Optional task conditioning A(c) = diag(g_c) A with a learned gain per task (init 1), and a
router that mixes several trained task modules (`TrajectoryRouter`). A run's examples carry its
`trajectory.task_id` (the recipe puts it in every batch and hence every Context); conditioned
modules refuse a forward without task ids rather than guess one.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backbone import Backbone
from ..errors import UserError, check, check_one_of
from .base import Method
from .noise_core import DEFAULT_EMBED_DIM, DEFAULT_HIDDEN, NoiseCore, check_continuous, gated_delta, one_row_if_uniform
from .registry import MethodSpec

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config

RANK_SCHEDULES = ("constant", "linear", "cosine", "step", "reversed")
SHARING_MODES = ("per_phase", "shared", "per_step")
T_CONDITIONING = ("phase", "continuous")


@dataclass
class TrajectoryConfig:
    """LoRA-Diffusion: h' = h + (alpha / r_k) B_k A_k h at the injection layers, k = phase(t)."""

    rank: int = 8  # r_max: the largest rank any phase gets
    min_rank: int = 1  # r_min for the non-constant schedules (0 = that phase owns no module)
    alpha: float = 16.0
    num_phases: int = 4  # uniform phases over (0, 1] unless phase_boundaries is given
    phase_boundaries: list[float] | None = None  # e.g. [0, 0.3, 1.0]; must cover (0, 1]
    rank_schedule: str = "constant"  # how r_k varies with t; "reversed" = less rank at high noise
    step_threshold: float = 0.5  # "step" schedule: r_min below this t, r_max above
    sharing: str = "per_phase"  # per_phase | shared (one module, rank masked by t) | per_step
    # Layers whose output is perturbed (0-based; -1 = last hidden state). The default, one
    # residual after the middle layer, is chosen by measurement: see README "Default injection".
    injection_layers: list[int] = field(default_factory=lambda: [2])
    num_tasks: int = 0  # > 0 enables task conditioning A(c) with that many task ids
    # This run's task id c (< num_tasks). A field, not derived from the task name: it is saved
    # in config.json, so a router gives each expert the id it was trained with, and ids stay put
    # when tasks are added to the code.
    task_id: int = 0
    nuclear_weight: float = 0.0  # weight of sum_k ||B_k A_k||_*
    orth_weight: float = 0.0  # weight of sum_k ||A_k A_k^T - I||_F^2
    init_std: float | None = None  # std of A's init; default 1/sqrt(hidden)
    # phase: modules chosen by phase(t); continuous: one module gated by g(t) (num_phases 1)
    t_conditioning: str = "phase"


def validate(tc: TrajectoryConfig) -> None:
    check_one_of(tc.rank_schedule, RANK_SCHEDULES, "trajectory.rank_schedule")
    check_one_of(tc.sharing, SHARING_MODES, "trajectory.sharing")
    check_one_of(tc.t_conditioning, T_CONDITIONING, "trajectory.t_conditioning")
    if tc.t_conditioning == "continuous":
        check_continuous(tc)
    check(tc.rank >= 1, "trajectory.rank", f"must be >= 1, got {tc.rank}")
    check(0 <= tc.min_rank <= tc.rank, "trajectory.min_rank", "must lie in [0, rank]")
    check(tc.num_phases >= 1, "trajectory.num_phases", "must be >= 1")
    check(tc.alpha > 0, "trajectory.alpha", "must be > 0")
    check(0 < tc.step_threshold < 1, "trajectory.step_threshold", "must lie in (0, 1)")
    check(tc.num_tasks >= 0, "trajectory.num_tasks", "must be >= 0")
    check(tc.task_id >= 0 and (tc.num_tasks == 0 or tc.task_id < tc.num_tasks), "trajectory.task_id",
          f"must lie in [0, trajectory.num_tasks) = [0, {tc.num_tasks}), got {tc.task_id}")
    check(tc.nuclear_weight >= 0, "trajectory.nuclear_weight", "must be >= 0")
    check(tc.orth_weight >= 0, "trajectory.orth_weight", "must be >= 0")
    check(len(tc.injection_layers) >= 1, "trajectory.injection_layers", "needs at least one layer")
    if tc.phase_boundaries is not None:
        b = tc.phase_boundaries
        covers = len(b) >= 2 and math.isclose(b[0], 0.0) and math.isclose(b[-1], 1.0)
        increasing = all(x < y for x, y in zip(b, b[1:]))
        check(covers and increasing, "trajectory.phase_boundaries",
              f"must start at 0, end at 1 and increase strictly to cover (0, 1]; got {b}")


def phase_boundaries(tc: TrajectoryConfig, sampler_steps: int) -> list[float]:
    """Edges of the phases over (0, 1]: given, uniform, or one per sampler step."""
    if tc.sharing == "per_step":
        n = sampler_steps
        return [i / n for i in range(n + 1)]
    if tc.phase_boundaries is not None:
        return list(tc.phase_boundaries)
    return [i / tc.num_phases for i in range(tc.num_phases + 1)]


def rank_schedule(tc: TrajectoryConfig, boundaries: list[float]) -> list[int]:
    """r_k per phase, phases ordered by t. Increasing schedules give more rank at high noise
    (the paper); `reversed` gives less (T-LoRA). min_rank 0 leaves a phase without a module."""
    K = len(boundaries) - 1
    lo, hi = tc.min_rank, tc.rank
    ranks = []
    for k in range(K):
        s = k / (K - 1) if K > 1 else 1.0  # position of the phase, 0 at low t, 1 at high t
        mid = 0.5 * (boundaries[k] + boundaries[k + 1])
        if tc.rank_schedule == "constant":
            r = hi
        elif tc.rank_schedule == "linear":
            r = lo + (hi - lo) * s
        elif tc.rank_schedule == "reversed":
            r = hi - (hi - lo) * s
        elif tc.rank_schedule == "cosine":
            r = lo + (hi - lo) * 0.5 * (1 - math.cos(math.pi * s))
        elif tc.rank_schedule == "step":
            r = hi if mid >= tc.step_threshold else lo
        else:
            raise UserError(f"field trajectory.rank_schedule: unknown value {tc.rank_schedule!r}")
        ranks.append(int(round(r)))
    return ranks


def nuclear_norm_lowrank(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """||B A||_* without an SVD of a d x d matrix: with A^T = Q_A R_A (Q_A orthonormal columns),
    B A = (B R_A^T) Q_A^T, so the singular values of B A are those of the d x r factor B R_A^T.

    B is not QR-factorised too (which would leave an r x r core) because B starts at zero, and
    the QR backward of a rank-deficient matrix is NaN; the d x r SVD costs O(d r^2)."""
    _, r_a = torch.linalg.qr(A.T)
    return torch.linalg.svdvals(B @ r_a.T).sum()


def orthogonality(A: torch.Tensor) -> torch.Tensor:
    """||A A^T - I||_F^2: zero when the rows of A are orthonormal."""
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return ((A @ A.T - eye) ** 2).sum()


class LowRank(nn.Module):
    """One (A, B) pair: A [r, d] random, B [d, r] zero, so the module starts as the identity."""

    def __init__(self, hidden: int, rank: int, init_std: float, num_tasks: int):
        super().__init__()
        self.rank = rank
        self.A = nn.Parameter(torch.randn(rank, hidden) * init_std)
        self.B = nn.Parameter(torch.zeros(hidden, rank))
        # task conditioning A(c) = diag(g_c) A; g starts at 1 so conditioning starts neutral
        self.task_gain = nn.Parameter(torch.ones(num_tasks, rank)) if num_tasks else None

    def down(self, h: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        z = h @ self.A.to(h.dtype).T  # [n, S, r], in the activation's dtype (fp32 A on a bf16 backbone)
        if self.task_gain is not None:
            if task_ids is None:  # a silent default id would make conditioning a no-op
                raise ValueError("a task-conditioned trajectory module needs Context.task_ids")
            z = z * self.task_gain[task_ids][:, None, :].to(z.dtype)
        return z

    def up(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.B.to(z.dtype).T


class TrajectoryLayer(nn.Module):
    """The modules of one injection layer."""

    def __init__(self, tc: TrajectoryConfig, hidden: int, ranks: list[int]):
        super().__init__()
        std = tc.init_std if tc.init_std is not None else 1.0 / math.sqrt(hidden)
        self.alpha = tc.alpha
        self.shared = tc.sharing == "shared"
        self.register_buffer("ranks", torch.tensor(ranks), persistent=False)
        if self.shared:
            self.module = LowRank(hidden, max(ranks), std, tc.num_tasks)
        else:
            self.phases = nn.ModuleDict({
                f"phase{k}": LowRank(hidden, r, std, tc.num_tasks) for k, r in enumerate(ranks) if r > 0
            })

    def delta(self, h: torch.Tensor, phase: torch.Tensor, task_ids, gates=None) -> torch.Tensor:
        if gates is not None:  # continuous t: the one module, gated by g(t)
            mod = self.phases["phase0"]
            return gated_delta(mod, h, gates, task_ids, self.alpha / mod.rank)
        if self.shared:
            r = self.ranks[phase]  # active rank of each sample [B]
            z = self.module.down(h, task_ids)
            keep = torch.arange(z.shape[-1], device=z.device) < r[:, None]  # mask ranks above r(t)
            scale = (self.alpha / r.clamp(min=1).float()) * (r > 0)
            return self.module.up(z * keep[:, None, :]) * scale[:, None, None].to(z.dtype)
        out = torch.zeros_like(h)
        for k in phase.unique().tolist():
            mod = self.phases[f"phase{k}"] if f"phase{k}" in self.phases else None
            if mod is None:
                continue
            rows = phase == k
            ids = task_ids[rows] if task_ids is not None else None
            # under autocast the product is bf16 while h may be fp32 (an fp32 checkpoint)
            out[rows] = (mod.up(mod.down(h[rows], ids)) * (self.alpha / mod.rank)).to(out.dtype)
        return out

    def low_rank_pairs(self):
        mods = [self.module] if self.shared else list(self.phases.values())
        return [(m.B, m.A) for m in mods]


def check_fits_backbone(tc: TrajectoryConfig, hidden: int, n_layers: int) -> None:
    """The settings that depend on the backbone, checked against its sizes: by the method when
    it is built, and by the sweep's preflight from the backbone's config.json before Ray starts."""
    if tc.rank > hidden:
        raise UserError(f"field trajectory.rank: {tc.rank} exceeds the hidden size {hidden}")
    for i in tc.injection_layers:
        if not -n_layers <= i < n_layers:
            raise UserError(f"field trajectory.injection_layers: {i} is outside the "
                            f"{n_layers} layers of the backbone")


def build_injection(tc: TrajectoryConfig, sampler_steps: int, backbone: Backbone):
    """Validate the trajectory settings against the backbone and build the modules:
    (layer indices, phase boundaries, per-phase ranks, ModuleDict of TrajectoryLayer)."""
    hidden, n_layers = backbone.hidden_size, len(backbone.layers)
    check_fits_backbone(tc, hidden, n_layers)
    layers = sorted({i % n_layers for i in tc.injection_layers})
    boundaries = phase_boundaries(tc, sampler_steps)
    ranks = rank_schedule(tc, boundaries)
    if not any(ranks):
        raise UserError("field trajectory.min_rank: the schedule gives every phase rank 0")
    modules = nn.ModuleDict({f"layer{i}": TrajectoryLayer(tc, hidden, ranks) for i in layers})
    return layers, boundaries, ranks, modules


def _replace_hidden(output, fn):
    """Apply fn to a block's hidden-state output, whether the block returns a tensor or a tuple."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


class TrajectoryMethod(Method):
    name = "trajectory"

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__(config, backbone)
        self.tc = config.trajectory
        layers, self.boundaries, self.ranks, self.injection = build_injection(
            self.tc, config.diffusion.sampler_steps, backbone)
        self.register_buffer("inner_edges", torch.tensor(self.boundaries[1:-1]), persistent=False)
        self.injected_blocks = layers
        self.t_core = (NoiseCore(self.tc.rank, DEFAULT_EMBED_DIM, DEFAULT_HIDDEN, diagonal=True)
                       if self.tc.t_conditioning == "continuous" else None)  # g(t), every layer's
        self.off_phases: frozenset[int] = frozenset()  # `switched_off(phases)`: run as the backbone
        self._hooks = [backbone.layers[i].register_forward_hook(self._hook(f"layer{i}"))
                       for i in layers]

    def phase_of(self, t: torch.Tensor) -> torch.Tensor:
        """k such that boundaries[k] < t <= boundaries[k+1]."""
        return torch.bucketize(t, self.inner_edges, right=False)

    def phase_boundaries(self) -> list[float]:
        return list(self.boundaries)

    def context_free_blocks(self) -> int:
        """Blocks up to the first injected one: the hook on its output is what reads t."""
        return min(self.injected_blocks) + 1

    def phase_modules(self) -> list[int]:
        return [k for k, r in enumerate(self.ranks) if r > 0]

    @contextlib.contextmanager
    def switched_off(self, phases=None):
        """`phases`: rows whose t lies in those phases run the backbone alone (in `shared` mode
        the one module is off at those t only); the other rows run exactly as before."""
        if phases is None:
            with super().switched_off():
                yield
            return
        self.off_phases = frozenset(phases)
        try:
            yield
        finally:
            self.off_phases = frozenset()

    def _hook(self, key: str):
        def hook(_module, _inputs, output):
            if self.context is None:  # no time given: behave as the base model
                return output
            phase = self.phase_of(self.context.t)
            layer, ids, gates = self.injection[key], self.context.task_ids, self.gates(self.context.t)
            if self.off_phases:
                on = ~torch.isin(phase, torch.tensor(sorted(self.off_phases), device=phase.device))
                return _replace_hidden(output, lambda h: h + layer.delta(h, phase, ids, gates)
                                       * on.view(-1, *[1] * (h.dim() - 1)))
            return _replace_hidden(output, lambda h: h + layer.delta(h, phase, ids, gates))
        return hook

    def gates(self, t: torch.Tensor) -> torch.Tensor | None:
        """g(t) [B or 1, r] (fp32) for continuous t (one row when every row shares t and no
        gradient is taken); None for phase modules."""
        if self.t_core is None:
            return None
        return self.t_core(t if torch.is_grad_enabled() else one_row_if_uniform(t))[0]

    def regularization(self):
        pairs = [p for layer in self.injection.values() for p in layer.low_rank_pairs()]
        # both are cheap (r x r cores), so both are always computed and logged
        nuc = sum(nuclear_norm_lowrank(B, A) for B, A in pairs)
        orth = sum(orthogonality(A) for _, A in pairs)
        total = self.tc.nuclear_weight * nuc + self.tc.orth_weight * orth
        return total, {"reg_nuclear": float(nuc.detach()), "reg_orth": float(orth.detach())}


# The comparison's rates (MiniLM, AdamW, batch 32) lie around the rate that trained best in
# single-seed calibration runs on SST-2 dev, as for every method.
SPEC = MethodSpec(name="trajectory", method=TrajectoryMethod, order=0, section=TrajectoryConfig,
                  validate=validate, size_knob="trajectory.rank",
                  clamped_to_knob=("trajectory.min_rank",), lr_grid=(5e-3, 1e-2),
                  # injection depth: after the middle layer (the default) or on the last hidden state
                  tuning={"trajectory.injection_layers": ([2], [-1]), "trajectory.num_phases": (2, 4),
                          "trajectory.rank": (16, 48)})
