"""FouRA (Borse et al. 2024, arXiv 2406.08798): low-rank adaptation in the frequency domain.

    dY = F_out^-1( B ( g(z, t) * z ) ) * alpha / r,    z = A F_in(X)

on each target nn.Linear, F a 1-D orthonormal transform along the feature dimension, A [r, in],
B [out, r], and g a gate on the r low-rank components that depends on the input (through z) and
on the diffusion time t:

    g(z, t) = sigmoid(z G^T + t u + c),   G [r, r], u [r], c [r]

Choices the paper leaves open (it adapts U-Net / DiT weights of image diffusion models), made here:
- F: `dft` is the real orthonormal form of the unitary DFT (DC, then the real and imaginary
  parts of each frequency of `torch.fft.rfft` with "ortho" scaling, times sqrt 2, then Nyquist):
  d real coefficients, so F^-1 = F^T exactly and the adapted layer stays real; `dct` is the
  orthonormal DCT-II. F_in acts on the input features, F_out^-1 on the output features.
- The gate: a sigmoid of a linear map of z plus a linear term in t (the paper's gate is learned
  from the low-rank features of a timestep-conditioned network; here t enters directly, as the
  method's context, since the encoder's features carry no t). G, u, c start at zero (g = 1/2).
- Initialisation: A kaiming-uniform as PEFT's LoRA, B zero, so the output is unchanged at
  initialisation; scale alpha / r as LoRA.
- Because F is linear, dY = (F_out^T B)(g * ((A F_in) X)): the transforms fold into the factors
  once per forward, costing LoRA's work plus two r x d x d products, not two d x d per token.
  The trained parameters stay A and B in the frequency domain (what AdamW updates
  coordinate-wise, which is where FouRA differs from LoRA).
With no context (t unknown) the hooks add nothing: the method behaves as the base model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backbone import Backbone
from ..errors import check, check_one_of
from .base import Method
from .lora import TARGETS, hook_linears, target_linears
from .registry import MethodSpec

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config

TRANSFORMS = ("dft", "dct")


@dataclass
class FouraConfig:
    """FouRA: LoRA in the frequency domain with an input- and t-dependent rank gate."""

    rank: int = 4  # r (the size knob)
    alpha: float = 16.0  # scale alpha / r
    transform: str = "dft"  # dft | dct, along the feature dimension
    targets: str = "attention"  # attention | attention_mlp


def validate(fc: FouraConfig) -> None:
    check(fc.rank >= 1, "foura.rank", f"must be >= 1, got {fc.rank}")
    check(fc.alpha > 0, "foura.alpha", "must be > 0")
    check_one_of(fc.transform, TRANSFORMS, "foura.transform")
    check_one_of(fc.targets, TARGETS, "foura.targets")


def fourier_basis(d: int, kind: str) -> torch.Tensor:
    """The orthonormal d x d matrix F of the transform: F(x) = x @ F.T, F^-1(y) = y @ F."""
    if kind == "dct":  # DCT-II, orthonormal: F[k, n] = c_k cos(pi (2n + 1) k / 2d)
        n, k = torch.arange(d, dtype=torch.float64), torch.arange(d, dtype=torch.float64)[:, None]
        basis = torch.cos(math.pi * (2 * n + 1) * k / (2 * d)) * math.sqrt(2 / d)
        basis[0] /= math.sqrt(2)
        return basis.float()
    spectrum = torch.fft.rfft(torch.eye(d, dtype=torch.float64), norm="ortho").T  # [d//2+1, d]
    rows = [spectrum[0].real]
    for k in range(1, (d + 1) // 2):  # both halves of a conjugate pair: real and imaginary part
        rows += [math.sqrt(2) * spectrum[k].real, math.sqrt(2) * spectrum[k].imag]
    if d % 2 == 0:
        rows.append(spectrum[d // 2].real)
    return torch.stack(rows).float()


class FouraLayer(nn.Module):
    """A, B and the gate of one linear layer; F_in, F_out as non-persistent buffers."""

    def __init__(self, lin: nn.Linear, fc: FouraConfig):
        super().__init__()
        r = fc.rank
        self.scale = fc.alpha / r
        self.A = nn.Parameter(torch.empty(r, lin.in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # PEFT's LoRA init of A
        self.B = nn.Parameter(torch.zeros(lin.out_features, r))
        self.gate = nn.Linear(r, r)  # G, c
        self.gate_t = nn.Parameter(torch.zeros(r))  # u
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.register_buffer("f_in", fourier_basis(lin.in_features, fc.transform), persistent=False)
        self.register_buffer("f_out", fourier_basis(lin.out_features, fc.transform), persistent=False)

    def forward(self, x: torch.Tensor, context) -> torch.Tensor:
        if context is None:  # no time given: behave as the base model
            return torch.zeros((), dtype=x.dtype, device=x.device)
        z = x @ (self.A @ self.f_in).T  # A F_in(x), [B, S, r]
        t = context.t.to(z.dtype).view(-1, *([1] * (z.dim() - 1)))
        g = torch.sigmoid(self.gate(z) + t * self.gate_t)
        return ((g * z) @ (self.f_out.T @ self.B).T) * self.scale  # F_out^-1(B (g * z))


class FouraMethod(Method):
    name = "foura"

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__(config, backbone)
        fc = config.foura
        linears = target_linears(backbone, fc.targets, "foura.targets")
        self.adapters = hook_linears(self, linears, lambda lin: FouraLayer(lin, fc))


# Rates: single-seed calibration (as dora.py): 1e-3 0.735, 3e-3 0.51 dev.
SPEC = MethodSpec(name="foura", method=FouraMethod, order=13, section=FouraConfig, validate=validate,
                  size_knob="foura.rank", lr_grid=(3e-4, 1e-3))
