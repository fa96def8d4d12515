"""Stand-in (tiny in tests, real size for the memory plan: core/standin.py)
for MDLM's modeling_mdlm.py (kuleshov-group/mdlm models/dit.py; the hub's
kuleshov-group/mdlm-owt), for tests: the real code is not installable here (flash-attn). Same
module paths and forward signatures as the released code: `MDLM.backbone` (DITBackbone) ->
vocab_embed, sigma_map (TimestepEmbedder), rotary_emb, `blocks[i]` (DDiTBlock: norm1, attn_qkv,
attn_out, norm2, mlp = Sequential(Linear, GELU, Linear), adaLN_modulation), output_layer
(DDitFinalLayer, conditioned on the time embedding). `MDLM.forward(input_ids, timesteps,
output_hidden_states, return_dict)`, `timesteps` being sigma (zeroed unless time_conditioning).
Attention through `F.scaled_dot_product_attention` (the released code: flash-attn varlen, no
mask). Left out: rotary application, fused dropout kernels; adaLN and output layers are
random-initialised here (released: zero) so that the output depends on input and time."""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_mdlm import MDLMConfig


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class LayerNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones([dim]))
        self.dim = dim

    def forward(self, x):
        return F.layer_norm(x.float(), [self.dim]) * self.weight[None, None, :]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class Rotary(nn.Module):  # kept for the module path; its tables are not applied here
    def forward(self, x):
        return None


class EmbeddingLayer(nn.Module):
    def __init__(self, dim, vocab_dim):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty((vocab_dim, dim)))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x):
        return self.embedding[x]


class DDiTBlock(nn.Module):
    def __init__(self, dim, n_heads, cond_dim, mlp_ratio=4, dropout=0.1):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim, bias=True), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim, bias=True))
        self.dropout2 = nn.Dropout(dropout)
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim, bias=True)

    def forward(self, x, rotary_cos_sin, c, seqlens=None):
        B, S, D = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        x_skip = x
        qkv = self.attn_qkv(modulate(self.norm1(x), shift_msa, scale_msa))
        q, k, v = qkv.view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        att = att.transpose(1, 2).reshape(B, S, D)
        x = x_skip + gate_msa * self.dropout1(self.attn_out(att))
        return x + gate_mlp * self.dropout2(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class DDitFinalLayer(nn.Module):
    def __init__(self, hidden_size, out_channels, cond_dim):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden_size, bias=True)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DITBackbone(nn.Module):
    def __init__(self, config: MDLMConfig):
        super().__init__()
        self.config = config
        self.vocab_embed = EmbeddingLayer(config.hidden_dim, config.vocab_size)
        self.sigma_map = TimestepEmbedder(config.cond_dim, config.frequency_embedding_size)
        self.rotary_emb = Rotary()
        self.blocks = nn.ModuleList(DDiTBlock(config.hidden_dim, config.n_heads, config.cond_dim,
                                              dropout=config.dropout) for _ in range(config.n_blocks))
        self.output_layer = DDitFinalLayer(config.hidden_dim, config.vocab_size, config.cond_dim)

    def forward(self, indices, sigma, output_hidden_states=False):
        if not self.config.time_conditioning:
            sigma = torch.zeros_like(sigma)
        all_hidden_states = []
        x = self.vocab_embed(indices)
        if output_hidden_states:
            all_hidden_states.append(x)
        c = F.silu(self.sigma_map(sigma))
        rotary_cos_sin = self.rotary_emb(x)
        for block in self.blocks:
            x = block(x, rotary_cos_sin, c, seqlens=None)
            if output_hidden_states:
                all_hidden_states.append(x)
        return self.output_layer(x, c), all_hidden_states


class MDLM(PreTrainedModel):
    config_class = MDLMConfig
    base_model_prefix = "mdlm"

    def __init__(self, config: MDLMConfig):
        super().__init__(config)
        self.backbone = DITBackbone(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.2)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids=None, timesteps=None, output_hidden_states=None, return_dict=None):
        logits, all_hidden_states = self.backbone(indices=input_ids, sigma=timesteps,
                                                  output_hidden_states=bool(output_hidden_states))
        if return_dict is False:
            return logits
        return MaskedLMOutput(logits=logits, hidden_states=all_hidden_states if output_hidden_states else None)
