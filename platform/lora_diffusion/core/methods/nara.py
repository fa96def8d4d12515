"""NaRA (Noise-aware Low-Rank Adaptation, arXiv 2605.29716): weight LoRA whose r x r core is made
by a hypernetwork of the noise level, shared across layers.

    y = W x + (alpha / r) B C(lambda) A x,   A [r, in], B [out, r], C(lambda) [r, r]

on the same target linears as weight LoRA (`nara.targets`: the family's attention, or attention
and MLP, projections). lambda is the diffusion time t of each row, taken from the method's
Context as the trajectory modules and T-LoRA take it, in training and in the sampler (with the
linear schedule t is the masking probability, the noise level; the other schedules' masking
probability is a monotone function of t, which the hypernetwork absorbs). With no Context the
hooks add nothing: the method behaves as the base model. A forward hook on each target linear
adds the update to its output: the backbone's modules and state_dict keys are untouched.

The paper's code was not reachable from here; its description leaves these choices open, made
here (noise_core.py implements the hypernetwork):
- Embedding of lambda: the sinusoidal timestep embedding of DDPM / DiT (`nara.embed_dim`, 32)
  of 1000 t, the scale diffusion models embed their steps on; fixed, not learned, so the only
  trained path from t to C is the hypernetwork.
- Hypernetwork: one hidden layer (`nara.hidden` units, 32, SiLU) from the embedding to the r^2
  entries of C: 1,056 + 33 r^2 parameters. "Lightweight": at r = 8 that is 3,168, 2% of LoRA
  rank 8 on MiniLM's attention (147,456); at LLaDA-8B's r = 32, 34,848 beside LoRA's 33.6M.
  Width 32, not more, also keeps NaRA inside the comparison's budget tolerance where LoRA is:
  at 73,728 parameters on MiniLM, rank 2 on attention + MLP is 84,132 (LoRA 82,944; a count
  more than 15% off drops a candidate), rank 4 on attention 75,312.
- Initialisation: C(lambda) = I + H(lambda) with H's output layer zero, A kaiming-uniform and B
  zero as PEFT's LoRA. The update starts at zero (B = 0) and is then exactly LoRA's B A at every
  t; B trains from the first step, H's output layer from the second (its gradient goes through
  B), its hidden layer from the third. A zero core (C = H, H's output zero) with a random B would
  also start at zero, but C = 0 leaves B and A without gradient: the three-way product would
  start on a saddle.
- Layers: one hypernetwork for every target linear; per-layer embeddings are off by default
  (`nara.layer_embedding: false`): "shared across layers" is read as one C(lambda) for all
  layers, the layers differing through their own A and B. `true` adds a learned embedding per
  target linear to e(t) (zero at init), so each layer gets its own core from the same network.
- Scale alpha / r as LoRA; the core is computed in fp32 (autocast off) and cast to the
  activation's dtype.
Budget: `nara.rank` is the size knob; the hypernetwork's (and the layer embeddings') parameters
are trainable parameters of the method, so the accounting, the saved file and budget matching
count them.

Inference cost. LoRA merges B A into W once; NaRA cannot, since C depends on t. Per target
linear and token it adds r (in + out) + r^2 multiply-adds beside W x (unmerged LoRA's r (in + out)
plus the core), and the hypernetwork: run per row and per layer, that is B x L small MLPs per
forward. But every row of a sampler step (and of an ELBO t point) has the same t: the cache
(`nara.cache_core`, on) computes C once per forward, for one row when all rows share t, and
every row and layer reuses it, so the hypernetwork costs one MLP per denoising step instead of
B x L; what remains is the unmerged low-rank path. Merging W + (alpha / r) B C(t) A into the
weights per step would remove that too, at d_in d_out r multiply-adds per layer per step: fewer
than the unmerged path's above d_in d_out / (d_in + d_out) tokens per step (192 on MiniLM's
384-wide attention, 2,048 on LLaDA-8B's 4,096; a step runs every position of every row, 4,096
tokens at 16 x 256). It is not done here: it needs a copy of every target weight (or takes bf16
rounding drift from adding and subtracting in place), and the benchmark's infer section (nara,
nara uncached, lora unmerged, lora merged) measures first whether the unmerged path costs enough
to pay for it; `merged_update` gives the matrix.
The cache is used without gradients only (evaluation, the sampler): in training the rows' t
differ and each hook computes its core, which activation checkpointing recomputes as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backbone import Backbone
from ..errors import check, check_one_of
from .base import Context, Method
from .lora import TARGETS, target_linears
from .noise_core import DEFAULT_EMBED_DIM, DEFAULT_HIDDEN, NoiseCore, one_row_if_uniform
from .registry import MethodSpec

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config


@dataclass
class NaraConfig:
    """NaRA: y = W x + (alpha / r) B C(t) A x, C(t) [r, r] from a hypernetwork of t shared across layers."""

    rank: int = 8  # r (the size knob)
    alpha: float = 16.0  # scale alpha / r
    targets: str = "attention"  # attention | attention_mlp
    embed_dim: int = DEFAULT_EMBED_DIM  # sinusoidal embedding of t (even)
    hidden: int = DEFAULT_HIDDEN  # the hypernetwork's hidden units (one hidden layer)
    layer_embedding: bool = False  # a learned embedding per target linear added to e(t)
    cache_core: bool = True  # without gradients: C(t) once per forward, shared by rows and layers


def validate(nc: NaraConfig) -> None:
    check(nc.rank >= 1, "nara.rank", f"must be >= 1, got {nc.rank}")
    check(nc.alpha > 0, "nara.alpha", "must be > 0")
    check_one_of(nc.targets, TARGETS, "nara.targets")
    check(nc.embed_dim >= 2 and nc.embed_dim % 2 == 0, "nara.embed_dim",
          f"must be an even number >= 2 (cosines and sines), got {nc.embed_dim}")
    check(nc.hidden >= 1, "nara.hidden", f"must be >= 1, got {nc.hidden}")


class NaraLayer(nn.Module):
    """A [r, in] and B [out, r] of one target linear."""

    def __init__(self, lin: nn.Linear, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, lin.in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # PEFT's LoRA init of A
        self.B = nn.Parameter(torch.zeros(lin.out_features, rank))

    def delta(self, x: torch.Tensor, core: torch.Tensor, scale: float) -> torch.Tensor:
        """scale * B C A x in x's dtype; core [B or 1, r, r] (fp32), one per row or for all."""
        z = x @ self.A.to(x.dtype).T  # [B, ..., r]
        flat = z.reshape(z.shape[0], -1, z.shape[-1]) @ core.to(z.dtype).mT  # C A x
        return (flat.reshape(z.shape) @ self.B.to(z.dtype).T) * scale


class NaraMethod(Method):
    name = "nara"

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__(config, backbone)
        nc = self.nc = config.nara
        self.scale = nc.alpha / nc.rank
        linears = target_linears(backbone, nc.targets, "nara.targets")
        self.core = NoiseCore(nc.rank, nc.embed_dim, nc.hidden, diagonal=False,
                              layers=len(linears) if nc.layer_embedding else 0)
        self.adapters = nn.ModuleDict()
        self.layer_of: dict[str, int] = {}
        for i, (name, lin) in enumerate(linears.items()):
            key = name.replace(".", "_")
            self.adapters[key] = NaraLayer(lin, nc.rank)
            self.layer_of[key] = i
            self._hooks.append(lin.register_forward_hook(self._hook(key)))
        self._cache: tuple | None = None  # (context, hypernetwork versions, cores) of this forward
        self.core_evaluations = 0  # hypernetwork forwards run (the cache's test and the benchmark)

    # every block holds a target linear, the first included: `context_free_blocks` stays 0

    def set_context(self, context: Context | None) -> None:
        self._cache = None  # one forward's cores: dropped with its Context
        super().set_context(context)

    def _run_core(self, t: torch.Tensor, layer: int | None) -> torch.Tensor:
        self.core_evaluations += 1
        return self.core(t, layer)

    def core_of(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """C(t) of the layer `key`: [B or 1, r, r], fp32."""
        layer = self.layer_of[key] if self.core.layer_embedding is not None else 0
        if torch.is_grad_enabled() or not self.nc.cache_core:
            per_layer = self.core.layer_embedding is not None
            return self._run_core(t, layer if per_layer else None)[0]
        versions = tuple(p._version for p in self.core.parameters())  # an in-place update misses
        if self._cache is None or self._cache[0] is not self.context or self._cache[1] != versions:
            self._cache = (self.context, versions, self._run_core(one_row_if_uniform(t), None))
        return self._cache[2][layer]

    def merged_update(self, key: str, t: float) -> torch.Tensor:
        """(alpha / r) B C(t) A of one layer [out, in]: what W gains at a fixed t."""
        adapter = self.adapters[key]
        core = self.core(torch.tensor([float(t)], device=adapter.A.device), None)
        core = core[self.layer_of[key] if self.core.layer_embedding is not None else 0, 0]
        return self.scale * adapter.B @ core @ adapter.A

    def _hook(self, key: str):
        def hook(_module, inputs, output):
            if self.context is None:  # no time given: behave as the base model
                return output
            x = inputs[0]
            core = self.core_of(key, self.context.t.to(x.device))
            return output + self.adapters[key].delta(x, core, self.scale).to(output.dtype)
        return hook


# Rates: weight LoRA's grid (NaRA is LoRA plus an r x r core starting at the identity); tuned on
# validation by the comparison's stage 1, with LoRA's placement and rank candidates.
SPEC = MethodSpec(name="nara", method=NaraMethod, order=18, section=NaraConfig, validate=validate,
                  size_knob="nara.rank", lr_grid=(1e-3, 3e-3),
                  tuning={"nara.targets": ("attention", "attention_mlp"), "nara.rank": (4, 8)})
