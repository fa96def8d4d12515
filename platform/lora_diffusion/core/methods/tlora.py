"""T-LoRA (arXiv 2507.05964): weight LoRA whose active rank is masked by the diffusion time.

    y = W x + (alpha / r_max) * B (m(t) * (A x)),   m(t)_j = 1 if j < r(t) else 0
    r(t) = floor(((T - k) / T)^rank_power * (r_max - r_min)) + r_min

T-LoRA's rule (`get_mask_by_timestep` in its code) on its discrete grid of T timesteps, k the
step of t: the cleanest step k = 0 gets all r_max components, pure noise the first r_min (T-LoRA's
"less rank at high noise"). Our t is continuous in [t_min, 1], so the T steps split that training
range evenly, k = floor((t - t_min) / (1 - t_min) * T): t ~ U[t_min, 1] draws every step with
probability 1/T, as T-LoRA draws its timesteps, and t = 1 is k = T, rank r_min. (A plain
floor((r_max - r_min)(1 - t)) + r_min never reaches r_max since t >= t_min > 0: the top component
would be counted but never trained.) The top component is active only at k = 0, so it trains on
about 1/T of the samples, as in T-LoRA. The scale alpha / r_max is the same for every t, as in
T-LoRA, where masking switches components off without renormalising.

Initialisation ("simplest faithful option" of Ortho-LoRA): the rows of A are orthonormal (QR of
a seeded Gaussian), B is zero, so the output is unchanged at init and the masked components are
orthogonal directions from the start. T-LoRA's full Ortho-LoRA additionally initialises B from
singular vectors and subtracts the frozen initial product; with B = 0 that subtraction is zero.

PEFT has no t-masked rank, so the adaptation is a forward hook on each target nn.Linear that adds
the low-rank term to its output: the backbone's modules and state_dict keys are untouched.
With no context (t unknown) the hooks add nothing: the method behaves as the base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backbone import Backbone
from ..errors import UserError, check, check_one_of
from .base import Method
from .lora import TARGETS, target_linears
from .registry import MethodSpec

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config


@dataclass
class TLoraConfig:
    """T-LoRA: weight LoRA whose active rank is masked by t, r = floor(((T-k)/T)^p (r_max-r_min)) + r_min."""

    rank: int = 8  # r_max (the size knob), the rank at the cleanest step
    min_rank: int = 1  # r_min, the rank at t = 1 (pure noise)
    alpha: float = 16.0  # scale alpha / r_max, fixed for every t
    rank_power: float = 1.0  # p, T-LoRA's alpha_rank_scale: > 1 drops rank faster as noise grows
    timesteps: int = 1000  # T, the discrete steps t in [t_min, 1] is cut into (T-LoRA: 1000)
    targets: str = "attention"  # attention | attention_mlp


def validate(tl: TLoraConfig) -> None:
    check(tl.rank >= 1, "tlora.rank", f"must be >= 1, got {tl.rank}")
    check(1 <= tl.min_rank <= tl.rank, "tlora.min_rank", "must lie in [1, rank]")
    check(tl.alpha > 0, "tlora.alpha", "must be > 0")
    check(tl.rank_power > 0, "tlora.rank_power", f"must be > 0, got {tl.rank_power}")
    check(tl.timesteps >= 1, "tlora.timesteps", f"must be >= 1, got {tl.timesteps}")
    check_one_of(tl.targets, TARGETS, "tlora.targets")


def tlora_rank(t: torch.Tensor, r_max: int, r_min: int, timesteps: int = 1000, power: float = 1.0,
               t_min: float = 1e-3) -> torch.Tensor:
    """Active rank per sample: k = floor((t - t_min) / (1 - t_min) * T) in [0, T], then
    r = floor(((T - k) / T)^power (r_max - r_min)) + r_min; r_max at k = 0, r_min at t = 1."""
    u = ((t.double() - t_min) / (1 - t_min)).clamp(0, 1)
    k = torch.floor(u * timesteps)
    share = ((timesteps - k) / timesteps) ** power
    return torch.floor(share * (r_max - r_min)).long() + r_min


class MaskedLoRA(nn.Module):
    """The (A, B) pair of one linear layer: A [r, in] orthonormal rows, B [out, r] zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, generator: torch.Generator):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(in_features, rank, generator=generator))
        self.A = nn.Parameter(q.T.contiguous())  # rank <= in_features: orthonormal rows
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def delta(self, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        z = x @ self.A.T  # [B, S, r]
        z = z * keep.view(keep.shape[0], *([1] * (z.dim() - 2)), keep.shape[1]).to(z.dtype)
        return (z @ self.B.T) * scale


class TLoraMethod(Method):
    name = "tlora"

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__(config, backbone)
        tl = config.tlora
        self.r_max, self.r_min, self.scale = tl.rank, tl.min_rank, tl.alpha / tl.rank
        self.timesteps, self.power, self.t_min = tl.timesteps, tl.rank_power, config.diffusion.t_min
        linears = target_linears(backbone, tl.targets, "tlora.targets")
        smallest = min(lin.in_features for lin in linears.values())
        if tl.rank > smallest:
            raise UserError(f"field tlora.rank: {tl.rank} exceeds the input size {smallest} of a "
                            f"target layer (A needs orthonormal rows)")
        gen = torch.Generator().manual_seed(config.train.seed)
        self.adapters = nn.ModuleDict()
        for name, lin in linears.items():
            key = name.replace(".", "_")
            self.adapters[key] = MaskedLoRA(lin.in_features, lin.out_features, tl.rank, gen)
            self._hooks.append(lin.register_forward_hook(self._hook(key)))

    def active_rank(self, t: torch.Tensor) -> torch.Tensor:
        return tlora_rank(t, self.r_max, self.r_min, self.timesteps, self.power, self.t_min)

    def _hook(self, key: str):
        def hook(_module, inputs, output):
            if self.context is None:  # no time given: behave as the base model
                return output
            r = self.active_rank(self.context.t).to(output.device)
            keep = torch.arange(self.r_max, device=output.device) < r[:, None]  # [B, r_max]
            return output + self.adapters[key].delta(inputs[0], keep, self.scale)
        return hook


SPEC = MethodSpec(name="tlora", method=TLoraMethod, order=6, section=TLoraConfig, validate=validate,
                  size_knob="tlora.rank", clamped_to_knob=("tlora.min_rank",), lr_grid=(1e-3, 3e-3),
                  tuning={"tlora.targets": ("attention", "attention_mlp"), "tlora.rank": (4, 8)})
