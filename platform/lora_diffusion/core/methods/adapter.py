"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), written here.

The `adapters` library (adapter-transformers 1.3.0) pins transformers ~=4.57 and cannot run on
the transformers 5 this project uses, so the adapter is a small module:

    a(h) = h + up(act(down(h)))        up initialised to zero: the output is unchanged at init

Placement (a forward hook on the sublayer's output projection, so the backbone's modules and
state_dict keys are untouched): the adapter acts on the output of the projection *before*
dropout, the residual connection and LayerNorm, as in Houlsby:
    pfeiffer  after the FFN only          (BERT layer.output.dense)
    houlsby   after attention and the FFN (BERT layer.attention.output.dense and layer.output.dense)
the projections named by the backbone family (families.py: `ffn_output`, `attention_output`).
Adapters do not depend on t: they are active with or without a context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..backbone import Backbone
from ..errors import UserError, check, check_one_of
from .base import Method
from .registry import MethodSpec

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@dataclass
class AdapterConfig:
    """Bottleneck adapters: h + up(act(down(h))) on a sublayer's output, up initialised to zero."""

    bottleneck: int = 16  # width of the bottleneck (the size knob)
    placement: str = "pfeiffer"  # pfeiffer: after the FFN | houlsby: after attention and FFN
    activation: str = "relu"  # relu | gelu | tanh


def validate(ac: AdapterConfig) -> None:
    check(ac.bottleneck >= 1, "adapter.bottleneck", f"must be >= 1, got {ac.bottleneck}")
    check_one_of(ac.placement, ("pfeiffer", "houlsby"), "adapter.placement")
    check_one_of(ac.activation, tuple(ACTIVATIONS), "adapter.activation")


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, bottleneck: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.normal_(self.down.weight, std=hidden ** -0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


def _sublayer_outputs(backbone: Backbone, index: int, placement: str) -> dict[str, nn.Module]:
    """The output projections of block `index` the adapters follow, by the family's names."""
    sites = {"ffn": backbone.family.ffn_output}
    if placement == "houlsby":
        sites = {"attn": backbone.family.attention_output, **sites}
    out = {}
    for key, path in sites.items():
        node = backbone.block_module(index, path)
        if not isinstance(node, nn.Linear):
            raise UserError(f"field adapter.placement: {path} in the blocks of the "
                            f"{backbone.family.name} backbone is no nn.Linear")
        out[key] = node
    return out


class AdapterMethod(Method):
    name = "adapter"
    reads_context = False  # t never reaches it: evaluation computes its logits once

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__(config, backbone)
        ac = config.adapter
        self.adapters = nn.ModuleDict()
        for i in range(len(backbone.layers)):
            for site, module in _sublayer_outputs(backbone, i, ac.placement).items():
                key = f"layer{i}_{site}"
                self.adapters[key] = Bottleneck(module.out_features, ac.bottleneck, ac.activation)
                self._hooks.append(module.register_forward_hook(
                    lambda _m, _i, output, key=key: self.adapters[key](output)))


SPEC = MethodSpec(name="adapter", method=AdapterMethod, order=4, section=AdapterConfig,
                  validate=validate, size_knob="adapter.bottleneck", lr_grid=(1e-3, 3e-3),
                  tuning={"adapter.placement": ("pfeiffer", "houlsby"), "adapter.bottleneck": (16, 32)})
