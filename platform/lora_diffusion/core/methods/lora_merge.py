"""Weight-LoRA composition baseline: per-task LoRA checkpoints merged into one adapter by PEFT.

Each checkpoint of `lora_merge.checkpoints` (method lora, trained on this backbone) is injected
as its own PEFT adapter, then PEFT's `LoraModel.add_weighted_adapter` (peft 0.21) combines them
into the one adapter that runs; the task adapters are deleted. Nothing trains. Combinations
(`combination_type`), with PEFT's constraints:

  linear  A = sum_i sqrt(w_i s_i) A_i, B = sum_i sqrt(w_i s_i) B_i (s_i = alpha_i / r_i): PEFT
          mixes A and B separately, so B A carries cross terms B_i A_j (PEFT calls it "a very
          rough approximation"); every rank must be equal
  cat     A = [w_i s_i A_i] stacked, B = [B_i] side by side: exactly sum_i w_i s_i B_i A_i, at
          rank sum_i r_i
  ties    TIES-merging (trim to `density`, elect signs, disjoint mean) of the A's and of the B's,
          each weighted like linear; equal ranks; density in (0, 1]

Weights: `lora_merge.weights`, else 1/n each for linear and cat (the average: each task keeps a
1/n share) and 1 each for ties (its disjoint mean already averages where tasks agree). The
merged adapter is what the method saves and is counted as (`state_to_save`); nothing is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..backbone import Backbone, backbone_fingerprint
from ..checkpoint_files import read_files
from ..errors import UserError, check, check_one_of
from .base import Method
from .lora import LoraConfig, attach_peft, peft_lora_config, validate as validate_lora
from .registry import MethodSpec

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config

COMBINATIONS = ("linear", "cat", "ties")
MERGED = "merged"


@dataclass
class LoraMergeConfig:
    """PEFT's weighted combination of per-task weight-LoRA checkpoints (method: lora_merge)."""

    checkpoints: list[str] = field(default_factory=list)  # two or more `lora` checkpoint dirs
    combination: str = "linear"  # linear | cat | ties (PEFT add_weighted_adapter combination_type)
    weights: list[float] | None = None  # one per checkpoint; None: 1/n (linear, cat), 1 (ties)
    density: float = 0.5  # ties: share of each task's entries kept


def validate(mc: LoraMergeConfig) -> None:
    check_one_of(mc.combination, COMBINATIONS, "lora_merge.combination")
    check(0 < mc.density <= 1, "lora_merge.density", f"must lie in (0, 1], got {mc.density}")
    check(mc.weights is None or len(mc.weights) == len(mc.checkpoints), "lora_merge.weights",
          "needs one weight per checkpoint")


def read_lora_expert(path: str, fingerprint: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(lora settings, tensors) of a trained weight-LoRA checkpoint on the backbone `fingerprint`."""
    data, tensors, meta = read_files(path)
    if data.get("method") != "lora":
        raise UserError(f"field lora_merge.checkpoints: {path} holds method '{data.get('method')}', not lora")
    if meta.get("backbone_fingerprint") != fingerprint:
        raise UserError(f"field lora_merge.checkpoints: {path} was trained on another backbone")
    try:
        lc = LoraConfig(**data["lora"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"field lora_merge.checkpoints: {path}/config.json is not a resolved config: {exc}") from None
    validate_lora(lc)
    if lc.use_dora:
        raise UserError(f"field lora_merge.checkpoints: {path} is DoRA, which PEFT does not merge this way")
    return lc, tensors


class LoraMerge(Method):
    name = "lora_merge"
    reads_context = False  # a merged weight adapter never sees the Context

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__(config, backbone)
        mc = config.lora_merge
        if len(mc.checkpoints) < 2:
            raise UserError("field lora_merge.checkpoints: needs at least two trained lora checkpoints")
        fingerprint = backbone_fingerprint(backbone)
        experts = [read_lora_expert(p, fingerprint) for p in mc.checkpoints]
        ranks = sorted({lc.rank for lc, _ in experts})
        check(mc.combination == "cat" or len(ranks) == 1, "lora_merge.combination",
              f"{mc.combination} needs equal ranks (PEFT), the checkpoints have {ranks}; use cat")
        names = [f"task{i}" for i in range(len(experts))]
        peft_configs = [peft_lora_config(lc, backbone) for lc, _ in experts]  # before PEFT wraps the linears
        tuner = attach_peft(self.model, peft_configs[0], adapter_name=names[0])
        for name, peft_config in zip(names[1:], peft_configs[1:]):
            tuner.peft_config[name] = peft_config
            tuner.inject_adapter(self.model, name)
        for name, (_, tensors) in zip(names, experts):
            self._load_adapter(name, tensors)
        weights = mc.weights or [1.0 if mc.combination == "ties" else 1.0 / len(names)] * len(names)
        density = mc.density if mc.combination == "ties" else None
        tuner.add_weighted_adapter(names, weights, MERGED, combination_type=mc.combination, density=density)
        tuner.set_adapter(MERGED)
        for name in names:
            tuner.delete_adapter(name)
        self.__dict__["tuner"] = tuner  # out of the module tree: it holds `self.model` again
        for p in self.model.parameters():
            p.requires_grad_(False)  # nothing trains

    def _load_adapter(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """A `lora` checkpoint's tensors (saved under PEFT's adapter name `default`) into adapter `name`."""
        params = dict(self.named_parameters())
        renamed = {k.replace(".default.", f".{name}."): v for k, v in tensors.items()}
        missing = sorted(set(renamed) - set(params))
        if missing:
            raise UserError(f"field lora_merge.checkpoints: tensor {missing[0]} has no place in this backbone")
        with torch.no_grad():
            for key, value in renamed.items():
                params[key].copy_(value)

    def state_to_save(self) -> dict[str, torch.Tensor]:
        """The merged adapter: what runs, so what is saved and counted (account)."""
        return {n: p.detach().contiguous() for n, p in self.named_parameters() if f".{MERGED}." in n}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        params = {n: p for n, p in self.named_parameters() if f".{MERGED}." in n}
        if set(params) != set(tensors):
            raise ValueError(f"checkpoint does not match the merged adapter: {sorted(set(params) ^ set(tensors))[:3]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])


# Composes trained checkpoints: no learning-rate grid, not in the baseline comparison.
SPEC = MethodSpec(name="lora_merge", method=LoraMerge, order=17, section=LoraMergeConfig, validate=validate)
