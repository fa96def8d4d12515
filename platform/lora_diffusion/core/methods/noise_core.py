"""The noise-level hypernetwork of the noise-aware methods: a small function of an embedding of t
that gives a low-rank update its r x r core (NaRA, nara.py) or its per-rank gates (the
continuous-t trajectory module, `trajectory.t_conditioning=continuous`).

    e(t) = [cos(1000 t f_j), sin(1000 t f_j)],  f_j = 10000^(-j / (E/2)),  j < E/2
    C(t) = I + W_2 silu(W_1 (e(t) + p_l) + b_1) + b_2      (matrix: reshaped to r x r)
    g(t) = 1 + W_2 silu(W_1 (e(t) + p_l) + b_1) + b_2      (diagonal: r gates)

e is the sinusoidal timestep embedding of DDPM / DiT with t on their 1000-step scale, so the
frequencies span one to hundreds of cycles over t in (0, 1]; p_l an optional learned per-layer
embedding (zero at init). W_2 and b_2 start at zero: C(t) = I and g(t) = 1 at initialisation, so
the update is a plain LoRA product there (zero while B is zero), and B gets its gradient from the
first step (a zero core would leave B, A and the core all without gradient). Everything here
runs in fp32 with autocast off, whatever the activations' dtype: the callers cast the core to
the activation's dtype (the precision convention: anything computed from t in fp32).

Also the dtype-safe gated low-rank product of one trajectory module (`gated_delta`) and the
conflicts of `t_conditioning=continuous` with the phase settings (`check_continuous`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import precision
from ..errors import check

# t is embedded on the 1000-step scale of DDPM / DiT's `timestep_embedding`
TIME_SCALE = 1000.0
MAX_PERIOD = 10000.0
# the hypernetwork's size unless a method's section sets it (nara.embed_dim, nara.hidden)
DEFAULT_EMBED_DIM = 32
DEFAULT_HIDDEN = 32


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] times -> [B, dim] fp32 sinusoidal embedding (dim even), made on t's device."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = TIME_SCALE * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class NoiseCore(nn.Module):
    """The hypernetwork of t: `forward(t)` gives [L, B, r, r] cores (matrix) or [L, B, r] gates
    (diagonal), L = `layers` with a per-layer embedding, else 1 (one core shared by every layer)."""

    def __init__(self, rank: int, embed_dim: int, hidden: int, diagonal: bool, layers: int = 0):
        super().__init__()
        self.rank, self.embed_dim, self.diagonal = rank, embed_dim, diagonal
        self.hidden = nn.Linear(embed_dim, hidden)  # PyTorch's default init
        self.out = nn.Linear(hidden, rank if diagonal else rank * rank)
        nn.init.zeros_(self.out.weight)  # the core starts at the identity
        nn.init.zeros_(self.out.bias)
        self.layer_embedding = nn.Parameter(torch.zeros(layers, embed_dim)) if layers else None

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        return time_embedding(t, self.embed_dim)

    def forward(self, t: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """`layer`: that layer's core only ([1, B, ...]); None: every layer's."""
        with precision.fp32_region(t.device):  # fp32 even inside the recipe's autocast
            e = self.embed(t.float())[None]  # [1, B, E]
            if self.layer_embedding is not None:
                table = self.layer_embedding if layer is None else self.layer_embedding[layer:layer + 1]
                e = e + table[:, None, :]  # [L, B, E]
            d = self.out(F.silu(self.hidden(e)))
            if self.diagonal:
                return 1.0 + d
            eye = torch.eye(self.rank, dtype=d.dtype, device=d.device)
            return eye + d.view(*d.shape[:-1], self.rank, self.rank)


def one_row_if_uniform(t: torch.Tensor) -> torch.Tensor:
    """t itself, or its first entry alone when every row has the same t (a sampler step, an ELBO
    t point): the core is then computed once and broadcast over the rows."""
    return t[:1] if bool((t == t[0]).all()) else t


def gated_delta(module, h: torch.Tensor, gates: torch.Tensor, task_ids, scale: float) -> torch.Tensor:
    """scale * B (g(t) * diag(task gain) A h) of one trajectory `LowRank` module, in h's dtype;
    gates [B or 1, r] fp32."""
    z = h @ module.A.to(h.dtype).T  # [B, S, r]
    if module.task_gain is not None:
        if task_ids is None:  # a silent default id would make conditioning a no-op
            raise ValueError("a task-conditioned trajectory module needs Context.task_ids")
        z = z * module.task_gain[task_ids].to(z.dtype)[:, None, :]
    z = z * gates.to(z.dtype)[:, None, :]
    return (z @ module.B.to(z.dtype).T) * scale


def check_continuous(tc) -> None:
    """`trajectory.t_conditioning=continuous` is one module for every t, gated by t: the phase
    settings that would split it are refused, each naming its field."""
    why = "continuous t conditioning is one module for every t (trajectory.t_conditioning=continuous)"
    check(tc.num_phases == 1, "trajectory.num_phases", f"must be 1: {why}, got {tc.num_phases}")
    check(tc.phase_boundaries is None or len(tc.phase_boundaries) == 2, "trajectory.phase_boundaries",
          f"must be null or [0, 1]: {why}, got {tc.phase_boundaries}")
    check(tc.sharing == "per_phase", "trajectory.sharing",
          f"must be per_phase (with one phase: one module): {why}, got {tc.sharing!r}")
    check(tc.rank_schedule == "constant", "trajectory.rank_schedule",
          f"must be constant (one module of trajectory.rank): {why}, got {tc.rank_schedule!r}")
