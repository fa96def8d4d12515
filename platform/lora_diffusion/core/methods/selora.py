"""SeLoRA (Mao et al. 2024, arXiv 2408.07196): LoRA that starts at a small rank and grows a layer's
rank when a Fisher-information criterion says the layer would gain from it.

    y = W x + (alpha / r_max) B A x,   A [r_max, in], B [out, r_max]

Fixed shapes for the optimizer and the saved file: every layer allocates r_max components and
the inactive ones are held at B[:, j] = 0 (their output is exactly zero, so A[j] gets no
gradient either) by a gradient hook on B that zeroes the inactive columns' gradient before
AdamW sees it. Growing a layer activates its next component: its B column starts to train from
zero (the output is unchanged at the growth), its A row from its initial value, as SeLoRA adds
a zero-initialised component.

The criterion, every `check_every` steps (through `after_step`, after the optimizer step):
with the last step's gradients, the empirical Fisher trace of the current LoRA,
FI = sum over active A and B entries of grad^2, and of the LoRA expanded by one component,
FI' = FI + ||dL/dB[:, r]||^2 (the gradient the next, zero, column would get if active: the hook
sees it before zeroing it, averaged over workers as every gradient is; the new A row's
gradient is zero at B = 0). The layer grows when
FI' / FI > `threshold` (SeLoRA's FI-Ratio test).

Choices the paper leaves open, made here: the initial rank (1), the threshold (1.1), the check
interval (10 steps), one component per layer per check, the scale alpha / r_max fixed for every
rank (growing does not rescale the components already trained), A kaiming-uniform as PEFT's LoRA.
Counted, saved and budget-matched: the maximum size, r_max per layer (the size knob), the final
size growth may reach; the budget matcher solves for it before training, when the grown size is
not yet known. The grown size is reported beside it: `accounting.active_params` (r_active x
(in + out) summed over layers) and `accounting.active_ranks` (per layer) in the result, and
`train/active_params`, `train/mean_rank` with every step's metrics. The active rank is not
saved: a layer's components grow in order, so on load it is 1 + the last nonzero column of B
(at least `init_rank`); a component activated at the very last step, still zero, reads as
inactive, which changes nothing the saved model computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ..backbone import Backbone
from ..errors import check, check_one_of
from .base import Method
from .lora import TARGETS, hook_linears, target_linears
from .registry import MethodSpec

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config


@dataclass
class SeloraConfig:
    """SeLoRA: LoRA whose rank per layer grows from init_rank to rank by a Fisher-information test."""

    rank: int = 4  # r_max, allocated, saved and counted (the size knob)
    init_rank: int = 1  # active rank of every layer at the start
    alpha: float = 16.0  # scale alpha / r_max
    threshold: float = 1.1  # grow when FI(expanded) / FI(current) exceeds it
    check_every: int = 10  # steps between growth tests
    targets: str = "attention"  # attention | attention_mlp


def validate(sc: SeloraConfig) -> None:
    check(sc.rank >= 1, "selora.rank", f"must be >= 1, got {sc.rank}")
    check(1 <= sc.init_rank <= sc.rank, "selora.init_rank", "must lie in [1, rank]")
    check(sc.alpha > 0, "selora.alpha", "must be > 0")
    check(sc.threshold >= 1, "selora.threshold", "must be >= 1 (a ratio of Fisher traces)")
    check(sc.check_every >= 1, "selora.check_every", "must be >= 1")
    check_one_of(sc.targets, TARGETS, "selora.targets")


class GrowingLoRA(nn.Module):
    """A [r_max, in], B [out, r_max]; components at index >= `active` are held at zero."""

    def __init__(self, lin: nn.Linear, sc: SeloraConfig):
        super().__init__()
        self.scale = sc.alpha / sc.rank
        self.A = nn.Parameter(torch.empty(sc.rank, lin.in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(lin.out_features, sc.rank))
        self.active = sc.init_rank
        self.candidate_grad: torch.Tensor | None = None  # dL/dB[:, active] of the last backward
        self.B.register_hook(self._mask_inactive)

    def _mask_inactive(self, grad: torch.Tensor) -> torch.Tensor:
        if self.active < grad.shape[1]:
            self.candidate_grad = grad[:, self.active].detach().clone()
        keep = torch.arange(grad.shape[1], device=grad.device) < self.active
        return grad * keep.to(grad.dtype)

    def forward(self, x: torch.Tensor, _context) -> torch.Tensor:
        return (x @ self.A.T) @ self.B.T * self.scale  # inactive columns of B are zero

    def fisher(self) -> float:
        """Empirical Fisher trace of the active components, from the last gradients."""
        r = self.active
        return float((self.A.grad[:r] ** 2).sum() + (self.B.grad[:, :r] ** 2).sum())

    def maybe_grow(self, threshold: float) -> bool:
        current = self.fisher()
        if self.active >= self.B.shape[1] or current <= 0 or self.candidate_grad is None:
            return False
        if (current + float((self.candidate_grad ** 2).sum())) / current > threshold:
            self.active += 1
            return True
        return False


class SeloraMethod(Method):
    name = "selora"
    reads_context = False  # t never reaches it: evaluation computes its logits once

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__(config, backbone)
        self.sc = config.selora
        linears = target_linears(backbone, self.sc.targets, "selora.targets")
        self.adapters = hook_linears(self, linears, lambda lin: GrowingLoRA(lin, self.sc))

    def active_ranks(self) -> dict[str, int]:
        return {k: a.active for k, a in self.adapters.items()}

    def active_params(self) -> int:
        """Parameters of the grown components only: r_active x (in + out) per layer."""
        return sum(a.active * (a.A.shape[1] + a.B.shape[0]) for a in self.adapters.values())

    def accounting_extras(self) -> dict[str, object]:
        return {"active_params": self.active_params(), "active_ranks": self.active_ranks()}

    def after_step(self, step: int) -> None:
        if step % self.sc.check_every or any(a.B.grad is None for a in self.adapters.values()):
            return  # not a check step, or resuming (no gradient yet)
        self._sync_candidates()
        for adapter in self.adapters.values():
            adapter.maybe_grow(self.sc.threshold)

    def _sync_candidates(self) -> None:
        """Average the candidate gradients over workers, as the loop averages every gradient, so
        that all workers make the same growth decisions."""
        grads = [a.candidate_grad for a in self.adapters.values() if a.candidate_grad is not None]
        if not grads or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        flat = torch.cat(grads)
        dist.all_reduce(flat)
        for g, avg in zip(grads, flat.split([len(g) for g in grads])):
            g.copy_(avg / dist.get_world_size())

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_saved(tensors)
        for adapter in self.adapters.values():
            used = (adapter.B != 0).any(0).nonzero()
            adapter.active = max(self.sc.init_rank, int(used.max()) + 1 if len(used) else 0)

    def regularization(self):
        ranks = list(self.active_ranks().values())
        return torch.zeros(()), {"mean_rank": sum(ranks) / len(ranks), "active_params": self.active_params()}


# Budget: the matcher solves selora.rank on `trainable_params`, the maximum (allocated, saved)
# size r_max, the final size growth may reach; `active_params` reports what grew.
# Rates: single-seed calibration (as dora.py): 1e-3 0.775, 3e-3 0.805 dev.
SPEC = MethodSpec(name="selora", method=SeloraMethod, order=14, section=SeloraConfig, validate=validate,
                  size_knob="selora.rank", clamped_to_knob=("selora.init_rank",), lr_grid=(1e-3, 3e-3))
