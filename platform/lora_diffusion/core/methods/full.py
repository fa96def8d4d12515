"""Full fine-tuning: every backbone parameter trains (tied embeddings counted once)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..backbone import Backbone
from .base import Method
from .registry import MethodSpec

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config


class FullFinetune(Method):
    name = "full"
    reads_context = False  # t never reaches it: evaluation computes its logits once

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__(config, backbone)
        for p in self.model.parameters():
            p.requires_grad_(True)


# full fine-tuning needs ~100x smaller steps than the small modules
SPEC = MethodSpec(name="full", method=FullFinetune, order=1, lr_grid=(5e-5, 1e-4))
