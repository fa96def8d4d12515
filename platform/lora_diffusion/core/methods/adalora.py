"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512) through PEFT: W' = W + s P diag(E) Q, with the rank
budget reallocated across layers during training by an importance score.

PEFT's `AdaLoraModel` is attached in place (lora.py's `attach_peft`) and its rank allocator is
driven by the training loop's step counter: `after_step(step)` calls `update_and_allocate(step)`
after every optimizer step, PEFT's documented order (backward, step, allocate). The schedule:
`tinit` steps at the initial budget (`init_r` per layer), a cubic decrease to `target_r` per
layer on average until `total_step - tfinal`, masking every `deltaT` steps, then the final mask
held fixed. `total_step` is `train.steps`; `tinit` and `tfinal` are fractions of it here (PEFT
and the paper give step counts, set for runs of thousands of steps).

Counted and saved: every allocated tensor, P [init_r, in], E [init_r, 1], Q [out, init_r] per
layer. Pruning zeroes entries of E (PEFT masks, it does not resize while training), so shapes
stay fixed for the optimizer and the saved file, and the zeros in E are the final rank pattern:
the budget that is saved is the initial one, `init_r`, the size knob.

AdaLoRA's orthogonality regulariser, which PEFT adds inside `AdaLoraModel.forward` only when the
model returns a loss (ours does not), is returned by `regularization()` with PEFT's formula:
the mean over P and Q of ||P P^T - I||_F and ||Q^T Q - I||_F, times `orth_reg_weight`.

Choices the paper leaves to the user, made here: the schedule fractions (10% warm-up at the
initial budget, the final 20% at the final mask), deltaT = 10 steps, target_r = init_r * 2/3
rounded (`target_fraction`: the paper's b(0) = 1.5 b(T)), orth_reg_weight 0.1 (the paper's gamma), the
EMA betas 0.85 (PEFT's and the paper's). Resuming restarts the importance EMAs (PEFT keeps them
on the allocator, not in any state dict).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..backbone import Backbone
from ..errors import check, check_one_of
from .lora import TARGETS, PeftMethod, target_linears
from .registry import MethodSpec

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config


@dataclass
class AdaLoraConfig:
    """AdaLoRA through PEFT: SVD-form LoRA whose rank budget is reallocated during training."""

    init_r: int = 6  # initial rank per layer: what is allocated, saved and counted (the size knob)
    target_fraction: float = 2 / 3  # average final rank per layer, as a fraction of init_r
    alpha: float = 16.0  # scale alpha / init_r
    targets: str = "attention"  # attention | attention_mlp
    tinit: float = 0.1  # fraction of train.steps at the initial budget
    tfinal: float = 0.2  # fraction of train.steps at the final mask
    delta_t: int = 10  # steps between two reallocations
    orth_reg_weight: float = 0.1


def validate(ac: AdaLoraConfig) -> None:
    check(ac.init_r >= 1, "adalora.init_r", f"must be >= 1, got {ac.init_r}")
    check(0 < ac.target_fraction <= 1, "adalora.target_fraction", "must lie in (0, 1]")
    check_one_of(ac.targets, TARGETS, "adalora.targets")
    check(0 <= ac.tinit < 1, "adalora.tinit", "must lie in [0, 1) (a fraction of train.steps)")
    check(0 <= ac.tfinal < 1 - ac.tinit, "adalora.tfinal",
          "must be >= 0 and leave a budgeting phase (tinit + tfinal < 1)")
    check(ac.delta_t >= 1, "adalora.delta_t", "must be >= 1")
    check(ac.orth_reg_weight >= 0, "adalora.orth_reg_weight", "must be >= 0")


def target_rank(ac: AdaLoraConfig) -> int:
    """PEFT's target_r, the average final rank per layer."""
    return max(1, round(ac.target_fraction * ac.init_r))


class AdaLoraMethod(PeftMethod):
    name = "adalora"

    def build_peft_config(self, config: Config, backbone: Backbone):
        from peft import AdaLoraConfig as PeftAdaLoraConfig

        ac, steps = config.adalora, config.train.steps
        target_linears(backbone, ac.targets, "adalora.targets")
        tinit, tfinal = int(ac.tinit * steps), int(ac.tfinal * steps)
        if tinit >= steps - tfinal:  # a run too short for a budgeting phase: allocate at once
            tinit, tfinal = 0, 0
        return PeftAdaLoraConfig(
            init_r=ac.init_r, target_r=target_rank(ac), lora_alpha=ac.alpha, tinit=tinit, tfinal=tfinal,
            deltaT=ac.delta_t, total_step=max(steps, 1), orth_reg_weight=ac.orth_reg_weight,
            target_modules=backbone.family.target_pattern(ac.targets), lora_dropout=0.0, bias="none")

    def after_step(self, step: int) -> None:
        params = self.trainable().values()
        if any(p.grad is None for p in params):  # resuming: no gradient to score importance with
            return
        self.tuner.update_and_allocate(step)

    def active_ranks(self) -> dict[str, int]:
        """Unmasked rank per layer: the nonzero entries of E."""
        return {n: int((p != 0).sum()) for n, p in self.trainable().items() if ".lora_E." in n}

    def regularization(self):
        norms = []
        for n, p in self.trainable().items():
            if ".lora_A." in n or ".lora_B." in n:
                cov = p @ p.T if ".lora_A." in n else p.T @ p
                norms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=p.device)))
        orth = torch.stack(norms).mean()
        return self.config.adalora.orth_reg_weight * orth, {"reg_orth": float(orth.detach())}


# Rates: single-seed calibration, init_r 4 (as dora.py): 1e-3 0.55, 3e-3 0.765, 1e-2 0.84 dev.
SPEC = MethodSpec(name="adalora", method=AdaLoraMethod, order=11, section=AdaLoraConfig,
                  validate=validate, size_knob="adalora.init_r",
                  lr_grid=(3e-3, 1e-2))
