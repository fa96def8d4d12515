"""GeLoRA (Ed-dib et al. 2024, arXiv 2412.09250): per-layer LoRA ranks from the intrinsic dimension
of the hidden states, then ordinary LoRA through PEFT with that `rank_pattern`.

GeLoRA bounds the rank a block needs by how much the intrinsic dimension of the representation
grows across it: r_l >= max(d_{l+1} - d_l, 0), with d_l the intrinsic dimension of the hidden
states entering block l (d_0: the embeddings) and d_{l+1} of those leaving it. The dimensions
are estimated with TwoNN (Facco et al. 2017) on the frozen backbone's hidden states of a sample
of training inputs, once, before training; they are kept on the method (`intrinsic_dims`) and
logged with every step's metrics (`train/intrinsic_dim_<l>`), the ranks likewise
(`block_ranks`).

Choices the paper leaves open, made here:
- The sample: `gelora.samples` training prompts (seeded by train.seed), tokenised as the loop
  does (max_length), each represented by its hidden states mean-pooled over its tokens; exact
  duplicate points are dropped (TwoNN needs r1 > 0).
- TwoNN: mu = r2 / r1 per point; d is the slope through the origin of -log(1 - F(mu)) against
  log(mu), F the empirical distribution, fitted on the smallest 90% of mu (Facco et al.'s fit).
- From bounds to ranks at a budget: weights w_l = max(d_{l+1} - d_l, 0) + 1 (the + 1 keeps every
  block adapted, also where the dimension falls), scaled to mean `gelora.rank`, the size knob:
  r_l = max(1, round(gelora.rank * w_l / mean(w))). Every target of block l gets r_l.
- Everything else is `lora.*` (alpha, targets, dropout): PEFT LoRA with scale alpha / r_l.
The estimate is stored: a checkpoint's config carries it as `gelora.intrinsic_dims`
(`saved_settings`), and a config that sets it builds with those dimensions instead of estimating,
so loading a checkpoint does not read the training data. A run's own config leaves it unset
(null): every run estimates on its own seeded sample.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import tasks
from ..backbone import Backbone
from ..errors import UserError, check
from .lora import LoraMethod, target_linears
from .registry import MethodSpec

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config

_DIMS_CACHE: dict[tuple, list[float]] = {}  # budget matching builds the method many times


@dataclass
class GeloraConfig:
    """GeLoRA: LoRA (lora.* settings) with per-block ranks from the hidden states' intrinsic dimension."""

    rank: int = 4  # mean rank over blocks (the size knob)
    samples: int = 512  # training prompts whose hidden states the dimensions are estimated on
    # d_0 .. d_L as estimated; null: estimate them (a checkpoint's config records its run's estimate)
    intrinsic_dims: list[float] | None = None


def validate(gc: GeloraConfig) -> None:
    check(gc.rank >= 1, "gelora.rank", f"must be >= 1, got {gc.rank}")
    check(gc.samples >= 8, "gelora.samples", "must be >= 8 (TwoNN needs neighbours)")
    check(gc.intrinsic_dims is None or all(d > 0 for d in gc.intrinsic_dims), "gelora.intrinsic_dims",
          "must be positive dimensions (or null: estimated)")


def two_nn_dimension(points: torch.Tensor, fit_fraction: float = 0.9) -> float:
    """TwoNN intrinsic dimension of a point cloud [N, D] (Facco et al. 2017)."""
    x = torch.unique(points.double(), dim=0)
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(float("inf"))
    r = dist.topk(2, dim=1, largest=False).values  # first and second neighbour distances
    mu = (r[:, 1] / r[:, 0]).sort().values
    n = len(mu)
    keep = max(2, int(n * fit_fraction))
    log_mu = torch.log(mu[:keep])
    y = -torch.log1p(-torch.arange(1, keep + 1, dtype=torch.float64) / n)  # -log(1 - F(mu))
    return float((log_mu * y).sum() / (log_mu * log_mu).sum())


@torch.no_grad()
def hidden_state_dims(config: Config, backbone: Backbone) -> list[float]:
    """TwoNN dimension of the mean-pooled hidden states entering each block, then of the last
    block's output: L + 1 values."""
    key = (backbone.source, config.backbone_seed, config.task, config.data_dir, config.max_length,
           config.train.seed, config.gelora.samples)
    if key not in _DIMS_CACHE:
        examples = tasks.load_split(config.task, "train", config.data_dir, max_examples=config.gelora.samples,
                                    seed=config.train.seed, allow_hub=config.allow_hub)
        enc = backbone.tokenizer([e.prompt for e in examples], truncation=True, padding=True,
                                 max_length=config.max_length, return_tensors="pt")
        was_training = backbone.model.training
        backbone.model.eval()
        states = backbone.block_states(enc["input_ids"].to(backbone.device),
                                       enc["attention_mask"].to(backbone.device))  # the family's blocks
        states = [h.float().cpu() for h in states]  # TwoNN on the CPU, in fp32
        backbone.model.train(was_training)
        weights = enc["attention_mask"].unsqueeze(-1).float()
        pooled = [(h * weights).sum(1) / weights.sum(1) for h in states]
        _DIMS_CACHE[key] = [two_nn_dimension(p) for p in pooled]
    return list(_DIMS_CACHE[key])


def block_ranks(dims: list[float], mean_rank: int) -> list[int]:
    """r_l from the dimension before and after each block, scaled to mean `mean_rank`."""
    weights = [max(after - before, 0.0) + 1.0 for before, after in zip(dims, dims[1:])]
    mean = sum(weights) / len(weights)
    return [max(1, round(mean_rank * w / mean)) for w in weights]


class GeloraMethod(LoraMethod):
    name = "gelora"

    def peft_extra(self, config: Config, backbone: Backbone) -> dict:
        self.intrinsic_dims = list(config.gelora.intrinsic_dims or hidden_state_dims(config, backbone))
        n = len(backbone.layers) + 1
        if len(self.intrinsic_dims) != n:
            raise UserError(f"field gelora.intrinsic_dims: {len(self.intrinsic_dims)} values, the backbone "
                            f"needs {n} (one per block input and the last output)")
        self.block_ranks = block_ranks(self.intrinsic_dims, config.gelora.rank)
        pattern = {}
        for name in target_linears(backbone, config.lora.targets, "lora.targets"):
            block = backbone.family.block_of(name)
            pattern[re.escape(name)] = self.block_ranks[block]
        return {"rank_pattern": pattern}

    def saved_settings(self) -> dict[str, object]:
        return {"gelora.intrinsic_dims": self.intrinsic_dims}

    def regularization(self):
        logs = {f"intrinsic_dim_{i}": d for i, d in enumerate(self.intrinsic_dims)}
        logs.update({f"rank_block_{i}": r for i, r in enumerate(self.block_ranks)})
        return torch.zeros(()), logs


# Rates: single-seed calibration (as dora.py): 1e-3 0.80, 3e-3 0.815 dev.
SPEC = MethodSpec(name="gelora", method=GeloraMethod, order=15, section=GeloraConfig, validate=validate,
                  size_knob="gelora.rank", lr_grid=(1e-3, 3e-3))
