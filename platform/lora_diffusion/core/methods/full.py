"""Full fine-tuning: every backbone parameter trains (tied embeddings counted once)."""

from ..backbone import Backbone
from ..config import Config
from .base import Method


class FullFinetune(Method):
    name = "full"

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__(config, backbone)
        for p in self.model.parameters():
            p.requires_grad_(True)
