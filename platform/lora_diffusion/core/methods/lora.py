"""Weight LoRA through HF PEFT: W' = W + (alpha / r) B A on the attention (and MLP) projections.

PEFT's `inject_adapter_in_model` replaces the target nn.Linear modules *in place* inside the
masked LM (no PeftModel wrapper), so `Backbone.logits`, which calls `model.base_model` and
`model.cls` directly, runs through the LoRA layers. B starts at zero: the output is unchanged at
initialisation. DoRA and rsLoRA are PEFT flags. `PeftMethod` is the base of every method that is
a PEFT tuner (lora, dora, adalora, vera, gelora); `hook_linears` the forward-hook wiring of the
hand-written weight methods (foura, selora).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ..backbone import Backbone
from ..errors import UserError, check, check_one_of
from .base import Method
from .registry import MethodSpec

if TYPE_CHECKING:  # config builds its sections from the method specs: no runtime import
    from ..config import Config

# The values of every weight method's `targets`; the module names they stand for are the
# backbone family's (families.py: BERT query/key/value/attention.output.dense, LLaDA q/k/v_proj
# and attn_out, Dream self_attn.*_proj, MDLM attn_qkv/attn_out, ...).
TARGETS = ("attention", "attention_mlp")


@dataclass
class LoraConfig:
    """Weight LoRA through HF PEFT (also DoRA / rsLoRA flags)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "attention"  # attention | attention_mlp
    use_dora: bool = False
    use_rslora: bool = False


def validate(lc: LoraConfig) -> None:
    check(lc.rank >= 1, "lora.rank", f"must be >= 1, got {lc.rank}")
    check_one_of(lc.targets, TARGETS, "lora.targets")
    check(0 <= lc.dropout < 1, "lora.dropout", "must lie in [0, 1)")


def target_linears(backbone: Backbone, targets: str, field_name: str) -> dict[str, nn.Linear]:
    """The nn.Linear modules a weight method adapts, by full module name, from the family's
    declared names (shared by every weight method)."""
    pattern = re.compile(backbone.family.target_pattern(targets))
    found = {n: m for n, m in backbone.model.named_modules()
             if pattern.fullmatch(n) and isinstance(m, nn.Linear)}
    if not found:
        raise UserError(f"field {field_name}: no nn.Linear of {type(backbone.model).__name__} matches the "
                        f"'{targets}' targets of the {backbone.family.name} family "
                        f"({backbone.family.target_pattern(targets)})")
    return found


def hook_linears(method: Method, linears: dict[str, nn.Linear], build) -> nn.ModuleDict:
    """One adapter per target linear, `build(linear)`, whose `adapter(x, context)` a forward hook
    adds to the linear's output (hand-written weight methods: FouRA, SeLoRA)."""
    adapters = nn.ModuleDict()
    for name, lin in linears.items():
        adapter = adapters[name.replace(".", "_")] = build(lin)

        def hook(_module, inputs, output, adapter=adapter):
            return output + adapter(inputs[0], method.context)
        method._hooks.append(lin.register_forward_hook(hook))
    return adapters


def attach_peft(model: nn.Module, peft_config, adapter_name: str = "default"):
    """Inject a PEFT tuner's layers into `model` in place and return the tuner (`BaseTuner`).

    What `peft.inject_adapter_in_model` does, keeping the tuner: AdaLoRA's rank allocator and
    VeRA's shared projections live on it. No PeftModel wrapper, so `Backbone.logits`, which calls
    `model.base_model` and `model.cls` directly, runs through the injected layers."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    return PEFT_TYPE_TO_TUNER_MAPPING[peft_config.peft_type](model, peft_config, adapter_name=adapter_name)


def peft_lora_config(lc: LoraConfig, backbone: Backbone, use_dora: bool = False, **extra):
    """PEFT's LoraConfig for a `lora` section (also what lora_merge.py rebuilds each task's from)."""
    from peft import LoraConfig as PeftLoraConfig

    target_linears(backbone, lc.targets, "lora.targets")  # fail early with a clear message
    return PeftLoraConfig(
        r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias="none",
        target_modules=backbone.family.target_pattern(lc.targets), use_dora=lc.use_dora or use_dora,
        use_rslora=lc.use_rslora, init_lora_weights=True,  # A kaiming-uniform, B zero
        **extra)


class PeftMethod(Method):
    """A method that is a PEFT tuner, configured here and not re-implemented. Subclasses say
    which PEFT config (`build_peft_config`) and which parameter names train (`trainable_marker`)."""

    trainable_marker = "lora_"
    reads_context = False  # PEFT's layers never see the Context

    def __init__(self, config: Config, backbone: Backbone):
        super().__init__(config, backbone)
        self.peft_config = self.build_peft_config(config, backbone)
        # kept out of the module tree: the tuner holds `self.model` again under another name
        self.__dict__["tuner"] = attach_peft(self.model, copy.deepcopy(self.peft_config))
        # PEFT marks only the adapter tensors trainable; make sure nothing else is
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.trainable_marker in n)

    def build_peft_config(self, config: Config, backbone: Backbone):
        raise NotImplementedError


class LoraMethod(PeftMethod):
    name = "lora"
    use_dora = False  # `dora` (dora.py) sets it; `lora.use_dora` also turns it on

    def build_peft_config(self, config: Config, backbone: Backbone):
        return peft_lora_config(config.lora, backbone, use_dora=self.use_dora, **self.peft_extra(config, backbone))

    def peft_extra(self, config: Config, backbone: Backbone) -> dict:
        """More PEFT LoraConfig fields (GeLoRA's `rank_pattern`); none for plain LoRA."""
        return {}


SPEC = MethodSpec(name="lora", method=LoraMethod, order=2, section=LoraConfig, validate=validate,
                  size_knob="lora.rank", lr_grid=(1e-3, 3e-3),
                  tuning={"lora.targets": ("attention", "attention_mlp"), "lora.rank": (4, 8)})
