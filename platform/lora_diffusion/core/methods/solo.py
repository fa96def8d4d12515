"""Solo Connection (Pathak & Paffenroth 2025, arXiv 2507.14353): representation-level adaptation by a
trainable low-rank long skip connection from an earlier block's output to a later block's input,
blended in from zero by a homotopy coefficient.

    x_to <- x_to + lambda * B A h_from,    A [r, d], B [d, r]

h_from is the output of block `from_block`, x_to the input of block `to_block` (the output of
block to_block - 1, changed by a forward hook there). The homotopy H(lambda) = lambda * B A h
moves from the zero vector (lambda = 0) to the task representation (lambda = 1).

Choices the paper leaves open, made here:
- One connection, from the first block's output to the last block's input (`from_block: 0`,
  `to_block: -1`; negative indices count from the end): the longest skip that leaves a block
  after it (placements measured: see the rates below the class).
- The homotopy schedule: lambda rises linearly, 0 before training, to 1 at `ramp` x
  train.steps (0.1 by default), then stays at 1; step s (from 0) trains at lambda(s + 1), so
  the first step already learns. It follows the loop's step counter through `after_step`
  (also when a run resumes). Evaluation always uses lambda = 1, the end of the path and the
  model the training is heading for, so a saved checkpoint means the same thing at any step.
  The ramp is short, of the order of the rate warmup, by measurement: AdamW's steps do not
  shrink with lambda (it normalises the gradient's scale away), so whatever B learns while
  lambda is small reaches the model 1 / lambda times larger once lambda is 1. With the ramp
  over half the run (the first version; MiniLM, SST-2, 150 steps, rate 3e-3) the blended
  input x_to + lambda B A h_from had rms 0.86 at lambda 0.35 (step 25) and 3.9 at lambda 1
  (step 75), against 0.59 without the connection, while |B| grew only 5.0 -> 6.8: the
  connection drowned the hidden state and SST-2 stayed at chance (0.52 validation, every row
  predicted one class). With ramp 0.1 the rms at step 25 was 0.62. `train/skip_ratio` logs
  the balance: rms(lambda B A h_from) / rms(x_to) of the last forward.
- Initialisation: A Gaussian with std 1/sqrt(d), B zero as LoRA's B, so the method is the
  identity at initialisation whatever lambda (as every method here).
- Scale: none beyond lambda (the rank is the size knob, r x 2d parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backbone import Backbone
from ..errors import UserError, check
from .base import Method
from .registry import MethodSpec
from .trajectory import _replace_hidden

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config


@dataclass
class SoloConfig:
    """Solo Connection: a low-rank long skip from block from_block's output to block to_block's input."""

    rank: int = 96  # r (the size knob)
    from_block: int = 0  # its output is read (negative: from the end)
    to_block: int = -1  # its input receives the connection (negative: from the end)
    ramp: float = 0.1  # fraction of train.steps over which lambda rises from 0 to 1 (keep it short)


def validate(sc: SoloConfig) -> None:
    check(sc.rank >= 1, "solo.rank", f"must be >= 1, got {sc.rank}")
    check(0 <= sc.ramp <= 1, "solo.ramp", "must lie in [0, 1]")


def homotopy(step: int, ramp_steps: float) -> float:
    """lambda(step): linear from 0 to 1 over `ramp_steps`, then 1."""
    return 1.0 if ramp_steps <= 0 else min(1.0, step / ramp_steps)


def resolve_blocks(sc: SoloConfig, n_layers: int) -> tuple[int, int]:
    """(from, to) as block indices in [0, n_layers), from before to."""
    for name, block in (("solo.from_block", sc.from_block), ("solo.to_block", sc.to_block)):
        if not -n_layers <= block < n_layers:
            raise UserError(f"field {name}: block {block} is outside the {n_layers} blocks of the backbone")
    src, dst = sc.from_block % n_layers, sc.to_block % n_layers
    if src >= dst:
        raise UserError(f"field solo.to_block: block {dst} does not come after from_block {src}")
    return src, dst


class SoloConnection(Method):
    name = "solo"
    reads_context = False  # t never reaches it: evaluation computes its logits once

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__(config, backbone)
        sc, d = config.solo, backbone.hidden_size
        self.src, self.dst = resolve_blocks(sc, len(backbone.layers))
        self.ramp_steps = sc.ramp * config.train.steps
        self.lam = homotopy(1, self.ramp_steps)  # lambda of the next training step
        self.skip = nn.ParameterDict({"A": nn.Parameter(torch.randn(sc.rank, d) / math.sqrt(d)),
                                      "B": nn.Parameter(torch.zeros(d, sc.rank))})
        self._source: torch.Tensor | None = None
        self.skip_ratio = 0.0  # rms(lambda B A h_from) / rms(x_to) of the last forward, logged
        self._hooks = [backbone.layers[self.src].register_forward_hook(self._read),
                       backbone.layers[self.dst - 1].register_forward_hook(self._add)]

    def after_step(self, step: int) -> None:
        self.lam = homotopy(step + 1, self.ramp_steps)  # step s (0-based) trains at lambda(s + 1)

    def coefficient(self) -> float:
        return self.lam if self.training else 1.0

    def _read(self, _module, _inputs, output):
        self._source = output[0] if isinstance(output, tuple) else output

    def _add(self, _module, _inputs, output):
        h, self._source = self._source, None  # read by this forward only
        delta = (h @ self.skip["A"].T) @ self.skip["B"].T * self.coefficient()
        return _replace_hidden(output, lambda x: self._blend(x, delta))

    def _blend(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.skip_ratio = float(delta.pow(2).mean().sqrt() / x.pow(2).mean().sqrt().clamp(min=1e-12))
        return x + delta

    def regularization(self):
        return torch.zeros(()), {"homotopy": self.coefficient(), "skip_ratio": self.skip_ratio}


# Rates: not placed; Solo Connection stays at chance on SST-2. Validation only (200 rows), MiniLM,
# 150 steps of 32, seed 0: the step-150 validation/accuracy line of
#   lora-diffusion train --set method=solo --set task=sst2 --set train.steps=150
#     --set max_eval_examples=200 --set train.threads=1 --set train.lr=1e-3 --set solo.ramp=0.1
# (run as a script that stops there, so test was never evaluated):
# ramp 0.5 (old default), 0 -> -1, 3e-3: 0.52, every row one class (x_to rms 3.9, 0.59 without);
# ramp 0.1, 0 -> -1, 1e-3: 0.52, every row one class (x_to rms 0.93: no blow-up, no learning);
# ramp 0.5, 1 -> 3 and 2 -> 4 at 3e-3: train loss 0.78-0.95 at step 75-100 (stopped, no gain).
# ramp 0.1 at 3e-3, stopped before evaluation (out of time): 1 -> 3 train loss 0.75 at step 125;
# 2 -> 3 (no skip, the trajectory method's place) train loss 0.62, batch accuracy 0.78 at step 100.
# Earlier (old dev split = test, 200 steps): 0.51 at 1e-3, 3e-3, 1e-2, and with to_block 3.
SPEC = MethodSpec(name="solo", method=SoloConnection, order=16, section=SoloConfig, validate=validate,
                  size_knob="solo.rank", lr_grid=(1e-3, 3e-3))
