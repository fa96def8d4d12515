"""Backbone families: what the platform must know about a diffusion LM's code, declared per family.

A family says where the transformer blocks are, which linears are the attention and MLP
projections (what PEFT and the hand-written weight methods target), its mask token, whether its
logits are shifted by one, whether its forward takes the diffusion time and under which name,
how it wants the padding mask, and how it is loaded. `Backbone` (backbone.py) and the methods
read these declarations; nothing else in core names a module of a particular architecture.

Module paths and signatures follow the released code (read for this file):
- BERT / RoBERTa / ModernBERT: transformers' own `*ForMaskedLM` classes (BertForMaskedLM:
  `bert.encoder.layer[i].attention.self.{query,key,value}`, head `cls`; RobertaForMaskedLM:
  `roberta.encoder.layer`, head `lm_head`; ModernBertForMaskedLM: `model.layers[i].attn.{Wqkv,Wo}`,
  `mlp.{Wi,Wo}`, head `head` then `decoder`).
- LLaDA (ML-GSAI/LLaDA, GSAI-ML/LLaDA-8B-Instruct modeling_llada.py): `LLaDAModelLM.model` is a
  `LLaDAModel` whose `transformer` ModuleDict holds `wte`, `blocks`, `ln_f` (and `ff_out` without
  weight tying); a `LLaDALlamaBlock` has `q_proj, k_proj, v_proj, attn_out, ff_proj, up_proj,
  ff_out`, no biases (`include_bias: false`), and computes attention in a method, not a module.
  `LLaDAModelLM.forward(input_ids, inputs_embeds, attention_mask, attention_bias, ...)` returns
  `CausalLMOutputWithPast(logits)`; mask id 126336 (`<|mdm_mask|>`); loaded with
  `AutoModel.from_pretrained(..., trust_remote_code=True)` as its README does.
- Dream (HKUNLP/Dream, Dream-org/Dream-v0-*-7B modeling_dream.py): `DreamModel.model` is a
  `DreamBaseModel` with `layers[i].self_attn.{q,k,v,o}_proj` (Qwen2: biases on q/k/v) and
  `mlp.{gate,up,down}_proj`, head `lm_head`; forward(input_ids, attention_mask, position_ids, ...)
  -> MaskedLMOutput. Its attention hands `attention_mask` to sdpa unchanged, so it gets a 4-D
  boolean mask. Logits are shifted: generation_utils.py does
  `logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)`, the output at i - 1 predicts
  token i. Mask id 151666 (`<|mask|>`); loaded with `AutoModel` and trust_remote_code.
- MDLM (kuleshov-group/mdlm models/dit.py; the hub's kuleshov-group/mdlm-owt modeling_mdlm.py):
  `MDLM.backbone` is a `DITBackbone` with `blocks[i]` = DDiTBlock(`attn_qkv`, `attn_out`,
  `mlp` = Sequential(Linear, GELU, Linear), `adaLN_modulation`) and `output_layer`, which needs
  the time embedding (no separable head). forward(input_ids, timesteps, ...) where `timesteps` is
  MDLM's sigma, the total noise; its checkpoints are trained under the log-linear schedule,
  sigma(t) = -log(1 - (1 - 1e-3) t) (noise_schedule.py LogLinearNoise). No attention mask
  argument. Mask id: the last id (MDLM appends [MASK] to the GPT-2 vocabulary: 50257).
Every family keeps the prompt clean the same way: diffusion.apply_mask only masks response
positions, so the prompt is never masked whatever the network.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError

AUTO = "auto"


@dataclass(frozen=True)
class BackboneFamily:
    name: str
    model_types: tuple[str, ...]  # HF config `model_type` values detected as this family
    blocks: str  # dotted path, from the loaded model, of the ModuleList of transformer blocks
    # Block-relative regexes of the projections weight methods adapt, by `targets` value.
    attention: str
    mlp: str
    ffn_output: str  # block-relative path of the FFN output projection (adapters)
    attention_output: str  # block-relative path of the attention output projection (Houlsby)
    # The module whose forward returns the last hidden state, and the head applied to selected
    # hidden states (paths from the model, applied in order); None: no separable head, the
    # full forward runs and the selected positions are taken from its logits.
    body: str | None = None
    head: tuple[str, ...] | None = None
    # The last module of a full forward that is the output head (LLaDA's untied `ff_out`, which
    # its forward calls inside, after ln_f): skipped during the forward and applied to the
    # selected positions only. None (or absent, as with LLaDA's tied embeddings): no such module.
    final_head: str | None = None
    mask_token_id: int | None = None  # None: the tokenizer's mask token
    mask_is_last_id: bool = False  # MDLM: [MASK] is appended as the last vocabulary entry
    shifted: bool = False  # logits at i - 1 predict token i (Dream)
    time_argument: str | None = None  # forward keyword taking the time (MDLM: timesteps)
    time_as_sigma: bool = False  # pass MDLM's sigma(t) rather than t itself
    attention_mask: str = "2d"  # 2d [B, S] | 4d key mask [B, 1, 1, S] bool | none
    auto_class: str = "AutoModelForMaskedLM"  # the transformers Auto class that loads it
    remote_code: bool = False  # its modeling code ships with the checkpoint
    hidden_size_keys: tuple[str, ...] = field(default=("hidden_size",))

    def target_pattern(self, targets: str) -> str:
        """Full-module-name regex (PEFT's re.fullmatch) for 'attention' or 'attention_mlp'."""
        names = self.attention if targets == "attention" else f"{self.attention}|{self.mlp}"
        return rf"{re.escape(self.blocks)}\.(\d+)\.({names})"

    def block_of(self, module_name: str) -> int:
        """The block index in a full module name matched by `target_pattern`."""
        return int(re.match(rf"{re.escape(self.blocks)}\.(\d+)\.", module_name).group(1))

    def time_input(self, t: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """What the forward's time argument receives; no t (clean text) is t = 0."""
        t = torch.zeros(batch, device=device) if t is None else t.to(device).float()
        if self.time_as_sigma:  # MDLM LogLinearNoise.total_noise, eps = 1e-3
            return -torch.log1p(-(1 - 1e-3) * t)
        return t

    def forward_inputs(self, input_ids, attention_mask, t) -> dict:
        kwargs = {"input_ids": input_ids}
        if self.attention_mask == "2d":
            kwargs["attention_mask"] = attention_mask
        elif self.attention_mask == "4d":
            kwargs["attention_mask"] = attention_mask.bool()[:, None, None, :]
        if self.time_argument:
            kwargs[self.time_argument] = self.time_input(t, input_ids.shape[0], input_ids.device)
        return kwargs


_BERT_ATTENTION = r"attention\.self\.(query|key|value)|attention\.output\.dense"
# BERT's MLP output is `output.dense`; anchored on the block index, so attention.output.dense
# (already an attention target) is not matched twice.
_BERT = dict(attention=_BERT_ATTENTION, mlp=r"intermediate\.dense|output\.dense",
             ffn_output="output.dense", attention_output="attention.output.dense")

FAMILIES: dict[str, BackboneFamily] = {f.name: f for f in (
    BackboneFamily("bert", ("bert",), "bert.encoder.layer", body="bert", head=("cls",), **_BERT),
    BackboneFamily("roberta", ("roberta", "xlm-roberta"), "roberta.encoder.layer", body="roberta",
                   head=("lm_head",), **_BERT),
    BackboneFamily("modernbert", ("modernbert",), "model.layers", body="model", head=("head", "decoder"),
                   attention=r"attn\.(Wqkv|Wo)", mlp=r"mlp\.(Wi|Wo)", ffn_output="mlp.Wo",
                   attention_output="attn.Wo"),
    BackboneFamily("llada", ("llada",), "model.transformer.blocks",
                   attention=r"q_proj|k_proj|v_proj|attn_out", mlp=r"ff_proj|up_proj|ff_out",
                   ffn_output="ff_out", attention_output="attn_out", mask_token_id=126336,
                   final_head="model.transformer.ff_out",
                   auto_class="AutoModel", remote_code=True,
                   hidden_size_keys=("d_model", "hidden_size")),
    BackboneFamily("dream", ("dream",), "model.layers", body="model", head=("lm_head",),
                   attention=r"self_attn\.(q_proj|k_proj|v_proj|o_proj)",
                   mlp=r"mlp\.(gate_proj|up_proj|down_proj)", ffn_output="mlp.down_proj",
                   attention_output="self_attn.o_proj", mask_token_id=151666, shifted=True,
                   attention_mask="4d", auto_class="AutoModel", remote_code=True),
    BackboneFamily("mdlm", ("mdlm",), "backbone.blocks", attention=r"attn_qkv|attn_out",
                   mlp=r"mlp\.0|mlp\.2", ffn_output="mlp.2", attention_output="attn_out",
                   mask_is_last_id=True, time_argument="timesteps", time_as_sigma=True,
                   attention_mask="none", remote_code=True,
                   hidden_size_keys=("hidden_dim", "hidden_size")),
)}
NAMES = (AUTO, *FAMILIES)


def read_model_config(source: str, local_only: bool) -> dict:
    """config.json of a local directory, or of a hub id through transformers (no model code runs)."""
    path = Path(source) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    from transformers import PretrainedConfig

    try:
        return PretrainedConfig.get_config_dict(source, local_files_only=local_only)[0]
    except (OSError, ValueError) as exc:
        raise UserError(f"backbone: cannot read the config of '{source}': {exc}".splitlines()[0]) from None


def detect(model_config: dict, requested: str = AUTO) -> BackboneFamily:
    """The family a model config belongs to: `requested`, or found by model_type."""
    if requested != AUTO:
        return FAMILIES[requested]
    model_type = str(model_config.get("model_type", "")).lower()
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise UserError(f"field backbone_family: cannot tell the family of model_type '{model_type}' "
                    f"(architectures {model_config.get('architectures')}); set one of "
                    f"{', '.join(FAMILIES)}")


def hidden_size(family: BackboneFamily, model_config) -> int:
    for key in family.hidden_size_keys:
        value = getattr(model_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise UserError(f"backbone: the {family.name} config has none of {family.hidden_size_keys}")


def mask_token_id(family: BackboneFamily, tokenizer, vocab_size: int) -> int:
    """The family's declared mask id, else MDLM's last id, else the tokenizer's."""
    if family.mask_token_id is not None:
        mask = family.mask_token_id
    elif family.mask_is_last_id:
        mask = vocab_size - 1
    else:
        mask = tokenizer.mask_token_id
    if mask is None or not 0 <= mask < vocab_size:
        raise UserError(f"backbone: the {family.name} mask token id {mask} is not in the "
                        f"vocabulary of {vocab_size}")
    return mask
