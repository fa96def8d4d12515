"""Stand-in (tiny in tests, real size for the memory plan: core/standin.py)
for LLaDA's modeling_llada.py (ML-GSAI/LLaDA, GSAI-ML/LLaDA-8B-Instruct), for
tests: the real code is not installable here. Same module paths and forward signatures as the
released code: `LLaDAModelLM.model` (LLaDAModel) -> `transformer` ModuleDict {wte, emb_drop,
ln_f, blocks, ff_out}; each LLaDALlamaBlock has attn_norm, ff_norm, q_proj, k_proj, v_proj,
attn_out, ff_proj, up_proj, ff_out, computes attention in its `attention` method through
`F.scaled_dot_product_attention` (no mask, bidirectional, as released) and returns (x, cache).
Left out: rotary embeddings, caching, activation checkpointing, init schemes."""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada import LLaDAConfig


class RMSLayerNorm(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.weight = nn.Parameter(torch.ones(config.d_model))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class LLaDALlamaBlock(nn.Module):
    def __init__(self, layer_id: int, config: LLaDAConfig):
        super().__init__()
        self.layer_id, self.config = layer_id, config
        d, hidden, head_dim = config.d_model, config.mlp_hidden_size, config.d_model // config.n_heads
        qkv_bias = config.include_bias | config.include_qkv_bias
        self.attn_norm, self.ff_norm = RMSLayerNorm(config), RMSLayerNorm(config)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, config.n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, config.n_kv_heads * head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=config.include_bias)
        self.ff_proj = nn.Linear(d, hidden, bias=config.include_bias)
        self.up_proj = nn.Linear(d, hidden, bias=config.include_bias)
        self.ff_out = nn.Linear(hidden, d, bias=config.include_bias)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(0.0)

    def _scaled_dot_product_attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        if q.size(1) != k.size(1):  # grouped-query attention, as released: repeat the kv heads
            k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
            v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal)

    def attention(self, q, k, v, attention_bias=None, layer_past=None, use_cache=False):
        B, T, C = q.size()
        nh, nkv = self.config.n_heads, self.config.n_kv_heads
        q = q.view(B, T, nh, C // nh).transpose(1, 2)
        k = k.view(B, T, nkv, C // nh).transpose(1, 2)
        v = v.view(B, T, nkv, C // nh).transpose(1, 2)
        att = self._scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        att = att.transpose(1, 2).contiguous().view(B, T, C)
        return self.attn_out(att), None

    def forward(self, x, attention_bias=None, layer_past=None, use_cache=False):
        x_normed = self.attn_norm(x)
        q, k, v = self.q_proj(x_normed), self.k_proj(x_normed), self.v_proj(x_normed)
        att, cache = self.attention(q, k, v, attention_bias, layer_past=layer_past, use_cache=use_cache)
        x = x + self.dropout(att)
        og_x = x
        x = self.ff_norm(x)
        x, x_up = self.ff_proj(x), self.up_proj(x)
        x = self.ff_out(self.act(x) * x_up)
        return og_x + self.dropout(x), cache


class LLaDAOutput(NamedTuple):
    logits: torch.FloatTensor
    attn_key_values: list | None
    hidden_states: tuple | None


class LLaDAModel(nn.Module):
    def __init__(self, config: LLaDAConfig, init_params: bool = False):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size or config.vocab_size, config.d_model),
            emb_drop=nn.Dropout(0.0), ln_f=RMSLayerNorm(config)))
        self.transformer.update({"blocks": nn.ModuleList(
            LLaDALlamaBlock(i, config) for i in range(config.n_layers))})
        if not config.weight_tying:
            self.transformer.update({"ff_out": nn.Linear(
                config.d_model, config.embedding_size or config.vocab_size, bias=config.include_bias)})

    def forward(self, input_ids, input_embeddings=None, attention_mask=None, attention_bias=None,
                past_key_values=None, use_cache=False, last_logits_only=False, output_hidden_states=None):
        x = self.transformer.wte(input_ids) if input_embeddings is None else input_embeddings
        x = self.transformer.emb_drop(x)
        hidden = []
        for block in self.transformer.blocks:
            if output_hidden_states:
                hidden.append(x)
            x, _ = block(x, attention_bias=attention_bias, layer_past=None, use_cache=use_cache)
        x = self.transformer.ln_f(x)
        if output_hidden_states:
            hidden.append(x)
        if self.config.weight_tying:
            logits = F.linear(x, self.transformer.wte.weight, None)
        else:
            logits = self.transformer.ff_out(x)
        return LLaDAOutput(logits=logits, attn_key_values=None,
                           hidden_states=tuple(hidden) if output_hidden_states else None)


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock", "LLaDASequentialBlock", "LLaDALlamaBlock"]

    def __init__(self, config: LLaDAConfig, model: LLaDAModel | None = None, init_params: bool = False):
        super().__init__(config)
        self.model = model or LLaDAModel(config, init_params=init_params)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, attention_bias=None,
                past_key_values=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, cache_position=None):
        if labels is not None:
            raise NotImplementedError("LLaDA's forward computes no loss")
        out = self.model.forward(input_ids=input_ids, input_embeddings=inputs_embeds,
                                 attention_mask=attention_mask, attention_bias=attention_bias,
                                 past_key_values=past_key_values, use_cache=bool(use_cache),
                                 output_hidden_states=output_hidden_states)
        return CausalLMOutputWithPast(logits=out.logits, past_key_values=out.attn_key_values,
                                      hidden_states=out.hidden_states)
