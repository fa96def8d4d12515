"""BitFit (Ben Zaken et al. 2022): only the bias terms train.

Which biases: every parameter of the masked LM whose name ends in `.bias`: the encoder's
(query/key/value/output projections, FFN, every LayerNorm, the embedding LayerNorm) and the MLM
head's (transform dense and LayerNorm, and the vocabulary bias `cls.predictions.bias`, which is
tied to the decoder's bias and counted once). The MLM head is the classifier of label-word
scoring, so its bias plays the role of the classifier bias BitFit trains. BitFit has no size
knob: its size is fixed by the backbone (57,018 on MiniLM-L6, 30,522 of them the vocabulary bias).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..backbone import Backbone
from ..errors import UserError
from .base import Method
from .registry import MethodSpec

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config


class BitFit(Method):
    name = "bitfit"
    reads_context = False  # t never reaches it: evaluation computes its logits once

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__(config, backbone)
        found = False
        for n, p in self.model.named_parameters():
            if n.endswith(".bias") or n == "bias":
                p.requires_grad_(True)
                found = True
        if not found:
            # LLaDA's blocks have none (include_bias: false): adding biases would be another method
            raise UserError(f"method: bitfit needs bias terms; the {backbone.family.name} backbone "
                            f"{type(self.model).__name__} has none")


# few, scale-sensitive parameters: larger rates than the low-rank modules
SPEC = MethodSpec(name="bitfit", method=BitFit, order=5, lr_grid=(1e-2, 3e-2))
