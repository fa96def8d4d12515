"""Tiny stand-in for MDLM's configuration_mdlm.py (kuleshov-group/mdlm-owt on the hub)."""

from transformers import PretrainedConfig


class MDLMConfig(PretrainedConfig):
    model_type = "mdlm"

    def __init__(self, vocab_size=50258, model_length=128, hidden_dim=16, cond_dim=8, n_blocks=2,
                 n_heads=2, dropout=0.0, time_conditioning=True, **kwargs):
        self.vocab_size, self.model_length = vocab_size, model_length
        self.hidden_dim, self.cond_dim = hidden_dim, cond_dim
        self.n_blocks, self.n_heads, self.dropout = n_blocks, n_heads, dropout
        self.time_conditioning = time_conditioning
        super().__init__(**kwargs)
